"""Fused ``int8`` decoder: rANS-coded residuals -> inverse prediction -> int8 -> dequantised floats.

Layout read (the device arrays of ``jcodec.tensor.from_encoded``; T tiles of L lanes x S steps):
  words       uint16[W]     every lane's 16-bit renormalisation words, lane by lane, in read order (read as
                            uint32[W/2] word pairs with ``word_group=2``: :mod:`.bf16_lossless`'s layout notes)
  starts      uint16|uint32[T*L]  where each lane starts reading, in words from its tile's base
  bases       uint32[T]     where each tile's first lane starts in ``words`` (:mod:`.bf16_lossless`'s layout notes)
  states      uint32[T*L]   each lane's start state
  table       uint32[4096 + 1280]  packed slot table ``cum | symbol << 12 | (freq - 1) << 20``, then the
                            symbol tables (``rans_math.symbol_table``; ``lanes.lookup`` says which lookup reads
                            what; built here when a lookup's table is missing)
  scales      float32[rows] the per-row (output channel) scale
  predictors  int32[T]      per tile: 0 none, 1 left, 2 up (``jcodec.codecs._predict``)
Value ``i`` (row ``i // cols``) lies in tile ``i // (L*S)``, at step ``(i % (L*S)) // L`` of lane ``i % L``.
Stacks of layers, ``tiles`` and windows: :mod:`.launch`.
The output is ``float32(q) * scales[row]`` rounded once to ``dtype``, with ``q`` the int8 value.

One program decodes one tile: its L lanes are the vector (padded to a power of two), one step (L values
in symbol order) at a time. The predictor is a per-tile scalar: the program branches once, to a step loop
compiled for that predictor (only for the predictors the tensor's tiles use):
- none: ``q = r``;
- left: a running sum along the step's lanes that continues from the previous step's last value and
  restarts at row starts and at the tile start: a cumsum over the lanes, less the sum before the row start
  (one cross-lane reduction when ``cols >= L``, a [L, L] masked max when rows are shorter than a step);
- up: ``q[i] = r[i] + q[i - cols]`` inside the tile. The decoded values of the last ``cols + L`` positions
  live in a per-tile ring in device memory (``ring``, uint8[T, cols + L], the kernel's scratch besides
  the optional prefetch's 4-byte-per-lane sink), read back after a barrier; rows shorter than a step take
  ``ceil(L / cols)`` rounds per step.
Each value is scaled by its row's scale, read at the top of the block of ``unroll`` steps before.
Positions past the end of the tensor in the last tile are not coded; the kernel decodes them anyway (they
end each lane's sequence, so nothing before them changes) and does not write them.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import launch
from . import rans_math as rm
from .lanes import (check_lanes, check_table, check_words, kernel_table, kernel_words, lanes_fold, lanes_step,
                    lanes_touch, program_tile, stack_lead, steps_with_values, symbols_reference, tile_lanes_init)


class Int8Meta(NamedTuple):
    """One tensor's geometry, as the kernel compiles it (hashable: a static argument).

    ``n`` = ``rows * cols`` values; ``lanes``, ``steps``: L and S of its tiles; ``dtype``: the output dtype;
    ``predictors_used``: the predictor ids its tiles may hold (the kernel compiles a step loop for each, and
    allocates the ``up`` ring only when 2 is among them)."""

    n: int
    rows: int
    cols: int
    lanes: int
    steps: int
    dtype: str
    predictors_used: tuple[int, ...] = (0, 1, 2)


# Launch options by launch, as bf16_lossless's: ONE tensor hides memory latency with longer blocks and the word
# prefetch (4096 x 14336 on the H100: 325.0 -> 429.4 GB/s, bench/decode.py); several keep unroll 4 (compile
# time: every tensor and every predictor a tensor uses adds a copy of the step loop). The lookup, side by side
# on one H100 (bench/decode.py): ONE tensor, 13 warps per SM, waits on each step's chain of loads (ncu), and the
# full table's one load beats the coarse table's two (matrix 534-540 GB/s against 473-482); for several, ~50
# warps per SM, the symbol tables, two loads over fewer cache lines, win (layer 615-619 against 546-551 with
# the coarse table and 487 with the full one; not profiled).
ONE_TENSOR = dict(unroll=16, prefetch=8, coarse_bits=0)
SEVERAL_TENSORS = dict(unroll=4, prefetch=0, coarse_bits=rm.BY_SYMBOL)


def _signed(q):
    """Decoded byte 0..255 (int32) -> the int8 value as float32."""
    return ((q ^ 0x80) - 0x80).astype(jnp.float32)


def int8_kernel(
    words_ref,       # [copies * W] uint16 | [copies * W/2] uint32 word pairs (word_group=2), whole array
    starts_ref,      # [copies * T*L] uint16 | uint32, whole array
    bases_ref,       # [copies * T] uint32, whole array
    states_ref,      # [copies * T*L] uint32, whole array
    table_ref,       # [copies * width] uint32, whole array (kernel_table's: slot, then coarse or symbol tables)
    scales_ref,      # [copies * rows] float32, whole array
    predictors_ref,  # [copies * T] int32, whole array
    tiles_ref,       # [R] int32: the tiles to decode (None: all T)
    out_ref,         # [copies * n] | [window * n] | [R * L*S] dtype, whole array; this program writes one tile
    ring_ref,        # [programs, cols + L] uint8 scratch: the up predictor's last decoded values, per program;
                     # None when no tile uses `up`
    sink_ref,        # [programs * block_lanes] uint32: what the prefetching loads read (never used); None without
    *, meta: Int8Meta, program, copies: int, start_ref=None, window: int = 0, unroll: int, coarse_bits: int,
    prefetch: int, interpret: bool,
):
    """Decode one tile: tile ``p`` (or ``tiles[p]``) of output copy ``o``, where ``program = o * per_copy + p``;
    that is array copy ``c = o``, or ``c = start + o`` for a window (as in :mod:`.bf16_lossless`)."""
    n, _, cols, lanes, steps, _, predictors = meta
    block_lanes = pl.next_power_of_2(lanes)
    unroll = math.gcd(unroll, steps)
    tile = lanes * steps
    tiles = states_ref.shape[0] // (copies * lanes)  # T, the tiles of one copy
    o, c, p, t = program_tile(program, tiles, copies, tiles_ref, start_ref, window, static_one_copy=False)
    rows = scales_ref.shape[0] // copies
    j = jnp.arange(block_lanes, dtype=jnp.int32)  # [B] lane
    live = j < lanes
    lane_state = tile_lanes_init(words_ref, starts_ref, bases_ref, states_ref, c * tiles + t, lanes, live,
                                 c * (words_ref.shape[0] // copies), prefetch)
    table_base = c * (table_ref.shape[0] // copies)
    first = t * tile + j  # [B] each lane's value at step 0, in its copy
    # where it goes; padding lanes (j >= L) point past the tile, where nothing is written (interpret mode's
    # masked scatter must not see a padding lane and a live lane at one address)
    out_first = o * (out_ref.shape[0] // (window or copies)) + jnp.where(live, p * tile + j, out_ref.shape[0] + j)
    pred = predictors_ref[c * tiles + t]

    def barrier():
        if not interpret:  # interpret mode runs the program's lanes in lockstep
            plgpu.debug_barrier()

    def block_scales(b):
        """[B] float32 row scales of each step of block ``b``, read the block before (at its top). Not masked:
        past the tensor's end the row is clamped to the last (those values are not written), which spares the
        zeroing a masked load needs (1000 x 4096 at 240 steps, unroll 16: 54.5 -> 47.9 SASS instructions a
        step, against masked loads spread through the block)."""
        i = first + b * (unroll * lanes)
        return tuple(scales_ref[c * rows + jnp.minimum((i + u * lanes) // cols, rows - 1)] for u in range(unroll))

    # the inverse predictors: (step k, residuals r, acc) -> (q, acc), acc the left predictor's running value
    def unpredict_none(k, r, acc):
        return r, acc

    def unpredict_left(k, r, acc):
        i = first + k * lanes
        reset = (i % cols == 0) & live  # row starts; the tile start has acc 0, so needs no reset
        cs = acc + jnp.cumsum(r)  # [B] non-decreasing
        cs_excl = jnp.where(reset, cs - r, 0)
        if cols >= lanes:  # at most one row start in the step: its lane p, found by a reduction
            base = jnp.where(j >= jnp.min(jnp.where(reset, j, block_lanes)), jnp.max(cs_excl), 0)
        else:  # several: for each lane the largest cs_excl at a row start at or before it
            q = j[None, :]
            base = jnp.max(jnp.where((q <= j[:, None]) & reset[None, :], cs_excl[None, :], 0), axis=1)
        q = (cs - base) & 0xFF
        return q, jnp.sum(jnp.where(j == lanes - 1, q, 0))

    def unpredict_up(k, r, acc):
        ring = ring_ref.shape[1]
        rounds = 1 if cols >= lanes else -(-lanes // cols)
        m = k * lanes + j  # tile-local index
        has = live & (m >= cols)
        src = ring_ref.at[program, jnp.maximum(m - cols, 0) % ring]
        dst = ring_ref.at[program, jnp.where(live, m % ring, ring)]
        q = r
        for _ in range(rounds):
            nb = plgpu.load(src, mask=has, other=0).astype(jnp.int32)
            q = (r + nb) & 0xFF
            if rounds > 1:
                barrier()  # every lane has read before any lane overwrites
            plgpu.store(dst, q.astype(jnp.uint8), mask=live)
            barrier()  # the step's values are visible to every lane
        return q, acc

    def decode_loop(unpredict):
        """The whole tile with one inverse predictor: the per-tile branch is taken once, outside the loop."""
        def block(b, val):  # `unroll` steps; a block's scales are read at the top of the block before
            # remaining: [B] the steps a lane still writes, from this block's first (counted down, as in
            # lanes.decode_lane_steps)
            lane_state, scales, acc, remaining = val
            touched = lanes_touch(words_ref, lane_state, prefetch)
            next_scales = block_scales(b + 1)
            for u in range(unroll):
                k = b * unroll + u
                sym, lane_state = lanes_step(words_ref, table_ref, lane_state, coarse_bits, table_base, hints=False)
                q, acc = unpredict(k, jnp.where(live, sym.astype(jnp.int32), 0), acc)
                plgpu.store(out_ref.at[out_first + k * lanes],
                            (_signed(q) * scales[u]).astype(out_ref.dtype), mask=u < remaining)
            return lanes_fold(lane_state, touched), next_scales, acc, remaining - unroll

        def decode_tile():
            lane_state, _, _, _ = lax.fori_loop(0, steps // unroll, block,
                                                (lane_state0, block_scales(0), jnp.int32(0), remaining0))
            return lane_state.sink
        return decode_tile

    lane_state0 = lane_state
    remaining0 = jnp.where(live, steps_with_values(n - first, lanes, steps), 0)  # [B] steps a lane writes
    loops = [decode_loop({0: unpredict_none, 1: unpredict_left, 2: unpredict_up}[k]) for k in predictors]

    def choose(i):  # a chain of uniform branches on the tile's predictor id
        if i == len(loops) - 1:
            return loops[i]
        return lambda: lax.cond(pred == predictors[i], loops[i], choose(i + 1))

    sink = choose(0)()
    if prefetch:
        plgpu.store(sink_ref.at[program * block_lanes + j], sink)


def _check(words, starts, bases, states, table, scales, predictors, meta: Int8Meta) -> None:
    """The arrays of one tensor, or of a stack of tensors of one meta (a leading axis on every array)."""
    n, rows, cols, lanes, steps, dtype, _ = meta
    if dtype not in rm.RAW_BYTES:
        raise ValueError(f"{dtype=} must be one of {', '.join(rm.RAW_BYTES)}")
    if not (1 <= lanes and 1 <= steps < 1 << 16):
        raise ValueError(f"{lanes=} must be >= 1 and {steps=} must be in [1, 65536)")
    t = max(1, -(-n // (lanes * steps)))
    lead = stack_lead(states)
    copies = lead[0] if lead else 1
    if n < 1 or rows * cols != n or copies * t * lanes * steps > rm.INT32_MAX:
        raise ValueError(f"{n=} must be rows * cols = {rows} * {cols} >= 1 and its tiles < 2^31 values")
    check_table(table, lead)
    check_lanes(starts, bases, states, lead, t * lanes, lanes)
    for name, a, dt, size in [("scales", scales, jnp.float32, rows),
                              ("predictors", predictors, jnp.int32, t)]:
        if a.dtype != dt or a.shape != lead + (size,):
            raise ValueError(f"{name}={a.dtype}{list(a.shape)} must be {jnp.dtype(dt).name}{list(lead + (size,))}")
    check_words(words, lead)


def check_predictors(predictors) -> tuple[int, ...]:
    ids = tuple(sorted(set(predictors)))
    if not ids or not set(ids) <= {0, 1, 2}:
        raise ValueError(f"predictors={predictors!r} must be a non-empty subset of (0, 1, 2)")
    return ids


def _ring(meta: Int8Meta, programs: int):
    """The ``up`` predictor's scratch of a tensor whose tiles may use it: per program its last ``cols + L``
    decoded values."""
    return jax.ShapeDtypeStruct((programs, meta.cols + meta.lanes), jnp.uint8) if 2 in meta.predictors_used else None


@functools.partial(jax.jit, static_argnames=["metas", "window", "unroll", "num_warps", "coarse_bits", "prefetch",
                                             "word_group", "interpret"])
def int8_decode_many(tensors, *, metas, tiles=None, start=None, window: int = 0, unroll: int | None = None,
                     num_warps: int = 4, coarse_bits: int | None = None, prefetch: int | None = None,
                     word_group: int = 2, interpret: bool = False) -> list[jax.Array]:
    """Decode several ``int8`` tensors in ONE kernel launch (e.g. all weights of a layer).

    ``tensors``: a sequence of ``(words, starts, bases, states, table, scales, predictors)``, each the arrays of
    one tensor or of a stack of tensors of one meta (a leading axis of ``copies`` on every array); ``metas``:
    an :class:`Int8Meta` per tensor. ``tiles``, ``start`` and ``window``: as in
    :func:`.bf16_lossless.bf16_lossless_decode_many`. Returns per tensor the flat decoded values: ``[n]``,
    ``[copies, n]``, ``[window, n]`` or ``[R * L*S]``. Options as in :func:`int8_decode`; ``unroll``,
    ``prefetch`` and ``coarse_bits`` left at None from :data:`ONE_TENSOR` or :data:`SEVERAL_TENSORS`.
    """
    unroll, prefetch, coarse_bits = launch.launch_options(metas, ONE_TENSOR, SEVERAL_TENSORS, unroll=unroll,
                                                          prefetch=prefetch, coarse_bits=coarse_bits)
    tiles, extra = launch.check_launch(tensors, metas, unroll, num_warps, prefetch, tiles, start, window)
    metas = tuple(Int8Meta(*m)._replace(predictors_used=check_predictors(m[6])) for m in metas)
    for arrays, meta in zip(tensors, metas):
        _check(*arrays, meta)
        check_words(arrays[0], stack_lead(arrays[3]), word_group)
    kernel = functools.partial(int8_kernel, unroll=unroll, coarse_bits=coarse_bits, prefetch=prefetch,
                               interpret=interpret)
    inputs = [(kernel_words(arrays[0], word_group), *arrays[1:4], kernel_table(arrays[4], coarse_bits), *arrays[5:])
              for arrays in tensors]
    return launch.decode_many(
        kernel, inputs, metas, states=[a[3] for a in tensors], tiles=tiles, extra=extra, window=window,
        out_dtypes=[jnp.dtype(m.dtype) for m in metas], value_dtypes=[jnp.dtype(m.dtype) for m in metas],
        scratch=(_ring,), sink=bool(prefetch), num_warps=num_warps, interpret=interpret,
        name=f"rans_int8_u{unroll}_w{num_warps}_{rm.lookup_name(coarse_bits)}_p{prefetch}"
             + (f"_g{word_group}" if word_group > 1 else ""))


def int8_decode(words, starts, bases, states, table, scales, predictors, *, n: int, rows: int, cols: int,
                lanes: int, steps: int, dtype: str, predictors_used=(0, 1, 2), tiles=None, unroll: int | None = None,
                num_warps: int = 4, coarse_bits: int | None = None, prefetch: int | None = None,
                word_group: int = 2, interpret: bool = False) -> jax.Array:
    """Decode an ``int8`` tensor to ``dtype[n]`` (flat) with the Pallas kernel; bit-exact with NumPy.

    One program per tile; ``predictors_used``: the predictor ids the tiles may hold; ``tiles``: decode only
    those (see :func:`int8_decode_many`); ``unroll`` steps per loop iteration (also how far ahead scales
    are read; reduced to a divisor of ``steps``), ``num_warps`` warps per program, ``coarse_bits`` (also
    ``rans_math.BY_SYMBOL``: the symbol tables), ``prefetch`` and ``word_group`` as in
    :func:`.bf16_lossless.bf16_lossless_decode` (``word_group`` defaults to 2 here: int8 residuals need ~0.41
    words per step, and reading them in pairs took an 8B layer from 420.6 to 618.6 GB/s on the H100; exponents
    need ~0.16, and pairs slowed bf16-lossless, 659.5 -> 531.7; bench/decode.py).
    """
    return int8_decode_many([(words, starts, bases, states, table, scales, predictors)],
                            metas=(Int8Meta(n, rows, cols, lanes, steps, dtype, tuple(predictors_used)),),
                            tiles=None if tiles is None else [tiles], unroll=unroll, num_warps=num_warps,
                            coarse_bits=coarse_bits, prefetch=prefetch, word_group=word_group,
                            interpret=interpret)[0]


# ----------------------------------------------------------------------------------------- reference
def unpredict_reference(r, predictors, *, n: int, cols: int, tile: int):
    """Inverse prediction per tile in pure jnp (all three predictors computed, one chosen per tile).

    ``r`` int32 residuals [n]; returns the decoded bytes 0..255 as int32 [n] (``codecs._unpredict``).
    """
    tiles = predictors.shape[0]
    m = jnp.arange(tile, dtype=jnp.int32)
    g = jnp.arange(tiles, dtype=jnp.int32)[:, None] * tile + m  # [T, tile] global index
    seg = jnp.pad(r, (0, tiles * tile - n)).reshape(tiles, tile)
    # left: a running sum restarting at row and tile starts (cs is non-decreasing, so the sum before the
    # last restart is a running max of the sums before restarts)
    cs = jnp.cumsum(seg, axis=1)
    before = jnp.where((g % cols == 0) | (m == 0), cs - seg, 0)
    left = cs - lax.cummax(before, axis=1)
    # up: column chains inside the tile, folded into rows of width cols starting at the tile start
    fold = -(-tile // cols)
    folded = jnp.pad(seg, ((0, 0), (0, fold * cols - tile))).reshape(tiles, fold, cols)
    up = jnp.cumsum(folded, axis=1).reshape(tiles, fold * cols)[:, :tile]
    p = predictors[:, None]
    out = jnp.where(p == 0, seg, jnp.where(p == 1, left, up)) & 0xFF
    return out.reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=["n", "rows", "cols", "lanes", "steps", "dtype"])
def int8_reference(words, starts, bases, states, table, scales, predictors, *, n: int, rows: int, cols: int,
                   lanes: int, steps: int, dtype: str) -> jax.Array:
    """Pure-JAX ``int8`` decoder (any backend); bit-exact with the kernel and with NumPy."""
    _check(words, starts, bases, states, table, scales, predictors, Int8Meta(n, rows, cols, lanes, steps, dtype))
    r = symbols_reference(words, starts, bases, states, table, n=n, lanes=lanes, steps=steps).astype(jnp.int32)
    q = unpredict_reference(r, predictors, n=n, cols=cols, tile=lanes * steps)
    y = _signed(q).reshape(rows, cols) * scales[:, None]
    return y.astype(jnp.dtype(dtype)).reshape(-1)
