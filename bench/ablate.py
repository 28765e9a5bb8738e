"""Where the pair layer's time goes: the kernel timed with one kind of memory access taken out at a time.

    python3 -P bench/ablate.py --out ablate.json            # on the GPU machine (a few minutes)
    python3 -P bench/ablate.py --small                      # a dry run on CPU (interpret mode)

The layer (7 Llama-3-8B tensors, pair symbols, the converter's default geometry) is decoded in one launch at
the default options (``rans_float.PAIR_SEVERAL_TENSORS``, or ``--variant``). Each ablation replaces one access of the step loop
with arithmetic on what the lane already holds, so that the rest of the loop runs as before:

- ``no_table``: the slot lookup (coarse table, then the slot table) -> an entry computed from the slot:
  64 slots a symbol (6 bits a step, ~0.38 words: pair symbols code ~5.3 bits a step);
- ``no_words``: the word loads (renormalisation and ESC) -> a value made from the read position;
- ``no_pair``: the pair-table load -> the symbol shifted in place;
- ``no_raw``: the raw-byte loads -> the raw position's low bits;
- ``no_loads``: all four (what is left: the arithmetic and the stores);
- ``no_table_hints``, ``no_hints`` (exact, not ablations): the tables' loads without their evict-last cache hint;
  also the raw loads and output stores without their evict-first one.

The outputs of an ablation are not the tensor (only ``base`` is checked bit for bit); their times say what each
access costs in the loop as it is. ``--waves``: the base kernel on a subset of each tensor's tiles, so that the
launch has whole waves of programs (132 SMs x 16 programs on the H100) against the full 3.84: what the last,
partial wave costs. ``--runs 1,4``: the layer encoded with each run length (``jcodec.rans.lane_positions``; 1 is
format version 3's layout), timed side by side in one run; ``--steps 121,105``: the same with steps per lane
(a launch's programs are whole waves of 132 x 16 when their count is a multiple of 2112); ``--compare
'4,4,5,0,r1;4,4,5,0,r1,g2'``: launch variants of the default layer, the same way.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import decode as bench  # noqa: E402  (bench/decode.py: encoding, timing and the rows' format)

from jcodec import codecs, tensor  # noqa: E402
from jcodec.rans import num_tiles  # noqa: E402
from jcodec.pallas_kernels import rans_common as rc, rans_float  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

ORIGINAL = dict(lookup=rans_float.lookup, lanes_step=rans_float.lanes_step, load_raw=rans_float.load_raw,
                STREAM=rans_float.STREAM)


def lookup_alu(table_ref, x, coarse_bits, base=0, hints=True):
    """no table: slot s -> symbol s >> 6, cum s & ~63, freq 64 (a valid step: the state keeps its range)."""
    slot = x & rc.SLOT_MASK
    return (slot & jnp.uint32(0xFC0)) | ((slot >> 6) << 12) | jnp.uint32(63 << 20), None


def pair_step(no_words: bool, no_pair: bool):
    """``rans_float.lanes_step`` for pair symbols, with its word loads and/or its pair-table load replaced."""
    def lanes_step(words_ref, table_ref, lane_state, coarse_bits, table_base=0, pair_base=None, hints=True, **_):
        assert pair_base is not None, "the ablations are of the pair-symbol step"
        x, ptr, word, sink = lane_state
        last = words_ref.shape[0] - 1
        sym, x = rc.rans_step(x, *rans_float.lookup(table_ref, x, coarse_bits, table_base, hints))
        x, need = rc.renormalise(x, word)
        esc = sym == rc.ESC
        at = ptr + need.astype(jnp.int32)
        if no_words:
            second = word
        else:
            second = plgpu.load(words_ref.at[jnp.minimum(at, last)], mask=esc, other=0).astype(jnp.uint32)
        payload, escaped = rc.bypass(x, second)
        x = jnp.where(esc, escaped, x)
        ptr = at + esc.astype(jnp.int32)
        if no_words:
            word = (ptr.astype(jnp.uint32) * jnp.uint32(40503)) & jnp.uint32(0xFFFF)
        else:
            word = plgpu.load(words_ref.at[jnp.minimum(ptr, last)], mask=need | esc,
                              other=word.astype(jnp.uint16)).astype(jnp.uint32)
        if no_pair:
            pair = sym << 7
        else:
            pair = plgpu.load(table_ref.at[sym.astype(jnp.int32) + pair_base])
        return jnp.where(esc, rc.exponents_in_place(payload), pair), (x, ptr, word, sink)
    return lanes_step


def lookup_unhinted(table_ref, x, coarse_bits, base=0, hints=True):
    """The slot lookup without its evict-last cache hint (each hinted load recomputes its policy: 5 uniform
    instructions a step in the SASS)."""
    return ORIGINAL["lookup"](table_ref, x, coarse_bits, base, hints=False)


def raw_alu(raw_ref, i, ok, rb):
    return jnp.where(ok, i.astype(jnp.uint32) & jnp.uint32(0xFFFF), jnp.uint32(0))


ABLATIONS = {
    "base": {},
    "no_table": dict(lookup=lookup_alu),
    "no_words": dict(lanes_step=pair_step(True, False)),
    "no_pair": dict(lanes_step=pair_step(False, True)),
    "no_raw": dict(load_raw=raw_alu),
    "no_table_no_words": dict(lookup=lookup_alu, lanes_step=pair_step(True, False)),
    "no_loads": dict(lookup=lookup_alu, lanes_step=pair_step(True, True), load_raw=raw_alu),
    # not ablations: the loads as they are, without cache hints (tables' evict-last; raw and outputs' evict-first)
    "no_table_hints": dict(lookup=lookup_unhinted),
    "no_hints": dict(lookup=lookup_unhinted, STREAM={}),
}


def patch(name: str) -> None:
    for attr, fn in {**ORIGINAL, **ABLATIONS[name]}.items():
        setattr(rans_float, attr, fn)
    jax.clear_caches()  # the jitted launch must be traced again with the patched step


def wave_tiles(metas, programs: int):
    """Per tensor the first tiles (int32) of a subset of ``programs`` tiles in all, in proportion to its tiles."""
    tiles = [num_tiles(*m[:3]) for m in metas]
    if not len(tiles) <= programs <= sum(tiles):
        raise SystemExit(f"--waves {programs}: must be between {len(tiles)} (a tile a tensor) and {sum(tiles)}")
    share = [max(1, int(t * programs / sum(tiles))) for t in tiles]
    share[int(np.argmax(tiles))] += programs - sum(share)
    return [jnp.arange(s, dtype=jnp.int32) for s in share]


def time_runs(args, opts, runs, n_total):
    """The layer encoded with lanes decoding runs of each length in ``runs`` (1: format version 3's layout), timed
    side by side: each in turn, then again in reverse order."""
    geometries = []
    for run in runs:
        steps = codecs.PAIR_STEPS - 1
        while (steps - 1) % run:  # (one carried step a lane)
            steps += 1
        geometries.append((steps, run))
    time_geometries(args, opts, geometries, n_total)


def time_geometries(args, opts, geometries, n_total):
    """The layer encoded at each ``(steps, run)`` (run None: the encoder's default), timed side by side: each in
    turn, then again in reverse order."""
    layers = {}
    for steps, run in geometries:
        layer = bench.encode_all(list(bench.LAYER.values()), "bf16-lossless", codecs.DEFAULT_LANES, steps, seed0=30,
                                 pairs=True, run=run)
        run = layer[0][1].record.get("run", 1)
        ratio = sum(e.nbytes for _, e in layer) / sum(x.nbytes for x, _ in layer)
        sets = [[tensor.kernel_args(tensor.from_encoded(e)) for _, e in layer] for _ in range(args.rotate)]
        layers[steps, run] = (ratio, [x for x, _ in layer], [tuple(a for a, _ in one) for one in sets],
                              tuple(m for _, m in sets[0]))
    for steps, run in list(layers) + list(layers)[::-1]:
        ratio, xs, sets, metas = layers[steps, run]
        fn = jax.jit(lambda *ts, metas=metas: rans_float.rans_float_decode_many(list(ts), metas=metas,
                                                                                interpret=bench.INTERPRET, **opts))
        exact = all(bench.same_bits(o, x) for o, x in zip(fn(*sets[0]), xs))
        s, _ = bench.time_fn(fn, sets, args.reps)
        programs = sum(num_tiles(*m[:3]) for m in metas)
        bench.record("ablate", f"runs of {run}, {steps} steps, {programs} programs, ratio {ratio:.4f} exact={exact}", s,
                     n_total, us=s * 1e6, run=run, steps=steps, programs=programs, ratio=ratio, exact=exact)


def variant_options(spec: str) -> dict:
    """Launch options from a variant ``'u,w,c,p[,gG][,rR]'`` (bench/decode.py's form)."""
    (un, nw, cb, pf, g, r, _), = bench.parse_variants(spec, 4, bench.FLOAT_OPTIONS)
    return dict(unroll=un, num_warps=nw, coarse_bits=cb, prefetch=pf, word_group=g, raw_early=bool(r))


def time_variants(specs, sets, metas, xs, n_total, reps):
    """The layer at each launch variant in turn, then again in reverse order (side by side in one run)."""
    for spec in specs + specs[::-1]:
        opts = variant_options(spec)
        fn = jax.jit(lambda *ts, opts=opts: rans_float.rans_float_decode_many(list(ts), metas=metas,
                                                                              interpret=bench.INTERPRET, **opts))
        exact = all(bench.same_bits(o, x) for o, x in zip(fn(*sets[0]), xs))
        s, _ = bench.time_fn(fn, sets, reps)
        bench.record("ablate", f"variant {spec} exact={exact}", s, n_total, us=s * 1e6, variant=spec, exact=exact)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--rotate", type=int, default=3)
    ap.add_argument("--only", default=",".join(ABLATIONS), help="comma list of ablations (base is run first and last)")
    ap.add_argument("--waves", default="", help="comma list of program counts for the wave rows (e.g. 4224,6336)")
    ap.add_argument("--variant", help="launch options 'u,w,c,p[,gG][,rR]' as bench/decode.py takes them (default: the "
                    "launch's own)")
    ap.add_argument("--runs", default="", help="comma list of run lengths: the layer encoded with each (at the "
                    "smallest steps >= codecs.PAIR_STEPS - 1 that allow it), timed in turn, twice")
    ap.add_argument("--compare", default="", help="';'-separated launch variants 'u,w,c,p[,gG][,rR]' timed in turn, "
                    "then in reverse order (e.g. '4,4,5,0,r1;4,4,5,0,r1,g2')")
    ap.add_argument("--steps", default="", help="comma list of steps per lane: the layer encoded with each (runs: "
                    "the encoder's default), timed in turn, then in reverse order")
    ap.add_argument("--small", action="store_true", help="tiny shapes, interpret mode: a dry run on CPU")
    args = ap.parse_args()
    bench.start_script(args.small)
    log = bench.log
    if not args.small:
        bench.warm_up()
    t0 = time.time()
    layer = bench.encode_all(list(bench.LAYER.values()), "bf16-lossless", codecs.DEFAULT_LANES, codecs.PAIR_STEPS,
                             seed0=30, pairs=True)
    xs = [x for x, _ in layer]
    n_total = sum(x.size for x in xs)
    args_sets = [[tensor.kernel_args(tensor.from_encoded(e)) for _, e in layer] for _ in range(args.rotate)]
    sets = [tuple(a for a, _ in one) for one in args_sets]
    metas = tuple(m for _, m in args_sets[0])
    programs = sum(num_tiles(*m[:3]) for m in metas)
    log(f"pair layer: {len(xs)} tensors, {n_total} weights, {programs} programs; encoded in {time.time() - t0:.1f}s")

    waves = [(p, wave_tiles(metas, p)) for p in [int(v) for v in args.waves.split(",") if v]]  # checked before any timing
    opts = {}
    if args.variant:
        opts = variant_options(args.variant)
    log(f"launch options: {opts or 'the defaults'}")

    def run(name, tiles=None, label=None):
        patch(name)
        fn = jax.jit(lambda *ts: rans_float.rans_float_decode_many(list(ts), metas=metas, tiles=tiles,
                                                                    interpret=bench.INTERPRET, **opts))
        t1 = time.perf_counter()
        outs = fn(*sets[0])
        jax.block_until_ready(outs)
        first = time.perf_counter() - t1
        exact = None if tiles is not None else all(bench.same_bits(o, x) for o, x in zip(outs, xs))
        s, _ = bench.time_fn(fn, sets, args.reps)
        values = n_total if tiles is None else sum(int(t.shape[0]) * m[1] * m[2] * 2 for t, m in zip(tiles, metas))
        bench.record("ablate", f"{label or name} exact={exact}", s, values, us=s * 1e6, first_call_s=first, exact=exact)

    names = [n for n in args.only.split(",") if n]
    for name in ["base"] + [n for n in names if n != "base"]:
        bench.guarded(f"ablate {name}")(run)(name)
    for p, tiles in waves:
        bench.guarded(f"waves {p}")(run)("base", tiles, f"base on {p} of {programs} programs")
    if args.compare:
        bench.guarded("variants")(time_variants)(args.compare.split(";"), sets, metas, xs, n_total, args.reps)
    if args.steps:
        bench.guarded("steps")(time_geometries)(args, opts, [(int(v), None) for v in args.steps.split(",")], n_total)
    if args.runs:
        bench.guarded("runs")(time_runs)(args, opts, [int(v) for v in args.runs.split(",")], n_total)
    bench.guarded("ablate base (again)")(run)("base", None, "base again")
    patch("base")
    if args.out:
        bench.write_rows(args.out)


if __name__ == "__main__":
    main()
