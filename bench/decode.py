"""Decoded-output throughput of the jcodec decoders (run on the GPU machine).

    python3 bench/decode.py --out results.json            # everything (several minutes)
    python3 bench/decode.py --quick                       # the 4096 x 14336 matrix only
    python3 bench/decode.py --profile                     # one kernel launch, for ncu
    python3 bench/decode.py --skip matrix,int8 --int8-layer-variants '4,4,5,0;4,4,5,0,g1'  # see INT8_OPTIONS

Inputs are Gaussian weights (std 0.02) in BF16: a Llama-3-8B MLP matrix (4096 x 14336), a 4096 x 4096
matrix, and all seven weights of one Llama-3-8B layer decoded in one kernel launch. They are encoded once
(NumPy, one process per tensor), then decoded many times. GB/s always counts decoded BF16 output bytes
(2 B per weight) over the median time of one decode; each timed run decodes ``--rotate`` different copies
of the input (more bytes than L2 holds) at least ``--batches`` times (more, until a run lasts ~50 ms or
holds 16 GB of outputs), all enqueued back to back, and divides. Each timed row also takes one such run's
device timeline (``jax.profiler``): "device" is the GPU's span a call, from the first kernel's start to the
last one's end (no host start-up in it), "kernels" the kernels' own time. Every variant's output is compared
bit for bit with the NumPy decoder before it is timed. Baselines in the same run: an XLA elementwise pass
over the BF16 weights (2 B read + 2 B written per weight: the memory ceiling), the pure-JAX decoder under XLA,
and host zstd decode + device_put.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import time
import traceback

import numpy as np

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

# the installed package (pip install .); run it with `python -P` from the repository root
from jcodec import codecs, tensor  # noqa: E402
from jcodec.benchmark import bits_of, time_calls  # noqa: E402
from jcodec.pallas_kernels import bf16_lossless, bf16_lossless_pack, int8, rans_math as rc  # noqa: E402

MATRIX = (4096, 14336)
SQUARE = (4096, 4096)
LAYER = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
         "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
# (unroll, num_warps, coarse_bits, prefetch) of the bf16-lossless kernel (one program per 128-lane tile) to
# time on the matrix (the first of each list is the kernel's default for that launch: bf16_lossless.ONE_TENSOR /
# SEVERAL_TENSORS)
FLOAT_VARIANTS = "16,4,5,8,r1;16,4,5,0;8,4,5,0;16,4,0,8,r1"
# one launch for the whole layer: unroll 4 (each tensor adds a copy of the loop; unroll 8 compiles 4x longer)
LAYER_VARIANTS = "4,4,5,0"
# pair symbols (the converter's default for bfloat16): bf16_lossless.PAIR_ONE_TENSOR / PAIR_SEVERAL_TENSORS first
PAIR_VARIANTS = "8,4,0,8,r1"
PAIR_LAYER_VARIANTS = "4,4,5,0,r1"
INT8_VARIANTS = "16,4,0,8;16,4,5,8"  # unroll, num_warps, coarse_bits, prefetch (the launch's default first)
INT8_LAYER_VARIANT = "4,4,0,0,s1;4,4,5,0"
# Options after a variant's numbers, as a letter and a value ("4,4,5,0,g2", "16,4,5,8,r1"); absent ones
# take the kernel's default: g word_group (2 reads the words as uint32 pairs: the default for int8, not for
# bf16-lossless), r raw_early (bf16-lossless: 1 loads a block's raw bytes at the top of the block before).
# gG: word_group G; rR: raw_early; s1: the lookup by symbol (coarse_bits rans_math.BY_SYMBOL, the c field
# ignored; tables that lack the symbol tables get them before the timed calls)
FLOAT_OPTIONS, INT8_OPTIONS = {"g": 1, "r": 0, "s": 0}, {"g": 2, "s": 0}

ROWS: list[dict] = []
INTERPRET = jax.default_backend() != "gpu"  # on CPU (a dry run of this script) the kernels are interpreted


def log(*a):
    print(*a, flush=True)


def gaussian(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)


def _encode(job):
    shape, seed, codec, lanes, steps, pairs, run = job
    x = gaussian(shape, seed)
    return x, codecs.encode(x, codec, lanes=lanes, steps=steps, pairs=pairs, run=run)


def encode_all(shapes, codec, lanes, steps, seed0=0, pairs=False, run=None):
    """[(x, enc)] for each shape, one process per tensor (``pairs``: bf16-lossless with pair symbols; ``run``:
    lanes decode runs, None: the encoder's default)."""
    return encode_jobs([(s, seed0 + i, codec, lanes, steps, pairs, run) for i, s in enumerate(shapes)])


def encode_jobs(jobs):
    """[(x, enc)] for each job ``(shape, seed, codec, lanes, steps, pairs, run)``, one process each."""
    ctx = multiprocessing.get_context("spawn")  # the parent holds a CUDA context: no fork
    with cf.ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1), mp_context=ctx) as pool:
        return list(pool.map(_encode, jobs))


LAST_DISPATCH: float | None = None  # the last time_fn's median host seconds to enqueue one call (record logs it)


def time_fn(fn, inputs, reps):
    """Median seconds per call of ``fn(*inputs[i])``, over ``reps`` timed runs of calls enqueued back to back
    (``jcodec.benchmark.time_calls``: at least ``BATCHES`` rounds over the inputs, more until a run lasts ~50
    ms or holds 16 GB of outputs; it waits on the last call).

    The GPU then runs call after call while the host enqueues the next, so a run times the device (a model's
    jitted forward also launches its decodes back to back), not the host's dispatch: a Llama layer's decode
    takes 42 arrays, and waiting after every few calls left the GPU idle while they were dispatched (the pair
    layer's kernel ran 407 us under ncu while a loop that waited timed 541 us a call). Runs of 4-10 calls read
    the lone matrix 10-15 us a call slow (docs/DECODE_DESIGN.md). The host's time to enqueue one call is kept
    in LAST_DISPATCH; a row whose dispatch is near its time is host-bound."""
    global LAST_DISPATCH, LAST_CALLS, LAST_DEVICE
    t = time_calls(fn, inputs, reps, min_rounds=BATCHES)
    LAST_DISPATCH, LAST_CALLS = t.dispatch, t.calls
    if TRACE:
        LAST_DEVICE = device_times(fn, inputs, t.calls // len(inputs))
    return t.seconds, t.runs


LAST_CALLS: int | None = None  # the calls of the last time_fn's runs (record logs it)
TRACE = True  # --no-trace: time_fn also takes one run's device timeline (device_times); record logs it
LAST_DEVICE: dict | None = None
_LINES_SHOWN = False


def device_times(fn, inputs, rounds) -> dict | None:
    """One more run as time_fn's (the same calls, enqueued back to back), under ``jax.profiler.trace``: per call,
    the device's ``span`` (the first kernel's start to the last kernel's end, over the run's calls: what the
    GPU spent, gaps between kernels included, the host's start-up and final wait not) and ``kernels`` (the
    kernels' own durations, summed), in seconds, and ``launches`` (kernels a call). Tracing slows the host's
    dispatch: a row whose dispatch is near its time shows gaps here that an untraced run does not have
    (``kernels`` holds either way). None where the trace holds no GPU kernels (CPU)."""
    global _LINES_SHOWN
    import glob
    import tempfile
    from jax.profiler import ProfileData
    calls = rounds * len(inputs)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            outs = [fn(*inp) for _ in range(rounds) for inp in inputs]
            jax.block_until_ready(outs)
            del outs
        files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        if not files:
            return None
        data = ProfileData.from_file(files[0])
        events = []
        for plane in data.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            lines = list(plane.lines)
            if not _LINES_SHOWN:
                log(f"    (trace: {plane.name} lines {[ln.name for ln in lines]})")
                _LINES_SHOWN = True
            for line in lines:
                if line.name.startswith("Stream"):  # the kernels as CUPTI saw them (not the derived "XLA Ops")
                    events += [(e.start_ns, e.duration_ns) for e in line.events]
    if not events:
        return None
    start, end = min(s for s, _ in events), max(s + t for s, t in events)
    return dict(span=(end - start) / calls * 1e-9, kernels=sum(t for _, t in events) / calls * 1e-9,
                launches=len(events) / calls)


BATCHES = 4  # --batches (main sets it)


def record(group, name, seconds, n_values, **extra):
    global LAST_DISPATCH, LAST_DEVICE, LAST_CALLS
    gbs = n_values * 2 / seconds / 1e9
    calls, LAST_CALLS = LAST_CALLS, None
    dispatch, LAST_DISPATCH = LAST_DISPATCH, None
    dev, LAST_DEVICE = LAST_DEVICE, None
    per = extra.pop("per_call", 1)  # decodes a call (a call of K decodes: the row's seconds are per decode)
    if dev:
        dev = dict(device_ms=dev["span"] / per * 1e3, device_gbs=n_values * 2 * per / dev["span"] / 1e9,
                   kernel_ms=dev["kernels"] / per * 1e3, kernel_gbs=n_values * 2 * per / dev["kernels"] / 1e9,
                   launches=dev["launches"])
    row = dict(group=group, name=name, ms=seconds * 1e3, gbs_bf16_out=gbs, values=n_values,
               dispatch_ms=None if dispatch is None else dispatch * 1e3, calls_a_run=calls, **(dev or {}), **extra)
    ROWS.append(row)
    host = "" if dispatch is None else f"  (dispatch {dispatch * 1e3:.3f} ms, {calls} calls a run)"
    if dev:
        host += (f"  device {dev['device_ms']:.3f} ms {dev['device_gbs']:.1f} GB/s, kernels {dev['kernel_ms']:.3f} ms"
                 f" {dev['kernel_gbs']:.1f} GB/s ({dev['launches']:g} a call)")
    log(f"  {group:<24} {name:<44} {seconds * 1e3:9.3f} ms  {gbs:8.1f} GB/s{host}")
    return row


def temp_bytes(fn, *args):
    """Device scratch XLA allocates for ``fn`` beyond its arguments and outputs (compiled memory analysis)."""
    try:
        ma = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(ma.temp_size_in_bytes)
    except Exception as e:  # noqa: BLE001
        return f"n/a ({type(e).__name__})"


def device_cells(row, scale: float = 1.0) -> str:
    """A row's device columns for a markdown table: span and kernels, each in ms times ``scale``, and GB/s
    (empty cells where the row has no device timeline)."""
    if "device_ms" not in row:
        return " | | | "
    return (f"{row['device_ms'] * scale:.{3 if scale == 1 else 1}f} | {row['device_gbs']:.1f} | "
            f"{row['kernel_ms'] * scale:.{3 if scale == 1 else 1}f} | {row['kernel_gbs']:.1f}")


def write_rows(path) -> None:
    """All rows recorded so far, with the device and jax version, as JSON at ``path``."""
    with open(path, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=ROWS), f, indent=1, default=str)


def same_bits(out, want) -> bool:
    out = np.asarray(out)
    want = np.asarray(want)
    u = {2: np.uint16, 4: np.uint32}[want.dtype.itemsize]
    out, want = out.reshape(-1), want.reshape(-1)
    return out.shape == want.shape and np.array_equal(out.view(u), want.view(u))


def first_call_exact(fn, args, xs) -> tuple[float, bool]:
    """Seconds of ``fn(*args)``'s first call (compile included) and whether its outputs are ``xs``, bit for bit."""
    t0 = time.perf_counter()
    outs = fn(*args)
    jax.block_until_ready(outs)
    return time.perf_counter() - t0, all(same_bits(o, x) for o, x in zip(outs, xs))


def guarded(label):
    def wrap(f):
        def run(*a, **k):
            try:
                return f(*a, **k)
            except Exception:  # noqa: BLE001  (one failing part must not lose the rest of a GPU run)
                log(f"!! {label} failed:\n{traceback.format_exc()}")
                ROWS.append(dict(group=label, name="FAILED", error=traceback.format_exc()[-2000:]))
        return run
    return wrap


def parse_variants(spec: str, numbers: int, options: dict) -> list[tuple[int, ...]]:
    """``"n,n,...[,g2][,h1];..."`` -> one tuple per variant: its ``numbers`` ints, then the value of each of
    ``options`` (letter -> default, in that order; an absent one takes its default)."""
    out = []
    for part in spec.split(";"):
        fields = part.split(",")
        head, opts = fields[:numbers], dict(options)
        for f in fields[numbers:]:
            if f[:1] not in opts or not f[1:].isdigit():
                raise SystemExit(f"variant {part!r}: {f!r} must be a letter of {options!r} and a number, e.g. g2")
            opts[f[0]] = int(f[1:])
        if len(head) != numbers or not all(f.isdigit() for f in head):
            raise SystemExit(f"variant {part!r} must start with {numbers} numbers")
        out.append(tuple(int(f) for f in head) + tuple(opts.values()))
    return out


def symbol_tables(arrays, at: int, pairs: bool, on: int):
    """``arrays`` (a kernel's arguments) with the table at index ``at`` holding the symbol tables when ``on``
    (so that the kernel's table argument needs no building inside the timed call)."""
    if not on or arrays[at].shape[-1] == rc.device_table_size(pairs, by_symbol=True):
        return arrays
    table = rc.with_symbol_table(np.asarray(arrays[at]), pairs, np)
    return (*arrays[:at], jax.device_put(table), *arrays[at + 1:])


def opts_name(defaults: dict, **opts) -> str:
    """The non-default options of a variant for its row name, e.g. ' g2 h1' ('' when all are default)."""
    return "".join(f" {k}{v}" for k, v in opts.items() if v != defaults[k])


# ------------------------------------------------------------------------------------------- parts
def warm_up(seconds=3.0):
    """Keep the GPU busy for a few seconds before anything is timed: the first rows of a fresh machine
    measured up to 2x slow (the elementwise ceiling at 522 GB/s, then ~1000 once warm)."""
    a = jnp.zeros(MATRIX, jnp.bfloat16)
    ew = jax.jit(lambda a: lax_xor(a))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = ew(a)
        a.block_until_ready()


@guarded("ceiling")
def bench_ceiling(x, rotate, reps):
    n = x.size
    copies = [(jax.device_put(x),) for _ in range(rotate)]
    ew = jax.jit(lambda a: lax_xor(a))
    s, _ = time_fn(ew, copies, reps)
    record("ceiling", f"XLA elementwise pass {x.shape} (2B rd + 2B wr)", s, n, traffic_gbs=n * 4 / s / 1e9)
    cp = jax.jit(lambda a: jnp.flip(a, 0))
    s, _ = time_fn(cp, copies, reps)
    record("ceiling", f"XLA copy with rows reversed {x.shape}", s, n, traffic_gbs=n * 4 / s / 1e9)


def lax_xor(a):
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(a, jnp.uint16) ^ jnp.uint16(1), a.dtype)


@guarded("bf16-lossless matrix")
def bench_float_matrix(x, enc, rotate, reps, variants, label="matrix"):
    cts = [tensor.from_encoded(enc) for _ in range(rotate)]
    arrays = [tensor.kernel_args(ct)[0] for ct in cts]
    meta = tensor.kernel_args(cts[0])[1]
    n = x.size  # values (meta[0] counts pairs with pair symbols)
    ratio = enc.nbytes / x.nbytes
    log(f"[{label}] bf16-lossless {x.shape}: ratio {ratio:.4f} (file {enc.nbytes} B; device {cts[0].nbytes} B)")
    results = {}
    for v in variants:
        un, nw, cb, pf, g, r, sy = v
        cb = rc.BY_SYMBOL if sy else cb
        timed = [symbol_tables(a, 5, meta.pairs, sy) for a in arrays]
        fn = jax.jit(lambda *a, un=un, nw=nw, cb=cb, pf=pf, g=g, r=r: bf16_lossless.bf16_lossless_decode(
            *a, **meta._asdict(), unroll=un,
            num_warps=nw, coarse_bits=cb, prefetch=pf, word_group=g, raw_early=bool(r), interpret=INTERPRET))
        try:
            t0 = time.perf_counter()
            ok = same_bits(fn(*timed[0]), x)
            first = time.perf_counter() - t0
        except Exception:  # noqa: BLE001
            log(f"  variant {v} failed: {traceback.format_exc()[-1500:]}")
            continue
        s, runs = time_fn(fn, timed, reps)
        results[v] = s
        record(f"bf16-lossless {label}", f"pallas u{un} w{nw} c{cb} p{pf}{opts_name(FLOAT_OPTIONS, g=g, r=r, s=sy)} exact={ok}", s, n,
               ratio=ratio, exact=ok, spread_ms=[min(runs) * 1e3, max(runs) * 1e3], first_call_s=first,
               temp_bytes=temp_bytes(lambda *a: fn(*a), *timed[0]) if v == variants[0] else None)
    return results, arrays, meta, ratio


@guarded("bf16-lossless reference")
def bench_float_reference(x, arrays, meta, rotate, reps, label="matrix"):
    fn = jax.jit(lambda *a: bf16_lossless.bf16_lossless_reference(*a, **meta._asdict()))
    ok = same_bits(fn(*arrays[0]), x)
    s, _ = time_fn(fn, arrays[:2], max(3, reps // 4))
    record(f"bf16-lossless {label}", f"pure-JAX reference under XLA exact={ok}", s, meta[0], exact=ok,
           temp_bytes=temp_bytes(fn, *arrays[0]))


@guarded("zstd host")
def bench_zstd(x, reps):
    try:
        import zstandard  # noqa: F401
    except ImportError:
        log("  zstandard not installed: host zstd baseline skipped")
        return
    enc = codecs.encode(x, "zstd")
    dev = jax.devices()[0]

    def host_path():
        return jax.device_put(codecs.decode(enc), dev)

    ok = same_bits(host_path(), x)
    s, _ = time_fn(host_path, [()], max(3, reps // 4))
    record("zstd host", f"zstd decode (1 thread) + device_put {x.shape} exact={ok}", s, x.size,
           ratio=enc.nbytes / x.nbytes, exact=ok)


@guarded("bf16-lossless layer")
def bench_float_layer(layer, rotate, reps, variants, skip=frozenset(), label="layer", pack_variants=()):
    xs = [x for x, _ in layer]
    encs = [e for _, e in layer]
    n_total = sum(x.size for x in xs)
    ratio = sum(e.nbytes for e in encs) / sum(x.nbytes for x in xs)
    sets = []
    for _ in range(rotate):
        args = [tensor.kernel_args(tensor.from_encoded(e)) for e in encs]
        sets.append(tuple(a for a, _ in args))
    metas = tuple(m for _, m in args)
    log(f"[{label}] bf16-lossless, {len(xs)} tensors, {n_total} weights: ratio {ratio:.4f}")
    for v in variants:
        un, nw, cb, pf, g, r, sy = v
        cb = rc.BY_SYMBOL if sy else cb
        timed = [tuple(symbol_tables(a, 5, m.pairs, sy) for a, m in zip(st, metas)) for st in sets]
        one = jax.jit(lambda *ts, un=un, nw=nw, cb=cb, pf=pf, g=g, r=r: bf16_lossless.bf16_lossless_decode_many(
            list(ts), metas=metas, unroll=un, num_warps=nw, coarse_bits=cb, prefetch=pf,
            word_group=g, raw_early=bool(r), interpret=INTERPRET))
        first, ok = first_call_exact(one, timed[0], xs)
        if SHOW_HLO and v == variants[0]:
            show_hlo(one, timed[0])
        s, _ = time_fn(one, timed, reps)
        record(f"bf16-lossless {label}", f"pallas ONE launch u{un} w{nw} c{cb} p{pf}{opts_name(FLOAT_OPTIONS, g=g, r=r, s=sy)} exact={ok}",
               s, n_total, ratio=ratio, exact=ok, first_call_s=first,
               temp_bytes=temp_bytes(one, *timed[0]) if v == variants[0] else None)
        log(f"    (first call incl. compile {first:.1f}s)")
    if pack_variants:
        bench_pack_layer(xs, encs, rotate, reps, pack_variants, label, ratio)
    if "separate" in skip:
        return
    un, nw, cb, pf, g, r, _ = variants[0]
    sep = jax.jit(lambda *ts: [bf16_lossless.bf16_lossless_decode(*t, n=m[0], lanes=m[1], steps=m[2], dtype=m[3], carry=m[4],
                                                                  pairs=m.pairs, unroll=un, num_warps=nw, coarse_bits=cb,
                                                                  prefetch=pf, word_group=g, raw_early=bool(r), interpret=INTERPRET)
                               for t, m in zip(ts, metas)])
    s, _ = time_fn(sep, sets, reps)
    record("bf16-lossless layer", f"pallas 7 launches u{un} w{nw} c{cb} p{pf}{opts_name(FLOAT_OPTIONS, g=g, r=r)}", s, n_total)
    if "ref" in skip and "ceiling" in skip:
        return
    ref = jax.jit(lambda *ts: [bf16_lossless.bf16_lossless_reference(*t, n=m[0], lanes=m[1], steps=m[2], dtype=m[3], carry=m[4],
                                                                     pairs=m.pairs)
                               for t, m in zip(ts, metas)])
    if "ref" not in skip:
        s, _ = time_fn(ref, sets[:1], 3)
        record("bf16-lossless layer", "pure-JAX reference under XLA", s, n_total)
    if "ceiling" in skip:
        return
    copies = [tuple(jax.device_put(x) for x in xs) for _ in range(rotate)]
    ew = jax.jit(lambda *a: [lax_xor(t) for t in a])
    s, _ = time_fn(ew, copies, reps)
    record("bf16-lossless layer", "XLA elementwise pass over the layer (ceiling)", s, n_total)


def bench_pack_layer(xs, encs, rotate, reps, variants, label, ratio):
    """The layer as ONE pack (``bf16_lossless_pack``): one step loop for all its tensors, a uniform branch per step picks
    a program's output (decode_many compiles a loop per tensor, so its unroll is held to 4)."""
    n_total = sum(x.size for x in xs)
    arrays, static = tensor.pack_float([tensor.from_encoded(e) for e in encs])
    sets = [tuple(jax.device_put(a) for a in arrays) for _ in range(rotate)]
    for un, nw, cb, pf, _, r, sy in variants:
        cb = rc.BY_SYMBOL if sy else cb
        timed = [symbol_tables(a, 4, static["pairs"], sy) for a in sets]
        un = math.gcd(un, static["steps"])  # what the kernel runs (a block of steps divides the lane's steps)
        one = jax.jit(lambda *a, un=un, nw=nw, cb=cb, pf=pf, r=r: bf16_lossless_pack.bf16_lossless_decode_pack(
            *a, **static, unroll=un, num_warps=nw, coarse_bits=cb, prefetch=pf, raw_early=bool(r), interpret=INTERPRET))
        first, ok = first_call_exact(one, timed[0], xs)
        s, _ = time_fn(one, timed, reps)
        record(f"bf16-lossless {label}", f"pallas ONE pack u{un} w{nw} c{cb} p{pf}{opts_name(FLOAT_OPTIONS, r=r, s=sy)} exact={ok}", s, n_total,
               ratio=ratio, exact=ok, first_call_s=first)
        log(f"    (first call incl. compile {first:.1f}s)")


@guarded("int8 matrix")
def bench_int8(shape, rotate, reps, variants, label, steps):
    x, enc = encode_all([shape], "int8", codecs.DEFAULT_LANES, steps, seed0=11)[0]
    want = codecs.decode(enc)
    arrays = [tensor.kernel_args(tensor.from_encoded(enc))[0] for _ in range(rotate)]
    meta = tensor.kernel_args(tensor.from_encoded(enc))[1]
    ratio = enc.nbytes / x.nbytes
    log(f"[{label}] int8 {shape}: ratio {ratio:.4f} predictors {np.bincount(enc.arrays['tiles'][:, 2], minlength=3)}")
    best = None
    for un, nw, cb, pf, g, sy in variants:
        cb = rc.BY_SYMBOL if sy else cb
        timed = [symbol_tables(a, 4, False, sy) for a in arrays]
        fn = jax.jit(lambda *a, un=un, nw=nw, cb=cb, pf=pf, g=g: int8.int8_decode(
            *a, n=meta[0], rows=meta[1], cols=meta[2], lanes=meta[3], steps=meta[4], dtype=meta[5],
            predictors_used=meta[6], unroll=un, num_warps=nw, coarse_bits=cb, prefetch=pf, word_group=g,
            interpret=INTERPRET))
        ok = same_bits(fn(*timed[0]), want)
        s, _ = time_fn(fn, timed, reps)
        record(f"int8 {label}", f"pallas u{un} w{nw} c{cb} p{pf}{opts_name(INT8_OPTIONS, g=g, s=sy)} exact={ok}", s, meta[0],
               ratio=ratio, exact=ok, temp_bytes=temp_bytes(fn, *timed[0]) if best is None else None)
        best = min(best or (s, un, nw, cb, pf, g, sy), (s, un, nw, cb, pf, g, sy))
    ref = jax.jit(lambda *a: int8.int8_reference(*a, n=meta[0], rows=meta[1], cols=meta[2],
                                                 lanes=meta[3], steps=meta[4], dtype=meta[5]))
    ok = same_bits(ref(*arrays[0]), want)
    s, _ = time_fn(ref, arrays[:1], 3)
    record(f"int8 {label}", f"pure-JAX reference under XLA exact={ok}", s, meta[0], exact=ok)
    return best


_INT8_LAYER = {}  # by steps: encoded once, timed with several variants


@guarded("int8 layer")
def bench_int8_layer(rotate, reps, variant, steps):
    if steps not in _INT8_LAYER:
        _INT8_LAYER[steps] = encode_all(list(LAYER.values()), "int8", codecs.DEFAULT_LANES, steps, seed0=20)
    layer = _INT8_LAYER[steps]
    encs = [e for _, e in layer]
    wants = [codecs.decode(e) for e in encs]
    n_total = sum(x.size for x, _ in layer)
    ratio = sum(e.nbytes for e in encs) / sum(x.nbytes for x, _ in layer)
    sets = []
    for _ in range(rotate):
        args = [tensor.kernel_args(tensor.from_encoded(e)) for e in encs]
        sets.append(tuple(a for a, _ in args))
    metas = tuple(m for _, m in args)
    un, nw, cb, pf, g, sy = variant
    cb = rc.BY_SYMBOL if sy else cb
    sets = [tuple(symbol_tables(a, 4, False, sy) for a in st) for st in sets]
    log(f"[layer s{steps}] int8: ratio {ratio:.4f}")
    one = jax.jit(lambda *ts: int8.int8_decode_many(list(ts), metas=metas, unroll=un, num_warps=nw,
                                                    coarse_bits=cb, prefetch=pf, word_group=g,
                                                    interpret=INTERPRET))
    t0 = time.perf_counter()
    ok = all(same_bits(o, w) for o, w in zip(one(*sets[0]), wants))
    log(f"    (first call incl. compile and check {time.perf_counter() - t0:.1f}s)")
    s, _ = time_fn(one, sets, reps)
    record(f"int8 layer s{steps}", f"pallas ONE launch u{un} w{nw} c{cb} p{pf}{opts_name(INT8_OPTIONS, g=g, s=sy)} exact={ok}", s, n_total,
           ratio=ratio, exact=ok,
           temp_bytes=temp_bytes(one, *sets[0]))


SMOL_LAYER = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


@guarded("small layers stacked")
def bench_stacked(codec, rotate, reps, groups=(1, 3, 30)):
    """A SmolLM2-135M layer (7 small tensors, ~3.5 K lanes) decoded alone, and G copies of it stacked and
    decoded in ONE launch (what ``jcodec.load`` does for small layers): small launches are latency-bound, so
    G layers should cost about as long as one."""
    layer = encode_all(list(SMOL_LAYER.values()), codec, codecs.DEFAULT_LANES, codecs.DEFAULT_STEPS[codec], seed0=40)
    wants = [bits_of(codecs.decode(e)) for _, e in layer]
    n_layer = sum(x.size for x, _ in layer)
    for g in groups:
        sets = []
        for _ in range(rotate):
            cts = [tensor.from_encoded(e) for _, e in layer]
            sets.append(tuple(tensor.stack_layers([c] * g) if g > 1 else c for c in cts))
        fn = jax.jit(lambda *cts: tensor.decode_many(list(cts), interpret=INTERPRET))
        outs = fn(*sets[0])
        ok = all(np.array_equal(bits_of(o).reshape(g, -1), np.broadcast_to(w.reshape(1, -1), (g, w.size)))
                 for o, w in zip(outs, wants))
        del outs
        s, _ = time_fn(fn, sets, reps)
        record(f"{codec} SmolLM2 layers", f"{g} layer(s), ONE launch exact={ok}", s, g * n_layer, exact=ok)


SHOW_HLO = False  # --hlo


def show_hlo(fn, args):
    """Print the operations of ``fn``'s compiled entry computation (--hlo): whether a launch is one kernel or
    also runs copies or fusions around it, which a timed call counts and ncu's kernel duration does not."""
    text = fn.lower(*args).compile().as_text()
    lines = [line.strip() for line in text[text.index("ENTRY"):].splitlines()[1:]
             if " = " in line and " parameter(" not in line]
    log(f"    compiled entry computation, {len(lines)} operations:")
    for line in lines[:40]:
        log("      " + line[:150])


def profile_once(steps, codec="bf16-lossless", pairs=False, layer=False):
    """Encode the matrix (``layer``: the 7 tensors of a layer), decode it in one launch, once: a target for
    ``ncu -k regex:rans``. PROFILE_VARIANT: the kernel's variant, in the form of ``--variants`` or, for int8,
    ``--int8-variants`` (default: the launch's defaults, as decode.py's default rows)."""
    encoded = encode_all(list(LAYER.values()) if layer else [MATRIX], codec, codecs.DEFAULT_LANES, steps, pairs=pairs)
    arrays, metas = zip(*(tensor.kernel_args(tensor.from_encoded(e)) for _, e in encoded))
    default = (INT8_LAYER_VARIANT if layer else INT8_VARIANTS) if codec == "int8" else (
        (PAIR_LAYER_VARIANTS if layer else PAIR_VARIANTS) if pairs else (LAYER_VARIANTS if layer else FLOAT_VARIANTS))
    spec = os.environ.get("PROFILE_VARIANT") or default.split(";")[0]
    if codec == "int8":
        (un, nw, cb, pf, g, sy), = parse_variants(spec, 4, INT8_OPTIONS)
        outs = int8.int8_decode_many([symbol_tables(a, 4, False, sy) for a in arrays], metas=metas,
                                     unroll=un, num_warps=nw, coarse_bits=rc.BY_SYMBOL if sy else cb,
                                     prefetch=pf, word_group=g, interpret=INTERPRET)
        wants = [codecs.decode(e) for _, e in encoded]
    else:
        (un, nw, cb, pf, g, r, sy), = parse_variants(spec, 4, FLOAT_OPTIONS)
        outs = bf16_lossless.bf16_lossless_decode_many([symbol_tables(a, 5, pairs, sy) for a in arrays], metas=metas,
                                                       unroll=un, num_warps=nw, coarse_bits=rc.BY_SYMBOL if sy else cb,
                                                       prefetch=pf, word_group=g, raw_early=bool(r), interpret=INTERPRET)
        wants = [x for x, _ in encoded]
    log(f"profile run ({codec}{' pairs' if pairs else ''}, {'layer' if layer else 'matrix'}, {spec}) exact:",
        all(same_bits(o, w) for o, w in zip(outs, wants)))


def shrink():
    """--small: tiny shapes, for a dry run of this script on CPU."""
    global MATRIX, SQUARE, LAYER, SMOL_LAYER
    MATRIX, SQUARE = (64, 2048 + 5), (64, 512)
    LAYER = {k: (r // 256, c // 64) for k, (r, c) in LAYER.items()}
    SMOL_LAYER = {k: (r // 64, c // 8) for k, (r, c) in SMOL_LAYER.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write all rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="the 4096 x 14336 matrix only")
    ap.add_argument("--profile", action="store_true", help="one kernel launch on the matrix (for ncu)")
    ap.add_argument("--profile-codec", default="bf16-lossless", choices=["bf16-lossless", "pairs", "int8"],
                    help="the codec --profile decodes (pairs: bf16-lossless with pair symbols)")
    ap.add_argument("--profile-layer", action="store_true", help="--profile decodes a layer in one launch, not the "
                    "matrix (steps: --steps, --int8-steps' first, or --pair-steps' first)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rotate", type=int, default=3, help="input copies a timed run cycles through")
    ap.add_argument("--batches", type=int, default=4, help="times (at least) a timed run cycles through them before it "
                    "waits (calls enqueued back to back: the device's time, not the host's dispatch)")
    ap.add_argument("--small", action="store_true", help="tiny shapes: a dry run of this script on CPU")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: "
                    "matrix,layer,int8,int8layer,square,zstd,ref,ceiling,stacked,separate (ref and "
                    "ceiling cover the layer's rows too; separate: the layer in one launch per tensor)")
    ap.add_argument("--variants", help="bf16 matrix variants 'u,w,c,p[,gG][,rR];...' (default: FLOAT_VARIANTS; "
                    "gG: word_group G, r1: raw_early, see FLOAT_OPTIONS)")
    ap.add_argument("--layer-variants", help="bf16 layer variants, same form (default: LAYER_VARIANTS)")
    ap.add_argument("--int8-variants", help="int8 variants 'u,w,c,p[,gG];...' (default: INT8_VARIANTS)")
    ap.add_argument("--int8-layer-variants", help="int8 layer variants, same form (default: INT8_LAYER_VARIANT)")
    ap.add_argument("--matrix-steps", default="", help="also time the 4096 x 14336 matrix encoded with these "
                    "steps per lane (comma list; the default geometry's row is always there)")
    ap.add_argument("--steps", type=int, default=codecs.DEFAULT_STEPS["bf16-lossless"], help="steps per lane of the bf16-lossless "
                    "matrix, layer and --profile geometry (default: the encoder's)")
    ap.add_argument("--layer-steps", default="", help="also time the layer encoded with these steps per lane "
                    "(comma list)")
    ap.add_argument("--int8-steps", default=str(codecs.DEFAULT_STEPS["int8"]),
                    help="steps per lane to encode the int8 matrix and layer with (comma list)")
    ap.add_argument("--square-steps", default="1024,512,256", help="steps per lane to encode the 4096 x 4096 matrix with")
    ap.add_argument("--pair-steps", default=str(codecs.PAIR_STEPS), help="time the matrix and the layer encoded "
                    "with pair symbols (codecs.encode_pairs, the converter's default) at these steps per lane "
                    "(comma list; '' for none)")
    ap.add_argument("--pair-variants", help="variants for the pair-symbol matrix rows, same form (default: "
                    "PAIR_VARIANTS; also the layer's when --pair-layer-variants is not given)")
    ap.add_argument("--pair-layer-variants", help="variants for the pair-symbol layer rows, same form (default: "
                    "PAIR_LAYER_VARIANTS)")
    ap.add_argument("--pack-variants", default="", help="also decode the pair layer as ONE pack (bf16_lossless_pack) with these "
                    "variants, same form (g ignored)")
    ap.add_argument("--no-trace", action="store_true", help="no device timeline (jax.profiler) after each timed row")
    ap.add_argument("--hlo", action="store_true", help="print the compiled entry computation of each layer's first "
                    "variant (the operations a timed call runs)")
    args = ap.parse_args()
    global SHOW_HLO, BATCHES, TRACE
    SHOW_HLO, BATCHES, TRACE = args.hlo, args.batches, not args.no_trace
    if args.profile:
        if args.small:
            shrink()
        codec, pairs = {"int8": ("int8", False), "pairs": ("bf16-lossless", True)}.get(args.profile_codec,
                                                                                        ("bf16-lossless", False))
        steps = (int(args.int8_steps.split(",")[0]) if codec == "int8"
                 else int(args.pair_steps.split(",")[0]) if pairs else args.steps)
        return profile_once(steps, codec, pairs=pairs, layer=args.profile_layer)
    skip = set(filter(None, args.skip.split(",")))
    if args.small:
        shrink()
    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if not args.small:
        warm_up()
    def parse(spec, defaults, numbers, options):  # a flag's variants, or the defaults
        return parse_variants(spec or defaults, numbers, options)
    variants = parse(args.variants, FLOAT_VARIANTS, 4, FLOAT_OPTIONS)
    best = variants[0]
    if not {"matrix", "ceiling", "ref", "zstd"} <= skip:
        t0 = time.time()
        (x, enc), = encode_all([MATRIX], "bf16-lossless", codecs.DEFAULT_LANES, args.steps)
        log(f"encoded matrix in {time.time() - t0:.1f}s")
        if "ceiling" not in skip:
            bench_ceiling(x, args.rotate, args.reps)
        res = None if "matrix" in skip else bench_float_matrix(x, enc, args.rotate, args.reps, variants)
        best = min(res[0], key=res[0].get) if res and res[0] else variants[0]
        log(f"best bf16-lossless variant on the matrix: {best}")
        if res and "ref" not in skip:
            bench_float_reference(x, res[1], res[2], args.rotate, args.reps)
        if "zstd" not in skip:
            bench_zstd(x, args.reps)
        del x, enc, res
        for steps in [int(v) for v in args.matrix_steps.split(",") if v] if "matrix" not in skip else []:
            (x, enc), = encode_all([MATRIX], "bf16-lossless", codecs.DEFAULT_LANES, steps)
            bench_float_matrix(x, enc, args.rotate, args.reps, variants, label=f"matrix s{steps}")
            del x, enc
    if not args.quick:
        if "stacked" not in skip:
            for codec in ("bf16-lossless", "int8"):
                bench_stacked(codec, args.rotate, args.reps)
        if "square" not in skip:
            for steps in [int(v) for v in args.square_steps.split(",")]:
                (xs, es), = encode_all([SQUARE], "bf16-lossless", codecs.DEFAULT_LANES, steps, seed0=5)
                bench_float_matrix(xs, es, args.rotate, args.reps, [best], label=f"4096x4096 s{steps}")
        if "layer" not in skip:
            for i, steps in enumerate([args.steps] + [int(v) for v in args.layer_steps.split(",") if v]):
                t0 = time.time()
                layer = encode_all(list(LAYER.values()), "bf16-lossless", codecs.DEFAULT_LANES, steps, seed0=30)
                log(f"encoded layer (steps {steps}) in {time.time() - t0:.1f}s")
                lv = parse(args.layer_variants, LAYER_VARIANTS, 4, FLOAT_OPTIONS)
                bench_float_layer(layer, args.rotate, args.reps, lv, skip | ({"separate"} if i else set()),
                                  label=f"layer s{steps}")
                del layer
        for steps in [int(v) for v in args.pair_steps.split(",") if v]:
            (x, enc), = encode_all([MATRIX], "bf16-lossless", codecs.DEFAULT_LANES, steps, pairs=True)
            if "matrix" not in skip:
                bench_float_matrix(x, enc, args.rotate, args.reps, parse(args.pair_variants, PAIR_VARIANTS, 4,
                                                                         FLOAT_OPTIONS), label=f"matrix pairs s{steps}")
            del x, enc
            if "layer" not in skip:
                layer = encode_all(list(LAYER.values()), "bf16-lossless", codecs.DEFAULT_LANES, steps, seed0=30,
                                   pairs=True)
                bench_float_layer(layer, args.rotate, args.reps, parse(args.pair_layer_variants or args.pair_variants,
                                                                       PAIR_LAYER_VARIANTS, 4, FLOAT_OPTIONS),
                                  skip | {"separate", "ref", "ceiling"}, label=f"layer pairs s{steps}",
                                  pack_variants=parse(args.pack_variants, "", 4, FLOAT_OPTIONS) if args.pack_variants else ())
                del layer
        int8_steps = [int(v) for v in args.int8_steps.split(",")]
        for steps in int8_steps if "int8" not in skip else []:
            bench_int8(MATRIX, args.rotate, args.reps, parse(args.int8_variants, INT8_VARIANTS, 4, INT8_OPTIONS),
                       "matrix" if steps == codecs.DEFAULT_STEPS["int8"] else f"matrix s{steps}", steps)
        for steps in int8_steps if "int8layer" not in skip else []:
            for iv in parse(args.int8_layer_variants, INT8_LAYER_VARIANT, 4, INT8_OPTIONS):
                bench_int8_layer(args.rotate, args.reps, iv, steps)
    log("\n| group | variant | ms | GB/s (BF16 out) | device ms | GB/s | kernels ms | GB/s |\n"
        "|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        if "ms" in r:
            log(f"| {r['group']} | {r['name']} | {r['ms']:.3f} | {r['gbs_bf16_out']:.1f} | {device_cells(r)} |")
        else:
            log(f"| {r['group']} | FAILED | | | | | | |")
    if args.out:
        write_rows(args.out)


if __name__ == "__main__":
    main()
