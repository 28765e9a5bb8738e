"""Fused ``bf16-lossless`` decoder (also float16, float32): rANS-coded exponent bytes + raw sign/mantissa ->
float bits.

Layout read (the device arrays of ``jcodec.tensor.from_encoded``; T tiles of L lanes x S steps):
  words    uint16[W]     every lane's 16-bit renormalisation words, lane by lane, each lane's in read order;
                         with ``word_group=2`` W is even and the kernel reads uint32[W/2] pairs
                         ``w[2i] | w[2i+1] << 16`` (a free view), loading only when a lane enters a new pair
  starts   uint16|uint32[T*L]  where each lane starts reading, in words from its tile's base
  bases    uint32[T]     where each tile's first lane starts in ``words``: lane ``l`` of tile ``t`` starts at
                         ``bases[t] + starts[t*L + l]``
  states   uint32[T*L]   each lane's start state
  raw      uint8[m*rb]   the raw bytes of the m stored values, value i at ``i*rb .. i*rb+rb-1`` (rb = 1, or 3 for
                         float32); a full tile's lanes carry their last ``carry`` values' raw bytes in their end
                         states (``jcodec.codecs.split_carry``), so m leaves those out (:func:`raw_size`); with pair
                         symbols uint16[m], pair i's two bytes in element i
  table    uint32[4096 + 128]  packed slot table ``cum | symbol << 12 | (freq - 1) << 20``, then the coarse
                         table of :func:`rans_math.coarse_table` (computed here when only 4096 are given);
                         with pair symbols then the pair table, uint32[256]: symbol -> ``e1 << 7 | e2 << 23``
Value ``i`` of the tensor lies in tile ``i // (L*S)``, at step ``(i % (L*S)) // L`` of lane ``i % L``; with runs
(``run`` G > 1, ``jcodec.rans.lane_positions``) value ``j = i % (L*S)`` of a tile, for ``j < (S - carry) * L``, at
step ``(j // (L*G)) * G + j % G`` of lane ``(j // G) % L``: a lane reads a run's raw bytes in one load and writes
its G values in one store. Pair symbols (``pairs``, bfloat16 only, ``jcodec.codecs.encode_pairs``; ``n`` counts
pairs): read "pair" for "value" throughout; a pair decodes to one uint32 (bfloat16 values 2i, 2i+1), and after
an ESC symbol a lane reads a second word. Stacks of layers, ``tiles`` and windows: :mod:`.launch`.

One program decodes one tile, one lane per vector element (L padded to a power of two). Each step it looks up
every lane's slot (coarse table first, the full table only for lanes in buckets that hold a symbol boundary),
updates the states, renormalises from a word loaded at the previous step (a lane reads at most one word per
step), and writes one value per lane: the exponent joined with its raw bits, which were read ``unroll`` steps
ahead (with runs: a run's G values at its end, raw bits read a block ahead, see ``lanes.decode_lane_runs``). No
intermediate array is written: compressed bytes in, output bits out (plus, only with the optional word prefetch,
a 4-byte sink per lane, see ``lanes.lanes_touch``). Positions past the end of the tensor in the last tile are not
coded; the kernel decodes them anyway (they end each lane's sequence, so nothing before them changes) and does
not write them. :func:`bf16_lossless_decode_many` decodes several tensors (a layer) in one launch.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import launch
from . import rans_math as rm
from .lanes import (STREAM, check_lanes, check_table, check_words, decode_lane_runs, decode_lane_steps, kernel_table,
                    kernel_words, load_raw, program_tile, run_unroll, stack_lead, steps_with_values, symbols_reference,
                    tile_lanes_init)


class LosslessMeta(NamedTuple):
    """One tensor's geometry, as the kernel compiles it (hashable: a static argument).

    ``n``: its symbols (values, or with ``pairs`` pairs of values); ``lanes``, ``steps``: L and S of its tiles;
    ``dtype``: the values' dtype; ``carry``: steps per lane of a full tile whose raw bytes its end state carries;
    ``run``: a lane decodes runs of this many consecutive values; ``pairs``: one symbol per two bfloat16 values."""

    n: int
    lanes: int
    steps: int
    dtype: str
    carry: int = 0
    run: int = 1
    pairs: bool = False


# Launch options by launch. ONE tensor (a matrix, a head chunk's tiles) gives too few lanes to hide memory
# latency behind other warps (4096 x 14336: 13 warps per SM), so its lanes hide it themselves: 16 steps per
# loop iteration, words prefetched 8 ahead, raw bytes loaded at the top of a block (that matrix on the H100:
# 388 -> 515 GB/s, bench/decode.py). Several tensors (a layer: ~50 warps per SM) run faster without them
# (692.6 against 648.9 with raw_early, 604.2 with prefetch 4), and every tensor adds a copy of the step loop
# to the kernel, so its compile time grows with ``unroll``.
ONE_TENSOR = dict(unroll=16, prefetch=8, raw_early=True, coarse_bits=rm.COARSE_BITS)
SEVERAL_TENSORS = dict(unroll=4, prefetch=0, raw_early=False, coarse_bits=rm.COARSE_BITS)
# Pair symbols (a launch of pair tensors only; bench/decode.py on the H100). One tensor: the full table, words
# prefetched, raw bytes at the top of 8-step blocks (the matrix 767.9 GB/s, against 729.4 at u4 c0 p0 and 684.8
# at u4 c5 p0). Several: u4 c5 p0, a layer at 925.1 GB/s compiled in 16 s; u8 c0 p8 r1 decodes it at 984.4 but
# compiles in 76 s, which every model would pay on its first call (pass those options to get them). The time is
# Triton's Coalesce pass (99.7% of it), which grows with (tensors x unroll)^2. Side by side on one machine, each
# twice in opposite orders: u4 c5 p0 with raw_early 1072.3 / 1094.5 GB/s, without 995.9 / 1055.8; u4 c0 p0 r1 no
# better (2-3% ahead in three runs, 16% behind in a fourth, where it was timed first): the default is u4 c5 p0 r1.
PAIR_ONE_TENSOR = dict(unroll=8, prefetch=8, raw_early=True, coarse_bits=0)
PAIR_SEVERAL_TENSORS = dict(SEVERAL_TENSORS, raw_early=True)


def bf16_lossless_kernel(
    words_ref,    # [copies * W] uint16 | [copies * W/2] uint32 word pairs (word_group=2), whole array
    starts_ref,   # [copies * T*L] uint16 | uint32, whole array
    bases_ref,    # [copies * T] uint32, whole array
    states_ref,   # [copies * T*L] uint32, whole array
    raw_ref,      # [copies * m*rb] uint8 | [copies * m] uint16 (pairs), whole array
    table_ref,    # [copies * width] uint32, whole array (kernel_table's: slot, coarse or symbol, pair tables)
    tiles_ref,    # [R] int32: the tiles to decode (None: all T)
    out_ref,      # [copies * n] | [window * n] | [R * L*S] uint16 | uint32 (the float bits); this program
                  # writes one tile
    sink_ref,     # [programs * block_lanes] uint32: what the prefetching loads read (never used); None
                  # without prefetch
    *, meta: LosslessMeta, program, copies: int, start_ref=None, window: int = 0, unroll: int, coarse_bits: int,
    prefetch: int, raw_early: bool = False,
):
    """Decode one tile: tile ``p`` (or ``tiles[p]``) of output copy ``o``, where ``program = o * per_copy + p``;
    that is array copy ``c = o``, or ``c = start + o`` for a window (``start_ref``: [1] int32, ``window``
    copies). The vector is L rounded up to a power of two (``block_lanes``)."""
    n, lanes, steps, dtype, carry, run, pairs = meta
    block_lanes = pl.next_power_of_2(lanes)
    unroll = run_unroll(unroll, steps, carry, run)
    tile = lanes * steps
    tiles = states_ref.shape[0] // (copies * lanes)  # T, the tiles of one copy
    o, c, p, t = program_tile(program, tiles, copies, tiles_ref, start_ref, window, static_one_copy=True)
    j = jnp.arange(block_lanes, dtype=jnp.int32)
    live = j < lanes
    l = jnp.where(live, j, 0)  # padding lanes decode lane 0 again and write nowhere
    lane_state = tile_lanes_init(words_ref, starts_ref, bases_ref, states_ref, c * tiles + t, lanes, live,
                                 c * (words_ref.shape[0] // copies), prefetch)
    # where it goes in the output (of its copy); padding lanes point past the end (masked writes need no valid
    # address, but interpret mode's masked scatter must not see two lanes at one address)
    out_first = jnp.where(live, p * tile + j, out_ref.shape[0] + j)
    out_base = o * (out_ref.shape[0] // (window or copies))
    table_base = c * (table_ref.shape[0] // copies)
    # pair symbols: the pair table ends each copy's table (kernel_table)
    pair_base = table_base + table_ref.shape[0] // copies - rm.PAIR_TABLE if pairs else None
    rb = rm.raw_bytes(dtype, pairs)
    # raw bytes: a full tile's lanes carry their last `carry` values in their end state (jcodec.codecs.split_carry);
    # the raw array holds the other steps of every full tile, then the last tile's (value units here)
    full = t < n // tile
    per_value = rm.raw_layout(dtype, pairs)[1]  # raw_ref elements per value (pair symbols: one uint16 per pair)
    raw_tile = c * (raw_ref.shape[0] // (copies * per_value)) + t * ((steps - carry) * lanes)
    raw_first = raw_tile + l

    def read_raw(k, ok):  # [B] uint32 raw bits of step k (masked past the end, and where carried)
        return load_raw(raw_ref, raw_first + k * lanes, ok, rb)

    def write(k, sym, raw, mask):
        bits = rm.join_float(sym, raw, dtype, pairs).astype(out_ref.dtype)
        plgpu.store(out_ref.at[out_base + out_first + k * lanes], bits, mask=mask, **STREAM)

    if run > 1:  # runs: lane l's run g is the tile's values g*L*G + l*G .. + G-1, in steps g*G .. g*G+G-1
        limit = jnp.minimum(n - t * tile, (steps - carry) * lanes)  # the tile's values in runs (the others: its tail)
        col = jnp.arange(run, dtype=jnp.int32)[None, :]
        at = (l * run)[:, None] + col  # [B, G] a lane's run 0
        # (padding lanes point past the end, each at its own address, as `out_first` does)
        out_at = at if block_lanes == lanes else jnp.where(live[:, None], at,
                                                           out_ref.shape[0] + (j * run)[:, None] + col)

        def run_ok(g):  # [B, G] (uniform along G where the tile's value count is a multiple of G: one wide access)
            # `at` against the bound less the runs before g (a scalar): written `g * L * G + at < limit`, the
            # compiler carried g * L * G as a 64-bit induction variable and compared in 64 bits, 2 SASS
            # instructions a step more
            ok = at < limit - g * (lanes * run)
            return ok if block_lanes == lanes else ok & live[:, None]

        def read_run(g):
            return load_raw(raw_ref, raw_tile + g * (lanes * run) + at, run_ok(g), rb)

        def write_run(g, sym, raw):
            bits = rm.join_float(sym, raw, dtype, pairs).astype(out_ref.dtype)
            plgpu.store(out_ref.at[out_base + p * tile + g * (lanes * run) + out_at], bits, mask=run_ok(g), **STREAM)

        def write_tail(i, sym, x_end):  # tail step steps - carry + i: a full tile's raw bits from the end state
            k = steps - carry + i
            ok = live & (k * lanes + l < n - t * tile)
            write(k, sym, jnp.where(full, rm.carried_raw(x_end, i, rb), read_raw(k, ok & ~full)), ok)

        lane_state = decode_lane_runs(words_ref, table_ref, lane_state, read_run, write_run, write_tail,
                                      run=run, steps=steps, unroll=unroll, carry=carry, coarse_bits=coarse_bits,
                                      table_base=table_base, pair_base=pair_base, prefetch=prefetch)
    else:
        # [B] the steps whose values a lane writes in the loop, with raw bytes from `raw` (a full tile's carried
        # steps are written after it, from the end state)
        in_loop = jnp.where(full, steps - carry, steps_with_values(n - (t * tile + l), lanes, steps))
        lane_state = decode_lane_steps(words_ref, table_ref, lane_state, live, in_loop, full,
                                       read_raw, write, steps=steps, unroll=unroll, carry=carry, rb=rb,
                                       coarse_bits=coarse_bits, table_base=table_base, pair_base=pair_base,
                                       prefetch=prefetch, raw_early=raw_early)
    if prefetch:
        plgpu.store(sink_ref.at[program * block_lanes + j], lane_state.sink)


def raw_size(n: int, lanes: int, steps: int, carry: int) -> int:
    """Values whose raw bytes are stored: all but the carried ones (``jcodec.codecs.stored_raw_values``)."""
    return n - n // (lanes * steps) * carry * lanes


def _check(words, starts, bases, states, raw, table, meta: LosslessMeta) -> None:
    """The arrays of one tensor, or of a stack of tensors of one meta (a leading axis on every array)."""
    n, lanes, steps, dtype, carry, run, pairs = meta
    if dtype not in rm.RAW_BYTES or (pairs and dtype != "bfloat16"):
        raise ValueError(f"{dtype=} must be one of {', '.join(rm.RAW_BYTES)}"
                         + (" (pair symbols: bfloat16)" if pairs else ""))
    if not (1 <= lanes and 1 <= steps < 1 << 16 and 0 <= carry < steps):
        raise ValueError(f"{lanes=} must be >= 1, {steps=} in [1, 65536) and {carry=} in [0, steps)")
    rm.check_run(run, steps, carry)
    t = max(1, -(-n // (lanes * steps)))
    lead = stack_lead(states)
    copies = lead[0] if lead else 1
    if n < 1 or copies * n * rm.raw_bytes(dtype, pairs) > rm.INT32_MAX or copies * t * lanes * steps > rm.INT32_MAX:
        raise ValueError(f"{n=} must be >= 1 and its padded tiles and raw bytes must have < 2^31 elements")
    check_lanes(starts, bases, states, lead, t * lanes, lanes)
    raw_dtype, per = rm.raw_layout(dtype, pairs)  # (pair symbols: one uint16 per pair)
    raw_shape = lead + (raw_size(n, lanes, steps, carry) * per,)
    if raw.dtype != raw_dtype or raw.shape != raw_shape:
        raise ValueError(f"raw={raw.dtype}{list(raw.shape)} must be {jnp.dtype(raw_dtype).name}{list(raw_shape)}")
    check_table(table, lead, pairs)
    check_words(words, lead)


@functools.partial(jax.jit, static_argnames=["metas", "window", "unroll", "num_warps", "coarse_bits", "prefetch",
                                             "word_group", "raw_early", "interpret"])
def bf16_lossless_decode_many(tensors, *, metas, tiles=None, start=None, window: int = 0,
                              unroll: int | None = None, num_warps: int = 4, coarse_bits: int | None = None,
                              prefetch: int | None = None, word_group: int = 1, raw_early: bool | None = None,
                              interpret: bool = False) -> list[jax.Array]:
    """Decode several ``bf16-lossless`` tensors in ONE kernel launch (e.g. all weights of a layer).

    ``tensors``: a sequence of ``(words, starts, bases, states, raw, table)``, each the arrays of one tensor or
    of a stack of tensors of one meta (every array with a leading axis of ``copies``: several layers in one
    launch); ``metas``: a :class:`LosslessMeta` per tensor. ``tiles``: None, or per tensor None or int32[R], the
    tiles to decode (of one tensor, not a stack; e.g. the rows of an embedding). Returns per tensor the flat
    decoded values: ``[n]`` (``[2n]`` for pairs), ``[copies, n]``, or ``[R * L*S]`` for ``tiles`` (tile
    ``tiles[r]`` at ``r * L*S``; positions past the tensor's end are unspecified). Block sizes as in
    :func:`bf16_lossless_decode`; ``unroll``, ``prefetch``, ``raw_early`` and ``coarse_bits`` left at None are
    chosen by the launch (:data:`ONE_TENSOR` or :data:`SEVERAL_TENSORS`; pair tensors only:
    :data:`PAIR_ONE_TENSOR`, :data:`PAIR_SEVERAL_TENSORS`): every tensor adds a copy of the step loop to the
    kernel (a stack adds one), and a Llama layer's 7 tensors compile in ~12 s at unroll 4, ~40-90 s at 8.
    ``word_group=2`` needs an even word count per copy (as ``jcodec.tensor`` builds them). ``window`` >= 1
    with ``start`` (an int32 scalar, traced welcome; clamped so that the window exists): decode copies
    ``start .. start + window`` of every tensor (each a stack), to ``[window, n]``, reading them in place.
    """
    metas = tuple(LosslessMeta(*m) for m in metas)
    pairs = all(m.pairs for m in metas)
    unroll, prefetch, raw_early, coarse_bits = launch.launch_options(
        metas, *((PAIR_ONE_TENSOR, PAIR_SEVERAL_TENSORS) if pairs else (ONE_TENSOR, SEVERAL_TENSORS)),
        unroll=unroll, prefetch=prefetch, raw_early=raw_early, coarse_bits=coarse_bits)
    tiles, extra = launch.check_launch(tensors, metas, unroll, num_warps, prefetch, tiles, start, window)
    for arrays, meta in zip(tensors, metas):
        _check(*arrays, meta)
        check_words(arrays[0], stack_lead(arrays[3]), word_group)
        if meta.pairs and word_group != 1:  # (not implemented: a prototype decoded the pair layer at 1143-1151
            # GB/s against 1191-1210 with single words, u4 c5 p0 r1, bench/decode.py)
            raise ValueError(f"{word_group=} must be 1 for pair symbols (a lane may read two words in a step)")
    kernel = functools.partial(bf16_lossless_kernel, unroll=unroll, coarse_bits=coarse_bits, prefetch=prefetch,
                               raw_early=raw_early)
    inputs = [(kernel_words(arrays[0], word_group), *arrays[1:5], kernel_table(arrays[5], coarse_bits, m.pairs))
              for arrays, m in zip(tensors, metas)]
    return launch.decode_many(
        kernel, inputs, metas, states=[a[3] for a in tensors], tiles=tiles, extra=extra, window=window,
        out_dtypes=[rm.bits_dtype(m.dtype, m.pairs) for m in metas],
        value_dtypes=[jnp.dtype(m.dtype) for m in metas], sink=bool(prefetch), num_warps=num_warps,
        interpret=interpret,
        # (the launch's name, as profiles and bench/gpu_session.sh's ncu filter, `-k regex:rans`, see it)
        name=f"rans_float_u{unroll}_w{num_warps}_{rm.lookup_name(coarse_bits)}_p{prefetch}"
             + (f"_g{word_group}" if word_group > 1 else "") + ("_r1" if raw_early else ""))


def bf16_lossless_decode(words, starts, bases, states, raw, table, *, n: int, lanes: int, steps: int, dtype: str,
                         carry: int = 0, run: int = 1, pairs: bool = False, tiles=None, unroll: int | None = None,
                         num_warps: int = 4, coarse_bits: int | None = None, prefetch: int | None = None,
                         word_group: int = 1, raw_early: bool | None = None, interpret: bool = False) -> jax.Array:
    """Decode a ``bf16-lossless`` tensor to ``dtype[n]`` (flat; ``[2n]`` with pair symbols) with the Pallas
    kernel; bit-exact.

    ``tiles`` (int32[R]): decode only those tiles, to ``dtype[R * L*S]`` (see :func:`bf16_lossless_decode_many`).
    One program per tile; ``unroll`` steps per loop iteration (also how far ahead raw bytes are read; reduced
    to a divisor of ``steps``; None: see ``launch.launch_options``), ``num_warps`` warps per program,
    ``coarse_bits``: log2 of the slots per coarse-table bucket (0: one gather from the full table),
    ``prefetch``: at the top of each block of ``unroll`` steps, lanes within that many words of their next
    32-byte sector of words load one of its words into L1 (0: never; see "Word prefetch" in :mod:`.lanes`),
    ``raw_early``: load the next block's raw bytes at the top of a block (not one per step, spread through it),
    ``word_group``: 1 loads one word per renormalisation; 2 reads the words as uint32 pairs and loads only
    when a lane moves into its next pair (half the per-lane gathers; needs an even word count).
    """
    return bf16_lossless_decode_many([(words, starts, bases, states, raw, table)],
                                     metas=(LosslessMeta(n, lanes, steps, dtype, carry, run, pairs),),
                                     tiles=None if tiles is None else [tiles],
                                     unroll=unroll, num_warps=num_warps, coarse_bits=coarse_bits,
                                     prefetch=prefetch, word_group=word_group, raw_early=raw_early,
                                     interpret=interpret)[0]


# ----------------------------------------------------------------------------------------- reference
def raw_reference(raw, ends, *, n: int, lanes: int, steps: int, dtype: str, carry: int, pairs: bool = False):
    """Every value's raw bits (uint32[n]) from the stored raw bytes and the lanes' end states (the carried
    values of the full tiles; ``jcodec.codecs.join_carry``)."""
    rb = rm.raw_bytes(dtype, pairs)
    if rb in (1, 2):  # (2: pair symbols, raw is uint16)
        r = raw.astype(jnp.uint32)
    else:
        r3 = raw.reshape(-1, 3).astype(jnp.uint32)
        r = r3[:, 0] | (r3[:, 1] << 8) | (r3[:, 2] << 16)
    full = n // (lanes * steps) if carry else 0
    if not full:
        return r
    head = r[:full * (steps - carry) * lanes].reshape(full, steps - carry, lanes)
    carried = jnp.stack([rm.carried_raw(ends[:full * lanes], j, rb) for j in range(carry)])  # [carry, full*L]
    carried = carried.reshape(carry, full, lanes).transpose(1, 0, 2)
    return jnp.concatenate([jnp.concatenate([head, carried], axis=1).reshape(-1), r[full * (steps - carry) * lanes:]])


@functools.partial(jax.jit, static_argnames=["n", "lanes", "steps", "dtype", "carry", "run", "pairs"])
def bf16_lossless_reference(words, starts, bases, states, raw, table, *, n: int, lanes: int, steps: int,
                            dtype: str, carry: int = 0, run: int = 1, pairs: bool = False) -> jax.Array:
    """Pure-JAX ``bf16-lossless`` decoder (any backend); bit-exact with the kernel and with NumPy. Pair
    symbols (``pairs``, ``n`` pairs): bfloat16[2n]."""
    meta = LosslessMeta(n, lanes, steps, dtype, carry, run, pairs)
    _check(words, starts, bases, states, raw, table, meta)
    sym, ends = symbols_reference(words, starts, bases, states, table, n=n, lanes=lanes, steps=steps,
                                  ends=True, pairs=pairs, run=run, carry=carry)
    r = raw_reference(raw, ends, n=n, lanes=lanes, steps=steps, dtype=dtype, carry=carry, pairs=pairs)
    bits = rm.join_float(sym, r, dtype, pairs).astype(rm.bits_dtype(dtype, pairs))
    return lax.bitcast_convert_type(bits, jnp.dtype(dtype)).reshape(-1)
