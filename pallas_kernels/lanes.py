"""The lanes every rANS kernel runs: their state, one decode step, the step loops, and the arrays they read.

A *lane* is one rANS state decoding its own word stream (``jcodec.rans``); a program decodes a vector of B
lanes at once (B a power of two, padding lanes masked). A lane's state is :class:`LaneState`: the rANS
state ``x``, its read position ``ptr`` (in words), the word at ``ptr`` (loaded a step before it can be
needed: a lane reads at most one word a step, two after a pair symbol's ESC) and the word prefetch's sink.

Each step a lane looks its slot up (:func:`lookup`), updates its state and renormalises (:func:`lanes_step`);
:func:`decode_lane_steps` and :func:`decode_lane_runs` are the step loops of the bf16-lossless kernels (one
value a step, or runs of consecutive values), in blocks of ``unroll`` steps. The host-side helpers check and
shape the arrays every codec shares (word streams, lane starts and states, tables) before a launch;
:func:`symbols_reference` is the plain-jnp twin of the lanes for the references.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from . import rans_math as rm

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
# Cache hints (bf16-lossless kernels). Raw bytes and outputs stream through once; the tables are read every
# step, a warp's lookup touching ~28 of the slot table's 128 lines (ncu). Raw loads and output stores are
# marked evict-first and table loads evict-last, so that the streams do not push the tables out of L1: the
# pair layer's kernel 404.6 -> 379.3 us under ncu (bench/decode.py --profile). The int8 kernel reads its
# tables without them (``lanes_step(hints=False)``): its matrix measured the same with and without, its layer
# was not measured with them, and they cost it 5 instructions a step.
STREAM = dict(eviction_policy="evict_first")
KEEP = dict(eviction_policy="evict_last")


class LaneState(NamedTuple):
    """The state of a vector of lanes ([B] each): rANS state, read position in words, the word (or uint32
    word pair) at ``ptr``, and the prefetch sink (what the prefetching loads read; zeros without prefetch)."""

    x: jax.Array
    ptr: jax.Array
    word: jax.Array
    sink: jax.Array


# ----------------------------------------------------------------------------------------- in the kernels
def group_shift(words_ref) -> int:
    """log2 of the words per element of ``words_ref``: 0 for uint16 words, 1 for uint32 word pairs."""
    return {2: 0, 4: 1}[jnp.dtype(words_ref.dtype).itemsize]


def lanes_init(words_ref, start, x, word_base, prefetch: int) -> LaneState:
    """Start of lanes that begin reading at ``start`` ([B] int32, words) of the word streams that start
    ``word_base`` elements into ``words_ref`` (a stack's copy), in state ``x``; with ``prefetch`` the sink
    holds a word of the next sector.

    ``words_ref`` holds uint16 words, or uint32 word pairs (``kernel_words``, ``word_group=2``): then the
    lane keeps the pair that holds its read position ``ptr`` (counted in words) in place of the word.
    """
    shift = group_shift(words_ref)
    last = words_ref.shape[0] - 1
    ptr = start + (word_base << shift)
    # every word index is clamped at both ends: a corrupted start or count (a file read with verify=False) must
    # not make a lane read before or after `words` on a GPU (interpret mode on a CPU never faults, so tests cannot
    # see it)
    word = words_ref[jnp.clip(ptr >> shift, 0, last)].astype(jnp.uint32)
    sink = jnp.zeros_like(x)
    if prefetch:
        sink = words_ref[jnp.clip((ptr + SECTOR_WORDS) >> shift, 0, last)].astype(jnp.uint32)
    return LaneState(x, ptr, word, sink)


def tile_lanes_init(words_ref, starts_ref, bases_ref, states_ref, tile, lanes: int, live, word_base,
                    prefetch: int) -> LaneState:
    """:func:`lanes_init` for the lanes of tile ``tile`` (a flat tile index into the arrays; ``live``: [B], the
    vector's lanes below L; padding lanes start as lane 0). A lane starts reading at its tile's base plus its
    start. (Summing the file's word counts here instead, with ``jnp.cumsum``, made the int8 matrix kernel
    2.4-2.7x slower and the bf16-lossless one 1.09-1.16x on the H100, with the same step loop: the scan's
    16 bytes of shared memory were the one difference in the compiled kernel; bench/decode.py.)"""
    l = jnp.where(live, jnp.arange(live.shape[0], dtype=jnp.int32), 0)
    start = bases_ref[tile].astype(jnp.int32) + starts_ref[tile * lanes + l].astype(jnp.int32)
    return lanes_init(words_ref, start, states_ref[tile * lanes + l], word_base, prefetch)


def lanes_touch(words_ref, lane_state: LaneState, prefetch: int):
    """At the top of a block: the lanes within ``prefetch`` words of their next sector load a word of it (see
    "Word prefetch"); returns what they read, for :func:`lanes_fold` at the end of the block (None: off)."""
    if not prefetch:
        return None
    ptr = lane_state.ptr
    ahead = ptr + prefetch
    # sectors by shifts: `//` on int32 is a floor division, which Triton emits with a fix-up for negative values
    near = (ahead >> SECTOR_SHIFT) != (ptr >> SECTOR_SHIFT)
    return plgpu.load(words_ref.at[jnp.clip(ahead >> group_shift(words_ref), 0, words_ref.shape[0] - 1)],
                      mask=near, other=0).astype(jnp.uint32)


def lanes_fold(lane_state: LaneState, touched) -> LaneState:
    """The lane state with ``touched`` (from :func:`lanes_touch`) folded into its sink: its first use."""
    if touched is None:
        return lane_state
    return lane_state._replace(sink=lane_state.sink ^ touched)


def lookup(table_ref, x, coarse_bits: int, base=0, hints=True):
    """``(entry, symbol or None)`` of the lanes' slots ``x & 4095`` (of the table at ``base``), as
    ``rans_math.rans_step`` takes them: from the symbol tables (``coarse_bits`` :data:`rans_math.BY_SYMBOL`);
    else the packed entry from the full table (0), or from the coarse table where the bucket holds one symbol,
    else (a masked gather, so only those lanes touch the 16 KiB table) from the full table."""
    slot = x & rm.SLOT_MASK
    keep = KEEP if hints else {}

    def gather(i, **masked):
        return plgpu.load(table_ref.at[i], **masked, **keep)

    if coarse_bits == rm.BY_SYMBOL:
        return rm.symbol_lookup(table_ref, slot, base, gather=gather)
    if not coarse_bits:
        return gather(slot.astype(jnp.int32) + base), None
    coarse = gather((slot >> coarse_bits).astype(jnp.int32) + (rm.TABLE_SIZE + base))
    # the full table's entry where the bucket is MIXED, else the coarse entry (one masked load)
    return gather(slot.astype(jnp.int32) + base, mask=coarse == jnp.uint32(rm.MIXED), other=coarse), None


def lanes_step(words_ref, table_ref, lane_state: LaneState, coarse_bits: int, table_base=0, pair_base=None,
               hints=True):
    """One decode step of every lane: (symbol uint32, new lane state). With ``pair_base`` (pair symbols, where
    the pair table starts in ``table_ref``) the "symbol" is the pair's two exponents in place
    (``e1 << 7 | e2 << 23``): from the pair table, or after an ESC from the 16 bits that follow it."""
    x, ptr, word, sink = lane_state
    shift = group_shift(words_ref)
    last = words_ref.shape[0] - 1
    sym, x = rm.rans_step(x, *lookup(table_ref, x, coarse_bits, table_base, hints))
    if pair_base is not None:
        x, need = rm.renormalise(x, word)
        esc = sym == rm.ESC
        # the bypass word follows the renormalisation word, if any: the held word or the one after it. Every ESC
        # lane loads it (a lane reads up to two words in a step; at the ESC rate, 0.15% of pairs on Gaussian
        # weights): with no `other` to keep, fewer instructions than a load masked to the ESC lanes that
        # renormalised (the pair layer's kernel: 65.5 -> 63.8 SASS instructions a step; its time under ncu
        # did not change)
        at = ptr + need.astype(jnp.int32)
        second = plgpu.load(words_ref.at[jnp.clip(at, 0, last)], mask=esc, other=0).astype(jnp.uint32)
        payload, escaped = rm.bypass(x, second)
        x = jnp.where(esc, escaped, x)
        ptr = at + esc.astype(jnp.int32)
        word = plgpu.load(words_ref.at[jnp.clip(ptr, 0, last)], mask=need | esc,
                          other=word.astype(jnp.uint16)).astype(jnp.uint32)
        # (every lane loads its pair-table entry, ESC's being in the table: no mask, no `other`)
        pair = plgpu.load(table_ref.at[sym.astype(jnp.int32) + pair_base])
        return jnp.where(esc, rm.exponents_in_place(payload), pair), LaneState(x, ptr, word, sink)
    if shift:  # `word` is the pair holding ptr: its low half at even ptr, its high half at odd
        x, need = rm.renormalise(x, (word >> ((ptr & 1) << 4).astype(jnp.uint32)) & 0xFFFF)
        ptr = ptr + need.astype(jnp.int32)
        # the next pair, loaded only by the lanes that moved into it (half the word loads)
        word = plgpu.load(words_ref.at[jnp.clip(ptr >> 1, 0, last)], mask=need & ((ptr & 1) == 0), other=word)
    else:
        x, need = rm.renormalise(x, word)
        ptr = ptr + need.astype(jnp.int32)
        # the word the lane needs next (at most one a step), loaded a step before it can be needed
        word = plgpu.load(words_ref.at[jnp.clip(ptr, 0, last)], mask=need,
                          other=word.astype(jnp.uint16)).astype(jnp.uint32)
    return sym, LaneState(x, ptr, word, sink)


def load_raw(raw_ref, i, ok, rb: int):
    """[B] uint32 raw bits of values ``i`` (masked by ``ok``): the raw byte, a pair's two (``rb`` = 2: ``raw_ref``
    holds uint16), or (``rb`` = 3, float32) the 24-bit little-endian value of the three raw bytes
    (``rans_math.join_float``'s ``raw``)."""
    if rb in (1, 2):
        return plgpu.load(raw_ref.at[i], mask=ok, other=0, **STREAM).astype(jnp.uint32)
    b = [plgpu.load(raw_ref.at[3 * i + j], mask=ok, other=0, **STREAM).astype(jnp.uint32) for j in range(3)]
    return b[0] | (b[1] << 8) | (b[2] << 16)


def steps_with_values(values, lanes: int, steps: int):
    """[B] the steps of a lane that hold one of the ``values`` ([B]) left from its step-0 value on."""
    return jnp.clip((values + lanes - 1) // lanes, 0, steps)


def program_tile(program, tiles: int, copies: int, tiles_ref, start_ref, window: int, static_one_copy: bool):
    """``(o, c, p, t)`` of a program that decodes one tile (``program = o * per_copy + p``): its output copy
    ``o``, array copy ``c`` (``o``, or ``start + o`` for a window), ``p`` its place among the tiles decoded per
    copy, and ``t`` the tile (``p``, or ``tiles[p]`` clamped to the ``tiles`` of a copy).

    ``static_one_copy``: one copy without a window gets static zero copies (known to the compiler: no base
    arithmetic). The bf16-lossless kernel takes it; the int8 kernel does not: with it, its step loop grew from
    44.1 to 50.9 SASS instructions a step (u16 p8)."""
    if static_one_copy and copies == 1 and start_ref is None:
        o = c = 0
        p = program
    else:
        per_copy = tiles if tiles_ref is None else tiles_ref.shape[0]
        o, p = program // per_copy, program % per_copy
        c = o if start_ref is None else jnp.clip(start_ref[0], 0, copies - window) + o
    t = p if tiles_ref is None else jnp.clip(tiles_ref[p], 0, tiles - 1)  # out-of-range ids are clamped
    return o, c, p, t


def decode_lane_steps(words_ref, table_ref, lane_state: LaneState, live, in_loop, full, read_raw, write, *,
                      steps: int, unroll: int, carry: int, rb: int, coarse_bits: int, table_base, pair_base,
                      prefetch: int, raw_early: bool) -> LaneState:
    """The step loop of the bf16-lossless kernels: every lane's ``steps`` steps, in blocks of ``unroll``; returns
    the end lane state. ``in_loop``: [B] the steps a ``live`` lane writes in the loop; then the last ``carry``
    steps of a lane in a ``full`` tile are written with raw bits from its end state. ``read_raw(k, ok)`` gives
    step ``k``'s raw bits, ``write(k, sym, raw, ok)`` stores step ``k``'s values; raw bytes are loaded ``unroll``
    steps before they are used."""

    def block(b, val):
        lane_state, raws, last, remaining = val
        touched = lanes_touch(words_ref, lane_state, prefetch)
        # raw_early: the next block's raw bytes all at the top (the loop head waits for every load still in
        # flight, so a load issued late in a block stalls the next one for most of a memory latency)
        next_raws = ([read_raw((b + 1) * unroll + u, unroll + u < remaining) for u in range(unroll)]
                     if raw_early else [])
        syms = []
        for u in range(unroll):
            k = b * unroll + u
            sym, lane_state = lanes_step(words_ref, table_ref, lane_state, coarse_bits, table_base, pair_base)
            write(k, sym, raws[u], u < remaining)
            syms.append(sym)
            if not raw_early:
                next_raws.append(read_raw(k + unroll, unroll + u < remaining))
        # the last `carry` symbols, kept for the carried steps (register renaming, no work)
        return (lanes_fold(lane_state, touched), tuple(next_raws), (last + tuple(syms))[len(syms):],
                remaining - unroll)

    # remaining: [B] the steps a lane still writes in the loop, from this block's first (counted down: its masks
    # are one 32-bit compare each, where `k < in_loop` compared against the loop's widened 64-bit counter)
    remaining = jnp.where(live, in_loop, 0)
    raws = tuple(read_raw(u, u < remaining) for u in range(unroll))
    last = tuple(jnp.zeros_like(remaining, dtype=jnp.uint32) for _ in range(carry))
    lane_state, _, last, _ = lax.fori_loop(0, steps // unroll, block, (lane_state, raws, last, remaining))
    for i, sym in enumerate(last):  # a full tile's carried steps: raw bits from the end state
        write(steps - carry + i, sym, rm.carried_raw(lane_state.x, i, rb), live & full)
    return lane_state


def decode_lane_runs(words_ref, table_ref, lane_state: LaneState, read_run, write_run, write_tail, *, run: int,
                     steps: int, unroll: int, carry: int, coarse_bits: int, table_base, pair_base,
                     prefetch: int) -> LaneState:
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

    def block(b, val):
        lane_state, raws = val
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
        write_tail(i, sym, lane_state.x)
    return lane_state


def run_unroll(unroll: int, steps: int, carry: int, run: int) -> int:
    """The steps per loop iteration of a kernel: ``unroll`` reduced to a divisor of ``steps``, or with runs
    (``run`` > 1) to a multiple of ``run`` that divides the ``steps - carry`` steps in runs."""
    if run == 1:
        return math.gcd(unroll, steps)
    return run * math.gcd(max(unroll // run, 1), (steps - carry) // run)


# ----------------------------------------------------------------------------------------- on the host
def stack_lead(states) -> tuple[int, ...]:
    """``(copies,)`` for a stack's arrays (a leading axis), ``()`` for one tensor's."""
    return tuple(states.shape[:1]) if states.ndim == 2 else ()


def check_words(words, lead, word_group: int = 1) -> None:
    if word_group not in WORD_GROUPS:
        raise ValueError(f"{word_group=} must be one of {WORD_GROUPS}")
    if (words.dtype != jnp.uint16 or words.shape[:-1] != lead or words.ndim != len(lead) + 1
            or not 1 <= words.size <= rm.INT32_MAX):
        raise ValueError(f"words={words.dtype}{list(words.shape)} must be uint16{list(lead) + ['W']} with "
                         f"1 <= W and < 2^31 words in all")
    if words.shape[-1] % word_group:
        raise ValueError(f"words={words.dtype}{list(words.shape)} must have a multiple of {word_group=} words "
                         f"per copy (jcodec.tensor.from_encoded and stack_layers pad them to an even count)")


def check_lanes(starts, bases, states, lead, total: int, lanes: int) -> None:
    """Every codec's lane arrays: ``starts`` (uint16 or uint32) and ``states`` (uint32) of ``total`` lanes,
    ``bases`` (uint32) of their tiles, each with the leading axes ``lead``."""
    for name, a, dts, size in [("starts", starts, (jnp.uint16, jnp.uint32), total),
                               ("bases", bases, (jnp.uint32,), total // lanes),
                               ("states", states, (jnp.uint32,), total)]:
        if a.dtype not in dts or a.shape != lead + (size,):
            raise ValueError(f"{name}={a.dtype}{list(a.shape)} must be "
                             f"{' or '.join(jnp.dtype(d).name for d in dts)}{list(lead + (size,))}")


def check_table(table, lead=(), pairs: bool = False) -> None:
    """The 4096 slot entries, optionally then the coarse table or the symbol tables, then with ``pairs`` the
    pair table."""
    sizes = tuple(rm.TABLE_SIZE + s + (rm.PAIR_TABLE if pairs else 0) for s in (0, rm.COARSE_SIZE, rm.SYMBOL_TABLE))
    if table.dtype != jnp.uint32 or table.shape[:-1] != lead or table.ndim != len(lead) + 1 \
            or table.shape[-1] not in sizes:
        raise ValueError(f"table={table.dtype}{list(table.shape)} must be uint32{list(lead)}[N], N one of "
                         f"{', '.join(map(str, sizes))}")


def kernel_words(words, word_group: int):
    """The word array the kernels read: ``uint16[..., W]`` as is, or (``word_group=2``) viewed as
    ``uint32[..., W/2]`` word pairs ``w[2i] | w[2i+1] << 16``: a reshape and a bitcast, no copy."""
    if word_group == 1:
        return words
    return lax.bitcast_convert_type(words.reshape(words.shape[:-1] + (-1, 2)), jnp.uint32)


def kernel_table(table, coarse_bits: int, pairs: bool = False):
    """The table the kernels read (on the last axis of ``table``; a stack's tables are flattened afterwards by
    the caller): the 4096 slot entries, then the coarse table for ``coarse_bits``, then with ``pairs`` the pair
    table (the last :data:`rans_math.PAIR_TABLE` entries). The kernels find the pair table at the end of each
    copy's table and read nothing else past the slot entries with ``coarse_bits=0``, so the device table goes
    in as it is (no copy on the decode path) unless it lacks the coarse table asked for, or the symbol tables
    for ``coarse_bits`` :data:`rans_math.BY_SYMBOL` (int8's device tables hold those; bf16-lossless's the
    coarse table)."""
    if not (0 <= coarse_bits <= 11 or coarse_bits == rm.BY_SYMBOL):
        raise ValueError(f"{coarse_bits=} must be in [0, 11] or {rm.BY_SYMBOL} (rans_math.BY_SYMBOL)")
    if coarse_bits == rm.BY_SYMBOL:
        if table.shape[-1] == rm.device_table_size(pairs, by_symbol=True):
            return table
        with_symbols = functools.partial(rm.with_symbol_table, pairs=pairs)
        for _ in range(table.ndim - 1):
            with_symbols = jax.vmap(with_symbols)
        return with_symbols(table)
    if not coarse_bits or (coarse_bits == rm.COARSE_BITS and table.shape[-1] == rm.device_table_size(pairs)):
        return table
    tail = rm.PAIR_TABLE if pairs else 0
    fine = table[..., :rm.TABLE_SIZE]
    coarse = functools.partial(rm.coarse_table, xp=jnp, bits=coarse_bits)
    for _ in range(fine.ndim - 1):
        coarse = jax.vmap(coarse)
    return jnp.concatenate([fine, coarse(fine)] + ([table[..., -tail:]] if tail else []), axis=-1)


# ----------------------------------------------------------------------------------------- reference
def symbols_reference(words, starts, bases, states, table, *, n: int, lanes: int, steps: int,
                      ends: bool = False, pairs: bool = False, run: int = 1, carry: int = 0):
    """All lanes' decoded symbols (uint32[n], symbol order) in pure jnp: a fori_loop over the steps,
    every lane at once; the exact inverse of ``jcodec.rans.encode``. ``ends``: also return the lanes' end
    states (uint32[T*L]). ``pairs``: pair symbols (``table`` ends with the pair table); the "symbols" are
    each pair's exponents in place, ``e1 << 7 | e2 << 23``, escaped pairs' from their 16 bypass bits. ``run``,
    ``carry``: which value a lane decodes at which step (``rans_math.run_positions``)."""
    last_word = words.shape[0] - 1
    total_lanes = states.shape[0]
    pair_table = table[-rm.PAIR_TABLE:]
    table = table[:rm.TABLE_SIZE]

    def step(k, val):
        x, ptr, out = val
        sym, x = rm.rans_step(x, table[x & rm.SLOT_MASK])
        word = words[jnp.clip(ptr, 0, last_word)].astype(jnp.uint32)
        x, need = rm.renormalise(x, word)
        ptr = ptr + need.astype(ptr.dtype)
        if pairs:
            sym, x, ptr = rm.pair_step(sym, x, ptr, words[jnp.clip(ptr, 0, last_word)].astype(jnp.uint32),
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
        at = rm.run_positions(k, l, lanes, steps, run, carry).reshape(-1)
        sym = jnp.zeros((tiles, steps * lanes), sym.dtype).at[:, at].set(sym.reshape(tiles, -1))
    sym = sym.reshape(-1)[:n].astype(jnp.uint32)
    return (sym, x) if ends else sym
