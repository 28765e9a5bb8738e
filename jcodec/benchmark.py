"""``jcodec bench``: how fast a compressed checkpoint's layers decode on this device, beside a plain pass.

A model loaded with ``mode="compressed"`` decodes its layers inside the forward's ``lax.scan``, a group of
layers per kernel launch (``decode_window``). This times exactly those decodes, every layer once, in one
jitted scan, and beside it an XLA elementwise pass over as many bytes, up to 2 GiB (read and written once:
the memory ceiling). Before timing, the first group's decoded weights are compared bit for bit with the NumPy decoder.
Also :func:`time_calls`, the timing the scripts in ``bench/`` use.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jcodec import codecs, schedule
from jcodec.api import load_params
from jcodec.checkpoint import Checkpoint
from jcodec.codecs import bits_of
from jcodec.models import llama
from jcodec.tensor import decode_window, default_backend


@dataclass
class Timing:
    seconds: float  # median seconds a call
    runs: list  # seconds a call of each timed run
    calls: int  # calls a run
    dispatch: float  # median host seconds to enqueue one call


def time_calls(fn, inputs, reps: int, *, min_rounds: int = 4, run_seconds: float = 0.05,
               run_bytes: float = 16e9) -> Timing:
    """Seconds a call of ``fn(*inputs[i])``: the median over ``reps`` runs, each enqueuing calls on every input
    set in turn, back to back, in whole rounds (at least ``min_rounds``; more until a run lasts about
    ``run_seconds`` or its outputs, all held to its end, reach ``run_bytes``), then waiting on the last call.

    Calls enqueued back to back keep the device busy while the host dispatches the next (a jitted forward runs
    its decodes that way), and one stream runs them in order, so the last call's outputs are the last written.
    A run still counts once its start (the first dispatch) and its end: runs of 4-10 calls of a 0.09 ms decode
    read 10-15 us a call slow on the H100 against the device timeline (bench/decode.py records both), hence runs
    sized from a call timed after the warm-up (the first calls after a compile are slow)."""
    for inp in inputs:
        jax.block_until_ready(fn(*inp))
    t0 = time.perf_counter()
    outs = [fn(*inp) for inp in inputs]
    jax.block_until_ready(outs[-1])
    one = (time.perf_counter() - t0) / len(inputs)
    out_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(outs[0]))
    jax.block_until_ready(outs)
    del outs
    rounds = max(min_rounds, min(math.ceil(run_seconds / max(one, 1e-9) / len(inputs)),
                                 int(run_bytes / max(out_bytes, 1) / len(inputs))))
    runs, dispatch = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(*inp) for _ in range(rounds) for inp in inputs]
        t1 = time.perf_counter()
        jax.block_until_ready(outs[-1])
        calls = rounds * len(inputs)
        runs.append((time.perf_counter() - t0) / calls)
        dispatch.append((t1 - t0) / calls)
        jax.block_until_ready(outs)
        del outs
    return Timing(statistics.median(runs), runs, rounds * len(inputs), statistics.median(dispatch))


CEILING_BYTES = 2 << 30  # the ceiling's pass runs over as many bytes as the layers decode to, at most this many


def copy_pass(nbytes: int, reps: int, *, min_rounds: int = 2) -> Timing:
    """The timing of an XLA elementwise pass over a uint16 array of ``nbytes`` bytes, read once and written once:
    the memory ceiling a decoder (bytes written) or a weight-reading step (bytes read) is measured against."""
    a = jnp.zeros((nbytes // 2,), jnp.uint16) + jnp.uint16(1)
    t = time_calls(jax.jit(lambda a: a ^ jnp.uint16(1)), [(a,)], reps, min_rounds=min_rounds)
    del a
    return t


def bench_checkpoint(path, *, reps: int = 5, layers_per_decode: int | None = None) -> dict:
    """Time the layer decodes of the jcodec checkpoint at ``path`` (see the module docstring); returns a dict of
    what was measured. Raises ValueError when it has no compressed layer weights to decode."""
    cfg, params = load_params(path, "compressed", jnp.bfloat16, layers_per_decode)
    stacks = schedule.layer_stacks(cfg, params.layers)
    if not stacks:
        raise ValueError(f"{path}: no compressed layer weights to decode (its layers are stored raw or as zstd, "
                         f"which decode on the host at load)")
    G, L = schedule.layer_group(cfg, params.layers), cfg.num_layers
    cts = list(stacks.values())
    decoded_bytes = sum(c.meta.size * jnp.dtype(c.meta.dtype).itemsize for c in cts) * L
    stored_bytes = sum(c.nbytes for c in cts)

    ckpt = Checkpoint(path)
    first = jax.jit(lambda cts: decode_window(cts, 0, G))(cts)
    exact = True
    for field, out in zip(stacks, first):
        for j in range(G):
            want = codecs.decode(ckpt.read(f"model.layers.{j}.{llama.LAYER_NAMES[field]}"))
            exact &= out.dtype == want.dtype and np.array_equal(bits_of(out[j]).reshape(-1), bits_of(want).reshape(-1))
    del first

    def all_layers(cts):  # every group decoded as the forward decodes it; one value of each output kept
        def step(acc, i):
            outs = decode_window(cts, i, G)
            return acc + sum(o.reshape(-1)[0].astype(jnp.float32) for o in outs), None
        return jax.lax.scan(step, jnp.float32(0), jnp.arange(0, L, G, dtype=jnp.int32))[0]

    decode_time = time_calls(jax.jit(all_layers), [(cts,)], reps, min_rounds=2)
    ceiling_bytes = min(decoded_bytes, CEILING_BYTES) // 2 * 2
    ceiling_time = copy_pass(ceiling_bytes, reps)
    device = jax.devices()[0]
    codecs_used = sorted({c.meta.codec for c in cts})
    return dict(
        path=str(path), device=f"{device.device_kind} ({platform.machine()})" if device.platform == "cpu"
        else device.device_kind, backend=default_backend(), jax=jax.__version__, layers=L, layers_per_launch=G,
        tensors_per_layer=len(cts), codecs=codecs_used, decoded_bytes=decoded_bytes, stored_bytes=stored_bytes,
        ratio=stored_bytes / decoded_bytes, exact=bool(exact),
        decode_ms=decode_time.seconds * 1e3, decode_gbs=decoded_bytes / decode_time.seconds / 1e9,
        decode_runs_ms=[r * 1e3 for r in decode_time.runs], decode_calls_a_run=decode_time.calls,
        ceiling_bytes=ceiling_bytes, ceiling_ms=ceiling_time.seconds * 1e3,
        ceiling_gbs=ceiling_bytes / ceiling_time.seconds / 1e9)


def report(r: dict) -> str:
    """The result of :func:`bench_checkpoint` as a short table."""
    size = lambda b: f"{b / 1e6:.1f} MB" if b < 1e9 else f"{b / 1e9:.2f} GB"  # noqa: E731
    how = "Pallas kernels" if r["backend"] == "pallas" else "pure-JAX decoder"
    what = (f"{r['layers']} layer{'s' * (r['layers'] > 1)} x {r['tensors_per_layer']} tensors "
            f"({'+'.join(r['codecs'])}), "
            f"{r['layers_per_launch']} a launch")
    return "\n".join([
        f"{r['path']} on {r['device']} ({how}), jax {r['jax']}",
        f"{'what':<56} {'decoded':>10} {'ms':>9} {'GB/s':>8}",
        f"{what:<56} {size(r['decoded_bytes']):>10} {r['decode_ms']:>9.3f} {r['decode_gbs']:>8.1f}",
        f"{'XLA elementwise pass (the ceiling)':<56} {size(r['ceiling_bytes']):>10} "
        f"{r['ceiling_ms']:>9.3f} {r['ceiling_gbs']:>8.1f}",
        f"in device memory: {size(r['stored_bytes'])}, {r['ratio']:.4f} of the decoded bytes; "
        f"{'layer 0' if r['layers_per_launch'] == 1 else 'layers 0-%d' % (r['layers_per_launch'] - 1)} decoded bit "
        f"for bit as the NumPy decoder: {'yes' if r['exact'] else 'NO'}",
        "GB/s: decoded bytes over the median time of one pass over all layers"])
