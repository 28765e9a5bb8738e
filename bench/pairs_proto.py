"""Prototype: bf16-lossless with one rANS symbol per PAIR of exponents: the experiment that led to the codec's
pair symbols (``jcodec.codecs.encode_pairs``, session 10; bench/RESULTS.md). Kept for its kernel: the least a
pair kernel does (one tensor, no carried raw bytes), to compare the production kernel with.

Why. The bf16-lossless kernels run ~43 SASS instructions per decoded value (bench/sass.py, u4 p0), at ~57% of
issue slots (ncu, bench/results/profile_h100_s5_*): at that rate 1.2 TB/s of output is out of reach. Half the
per-value work is the rANS step itself (table gathers, state update, renormalisation), and it is paid once per
exponent. Coding the exponents of two adjacent values as ONE symbol pays it once per two values, and the two
values' raw bytes and output bits move as one uint16 load and one uint32 store.

The alphabet (the codec's): the K most frequent exponent pairs of the tensor (symbol = rank, so rare pairs sit
together at the end of the slot table), plus ESC = 255 for every other pair. An ESC is followed, in the rANS state, by the
pair's 16 bits coded as a uniform ("bypass") symbol: the decoder takes the state's low 16 bits as the pair
``e1 | e2 << 8`` and shifts a word of its stream in their place. So a lane reads up to two words in one step:
its renormalisation word, then its bypass word. On Gaussian weights (4096 x 14336, std 0.02) K = 127 costs
2.554 bits per exponent against 2.550 for single exponents, with an ESC in 0.15% of pairs.

The "patch" variant (session 11; ``encode_patched``, rows marked PATCH): ESC is an ordinary symbol (no bypass,
one word a step at most), each tile's escaped pairs are listed apart and ORed into the output after the tile's
loop, and the slot table holds two words a slot (entry, exponents) read as one 64-bit gather. A third fewer
instructions a step, but only +3.4% at u24 (and 0.0006 more of BF16): the pair kernel waits on memory
latency, not on its instructions (bench/RESULTS.md, session 11). Kept as the measured alternative.

    python -P bench/pairs_proto.py --check              # CPU: the codec's NumPy decoder <-> kernel (interpret)
    python -P bench/pairs_proto.py --sass --out /tmp/p  # CPU, pip triton: SASS instructions per step
    python3 -P bench/pairs_proto.py --bench --out r.json  # GPU: against the production kernel, side by side

Layout read by the kernel (one tensor of n bf16 values, n even; T tiles of L lanes x S pair steps): pair
``j`` (values 2j, 2j+1) lies in tile ``j // (L*S)`` at step ``(j % (L*S)) // L`` of lane ``j % L``;
``words`` uint16[W + 2] (every lane's stream, in read order, lane by lane, then 2 zero words so that a lane's
second read past its end stays in bounds), ``starts`` int32[T*L] (each lane's first word), ``states``
uint32[T*L], ``raw`` uint16[n/2] (the sign+mantissa bytes of values 2j, 2j+1), ``table`` uint32[4096 + 4096 >>
coarse] (``cum | symbol << 12 | (freq - 1) << 20``, then the coarse table), ``pairs`` uint32[256] (symbol ->
``e1 << 7 | e2 << 23``, the exponents in place in the output word).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jcodec import codecs, rans, tensor
from jcodec.pallas_kernels import rans_common as rc

ESC = rans.ESC
STATE_LOW = rans.STATE_LOW


# ------------------------------------------------------------------------------------------- the arrays
def encode(bits: np.ndarray, lanes: int, steps: int):
    """The codec's pair symbols (``jcodec.codecs.encode_pairs``) without carried raw bytes: this kernel reads
    every pair's raw bytes from ``raw``."""
    return codecs.encode_pairs(bits.view(jnp.bfloat16), lanes, steps, carry=False)


def device_arrays(enc, coarse_bits: int):
    """The prototype's layout (module docstring) of an encoded tensor."""
    a = enc.arrays
    words = np.concatenate([a["words"], np.zeros(2, np.uint16)])
    starts = rans.lane_offsets(a["counts"]).astype(np.int32)
    table = rans.packed_slot_table(a["freqs"])
    if coarse_bits:
        table = np.concatenate([table, rc.coarse_table(table, xp=np, bits=coarse_bits)])
    pairs = tensor.pair_table(a["pairs"])
    return tuple(jnp.asarray(v) for v in (words, starts, a["states"], a["raw"].view(np.uint16), table, pairs))


def encode_patched(bits: np.ndarray, lanes: int, steps: int):
    """The patch variant: ESC is an ordinary symbol of the stream (no bypass bits: a lane reads at most one
    word a step) and decodes to exponents 0; every escaped pair is listed apart, per tile, as ``pos | P << 16``
    (``pos`` its place in the tile, ``P = e1 | e2 << 8``), for the kernel to OR in after its tile's loop."""
    symbols, both, pairs = codecs.pair_symbols(bits)
    freqs = rans.normalize_freqs(np.bincount(symbols, minlength=rans.ALPHABET))
    states, counts, words = rans.encode(symbols, freqs, lanes, steps)
    tile = lanes * steps
    t = rans.num_tiles(symbols.size, lanes, steps)
    j = np.flatnonzero(symbols == ESC)
    exc = (j % tile).astype(np.uint32) | (both[j].astype(np.uint32) << 16)
    exc_start = np.searchsorted(j // tile, np.arange(t + 1)).astype(np.int32)
    _, raw = codecs.split_float(bits, "bfloat16")
    return dict(freqs=freqs, states=states, counts=counts, words=words, pairs=pairs, raw=np.ascontiguousarray(raw).reshape(-1).view(np.uint16),
                exc=exc, exc_start=exc_start, nbytes=2 * words.size + 4 * states.size + counts.size + raw.size
                + 4 * exc.size + 4 * t + 2 * 256 + 2 * 256)


def device_arrays_patched(e):
    """words, starts, states, raw, the two-word slot table (entry ``2s``: ``cum | symbol << 12 | (freq - 1) <<
    20``; ``2s + 1``: the slot's pair exponents in place, 0 for ESC), the patch list and its tile starts."""
    words = np.concatenate([e["words"], np.zeros(2, np.uint16)])
    starts = rans.lane_offsets(e["counts"]).astype(np.int32)
    packed = rans.packed_slot_table(e["freqs"])
    in_place = tensor.pair_table(e["pairs"])
    in_place[ESC] = 0
    table = np.stack([packed, in_place[(packed >> 12) & 0xFF]], axis=1).reshape(-1)
    exc = e["exc"] if e["exc"].size else np.zeros(1, np.uint32)
    return tuple(jnp.asarray(v) for v in (words, starts, e["states"], e["raw"], table, exc, e["exc_start"]))


# ------------------------------------------------------------------------------------------------- kernel
def pairs_kernel(words_ref, starts_ref, states_ref, raw_ref, table_ref, pairs_ref, *refs, m: int,
                 lanes: int, steps: int, unroll: int, coarse_bits: int, prefetch: int, patch: bool = False,
                 interpret: bool = False):
    """``patch``: ``pairs_ref`` is absent and ``refs`` starts with the patch list and its tile starts
    (``device_arrays_patched``); the table has two words a slot."""
    if patch:
        exc_ref, exc_start_ref, *refs = (pairs_ref, *refs)
    out_ref, sink_ref = (list(refs) + [None])[:2]
    t = pl.program_id(0)
    l = jnp.arange(lanes, dtype=jnp.int32)
    last = words_ref.shape[0] - 1
    x = states_ref[t * lanes + l]
    ptr = starts_ref[t * lanes + l]
    word = words_ref[ptr].astype(jnp.uint32)
    first = t * (lanes * steps) + l
    left = jnp.clip((m - first + lanes - 1) // lanes, 0, steps)  # [L] steps a lane writes

    def lookup(x):
        slot = x & rc.SLOT_MASK
        if not coarse_bits:
            return table_ref[slot.astype(jnp.int32)]
        coarse = table_ref[(slot >> coarse_bits).astype(jnp.int32) + rc.TABLE_SIZE]
        return plgpu.load(table_ref.at[slot.astype(jnp.int32)], mask=coarse == jnp.uint32(rc.MIXED), other=coarse)

    def step_patched(x, ptr, word):  # ESC is an ordinary symbol here: one word at most, no bypass
        slot = x & rc.SLOT_MASK
        # one 64-bit gather of the slot's two words ([B, 2], contiguous in its last axis), split in registers
        i = slot.astype(jnp.int32)[:, None] * 2 + jnp.arange(2, dtype=jnp.int32)[None, :]
        e, exps = jnp.unstack(table_ref[i], axis=1)
        x = ((e >> 20) + 1) * (x >> 12) + slot - (e & rc.SLOT_MASK)
        need = x < STATE_LOW
        x = jnp.where(need, (x << 16) | word, x)
        ptr = ptr + need.astype(jnp.int32)
        word = plgpu.load(words_ref.at[jnp.minimum(ptr, last)], mask=need,
                          other=word.astype(jnp.uint16)).astype(jnp.uint32)
        return exps, x, ptr, word

    def step(x, ptr, word):
        if patch:
            return step_patched(x, ptr, word)
        e = lookup(x)
        sym = (e >> 12) & 0xFF
        x = ((e >> 20) + 1) * (x >> 12) + (x & rc.SLOT_MASK) - (e & rc.SLOT_MASK)
        need = x < STATE_LOW
        x = jnp.where(need, (x << 16) | word, x)
        esc = sym == ESC
        # the bypass word: the held word if no renormalisation word was taken, else the one after it
        w2 = plgpu.load(words_ref.at[jnp.minimum(ptr + 1, last)], mask=esc & need,
                        other=word.astype(jnp.uint16)).astype(jnp.uint32)
        pay = x & 0xFFFF
        x = jnp.where(esc, (x & jnp.uint32(0xFFFF0000)) | w2, x)
        adv = need.astype(jnp.int32) + esc.astype(jnp.int32)
        ptr = ptr + adv
        word = plgpu.load(words_ref.at[jnp.minimum(ptr, last)], mask=adv > 0,
                          other=word.astype(jnp.uint16)).astype(jnp.uint32)
        spread = (pay & 0xFF) | ((pay & 0xFF00) << 8)
        exps = jnp.where(esc, spread << 7, pairs_ref[sym.astype(jnp.int32)])
        return exps, x, ptr, word

    def read_raw(k, ok):  # [L] uint32: the raw bytes of step k's pair (masked past the end)
        return plgpu.load(raw_ref.at[first + k * lanes], mask=ok, other=0).astype(jnp.uint32)

    def block(b, carry):
        # the next block's raw bytes are loaded at the top of this one (the loop head waits for every load in
        # flight, so a load must be issued a block before its use); with `prefetch`, lanes within that many
        # words of their next 32-byte sector of words touch it now and fold it into a sink at the end
        x, ptr, word, sink, raws, left = carry
        next_raws = [read_raw((b + 1) * unroll + u, unroll + u < left) for u in range(unroll)]
        touched = None
        if prefetch:
            ahead = ptr + prefetch
            near = (ahead >> 4) != (ptr >> 4)
            touched = plgpu.load(words_ref.at[jnp.minimum(ahead, last)], mask=near, other=0).astype(jnp.uint32)
        for u in range(unroll):
            k = b * unroll + u
            exps, x, ptr, word = step(x, ptr, word)
            r = raws[u]
            spread = (r & 0xFF) | ((r & 0xFF00) << 8)
            bits = (spread & 0x007F007F) | ((spread & 0x00800080) << 8) | exps
            plgpu.store(out_ref.at[first + k * lanes], bits, mask=u < left)
        if prefetch:
            sink = sink ^ touched
        return x, ptr, word, sink, tuple(next_raws), left - unroll

    raws = tuple(read_raw(u, u < left) for u in range(unroll))
    _, _, _, sink, _, _ = lax.fori_loop(0, steps // unroll, block, (x, ptr, word, jnp.zeros_like(x), raws, left))
    if prefetch:
        plgpu.store(sink_ref.at[t * lanes + l], sink)
    if patch:  # the tile's escaped pairs: OR their exponents into what the loop wrote (other threads' stores)
        if not interpret:  # (interpret mode runs a program's lanes as one array: nothing to wait for)
            plgpu.debug_barrier()
        lo, hi = exc_start_ref[t], exc_start_ref[t + 1]

        def fix(i, c):
            k = lo + i * lanes + l
            ok = k < hi
            e = plgpu.load(exc_ref.at[jnp.where(ok, k, 0)], mask=ok, other=0)
            at = jnp.where(ok, t * (lanes * steps) + (e & 0xFFFF).astype(jnp.int32), 0)
            cur = plgpu.load(out_ref.at[at], mask=ok, other=0)
            plgpu.store(out_ref.at[at], cur | rc.exponents_in_place(e >> 16), mask=ok)
            return c

        lax.fori_loop(0, (hi - lo + lanes - 1) // lanes, fix, 0)


@functools.partial(jax.jit, static_argnames=["n", "lanes", "steps", "unroll", "num_warps", "coarse_bits",
                                             "prefetch", "interpret"])
def pairs_decode(words, starts, states, raw, table, pairs, *extra, n: int, lanes: int, steps: int, unroll: int = 4,
                 num_warps: int = 4, coarse_bits: int = 0, prefetch: int = 0, interpret: bool = False):
    """``extra``: the patch variant's tile starts (``pairs`` is then its patch list; ``device_arrays_patched``)."""
    m = n // 2
    if steps % unroll:
        raise ValueError(f"{steps=} must be a multiple of {unroll=}")
    if extra and coarse_bits:
        raise ValueError("the patch variant reads the two-word slot table only (coarse_bits=0)")
    kernel = functools.partial(pairs_kernel, m=m, lanes=lanes, steps=steps, unroll=unroll, coarse_bits=coarse_bits,
                               prefetch=prefetch, patch=bool(extra), interpret=interpret)
    shapes = [jax.ShapeDtypeStruct((m,), jnp.uint32)]
    if prefetch:
        shapes.append(jax.ShapeDtypeStruct(states.shape, jnp.uint32))
    out = pl.pallas_call(
        kernel, out_shape=shapes, grid=(states.shape[0] // lanes,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1), interpret=interpret,
        name=f"rans_pairs_u{unroll}_w{num_warps}_c{coarse_bits}_p{prefetch}" + ("_patch" if extra else ""),
    )(words, starts, states, raw, table, pairs, *extra)
    return lax.bitcast_convert_type(out[0], jnp.uint16).reshape(-1)


# ------------------------------------------------------------------------------------------------- modes
def gaussian_bits(shape, seed=0, edge=True) -> np.ndarray:
    x = (np.random.default_rng(seed).standard_normal(shape, np.float32) * 0.02).astype(jnp.bfloat16)
    bits = np.asarray(x).view(np.uint16).reshape(-1).copy()
    if edge:  # edge values in a few places: NaN, +-Inf, a subnormal, +-0, the largest negative subnormal
        edges = [0x7FC0, 0xFFC0, 0x7F80, 0xFF80, 0x0001, 0x8000, 0x0000, 0x807F]
        bits[:min(8, bits.size)] = edges[:min(8, bits.size)]
    return bits


def check(a):
    """CPU: the prototype kernel (interpret mode) against the codec's NumPy decoder, escapes included."""
    rng = np.random.default_rng(1)
    for shape, lanes, steps in [((37, 130), 32, 8), ((64, 256), 64, 16), ((3, 1000), 32, 24), ((1, 2), 32, 8)]:
        bits = gaussian_bits(shape, seed=int(rng.integers(1 << 30)))
        if shape == (3, 1000):
            bits[1000:2000] = rng.integers(0, 1 << 16, 1000)  # incompressible stretch: many escapes
        enc = encode(bits, lanes, steps)
        assert np.array_equal(np.asarray(codecs.decode(enc)).view(np.uint16).reshape(-1), bits), shape
        for cb, pf in ((0, 0), (5, 8)):
            got = np.asarray(pairs_decode(*device_arrays(enc, cb), n=bits.size, lanes=lanes, steps=steps,
                                          unroll=4, coarse_bits=cb, prefetch=pf, interpret=True))
            assert np.array_equal(got, bits), (shape, cb)
        e = encode_patched(bits, lanes, steps)
        got = np.asarray(pairs_decode(*device_arrays_patched(e), n=bits.size, lanes=lanes, steps=steps, unroll=4,
                                      interpret=True))
        assert np.array_equal(got, bits), (shape, "patch")
        escapes = int(np.sum(codecs.pair_symbols(bits)[0] == ESC))
        print(f"ok {shape} lanes={lanes} steps={steps} words={enc.arrays['words'].size} escaped pairs={escapes}")


def sass(a):
    import triton
    from triton.backends.compiler import GPUTarget
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sass as sass_tool
    sass_tool.capture_modules()
    bits = gaussian_bits((256, 4096))
    enc = encode(bits, 128, a.steps)
    patched = device_arrays_patched(encode_patched(bits, 128, a.steps))
    for (u, w, cb, pf), patch in [(v, False) for v in variants(a)] + [(v, True) for v in variants(a) if not v[2]]:
        args = patched if patch else device_arrays(enc, cb)
        f = functools.partial(pairs_decode, n=bits.size, lanes=128, steps=a.steps, unroll=u, num_warps=w,
                              coarse_bits=cb, prefetch=pf)
        jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"p_u{u}_c{cb}_p{pf}{'_patch' if patch else ''}.ttir")
        with open(path, "w") as fh:
            fh.write(sass_tool.MODULES[-1])
        compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=w, num_stages=1))
        with open(path.replace(".ttir", ".sass"), "w") as fh:
            fh.write(compiled.asm["sass"])
        info = sass_tool.summarise(compiled.asm["sass"], u)
        print(f"pairs u{u} w{w} c{cb} p{pf}{' patch' if patch else ''}: shared={compiled.metadata.shared} {info} "
              f"per_value={info['per_step'] / 2:.1f}")


def bench(a):
    """On the GPU: the pair kernel against the production bf16-lossless kernel on the same tensor(s)."""
    from jcodec.pallas_kernels import rans_float
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import decode as decode_bench
    rows = []

    def time_fn(fn, inputs, reps):
        return decode_bench.time_fn(fn, inputs, reps)[0]

    def row(name, s, n, ratio=None):
        rows.append(dict(name=name, ms=s * 1e3, gbs=n * 2 / s / 1e9, ratio=ratio))
        print(f"{name:58s} {s * 1e3:8.3f} ms {n * 2 / s / 1e9:8.1f} GB/s" + (f"  ratio {ratio:.4f}" if ratio else ""),
              flush=True)

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 3:  # warm the GPU up
        jnp.ones((4096, 4096)).sum().block_until_ready()
    for label, shape in [("matrix", (4096, 14336)), ("layer-sized", (4096, 4096 * 2 + 1024 * 2 + 14336 * 3))]:
        bits = gaussian_bits(shape, edge=False)
        n = bits.size
        xb = jnp.asarray(bits).view(jnp.bfloat16)
        ceil = [(xb + 0,) for _ in range(a.rotate)]
        ew = jax.jit(lambda v: lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.uint16) ^ jnp.uint16(1),
                                                        jnp.bfloat16))
        row(f"{label}: XLA elementwise pass (ceiling)", time_fn(ew, ceil, a.reps), n)
        # production kernel, one launch over the whole tensor (the layer-sized tensor stands in for a layer)
        enc = codecs.encode(bits.view(jnp.bfloat16).reshape(shape), "bf16-lossless", steps=240)
        cts = [tensor.from_encoded(enc) for _ in range(a.rotate)]
        args = [tensor.kernel_args(ct)[0] for ct in cts]
        meta = tensor.kernel_args(cts[0])[1]
        for u, p, r in [(16, 8, 1), (4, 0, 0)]:
            fn = jax.jit(lambda *v, u=u, p=p, r=r: rans_float.rans_float_decode(
                *v, n=meta[0], lanes=meta[1], steps=meta[2], dtype=meta[3], carry=meta[4], unroll=u, prefetch=p,
                raw_early=bool(r)))
            ok = np.array_equal(np.asarray(fn(*args[0])).view(np.uint16).reshape(-1), bits)
            row(f"{label}: production 240 steps u{u} p{p} r{r} {'ok' if ok else 'WRONG'}", time_fn(fn, args, a.reps),
                n, enc.nbytes / (2 * n))
        del cts, args
        for steps in [int(s) for s in a.pair_steps.split(",")]:
            encp = encode(bits, 128, steps)
            ratio = encp.nbytes / (2 * n)
            dev = [device_arrays(encp, 0) for _ in range(a.rotate)]
            for u, w, cb, pf in variants(a):
                devc = dev if cb == 0 else [device_arrays(encp, cb) for _ in range(a.rotate)]
                fn = jax.jit(functools.partial(pairs_decode, n=n, lanes=128, steps=steps, unroll=u, num_warps=w,
                                               coarse_bits=cb, prefetch=pf))
                ok = np.array_equal(np.asarray(fn(*devc[0])), bits)
                row(f"{label}: pairs {steps} steps u{u} w{w} c{cb} p{pf} {'ok' if ok else 'WRONG'}",
                    time_fn(fn, devc, a.reps), n, ratio)
            del dev
            enc_patch = encode_patched(bits, 128, steps)
            ratio = enc_patch["nbytes"] / (2 * n)
            dev = [device_arrays_patched(enc_patch) for _ in range(a.rotate)]
            for u, w, cb, pf in variants(a):
                if cb:
                    continue
                fn = jax.jit(functools.partial(pairs_decode, n=n, lanes=128, steps=steps, unroll=u, num_warps=w,
                                               prefetch=pf))
                ok = np.array_equal(np.asarray(fn(*dev[0])), bits)
                row(f"{label}: pairs {steps} steps u{u} w{w} c0 p{pf} PATCH {'ok' if ok else 'WRONG'}",
                    time_fn(fn, dev, a.reps), n, ratio)
            del dev
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(dict(rows=rows, device=str(jax.devices()[0]), jax=jax.__version__), fh, indent=1)


def profile(a):
    """One launch of each kernel on the layer-sized tensor, for ncu (-k regex:rans): production u4 p0, then
    the pair kernel for each --variants entry at the first --pair-steps."""
    from jcodec.pallas_kernels import rans_float
    shape = (4096, 4096 * 2 + 1024 * 2 + 14336 * 3) if a.profile == "layer" else (4096, 14336)
    bits = gaussian_bits(shape, edge=False)
    enc = codecs.encode(bits.view(jnp.bfloat16).reshape(shape), "bf16-lossless", steps=240)
    args, meta = tensor.kernel_args(tensor.from_encoded(enc))
    for u, p, r in [(4, 0, 0), (16, 8, 1)]:
        out = rans_float.rans_float_decode(*args, n=meta[0], lanes=meta[1], steps=meta[2], dtype=meta[3],
                                           carry=meta[4], unroll=u, prefetch=p, raw_early=bool(r))
        print(f"production u{u} p{p} r{r}", np.array_equal(np.asarray(out).view(np.uint16).reshape(-1), bits))
    steps = int(a.pair_steps.split(",")[0])
    encp = encode(bits, 128, steps)
    for u, w, cb, pf in variants(a):
        out = pairs_decode(*device_arrays(encp, cb), n=bits.size, lanes=128, steps=steps, unroll=u, num_warps=w,
                           coarse_bits=cb, prefetch=pf)
        print(f"pairs {steps} u{u} w{w} c{cb} p{pf}", np.array_equal(np.asarray(out), bits))
    patched = device_arrays_patched(encode_patched(bits, 128, steps))
    for u, w, cb, pf in variants(a):
        if not cb:
            out = pairs_decode(*patched, n=bits.size, lanes=128, steps=steps, unroll=u, num_warps=w, prefetch=pf)
            print(f"pairs {steps} u{u} w{w} c0 p{pf} patch", np.array_equal(np.asarray(out), bits))


def variants(a):
    """--variants as (unroll, warps, coarse_bits, prefetch) tuples ('u,w,c[,p];...')."""
    out = []
    for v in a.variants.split(";"):
        nums = [int(x) for x in v.split(",")]
        out.append(tuple(nums + [0] * (4 - len(nums))))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--profile", choices=("layer", "matrix"), help="one launch of each kernel, for ncu")
    ap.add_argument("--steps", type=int, default=120, help="pair steps per lane (--sass)")
    ap.add_argument("--pair-steps", default="120,240", help="pair steps per lane (--bench)")
    ap.add_argument("--variants", default="4,4,0;4,4,5;8,4,0", help="'unroll,warps,coarse_bits[,prefetch];...'")
    ap.add_argument("--rotate", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.check:
        check(a)
    if a.sass:
        sass(a)
    if a.bench:
        bench(a)
    if a.profile:
        profile(a)


if __name__ == "__main__":
    main()
