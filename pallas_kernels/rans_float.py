"""Fused ``bf16-lossless`` decoder: rANS-coded exponent bytes + raw sign/mantissa -> float bits.

Layout read (the device arrays of ``jcodec.tensor.from_encoded``; T tiles of L lanes x S steps):
  words    uint16[W]     every lane's 16-bit renormalisation words, lane by lane, each lane's in read order;
                         with ``word_group=2`` W is even and the kernel reads uint32[W/2] pairs
                         ``w[2i] | w[2i+1] << 16`` (a free view), loading only when a lane enters a new pair
  starts   uint16|uint32[T*L]  where each lane starts reading, in words from its tile's base
  bases    uint32[T]     where each tile's first lane starts in ``words``: lane ``l`` of tile ``t`` starts at
                         ``bases[t] + starts[t*L + l]``
  states   uint32[T*L]   each lane's start state
  raw      uint8[n*rb]   the raw bytes of value i at ``i*rb .. i*rb+rb-1`` (rb = 1, or 3 for float32); with pair
                         symbols (dtype "bfloat16x2", n pairs) uint16[n], pair i's two bytes in element i
  table    uint32[4096 + 128]  packed slot table ``cum | symbol << 12 | (freq - 1) << 20``, then the coarse
                         table of :func:`rans_common.coarse_table` (computed here when only 4096 are given);
                         with pair symbols then the pair table, uint32[256]: symbol -> ``e1 << 7 | e2 << 23``
Value ``i`` of the tensor lies in tile ``i // (L*S)``, at step ``(i % (L*S)) // L`` of lane ``i % L``; with runs
(``run`` G > 1, ``jcodec.rans.lane_positions``) value ``j = i % (L*S)`` of a tile, for ``j < (S - carry) * L``, at
step ``(j // (L*G)) * G + j % G`` of lane ``(j // G) % L``: a lane reads a run's raw bytes in one load and writes
its G values in one store. Pair
symbols (``jcodec.codecs.encode_pairs``; dtype "bfloat16x2", ``n`` pairs): read "pair" for "value" throughout; a
pair decodes to one uint32 (bfloat16 values 2i, 2i+1), and after an ESC symbol a lane reads a second word.
A stack of ``copies`` tensors of one geometry (layers) has a leading axis on every array, the word streams
zero-padded to the longest (``jcodec.tensor.stack_layers``); the kernel reads it flattened, copy ``c`` at
``c`` times each array's row length. ``tiles`` (int32[R], optional) picks the tiles to decode; a *window*
(``start``, a traced int32, and ``window`` copies) picks copies ``start .. start + window`` of a stack, read
in place (a ``lax.scan`` over layers that sliced each layer's arrays out first would copy them).

One program decodes one tile, one lane per vector element (L padded to a power of two). Each step it looks up
every lane's slot (coarse table first, the full table only for lanes in buckets that hold a symbol boundary),
updates the states, renormalises from a word loaded at the previous step (a lane reads at most one word per
step), and writes one value per lane: the exponent joined with its raw bits, which were read ``unroll`` steps
ahead (with runs: a run's G values at its end, raw bits read a block ahead, see ``decode_lane_runs``). No
intermediate array is written: compressed bytes in, output bits out (plus, only with the optional word prefetch,
a 4-byte sink per lane, see ``lanes_touch``). Positions past the end of the tensor in the last
tile are not coded; the kernel decodes them anyway (they end each lane's sequence, so nothing before them
changes) and does not write them. ``rans_float_decode_many`` decodes several tensors (a layer) in one launch.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import rans_common as rc


def rans_float_kernel(
    words_ref,    # [copies * W] uint16, whole array
    starts_ref,   # [copies * T*L] uint16 | uint32, whole array
    bases_ref,    # [copies * T] uint32, whole array
    states_ref,   # [copies * T*L] uint32, whole array
    raw_ref,      # [copies * raw_size * rb] uint8, whole array
    table_ref,    # [copies * (4096 + 4096 >> coarse_bits)] uint32, whole array
    tiles_ref,    # [R] int32: the tiles to decode (None: all T)
    out_ref,      # [copies * n] | [R * L*S] uint16 | uint32 (the float bits); this program writes one tile
    sink_ref,     # [programs * block_lanes] uint32: what the prefetching loads read (never used); None
                  # without prefetch
    *, program, n: int, lanes: int, steps: int, dtype: str, copies: int, block_lanes: int, unroll: int,
    coarse_bits: int, prefetch: int, start_ref=None, window: int = 0, raw_early: bool = False, carry: int = 0,
    run: int = 1,
):
    """Decode one tile: tile ``p`` (or ``tiles[p]``) of output copy ``o``, where ``program = o * per_copy + p``;
    that is array copy ``c = o``, or ``c = start + o`` for a window (``start_ref``: [1] int32, ``window``
    copies). ``block_lanes``: L rounded up to a power of two (the vector)."""
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
    pair_base = table_base + table_ref.shape[0] // copies - rc.PAIR_TABLE if dtype == rc.PAIRS else None
    rb = rc.RAW_BYTES[dtype]
    # raw bytes: a full tile's lanes carry their last `carry` values in their end state (jcodec.codecs.split_carry);
    # the raw array holds the other steps of every full tile, then the last tile's (value units here)
    full = t < n // tile
    per_value = rc.raw_layout(dtype)[1]  # raw_ref elements per value (pair symbols: one uint16 per pair)
    raw_tile = c * (raw_ref.shape[0] // (copies * per_value)) + t * ((steps - carry) * lanes)
    raw_first = raw_tile + l

    def read_raw(k, ok):  # [B] uint32 raw bits of step k (masked past the end, and where carried)
        return load_raw(raw_ref, raw_first + k * lanes, ok, rb)

    def write(k, sym, raw, mask):
        bits = rc.join_float(sym, raw, dtype).astype(out_ref.dtype)
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
            # compiler carried g * L * G as a 64-bit induction variable and compared in 64 bits, 2 instructions a
            # step more (bench/sass.py)
            ok = at < limit - g * (lanes * run)
            return ok if block_lanes == lanes else ok & live[:, None]

        def read_run(g):
            return load_raw(raw_ref, raw_tile + g * (lanes * run) + at, run_ok(g), rb)

        def write_run(g, sym, raw):
            bits = rc.join_float(sym, raw, dtype).astype(out_ref.dtype)
            plgpu.store(out_ref.at[out_base + p * tile + g * (lanes * run) + out_at], bits, mask=run_ok(g), **STREAM)

        def write_tail(i, sym, x_end):  # tail step steps - carry + i: a full tile's raw bits from the end state
            k = steps - carry + i
            ok = live & (k * lanes + l < n - t * tile)
            write(k, sym, jnp.where(full, rc.carried_raw(x_end, i, rb), read_raw(k, ok & ~full)), ok)

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
        plgpu.store(sink_ref.at[program * block_lanes + j], lane_state[3])


def decode_lane_steps(words_ref, table_ref, lane_state, live, in_loop, full, read_raw, write, *, steps: int,
                      unroll: int, carry: int, rb: int, coarse_bits: int, table_base, pair_base, prefetch: int,
                      raw_early: bool):
    """The step loop of the float and pack kernels: every lane's ``steps`` steps, in blocks of ``unroll``; returns
    the end lane state. ``in_loop``: [B] the steps a ``live`` lane writes in the loop; then the last ``carry``
    steps of a lane in a ``full`` tile are written with raw bits from its end state. ``read_raw(k, ok)`` gives
    step ``k``'s raw bits, ``write(k, sym, raw, ok)`` stores step ``k``'s values; raw bytes are loaded ``unroll``
    steps before they are used."""

    def block(b, carry_in):
        lane_state, raws, last, left = carry_in
        touched = lanes_touch(words_ref, lane_state, prefetch)
        # raw_early: the next block's raw bytes all at the top (the loop head waits for every load still in
        # flight, so a load issued late in a block stalls the next one for most of a memory latency)
        next_raws = [read_raw((b + 1) * unroll + u, unroll + u < left) for u in range(unroll)] if raw_early else []
        syms = []
        for u in range(unroll):
            k = b * unroll + u
            sym, lane_state = lanes_step(words_ref, table_ref, lane_state, coarse_bits, table_base, pair_base)
            write(k, sym, raws[u], u < left)
            syms.append(sym)
            if not raw_early:
                next_raws.append(read_raw(k + unroll, unroll + u < left))
        # the last `carry` symbols, kept for the carried steps (register renaming, no work)
        return lanes_fold(lane_state, touched), tuple(next_raws), (last + tuple(syms))[len(syms):], left - unroll

    # left: [B] the steps a lane still writes in the loop, from this block's first (counted down: its masks are one
    # 32-bit compare each, where `k < in_loop` compared against the loop's widened 64-bit counter)
    left = jnp.where(live, in_loop, 0)
    raws = tuple(read_raw(u, u < left) for u in range(unroll))
    last = tuple(jnp.zeros_like(left, dtype=jnp.uint32) for _ in range(carry))
    lane_state, _, last, _ = lax.fori_loop(0, steps // unroll, block, (lane_state, raws, last, left))
    for i, sym in enumerate(last):  # a full tile's carried steps: raw bits from the end state
        write(steps - carry + i, sym, rc.carried_raw(lane_state[0], i, rb), live & full)
    return lane_state


def decode_lane_runs(words_ref, table_ref, lane_state, read_run, write_run, write_tail, *, run: int, steps: int,
                     unroll: int, carry: int, coarse_bits: int, table_base, pair_base, prefetch: int):
    """The step loop of lanes that decode runs of ``run`` consecutive values (``jcodec.rans.lane_positions``):
    every lane's first ``steps - carry`` steps in blocks of ``unroll`` (a multiple of ``run``), run ``g`` being
    steps ``g*G .. g*G+G-1``; then its last ``carry`` steps (the tail). ``read_run(g)`` gives run ``g``'s raw bits
    ([B, G] uint32), loaded at the top of the block before (the loop head waits for the loads of the block
    before, so a block's own would stall it); ``write_run(g, syms, raws)`` stores the run's values ([B, G]) in one
    store; ``write_tail(i, sym, x_end)`` the tail's step ``i`` (``x_end`` the end states). Returns the end lane
    state."""
    per = unroll // run

    def columns(vs):  # G vectors [B] -> [B, G], column u = vs[u] (Triton's join: in registers, no shuffle)
        if len(vs) == 1:
            return vs[0]
        both = jnp.stack([columns(vs[0::2]), columns(vs[1::2])], axis=-1)
        return both.reshape(both.shape[0], -1)

    def block(b, carry_in):
        lane_state, raws = carry_in
        touched = lanes_touch(words_ref, lane_state, prefetch)
        next_raws = tuple(read_run((b + 1) * per + h) for h in range(per))
        for h in range(per):
            syms = []
            for _ in range(run):
                sym, lane_state = lanes_step(words_ref, table_ref, lane_state, coarse_bits, table_base, pair_base)
                syms.append(sym)
            write_run(b * per + h, columns(syms), raws[h])
        return lanes_fold(lane_state, touched), next_raws

    raws = tuple(read_run(h) for h in range(per))
    lane_state, _ = lax.fori_loop(0, (steps - carry) // unroll, block, (lane_state, raws))
    tail = []
    for _ in range(carry):
        sym, lane_state = lanes_step(words_ref, table_ref, lane_state, coarse_bits, table_base, pair_base)
        tail.append(sym)
    for i, sym in enumerate(tail):
        write_tail(i, sym, lane_state[0])
    return lane_state


def run_unroll(unroll: int, steps: int, carry: int, run: int) -> int:
    """The steps per loop iteration of a kernel: ``unroll`` reduced to a divisor of ``steps``, or with runs
    (``run`` > 1) to a multiple of ``run`` that divides the ``steps - carry`` steps in runs."""
    if run == 1:
        return math.gcd(unroll, steps)
    return run * math.gcd(max(unroll // run, 1), (steps - carry) // run)


# Word prefetch. A lane reads its words one at a time, ~0.16 (exponents) to ~0.4 (int8 residuals) per step,
# so it enters a new 32-byte sector every 40-100 steps, and that first read comes from L2 or DRAM: the warp
# then waits in the middle of its dependency chain (ncu: the word's first use is where the matrix kernel
# waits most). With ``prefetch`` = P, at the top of each block of ``unroll`` steps every lane within P words
# of its next sector loads a word of it (into L1), and folds the value into a sink at the END of the block:
# the first instruction that reads a loaded register is where a warp waits for it, and the loop head waits
# for every load still in flight, so a load issued at the top has the whole block to arrive. (Pallas has no
# prefetch instruction, and a load whose value is unused is deleted, hence the sink, stored at the end.)
SECTOR_WORDS = 16
SECTOR_SHIFT = 4  # log2(SECTOR_WORDS)
# Word pairs. A lane that renormalises loads its next word with a per-lane gather: one L1 wavefront per
# such lane, ~0.16 (exponents) to ~0.41 (int8 residuals) of the lanes every step. With word_group=2 the
# kernels read the words as uint32 pairs; a lane keeps the pair that holds its read position and loads
# only when it moves into the next pair, so half as many lanes gather per step (a shift and a mask more).
WORD_GROUPS = (1, 2)


def check_launch(tensors, metas, unroll: int, num_warps: int, prefetch: int, tiles=None) -> list:
    """The arguments every multi-tensor launch (float and int8) shares, checked before it is built; returns
    ``tiles`` as a list with one entry (None or an int32 array) per tensor."""
    if len(tensors) != len(metas) or not metas:
        raise ValueError(f"{len(tensors)=} must equal {len(metas)=} and be >= 1")
    if unroll < 1 or num_warps < 1:
        raise ValueError(f"{unroll=} and {num_warps=} must be >= 1")
    if not 0 <= prefetch <= SECTOR_WORDS:
        raise ValueError(f"{prefetch=} must be in [0, {SECTOR_WORDS}] words (0: no prefetch)")
    tiles = [None] * len(metas) if tiles is None else list(tiles)
    if len(tiles) != len(metas):
        raise ValueError(f"{len(tiles)=} must equal {len(metas)=}")
    return tiles


def stack_lead(states) -> tuple[int, ...]:
    """``(copies,)`` for a stack's arrays (a leading axis), ``()`` for one tensor's."""
    return tuple(states.shape[:1]) if states.ndim == 2 else ()


def check_words(words, lead, word_group: int = 1) -> None:
    if word_group not in WORD_GROUPS:
        raise ValueError(f"{word_group=} must be one of {WORD_GROUPS}")
    if (words.dtype != jnp.uint16 or words.shape[:-1] != lead or words.ndim != len(lead) + 1
            or not 1 <= words.size <= rc.INT32_MAX):
        raise ValueError(f"words={words.dtype}{list(words.shape)} must be uint16{list(lead) + ['W']} with "
                         f"1 <= W and < 2^31 words in all")
    if words.shape[-1] % word_group:
        raise ValueError(f"words={words.dtype}{list(words.shape)} must have a multiple of {word_group=} words "
                         f"per copy (jcodec.tensor.from_encoded and stack_layers pad them to an even count)")


def kernel_words(words, word_group: int):
    """The word array the kernels read: ``uint16[..., W]`` as is, or (``word_group=2``) viewed as
    ``uint32[..., W/2]`` word pairs ``w[2i] | w[2i+1] << 16``: a reshape and a bitcast, no copy."""
    if word_group == 1:
        return words
    return lax.bitcast_convert_type(words.reshape(words.shape[:-1] + (-1, 2)), jnp.uint32)


def unpack_refs(refs, inputs: int, has_tiles, has_start: bool, *optional):
    """The refs of a multi-tensor launch, in call order: ``inputs`` per tensor, the ``tiles`` arrays of the
    tensors that have them, a window's ``start`` if it has one, one output per tensor, then each ``optional``
    group (one flag per tensor: a ref where set, None where not). Returns ``(ins, tiles, start, outs,
    *groups)``."""
    refs, k = list(refs), len(has_tiles)
    ins = [refs.pop(0) for _ in range(inputs * k)]
    tiles = [refs.pop(0) if has else None for has in has_tiles]
    start = refs.pop(0) if has_start else None
    outs = [refs.pop(0) for _ in range(k)]
    return (ins, tiles, start, outs, *[[refs.pop(0) if flag else None for flag in flags] for flags in optional])


def check_window(states, tiles, start, window: int) -> list:
    """A window (copies ``start .. start + window`` of every tensor, each a stack of at least ``window``;
    ``states``: each tensor's states array) checked before launch; returns the call's extra input
    (``[start]`` as int32[1]) or []."""
    if not window:
        if start is not None:
            raise ValueError(f"start={start!r} needs window >= 1")
        return []
    if window < 1 or start is None or any(t is not None for t in tiles):
        raise ValueError(f"{window=} must be >= 1, with a start and without tiles")
    for a in states:
        if a.ndim != 2 or a.shape[0] < window:
            raise ValueError(f"a window of {window} copies needs stacks of at least {window}, got "
                             f"states{list(a.shape)}")
    return [jnp.asarray(start, jnp.int32).reshape(1)]


def group_shift(words_ref) -> int:
    """log2 of the words per element of ``words_ref``: 0 for uint16 words, 1 for uint32 word pairs."""
    return {2: 0, 4: 1}[jnp.dtype(words_ref.dtype).itemsize]


# Cache hints (bf16-lossless kernels). Raw bytes and outputs stream through once; the tables are read every
# step, a warp's lookup touching ~28 of the slot table's 128 lines (ncu, session 14). Raw loads and output stores
# are marked evict-first and table loads evict-last, so that the streams do not push the tables out of L1: the
# pair layer's kernel 404.6 -> 379.3 us under ncu (bench/RESULTS.md, session 14). The int8 kernel reads its
# tables without them (``lanes_step(hints=False)``): its matrix measured the same with and without, its layer
# was not measured with them, and they cost it 5 instructions a step.
STREAM = dict(eviction_policy="evict_first")
KEEP = dict(eviction_policy="evict_last")


def load_raw(raw_ref, i, ok, rb: int):
    """[B] uint32 raw bits of values ``i`` (masked by ``ok``): the raw byte, a pair's two (``rb`` = 2: ``raw_ref``
    holds uint16), or (``rb`` = 3, float32) the 24-bit little-endian value of the three raw bytes
    (``rans_common.join_float``'s ``raw``)."""
    if rb in (1, 2):
        return plgpu.load(raw_ref.at[i], mask=ok, other=0, **STREAM).astype(jnp.uint32)
    b = [plgpu.load(raw_ref.at[3 * i + j], mask=ok, other=0, **STREAM).astype(jnp.uint32) for j in range(3)]
    return b[0] | (b[1] << 8) | (b[2] << 16)


def program_tile(program, tiles: int, copies: int, tiles_ref, start_ref, window: int, static_one_copy: bool):
    """``(o, c, p, t)`` of a program that decodes one tile (``program = o * per_copy + p``): its output copy
    ``o``, array copy ``c`` (``o``, or ``start + o`` for a window), ``p`` its place among the tiles decoded per
    copy, and ``t`` the tile (``p``, or ``tiles[p]`` clamped to the ``tiles`` of a copy).

    ``static_one_copy``: one copy without a window gets static zero copies (known to the compiler: no base
    arithmetic). The float kernel takes it (session 6); the int8 kernel does not: with it, its step loop
    grew from 44.1 to 50.9 SASS instructions a step (u16 p8, ``bench/sass.py``)."""
    if static_one_copy and copies == 1 and start_ref is None:
        o = c = 0
        p = program
    else:
        per_copy = tiles if tiles_ref is None else tiles_ref.shape[0]
        o, p = program // per_copy, program % per_copy
        c = o if start_ref is None else jnp.clip(start_ref[0], 0, copies - window) + o
    t = p if tiles_ref is None else jnp.clip(tiles_ref[p], 0, tiles - 1)  # out-of-range ids are clamped
    return o, c, p, t


def tile_lanes_init(words_ref, starts_ref, bases_ref, states_ref, tile, lanes: int, live, word_base,
                    prefetch: int):
    """:func:`lanes_init` for the lanes of tile ``tile`` (a flat tile index into the arrays; ``live``: [B], the
    vector's lanes below L; padding lanes start as lane 0). A lane starts reading at its tile's base plus its
    start. (Summing the file's word counts here instead, with ``jnp.cumsum``, made the int8 matrix kernel
    2.4-2.7x slower and the bf16-lossless one 1.09-1.16x on the H100, with the same step loop: the scan's
    16 bytes of shared memory were the one difference in the compiled kernel. bench/RESULTS.md, session 9.)"""
    l = jnp.where(live, jnp.arange(live.shape[0], dtype=jnp.int32), 0)
    start = bases_ref[tile].astype(jnp.int32) + starts_ref[tile * lanes + l].astype(jnp.int32)
    return lanes_init(words_ref, start, states_ref[tile * lanes + l], word_base, prefetch)


def steps_with_values(values, lanes: int, steps: int):
    """[B] the steps of a lane that hold one of the ``values`` ([B]) left from its step-0 value on."""
    return jnp.clip((values + lanes - 1) // lanes, 0, steps)


def lanes_init(words_ref, start, x, word_base, prefetch: int):
    """Start of lanes that begin reading at ``start`` ([B] int32, words) of the word streams that start
    ``word_base`` elements into ``words_ref`` (a stack's copy), in state ``x``: (x, ptr, next word, sink);
    with ``prefetch`` the sink holds a word of the next sector.

    ``words_ref`` holds uint16 words, or uint32 word pairs (``kernel_words``, ``word_group=2``): then the
    lane keeps the pair that holds its read position ``ptr`` (counted in words) in place of the word.
    """
    shift = group_shift(words_ref)
    last = words_ref.shape[0] - 1
    ptr = start + (word_base << shift)
    word = words_ref[jnp.minimum(ptr >> shift, last)].astype(jnp.uint32)
    sink = jnp.zeros_like(x)
    if prefetch:
        sink = words_ref[jnp.minimum((ptr + SECTOR_WORDS) >> shift, last)].astype(jnp.uint32)
    return x, ptr, word, sink


def lanes_touch(words_ref, lane_state, prefetch: int):
    """At the top of a block: the lanes within ``prefetch`` words of their next sector load a word of it (see
    "Word prefetch"); returns what they read, for :func:`lanes_fold` at the end of the block (None: off)."""
    if not prefetch:
        return None
    ptr = lane_state[1]
    ahead = ptr + prefetch
    # sectors by shifts: `//` on int32 is a floor division, which Triton emits with a fix-up for negative values
    near = (ahead >> SECTOR_SHIFT) != (ptr >> SECTOR_SHIFT)
    return plgpu.load(words_ref.at[jnp.minimum(ahead >> group_shift(words_ref), words_ref.shape[0] - 1)],
                      mask=near, other=0).astype(jnp.uint32)


def lanes_fold(lane_state, touched):
    """The lane state with ``touched`` (from :func:`lanes_touch`) folded into its sink: its first use."""
    if touched is None:
        return lane_state
    x, ptr, word, sink = lane_state
    return x, ptr, word, sink ^ touched


def lanes_step(words_ref, table_ref, lane_state, coarse_bits: int, table_base=0, pair_base=None, hints=True):
    """One decode step of every lane: (symbol uint32, new lane state). With ``pair_base`` (pair symbols, where
    the pair table starts in ``table_ref``) the "symbol" is the pair's two exponents in place
    (``e1 << 7 | e2 << 23``): from the pair table, or after an ESC from the 16 bits that follow it."""
    x, ptr, word, sink = lane_state
    shift = group_shift(words_ref)
    last = words_ref.shape[0] - 1
    sym, x = rc.rans_step(x, *lookup(table_ref, x, coarse_bits, table_base, hints))
    if pair_base is not None:
        x, need = rc.renormalise(x, word)
        esc = sym == rc.ESC
        # the bypass word follows the renormalisation word, if any: the held word or the one after it. Every ESC
        # lane loads it (a lane reads up to two words in a step; at the ESC rate, 0.15% of pairs on Gaussian
        # weights): with no `other` to keep, fewer instructions than a load masked to the ESC lanes that
        # renormalised (bench/sass.py, the pair layer's kernel: 65.5 -> 63.8 a step; 69.5 in session 16, before
        # this, the unmasked pair-table load and the run mask; its time under ncu did not change, session 17)
        at = ptr + need.astype(jnp.int32)
        second = plgpu.load(words_ref.at[jnp.minimum(at, last)], mask=esc, other=0).astype(jnp.uint32)
        payload, escaped = rc.bypass(x, second)
        x = jnp.where(esc, escaped, x)
        ptr = at + esc.astype(jnp.int32)
        word = plgpu.load(words_ref.at[jnp.minimum(ptr, last)], mask=need | esc,
                          other=word.astype(jnp.uint16)).astype(jnp.uint32)
        # (every lane loads its pair-table entry, ESC's being in the table: no mask, no `other`)
        pair = plgpu.load(table_ref.at[sym.astype(jnp.int32) + pair_base])
        return jnp.where(esc, rc.exponents_in_place(payload), pair), (x, ptr, word, sink)
    if shift:  # `word` is the pair holding ptr: its low half at even ptr, its high half at odd
        x, need = rc.renormalise(x, (word >> ((ptr & 1) << 4).astype(jnp.uint32)) & 0xFFFF)
        ptr = ptr + need.astype(jnp.int32)
        # the next pair, loaded only by the lanes that moved into it (half the word loads)
        word = plgpu.load(words_ref.at[jnp.minimum(ptr >> 1, last)], mask=need & ((ptr & 1) == 0), other=word)
    else:
        x, need = rc.renormalise(x, word)
        ptr = ptr + need.astype(jnp.int32)
        # the word the lane needs next (at most one a step), loaded a step before it can be needed
        word = plgpu.load(words_ref.at[jnp.minimum(ptr, last)], mask=need,
                          other=word.astype(jnp.uint16)).astype(jnp.uint32)
    return sym, (x, ptr, word, sink)


def lookup(table_ref, x, coarse_bits: int, base=0, hints=True):
    """``(entry, symbol or None)`` of the lanes' slots ``x & 4095`` (of the table at ``base``), as
    ``rans_common.rans_step`` takes them: from the symbol tables (``coarse_bits`` :data:`rans_common.BY_SYMBOL`);
    else the packed entry from the full table (0), or from the coarse table where the bucket holds one symbol,
    else (a masked gather, so only those lanes touch the 16 KiB table) from the full table."""
    slot = x & rc.SLOT_MASK
    keep = KEEP if hints else {}

    def gather(i, **masked):
        return plgpu.load(table_ref.at[i], **masked, **keep)

    if coarse_bits == rc.BY_SYMBOL:
        return rc.symbol_lookup(table_ref, slot, base, gather=gather)
    if not coarse_bits:
        return gather(slot.astype(jnp.int32) + base), None
    coarse = gather((slot >> coarse_bits).astype(jnp.int32) + (rc.TABLE_SIZE + base))
    # the full table's entry where the bucket is MIXED, else the coarse entry (one masked load)
    return gather(slot.astype(jnp.int32) + base, mask=coarse == jnp.uint32(rc.MIXED), other=coarse), None


def kernel_table(table, coarse_bits: int, pairs: bool = False):
    """The table the kernels read (on the last axis of ``table``; a stack's tables are flattened afterwards by
    the caller): the 4096 slot entries, then the coarse table for ``coarse_bits``, then with ``pairs`` the pair
    table (the last :data:`rans_common.PAIR_TABLE` entries). The kernels find the pair table at the end of each
    copy's table and read nothing else past the slot entries with ``coarse_bits=0``, so the device table goes
    in as it is (no copy on the decode path) unless it lacks the coarse table asked for, or the symbol tables
    for ``coarse_bits`` :data:`rans_common.BY_SYMBOL` (int8's device tables hold those; bf16-lossless's the
    coarse table)."""
    if not (0 <= coarse_bits <= 11 or coarse_bits == rc.BY_SYMBOL):
        raise ValueError(f"{coarse_bits=} must be in [0, 11] or {rc.BY_SYMBOL} (rans_common.BY_SYMBOL)")
    if coarse_bits == rc.BY_SYMBOL:
        if table.shape[-1] == rc.device_table_size(pairs, by_symbol=True):
            return table
        with_symbols = functools.partial(rc.with_symbol_table, pairs=pairs)
        for _ in range(table.ndim - 1):
            with_symbols = jax.vmap(with_symbols)
        return with_symbols(table)
    if not coarse_bits or (coarse_bits == rc.COARSE_BITS and table.shape[-1] == rc.device_table_size(pairs)):
        return table
    tail = rc.PAIR_TABLE if pairs else 0
    fine = table[..., :rc.TABLE_SIZE]
    coarse = functools.partial(rc.coarse_table, xp=jnp, bits=coarse_bits)
    for _ in range(fine.ndim - 1):
        coarse = jax.vmap(coarse)
    return jnp.concatenate([fine, coarse(fine)] + ([table[..., -tail:]] if tail else []), axis=-1)


def launch_shape(states, tiles, lanes: int) -> tuple[int, int]:
    """``(copies, programs)`` of one tensor of a launch (``states``: its states array): a stack's copies (the
    arrays' leading axis, 1 for one tensor), and its programs, one per tile decoded."""
    copies = states.shape[0] if states.ndim == 2 else 1
    decoded = states.shape[-1] // lanes if tiles is None else tiles.shape[0]
    if tiles is not None and (copies != 1 or tiles.dtype != jnp.int32 or tiles.ndim != 1 or not decoded):
        raise ValueError(f"tiles={tiles.dtype}{list(tiles.shape)} must be int32[R], R >= 1, of one tensor "
                         f"(not a stack)")
    return copies, copies * decoded


def flat(a):
    return a.reshape(-1)


def _many_kernel(*refs, metas, starts, copies, has_tiles, window, unroll, coarse_bits, prefetch, raw_early):
    """Several tensors in one launch: programs ``starts[k] .. starts[k+1]`` decode tensor ``k``."""
    ins, tiles, start, outs, sinks = unpack_refs(refs, 6, has_tiles, bool(window), [bool(prefetch)] * len(metas))
    pid = pl.program_id(0)

    def branch(k):
        def decode_tensor():
            n, lanes, steps, dtype, carry, run = metas[k]
            rans_float_kernel(*ins[6 * k:6 * k + 6], tiles[k], outs[k], sinks[k], program=pid - starts[k], n=n,
                              lanes=lanes, steps=steps, dtype=dtype, copies=copies[k],
                              block_lanes=pl.next_power_of_2(lanes),
                              unroll=run_unroll(unroll, steps, carry, run), coarse_bits=coarse_bits,
                              prefetch=prefetch, start_ref=start, window=window, raw_early=raw_early, carry=carry,
                              run=run)
        return decode_tensor

    rc.run_segment(pid, starts, branch)


def raw_size(n: int, lanes: int, steps: int, carry: int) -> int:
    """Values whose raw bytes are stored: all but the carried ones (``jcodec.codecs.stored_raw_values``)."""
    return n - n // (lanes * steps) * carry * lanes


def _check(words, starts, bases, states, raw, table, n, lanes, steps, dtype, carry, run=1):
    """The arrays of one tensor, or of a stack of tensors of one meta (a leading axis on every array)."""
    if dtype not in rc.RAW_BYTES:
        raise ValueError(f"{dtype=} must be one of {', '.join(rc.RAW_BYTES)}")
    if not (1 <= lanes and 1 <= steps < 1 << 16 and 0 <= carry < steps):
        raise ValueError(f"{lanes=} must be >= 1, {steps=} in [1, 65536) and {carry=} in [0, steps)")
    rc.check_run(run, steps, carry)
    t = max(1, -(-n // (lanes * steps)))
    lead = stack_lead(states)
    copies = lead[0] if lead else 1
    if n < 1 or copies * n * rc.RAW_BYTES[dtype] > rc.INT32_MAX or copies * t * lanes * steps > rc.INT32_MAX:
        raise ValueError(f"{n=} must be >= 1 and its padded tiles and raw bytes must have < 2^31 elements")
    check_lanes(starts, bases, states, lead, t * lanes, lanes)
    raw_dtype, per = rc.raw_layout(dtype)  # (pair symbols: one uint16 per pair)
    raw_shape = lead + (raw_size(n, lanes, steps, carry) * per,)
    if raw.dtype != raw_dtype or raw.shape != raw_shape:
        raise ValueError(f"raw={raw.dtype}{list(raw.shape)} must be {jnp.dtype(raw_dtype).name}{list(raw_shape)}")
    check_table(table, lead, dtype == rc.PAIRS)
    check_words(words, lead)


def check_lanes(starts, bases, states, lead, total: int, lanes: int):
    """Every codec's lane arrays: ``starts`` (uint16 or uint32) and ``states`` (uint32) of ``total`` lanes,
    ``bases`` (uint32) of their tiles, each with the leading axes ``lead``."""
    for name, a, dts, size in [("starts", starts, (jnp.uint16, jnp.uint32), total),
                               ("bases", bases, (jnp.uint32,), total // lanes),
                               ("states", states, (jnp.uint32,), total)]:
        if a.dtype not in dts or a.shape != lead + (size,):
            raise ValueError(f"{name}={a.dtype}{list(a.shape)} must be "
                             f"{' or '.join(jnp.dtype(d).name for d in dts)}{list(lead + (size,))}")


def check_table(table, lead=(), pairs: bool = False):
    """The 4096 slot entries, optionally then the coarse table or the symbol tables, then with ``pairs`` the
    pair table."""
    sizes = tuple(rc.TABLE_SIZE + s + (rc.PAIR_TABLE if pairs else 0) for s in (0, rc.COARSE_SIZE, rc.SYMBOL_TABLE))
    if table.dtype != jnp.uint32 or table.shape[:-1] != lead or table.ndim != len(lead) + 1 \
            or table.shape[-1] not in sizes:
        raise ValueError(f"table={table.dtype}{list(table.shape)} must be uint32{list(lead)}[N], N one of "
                         f"{', '.join(map(str, sizes))}")


# Launch options by launch. ONE tensor (a matrix, a head chunk's tiles) gives too few lanes to hide memory
# latency behind other warps (4096 x 14336: 13 warps per SM), so its lanes hide it themselves: 16 steps per
# loop iteration, words prefetched 8 ahead, raw bytes loaded at the top of a block (that matrix on the H100:
# 388 -> 515 GB/s, bench/RESULTS.md). Several tensors (a layer: ~50 warps per SM) run faster without them
# (692.6 against 648.9 with raw_early, 604.2 with prefetch 4), and every tensor adds a copy of the step loop
# to the kernel, so its compile time grows with ``unroll``.
ONE_TENSOR = dict(unroll=16, prefetch=8, raw_early=True, coarse_bits=rc.COARSE_BITS)
SEVERAL_TENSORS = dict(unroll=4, prefetch=0, raw_early=False, coarse_bits=rc.COARSE_BITS)
# Pair symbols (a launch of pair tensors only; bench/RESULTS.md session 10). One tensor: the full table, words
# prefetched, raw bytes at the top of 8-step blocks (the matrix 767.9 GB/s, against 729.4 at u4 c0 p0 and 684.8
# at u4 c5 p0). Several: u4 c5 p0, a layer at 925.1 GB/s compiled in 16 s; u8 c0 p8 r1 decodes it at 984.4
# but compiles in 76 s, which every model would pay on its first call (pass those options to get them). The
# time is Triton's Coalesce pass (99.7% of it, session 11), which grows with (tensors x unroll)^2. (Session 14,
# timed back to back: u4 c0 p0 r1 beat u4 c5 p0 by 2-3% in three runs and lost by 16% in a fourth, where it was
# timed first.) Session 15, one machine, each twice in opposite orders: u4 c5 p0 with raw_early 1072.3 / 1094.5
# GB/s, without 995.9 / 1055.8, u4 c0 p0 r1 in session 14 no better: the default is u4 c5 p0 r1.
PAIR_ONE_TENSOR = dict(unroll=8, prefetch=8, raw_early=True, coarse_bits=0)
PAIR_SEVERAL_TENSORS = dict(SEVERAL_TENSORS, raw_early=True)


def launch_options(metas, one: dict, several: dict, **given) -> tuple:
    """The ``given`` options' values, in order: each as given, or (None) from ``one`` for a launch of one
    tensor, ``several`` for more (each codec's ONE_TENSOR / SEVERAL_TENSORS)."""
    defaults = one if len(metas) == 1 else several
    return tuple(defaults[k] if v is None else v for k, v in given.items())


@functools.partial(jax.jit, static_argnames=["metas", "unroll", "num_warps", "coarse_bits",
                                             "prefetch", "word_group", "window", "raw_early",
                                             "interpret"])
def rans_float_decode_many(tensors, *, metas, tiles=None, start=None, window: int = 0,
                           unroll: int | None = None, num_warps: int = 4, coarse_bits: int | None = None,
                           prefetch: int | None = None, word_group: int = 1, raw_early: bool | None = None,
                           interpret: bool = False) -> list[jax.Array]:
    """Decode several ``bf16-lossless`` tensors in ONE kernel launch (e.g. all weights of a layer).

    ``tensors``: a sequence of ``(words, starts, bases, states, raw, table)``, each the arrays of one tensor or
    of a stack of tensors of one meta (every array with a leading axis of ``copies``: several layers in one
    launch); ``metas``: a tuple of ``(n, lanes, steps, dtype, carry, run)`` per tensor. ``tiles``: None, or per tensor
    None or int32[R], the tiles to decode (of one tensor, not a stack; e.g. the rows of an embedding).
    Returns per tensor the flat decoded values: ``[n]``, ``[copies, n]``, or ``[R * L*S]`` for ``tiles``
    (tile ``tiles[r]`` at ``r * L*S``; positions past the tensor's end are unspecified). Block sizes as in
    :func:`rans_float_decode`; ``unroll``, ``prefetch``, ``raw_early`` and ``coarse_bits`` left at None are
    chosen by the launch (:data:`ONE_TENSOR` or :data:`SEVERAL_TENSORS`; pair tensors only:
    :data:`PAIR_ONE_TENSOR`, :data:`PAIR_SEVERAL_TENSORS`): every tensor adds a copy of the step loop to the
    kernel (a stack adds one), and a Llama layer's 7 tensors compile in ~12 s at unroll 4, ~40-90 s at 8.
    ``word_group=2`` needs an even word count per copy (as ``jcodec.tensor`` builds them). ``window`` >= 1
    with ``start`` (an int32 scalar, traced welcome; clamped so that the window exists): decode copies
    ``start .. start + window`` of every tensor (each a stack), to ``[window, n]``, reading them in place.
    """
    pairs = all(m[3] == rc.PAIRS for m in metas)
    unroll, prefetch, raw_early, coarse_bits = launch_options(
        metas, *((PAIR_ONE_TENSOR, PAIR_SEVERAL_TENSORS) if pairs else (ONE_TENSOR, SEVERAL_TENSORS)),
        unroll=unroll, prefetch=prefetch, raw_early=raw_early, coarse_bits=coarse_bits)
    tiles = check_launch(tensors, metas, unroll, num_warps, prefetch, tiles)
    extra = check_window([a[3] for a in tensors], tiles, start, window)
    starts, copies = [0], []
    for arrays, (n, lanes, steps, dtype, carry, run), tl in zip(tensors, metas, tiles):
        _check(*arrays, n, lanes, steps, dtype, carry, run)
        check_words(arrays[0], stack_lead(arrays[3]), word_group)
        if dtype == rc.PAIRS and word_group != 1:  # (measured: the pair layer 1143-1151 GB/s against 1191-1210 with
            # single words, u4 c5 p0 r1, bench/RESULTS.md session 17; the code was not kept)
            raise ValueError(f"{word_group=} must be 1 for pair symbols (a lane may read two words in a step)")
        c, programs = launch_shape(arrays[3], tl, lanes)
        copies.append(c)
        starts.append(starts[-1] + (programs // c * window if window else programs))
    rc.filter_triton_deprecation()
    kernel = functools.partial(_many_kernel, metas=tuple(metas), starts=tuple(starts), copies=tuple(copies),
                               has_tiles=tuple(tl is not None for tl in tiles), window=window, unroll=unroll,
                               coarse_bits=coarse_bits, prefetch=prefetch, raw_early=raw_early)
    sizes = [(window or c) * n if tl is None else tl.shape[0] * lanes * steps
             for c, (n, lanes, steps, *_), tl in zip(copies, metas, tiles)]
    outs = pl.pallas_call(
        kernel,
        out_shape=([jax.ShapeDtypeStruct((size,), rc.BITS_DTYPE[m[3]]) for size, m in zip(sizes, metas)]
                   + [jax.ShapeDtypeStruct(((b - a) * pl.next_power_of_2(m[1]),), jnp.uint32)
                      for a, b, m in zip(starts, starts[1:], metas) if prefetch]),
        grid=(starts[-1],),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"rans_float_u{unroll}_w{num_warps}_{rc.lookup_name(coarse_bits)}_p{prefetch}"
             + (f"_g{word_group}" if word_group > 1 else "") + ("_r1" if raw_early else ""),
    )(*[flat(a) for arrays, m in zip(tensors, metas)
        for a in (kernel_words(arrays[0], word_group), *arrays[1:5],
                  kernel_table(arrays[5], coarse_bits, m[3] == rc.PAIRS))],
      *[tl for tl in tiles if tl is not None], *extra)
    return [lax.bitcast_convert_type(b, value_dtype(m[3])).reshape((window or c, -1) if t[3].ndim == 2 else (-1,))
            for b, m, c, t in zip(outs[:len(metas)], metas, copies, tensors)]


def value_dtype(dtype: str):
    """The values' dtype of a kernel dtype (pair symbols decode bfloat16 values, two per symbol)."""
    return jnp.bfloat16 if dtype == rc.PAIRS else jnp.dtype(dtype)


def rans_float_decode(words, starts, bases, states, raw, table, *, n: int, lanes: int, steps: int, dtype: str,
                      carry: int = 0, run: int = 1, tiles=None, unroll: int | None = None, num_warps: int = 4,
                      coarse_bits: int | None = None, prefetch: int | None = None, word_group: int = 1,
                      raw_early: bool | None = None, interpret: bool = False) -> jax.Array:
    """Decode a ``bf16-lossless`` tensor to ``dtype[n]`` (flat) with the Pallas kernel; bit-exact.

    ``tiles`` (int32[R]): decode only those tiles, to ``dtype[R * L*S]`` (see ``rans_float_decode_many``).
    One program per tile; ``unroll`` steps per loop iteration (also how far ahead raw bytes are read; reduced
    to a divisor of ``steps``; None: see ``launch_options``), ``num_warps`` warps per program,
    ``coarse_bits``: log2 of the slots per coarse-table bucket (0: one gather from the full table),
    ``prefetch``: at the top of each block of ``unroll`` steps, lanes within that many words of their next
    32-byte sector of words load one of its words into L1 (0: never; see "Word prefetch"), ``raw_early``: load
    the next block's raw bytes at the top of a block (not one per step, spread through it),
    ``word_group``: 1 loads one word per renormalisation; 2 reads the words as uint32 pairs and loads only
    when a lane moves into its next pair (half the per-lane gathers; needs an even word count).
    """
    return rans_float_decode_many([(words, starts, bases, states, raw, table)],
                                  metas=((n, lanes, steps, dtype, carry, run),),
                                  tiles=None if tiles is None else [tiles],
                                  unroll=unroll, num_warps=num_warps, coarse_bits=coarse_bits,
                                  prefetch=prefetch, word_group=word_group, raw_early=raw_early,
                                  interpret=interpret)[0]


# ----------------------------------------------------------------------------------------- reference
def rans_symbols_reference(words, starts, bases, states, table, *, n: int, lanes: int, steps: int,
                           ends: bool = False, pairs: bool = False, run: int = 1, carry: int = 0):
    """All lanes' decoded symbols (uint32[n], symbol order) in pure jnp: a fori_loop over the steps,
    every lane at once; the exact inverse of ``jcodec.rans.encode``. ``ends``: also return the lanes' end
    states (uint32[T*L]). ``pairs``: pair symbols (``table`` ends with the pair table); the "symbols" are
    each pair's exponents in place, ``e1 << 7 | e2 << 23``, escaped pairs' from their 16 bypass bits. ``run``,
    ``carry``: which value a lane decodes at which step (``rans_common.run_positions``)."""
    last_word = words.shape[0] - 1
    total_lanes = states.shape[0]
    pair_table = table[-rc.PAIR_TABLE:]
    table = table[:rc.TABLE_SIZE]

    def step(k, carry):
        x, ptr, out = carry
        sym, x = rc.rans_step(x, table[x & rc.SLOT_MASK])
        word = words[jnp.minimum(ptr, last_word)].astype(jnp.uint32)
        x, need = rc.renormalise(x, word)
        ptr = ptr + need.astype(ptr.dtype)
        if pairs:
            sym, x, ptr = rc.pair_step(sym, x, ptr, words[jnp.minimum(ptr, last_word)].astype(jnp.uint32),
                                       pair_table[sym])
        return x, ptr, out.at[k].set(sym.astype(out.dtype))

    out = jnp.zeros((steps, total_lanes), jnp.uint32 if pairs else jnp.uint8)
    start = jnp.repeat(bases.astype(jnp.int32), lanes) + starts.astype(jnp.int32)  # [T*L] each lane's first word
    x, _, out = lax.fori_loop(0, steps, step, (states, start, out))
    tiles = total_lanes // lanes
    # [steps, tiles*lanes] -> [tiles, steps, lanes] -> each value at its position in its tile -> symbol order
    sym = out.reshape(steps, tiles, lanes).transpose(1, 0, 2)
    if run > 1:
        k, l = jnp.arange(steps, dtype=jnp.int32)[:, None], jnp.arange(lanes, dtype=jnp.int32)[None, :]
        at = rc.run_positions(k, l, lanes, steps, run, carry).reshape(-1)
        sym = jnp.zeros((tiles, steps * lanes), sym.dtype).at[:, at].set(sym.reshape(tiles, -1))
    sym = sym.reshape(-1)[:n].astype(jnp.uint32)
    return (sym, x) if ends else sym


def raw_reference(raw, ends, *, n: int, lanes: int, steps: int, dtype: str, carry: int):
    """Every value's raw bits (uint32[n]) from the stored raw bytes and the lanes' end states (the carried
    values of the full tiles; ``jcodec.codecs.join_carry``)."""
    rb = rc.RAW_BYTES[dtype]
    if rb in (1, 2):  # (2: pair symbols, raw is uint16)
        r = raw.astype(jnp.uint32)
    else:
        r3 = raw.reshape(-1, 3).astype(jnp.uint32)
        r = r3[:, 0] | (r3[:, 1] << 8) | (r3[:, 2] << 16)
    full = n // (lanes * steps) if carry else 0
    if not full:
        return r
    head = r[:full * (steps - carry) * lanes].reshape(full, steps - carry, lanes)
    carried = jnp.stack([rc.carried_raw(ends[:full * lanes], j, rb) for j in range(carry)])  # [carry, full*L]
    carried = carried.reshape(carry, full, lanes).transpose(1, 0, 2)
    return jnp.concatenate([jnp.concatenate([head, carried], axis=1).reshape(-1), r[full * (steps - carry) * lanes:]])


@functools.partial(jax.jit, static_argnames=["n", "lanes", "steps", "dtype", "carry", "run"])
def rans_float_reference(words, starts, bases, states, raw, table, *, n: int, lanes: int, steps: int,
                         dtype: str, carry: int = 0, run: int = 1) -> jax.Array:
    """Pure-JAX ``bf16-lossless`` decoder (any backend); bit-exact with the kernel and with NumPy. Pair
    symbols (``dtype="bfloat16x2"``, ``n`` pairs): bfloat16[2n]."""
    _check(words, starts, bases, states, raw, table, n, lanes, steps, dtype, carry, run)
    sym, ends = rans_symbols_reference(words, starts, bases, states, table, n=n, lanes=lanes, steps=steps,
                                       ends=True, pairs=dtype == rc.PAIRS, run=run, carry=carry)
    r = raw_reference(raw, ends, n=n, lanes=lanes, steps=steps, dtype=dtype, carry=carry)
    bits = rc.join_float(sym, r, dtype).astype(rc.BITS_DTYPE[dtype])
    return lax.bitcast_convert_type(bits, value_dtype(dtype)).reshape(-1)
