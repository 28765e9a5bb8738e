"""One generation step taken apart on the device timeline, beside the memory roofline measured in the same run.

    python bench/step_profile.py --out /tmp/step.json                          # GPU: 8B, 1B, SmolLM2; bf16 + compressed
    python bench/step_profile.py --models llama-3-8b --modes bf16 --batches 1  # one row
    python bench/step_profile.py --tiny --out /tmp/step.json                   # CPU smoke test (no GPU kernels)

For each (model, mode, batch): the decode step generation runs (``jcodec.generation._decode``: the forward on
one token a row at cache slot ``--prompt-len``, then greedy sampling) is timed back to back (host clock, the
median of ``--reps`` runs), then one more run of ``--trace-steps`` steps is traced with ``jax.profiler``. From
the trace, per step:
- the kernels grouped by kind (matmul, attention, rANS decode, copy, other fusions), with their launches,
  time, the bytes of their operands and outputs (XLA's compiled HLO; a fusion that slices its operand in place
  is charged the whole operand, so its GB/s reads high) and the achieved GB/s;
- the device span (first kernel start to last kernel end) and the idle time between kernels (launch gaps);
- the host's dispatch time (enqueueing a step), which is on the critical path when it exceeds the step.
XLA launches most of a step's kernels as CUDA graphs (command buffers), which the trace shows as one event each
(kind "other fusion", named ``command_buffer_N``): ``--no-command-buffers`` turns them off to see every kernel
(the step then also pays a launch per kernel).
The roofline is the weights' bytes over the bandwidth of an XLA pass that reads and writes a 2 GiB buffer,
timed in the same process: the least time a step that reads every weight once can take.

Models are ``bench/generate.py``'s: random weights of real shapes (SmolLM2's real weights when installed).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import ProfileData

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as gen_bench  # noqa: E402  (bench/generate.py: the models and modes benchmarked)

from jcodec import generation as gen  # noqa: E402
from jcodec.benchmark import copy_pass  # noqa: E402
from jcodec.models import llama  # noqa: E402

COPY_BYTES = 2 << 30  # the roofline pass reads and writes this many bytes

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (e.g. ``bf16[1,4096]{1,0}``)."""
    return sum(DTYPE_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dt, dims in SHAPE.findall(text))


def hlo_bytes(hlo_text: str) -> dict[str, int]:
    """{instruction name: bytes of its operands and its result} of an optimized HLO module's text (the
    cuBLAS workspace, an s8 buffer in a custom call's result, is left out)."""
    out = {}
    for line in hlo_text.splitlines():
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, result, op, rest = m.groups()
        operands = rest.split("),", 1)[0] if op != "custom-call" else rest.split("), custom_call_target", 1)[0]
        result_bytes = shape_bytes(re.sub(r"s8\[\d+\]\{0\}", "", result)) if op == "custom-call" else shape_bytes(result)
        out[name] = result_bytes + shape_bytes(operands)
    return out


def kind_of(kernel: str, hlo_op: str) -> str:
    k, h = kernel.lower(), hlo_op.lower()
    if "rans" in k or "rans" in h:
        return "rANS decode"
    if any(s in k for s in ("gemm", "gemv", "xmma", "cutlass", "nvjet", "cublas", "matmul", "sm90")) \
            or any(s in h for s in ("dot", "gemm", "custom-call", "cublas", "triton_gemm")):
        return "matmul"
    if "softmax" in h or "attention" in h:
        return "attention"
    if "memcpy" in k or "copy" in h or "copy" in k or "dynamic-update-slice" in h or "dynamic_slice" in h:
        return "copy / slice"
    if "reduce" in h or "reduce" in k:
        return "reduction fusion"
    return "other fusion"


def trace_steps(run_steps, steps: int) -> list[tuple[int, int, str, str]]:
    """(start ns, duration ns, kernel name, hlo op) of every GPU kernel of ``steps`` steps, in start order."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            run_steps(steps)
        files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        if not files:
            return []
        data = ProfileData.from_file(files[0])
        events = []
        for plane in data.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if line.name.startswith("Stream"):  # kernels as CUPTI saw them (not the derived "XLA Ops" line)
                    for e in line.events:
                        stats = dict(e.stats)
                        events.append((int(e.start_ns), int(e.duration_ns), e.name, str(stats.get("hlo_op", ""))))
    return sorted(events)


def breakdown(events, steps: int, op_bytes: dict[str, int]) -> dict:
    """Per step: kernels by kind (launches, ms, bytes, GB/s), the top kernels, span, busy and idle time."""
    if not events:
        return {}
    kinds = collections.defaultdict(lambda: [0, 0, 0])  # launches, ns, bytes
    top = collections.defaultdict(lambda: [0, 0, 0, ""])
    for _, dur, name, op in events:
        b = op_bytes.get(op, 0)
        for acc in (kinds[kind_of(name, op)], top[(op or name)[:60]]):
            acc[0] += 1
            acc[1] += dur
            acc[2] += b
        top[(op or name)[:60]][3] = kind_of(name, op)
    busy, end = 0, None
    for start, dur, _, _ in events:  # union of the kernels' intervals (one stream: no overlap expected)
        stop = start + dur
        if end is None or start >= end:
            busy += dur
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    span = events[-1][0] + events[-1][1] - events[0][0]
    per = lambda acc: dict(launches=acc[0] / steps, ms=acc[1] / steps / 1e6, bytes=acc[2] / steps,  # noqa: E731
                           gbs=acc[2] / acc[1] if acc[1] else None)
    return dict(span_ms=span / steps / 1e6, busy_ms=busy / steps / 1e6, idle_ms=(span - busy) / steps / 1e6,
                launches=len(events) / steps,
                kinds={k: per(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][1])},
                top=[dict(op=k, kind=v[3], **per(v)) for k, v in sorted(top.items(), key=lambda kv: -kv[1][1])[:12]])


def copy_bandwidth(reps: int) -> float:
    """Bytes a second an XLA pass moves reading and writing a ``COPY_BYTES`` buffer (half read, half written)."""
    return COPY_BYTES / copy_pass(COPY_BYTES // 2, reps, min_rounds=4).seconds


def profile_row(model_name: str, mode: str, batches, args, copy_bps: float) -> dict:
    cfg, get, weights = gen_bench.model_tensors(model_name, args.tiny)
    params = jax.block_until_ready(gen_bench.MODES[mode](cfg, get))
    weight_bytes = gen_bench.weight_bytes(params)
    row = dict(model=model_name, weights=weights, mode=mode, weight_bytes=weight_bytes,
               roofline_ms=weight_bytes / copy_bps * 1e3, batches=[])
    dtype = jnp.bfloat16
    static = dict(cfg=cfg, dtype=dtype, sampling=gen.Sampling())
    key = jax.random.PRNGKey(0)
    for B in batches:
        length = gen.bucket(args.prompt_len + args.steps * (args.reps + 2) + args.trace_steps + 2)
        cache = llama.init_cache(cfg, B, length, dtype).replace(pos=jnp.int32(args.prompt_len))
        token = jnp.zeros((B,), jnp.int32)
        state = dict(token=token, cache=cache)

        def run_steps(n):
            tok, c = state["token"], state["cache"]
            for i in range(n):
                tok, c = gen._decode(params, tok, c, key, np.int32(i), **static)
            state["token"], state["cache"] = tok, c
            return tok

        jax.block_until_ready(run_steps(2))  # compile, warm up
        lowered = gen._decode.lower(params, state["token"], state["cache"], key, np.int32(0), **static)
        hlo = lowered.compile().as_text()
        op_bytes = hlo_bytes(hlo)
        if args.hlo_dir:
            with open(os.path.join(args.hlo_dir, f"{model_name}_{mode.replace(' ', '_')}_b{B}.hlo.txt"), "w") as f:
                f.write(hlo)
        times, dispatch = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            tok = run_steps(args.steps)
            t1 = time.perf_counter()
            jax.block_until_ready(tok)
            times.append((time.perf_counter() - t0) / args.steps)
            dispatch.append((t1 - t0) / args.steps)
        step_s = statistics.median(times)
        trace = breakdown(trace_steps(run_steps, args.trace_steps), args.trace_steps, op_bytes)
        row["batches"].append(dict(
            batch=B, step_ms=step_s * 1e3, tokens_per_s=B / step_s, dispatch_ms=statistics.median(dispatch) * 1e3,
            weights_gbs=weight_bytes / step_s / 1e9, of_roofline=row["roofline_ms"] / (step_s * 1e3), **trace))
        del state["cache"]
    if args.prefill:  # time to first token of a --prefill-token prompt (batch 1), and its matmul rate
        T = args.prefill
        tokens = jnp.zeros((1, T), jnp.int32)

        def prefill():
            cache = llama.init_cache(cfg, 1, gen.bucket(T + 1), dtype)
            return gen._prefill(params, tokens, cache, key, **static)[0]

        jax.block_until_ready(prefill())  # compile
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(prefill())
            times.append(time.perf_counter() - t0)
        ttft = statistics.median(times)
        flops = 2 * cfg.num_params * T  # the weights' matmuls (attention's are a few % at this length)
        row["prefill"] = dict(tokens=T, ttft_ms=ttft * 1e3, tflops=flops / ttft / 1e12)
    return row


def report(rows, copy_bps: float) -> str:
    out = [f"copy pass: {copy_bps / 1e9:.1f} GB/s moved (read + write; {copy_bps / 2e9:.1f} GB/s of output)", "",
           f"{'model':<14} {'mode':<26} {'B':>3} {'ms/step':>8} {'tok/s':>8} {'roofline ms':>11} {'of roof':>7} "
           f"{'span':>7} {'idle':>6} {'launch':>6} {'dispatch':>8}"]
    for r in rows:
        for x in r["batches"]:
            out.append(f"{r['model']:<14} {r['mode']:<26} {x['batch']:>3} {x['step_ms']:>8.3f} {x['tokens_per_s']:>8.1f} "
                       f"{r['roofline_ms']:>11.3f} {x['of_roofline']:>7.1%} {x.get('span_ms', 0):>7.3f} "
                       f"{x.get('idle_ms', 0):>6.3f} {x.get('launches', 0):>6.0f} {x['dispatch_ms']:>8.3f}")
    for r in rows:
        if "prefill" in r:
            pf = r["prefill"]
            out.append(f"{r['model']} / {r['mode']}: prefill of {pf['tokens']} tokens {pf['ttft_ms']:.1f} ms "
                       f"(time to first token), {pf['tflops']:.0f} TFLOP/s in the weights' matmuls")
    for r in rows:
        for x in r["batches"]:
            if not x.get("kinds"):
                continue
            out += ["", f"{r['model']} / {r['mode']} / batch {x['batch']}: kernels a step by kind"]
            out.append(f"  {'kind':<20} {'launches':>8} {'ms':>8} {'MB':>9} {'GB/s':>7}")
            for k, v in x["kinds"].items():
                gbs = f"{v['gbs']:.0f}" if v["gbs"] else "-"
                out.append(f"  {k:<20} {v['launches']:>8.1f} {v['ms']:>8.3f} {v['bytes'] / 1e6:>9.1f} {gbs:>7}")
            out.append("  top ops: " + "; ".join(f"{t['op']} ({t['kind']}) {t['ms']:.3f} ms x{t['launches']:g}"
                                                 + (f" {t['gbs']:.0f} GB/s" if t["gbs"] else "")
                                                 for t in x["top"][:8]))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(gen_bench.SHAPES))
    p.add_argument("--modes", default="bf16,bf16-lossless compressed")
    p.add_argument("--batches", default="1,16", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--prompt-len", type=int, default=128, help="cache slots already filled")
    p.add_argument("--steps", type=int, default=32, help="steps a timed run")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--trace-steps", type=int, default=8)
    p.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens (batch 1)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--hlo-dir", help="write each step's optimized HLO here")
    p.add_argument("--no-command-buffers", action="store_true",
                   help="XLA launches every kernel on its own (the trace then names them)")
    args = p.parse_args(argv)
    if args.no_command_buffers:  # read when the GPU backend starts, which is after this
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    copy_bps = copy_bandwidth(args.reps)
    rows = []
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            print(f"profiling {model_name} / {mode} ...", file=sys.stderr, flush=True)
            rows.append(profile_row(model_name, mode, args.batches, args, copy_bps))
            if args.out:
                save(args, rows, copy_bps)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; weights random unless said; "
          f"cache at slot {args.prompt_len}")
    print(report(rows, copy_bps))
    if args.out:
        save(args, rows, copy_bps)
    return 0


def save(args, rows, copy_bps) -> None:
    meta = dict(jax=jax.__version__, device=jax.devices()[0].device_kind, platform=platform.platform(),
                copy_gbs_moved=copy_bps / 1e9, prompt_len=args.prompt_len, steps=args.steps, reps=args.reps,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    sys.exit(main())
