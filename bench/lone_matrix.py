"""The lone 4096 x 14336 pair matrix (the peers' shape): where its time goes beyond the kernel's own.

    python3 -P bench/lone_matrix.py --out lone.json          # on the GPU machine (a few minutes)
    python3 -P bench/lone_matrix.py --small                  # a dry run on CPU (interpret mode)

Session 17's host-timed rows put this matrix at 1019.9-1140.4 GB/s, under a layer decoded in one launch,
though it is the same kernel. Each suspect is timed here side by side with the ceiling (an XLA elementwise
pass over the BF16 matrix), and each row five ways: decode.py's host median, the device timeline's span and
kernels, the slope between short and long runs, and one run waiting on its last call.

- **per call**: ``--per-jit 1,8`` times K decodes of K different copies inside ONE jitted function (as a
  model's forward runs its decodes) and divides by K: what is left between K = 1 and K = 8 is what a call
  costs around its kernel.
- **the last wave**: 2112 programs (132 SMs x 16) run at once on the H100 when a kernel holds 32 registers.
  ``--steps`` encodes the matrix at each steps per lane (the format's field: any file may use it) and times
  them in turn, then in reverse order.

Session 18 found neither: the timed runs were too short (bench/RESULTS.md). Every row's output is compared
bit for bit with the matrix before it is timed. GB/s counts BF16 output.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import decode as bench  # noqa: E402  (bench/decode.py: encoding, timing and the rows' format)

from jcodec import codecs, tensor  # noqa: E402
from jcodec.pallas_kernels import rans_float  # noqa: E402
from jcodec.rans import num_tiles  # noqa: E402

SLOTS = 132 * 16  # programs resident at once on the H100 (132 SMs, 16 programs of 4 warps each)


def encode_each(steps_list):
    """{steps: (x, enc)}: the matrix (one seed) encoded with pair symbols at each steps, one process each."""
    jobs = [(bench.MATRIX, 0, "bf16-lossless", codecs.DEFAULT_LANES, s, True, None) for s in steps_list]
    return dict(zip(steps_list, bench.encode_jobs(jobs)))


def input_sets(arrays, k):
    """The input sets a timed run cycles through, K arrays each: two sets of one for K = 1 (more bytes than L2
    holds), else the copies K at a time."""
    if k == 1:
        return [(a,) for a in arrays[:2]]
    return [tuple(arrays[i:i + k]) for i in range(0, len(arrays) - k + 1, k)]


def k_decodes(meta, opts, k):
    """One jitted function decoding ``k`` different copies (distinct buffers: XLA cannot merge the calls)."""
    def fn(*arrays):
        return [rans_float.rans_float_decode_many([a], metas=(meta,), interpret=bench.INTERPRET, **opts)[0]
                for a in arrays]
    return jax.jit(fn)


def slope_and_last(fn, inputs, reps, decodes_per_call, few=32, many=96):
    """Two other host timings of the same calls, seconds a decode: the slope between runs of ~``few`` and ~``many``
    decodes (what a run costs once, its start-up and its final wait, cancels), and runs that wait on the LAST
    call's outputs only (one stream runs the calls in order), then on all, untimed."""
    def rounds(d):
        return max(1, -(-d // (decodes_per_call * len(inputs))))

    def run(r, last_only=False):
        t0 = time.perf_counter()
        outs = [fn(*inp) for _ in range(r) for inp in inputs]
        jax.block_until_ready(outs[-1] if last_only else outs)
        t = time.perf_counter() - t0
        jax.block_until_ready(outs)
        return t

    r1, r2 = rounds(few), rounds(many)
    n1, n2 = r1 * len(inputs) * decodes_per_call, r2 * len(inputs) * decodes_per_call
    slopes, lasts = [], []
    for _ in range(reps):
        a, b = run(r1), run(r2)
        slopes.append((b - a) / (n2 - n1))
        lasts.append(run(r2, last_only=True) / n2)
    return statistics.median(slopes), statistics.median(lasts)


def k_passes():
    """One jitted function passing over each of its arguments (the ceiling, as many arrays as decodes)."""
    return jax.jit(lambda *xs: [bench.lax_xor(x) for x in xs])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--steps", default=f"{codecs.PAIR_STEPS}", help="comma list of steps per lane")
    ap.add_argument("--per-jit", default="1,8", help="comma list of K: decodes in one jitted function")
    ap.add_argument("--variant", help="launch options 'u,w,c,p[,rR]' (default: the launch's own for one tensor)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="tiny shapes, interpret mode: a dry run on CPU")
    args = ap.parse_args()
    bench.start_script(args.small)
    log = bench.log
    steps_list = [int(v) for v in args.steps.split(",")]
    ks = [int(v) for v in args.per_jit.split(",")]
    copies = max(ks) + (1 if max(ks) == 1 else 0)  # K = 1 still rotates over two copies (L2: 50 MB)
    opts = {}
    if args.variant:
        import ablate  # noqa: E402  (the variant parser)
        opts = ablate.variant_options(args.variant)
    t0 = time.time()
    encoded = encode_each(steps_list)
    log(f"encoded {len(steps_list)} geometries in {time.time() - t0:.1f}s; launch options {opts or 'the defaults'}")
    if not args.small:
        bench.warm_up()
    x = encoded[steps_list[0]][0]
    n = x.size
    plain = [jax.device_put(x) for _ in range(copies)]
    setups = {}
    for steps, (xs, enc) in encoded.items():
        cts = [tensor.from_encoded(enc) for _ in range(copies)]
        meta = tensor.kernel_args(cts[0])[1]
        programs = num_tiles(*meta[:3])
        setups[steps] = (xs, [tensor.kernel_args(c)[0] for c in cts], meta, programs, enc.nbytes / xs.nbytes)
        log(f"  steps {steps}: {programs} programs ({programs / SLOTS:.3f} waves of {SLOTS}), ratio "
            f"{enc.nbytes / xs.nbytes:.4f}")
    order = steps_list + steps_list[::-1]
    for rnd, steps in enumerate(order):
        xs, arrays, meta, programs, ratio = setups[steps]
        for k in ks:
            fn = k_decodes(meta, opts, k)
            inputs = input_sets(arrays, k)
            outs = fn(*inputs[0])
            exact = all(bench.same_bits(o, xs) for o in outs)
            del outs
            if rnd < len(steps_list):  # (the second round the other way round: does the order change them?)
                s, _ = bench.time_fn(fn, inputs, args.reps)
                slope, last = slope_and_last(fn, inputs, args.reps, k)
            else:
                slope, last = slope_and_last(fn, inputs, args.reps, k)
                s, _ = bench.time_fn(fn, inputs, args.reps)
            bench.record("lone matrix", f"s{steps} ({programs} programs) {k} a jit exact={exact}", s / k, n,
                         per_call=k, slope_us=slope * 1e6, wait_last_us=last * 1e6, steps=steps, programs=programs,
                         per_jit=k, ratio=ratio, exact=exact, round=0 if rnd < len(steps_list) else 1)
        if rnd in (0, len(order) - 1):  # the ceiling, first and last
            passes = k_passes()
            for k in ks:
                inputs = input_sets(plain, k)
                s, _ = bench.time_fn(passes, inputs, args.reps)
                slope, last = slope_and_last(passes, inputs, args.reps, k)
                bench.record("ceiling", f"XLA elementwise pass {bench.MATRIX} {k} a jit", s / k, n, per_call=k,
                             slope_us=slope * 1e6, wait_last_us=last * 1e6, per_jit=k)
    log("\n| group | row | slope us | GB/s | wait on last us | GB/s |\n|---|---|---|---|---|---|")
    for r in bench.ROWS:
        log(f"| {r['group']} | {r['name']} | {r['slope_us']:.1f} | {n * 2 / r['slope_us'] / 1e3:.1f} | "
            f"{r['wait_last_us']:.1f} | {n * 2 / r['wait_last_us'] / 1e3:.1f} |")
    log("\n| group | row | host-timed us | GB/s | device us | GB/s | kernels us | GB/s |\n"
        "|---|---|---|---|---|---|---|---|")
    for r in bench.ROWS:
        log(f"| {r['group']} | {r['name']} | {r['ms'] * 1e3:.1f} | {r['gbs_bf16_out']:.1f} | "
            f"{bench.device_cells(r, 1e3)} |")
    if args.out:
        bench.write_rows(args.out)


if __name__ == "__main__":
    main()
