"""Tile-parallel rANS over byte symbols: the NumPy encoder and the reference decoder.

The layout (docs/FORMAT.md, "rANS streams") in one paragraph: symbols are cut into tiles of
``lanes * steps`` (positions past the end of the tensor in the last tile are skipped, not coded); symbol ``i``
of a tile belongs to lane ``i % lanes`` and is decoded at step ``i // lanes`` (or, with ``run`` > 1, a lane decodes
runs of consecutive symbols: :func:`lane_positions`). Every lane is an independent rANS coder (32-bit state in
[2^16, 2^32), 16-bit words, 12-bit probabilities) with its own word stream; the streams of all lanes are
concatenated lane by lane, each in the order the decoder reads it. So a decoder needs, per lane, only its start
state and where its stream starts: lanes are fully independent, which is what a GPU wants.

Both coders are vectorised over all lanes of all tiles at once: one Python step per symbol position.
"""
from __future__ import annotations

import numpy as np

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
WORD_BITS = 16
STATE_LOW = 1 << 16  # states live in [STATE_LOW, 2^32); a lane starts encoding (and ends decoding) here by default
ALPHABET = 256
# With ``bypass`` (bf16-lossless pair symbols), symbol ESC is followed by 16 raw bits coded as a uniform
# symbol: the decoder takes its state's low 16 bits and shifts the lane's next word in their place, so a lane
# reads up to two words in one step (its renormalisation word first).
ESC = 255


class RansError(ValueError):
    """A stream that does not decode: corrupted words, states or counts."""


def normalize_freqs(counts: np.ndarray) -> np.ndarray:
    """Scale symbol counts to frequencies summing to ``PROB_SCALE``; every present symbol gets >= 1.

    Starts from rounded proportional frequencies, then moves single units where they cost (or save)
    the fewest coded bits, so the table is close to the best 12-bit approximation.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (ALPHABET,) or counts.min() < 0:
        raise ValueError(f"counts must be {ALPHABET} non-negative integers, got shape {counts.shape}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("cannot build a frequency table for zero symbols")
    present = counts > 0
    if int(present.sum()) > PROB_SCALE:
        raise ValueError("more symbols present than probability slots")
    freqs = np.where(present, np.maximum(1, np.rint(counts * (PROB_SCALE / total))), 0).astype(np.int64)
    cnt = counts.astype(np.float64)
    while (diff := int(freqs.sum()) - PROB_SCALE) != 0:
        f = freqs.astype(np.float64)
        if diff > 0:  # take a unit from the symbol whose cost rises least
            shrinkable = freqs > 1
            cost = np.full(ALPHABET, np.inf)
            cost[shrinkable] = cnt[shrinkable] * np.log2(f[shrinkable] / (f[shrinkable] - 1))
            order = np.argsort(cost, kind="stable")[:diff]
            order = order[np.isfinite(cost[order])]
            freqs[order] -= 1
        else:  # give a unit to the symbol that saves most
            gain = np.full(ALPHABET, -np.inf)
            gain[present] = cnt[present] * np.log2((f[present] + 1) / f[present])
            order = np.argsort(-gain, kind="stable")[:-diff]
            freqs[order] += 1
    return freqs.astype(np.uint16)


def slot_tables(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per probability slot: (symbol, frequency, bias = slot - cumulative frequency of the symbol)."""
    freqs = np.asarray(freqs, dtype=np.int64)
    if freqs.shape != (ALPHABET,) or int(freqs.sum()) != PROB_SCALE or freqs.min() < 0:
        raise RansError(f"frequency table must be {ALPHABET} counts summing to {PROB_SCALE}")
    symbol = np.repeat(np.arange(ALPHABET, dtype=np.int64), freqs)
    cum = np.concatenate([[0], np.cumsum(freqs)[:-1]])
    bias = np.arange(PROB_SCALE, dtype=np.int64) - cum[symbol]
    return symbol.astype(np.uint8), freqs[symbol].astype(np.uint32), bias.astype(np.uint32)


def packed_slot_table(freqs: np.ndarray) -> np.ndarray:
    """One uint32 per slot: ``cum | symbol << 12 | (freq - 1) << 20`` (what the GPU kernels gather; ``cum`` the
    symbol's cumulative frequency, so every slot of a symbol holds the same entry; each field takes one
    instruction to extract but the symbol, which is only shifted into place)."""
    symbol, freq, bias = slot_tables(freqs)
    cum = np.arange(PROB_SCALE, dtype=np.uint32) - bias
    return (cum | (symbol.astype(np.uint32) << 12) | ((freq - 1) << 20)).astype(np.uint32)


def num_tiles(n: int, lanes: int, steps: int) -> int:
    return max(1, -(-n // (lanes * steps)))


def lane_positions(lanes: int, steps: int, run: int = 1, tail: int = 0) -> np.ndarray:
    """int64[steps, lanes]: the position in its tile of the symbol that lane ``l`` decodes at step ``k``.

    ``run`` = 1: ``k * lanes + l``. ``run`` G > 1: in the first ``steps - tail`` steps a lane decodes runs of
    G consecutive symbols, ``(k // G) * lanes * G + l * G + k % G``, so that a GPU lane reads its raw bytes and
    writes its values G at a time (one wide load and one wide store, not G narrow ones); its last ``tail`` steps
    (``bf16-lossless``'s carried values) stay at ``k * lanes + l``. Needs ``(steps - tail) % run == 0``."""
    if run < 1 or not 0 <= tail <= steps or (steps - tail) % run:
        raise ValueError(f"{run=} must be >= 1 and divide steps - tail ({steps=}, {tail=})")
    k = np.arange(steps, dtype=np.int64)[:, None]
    l = np.arange(lanes, dtype=np.int64)[None, :]
    runs = (k // run) * (lanes * run) + l * run + k % run
    return np.where(k < steps - tail, runs, k * lanes + l)


def tile_symbols(symbols: np.ndarray, lanes: int, steps: int, pad: int, positions=None) -> np.ndarray:
    """[n] -> [tiles, steps, lanes], the last tile filled up with ``pad``: positions >= n are NOT coded
    (encoder and decoders leave the lane's state unchanged there), so padding costs nothing. ``positions``
    (:func:`lane_positions`): which symbol of its tile each lane decodes at each step (default: ``k * lanes + l``)."""
    n = symbols.size
    t = num_tiles(n, lanes, steps)
    padded = np.full(t * lanes * steps, pad, dtype=symbols.dtype)
    padded[:n] = symbols
    padded = padded.reshape(t, steps * lanes)
    return (padded if positions is None else padded[:, positions.reshape(-1)]).reshape(t, steps, lanes)


def lane_first(t: int, lanes: int, steps: int, positions) -> np.ndarray:
    """int64[steps, t * lanes]: the global symbol index that each lane decodes at each step."""
    tile = np.arange(t, dtype=np.int64)[:, None] * (lanes * steps)  # [t, 1]
    return (tile[None, :, :] + positions[:, None, :]).reshape(steps, t * lanes)


def encode(symbols: np.ndarray, freqs: np.ndarray, lanes: int, steps: int, start=None, bypass=None,
           run: int = 1, tail: int = 0):
    """Encode ``symbols`` (uint8[n]) with the table ``freqs``; ``run``, ``tail``: which lane decodes which
    symbol at which step (:func:`lane_positions`).

    ``bypass`` (uint16[n], optional): after every :data:`ESC` symbol, its 16 bits are coded as a uniform
    symbol (see :data:`ESC`); elsewhere it is ignored.

    ``start``: each lane's encoder start state (uint32[T*L] in [2^16, 2^32); default 2^16), which is also
    where its decoder ends: a start state can carry data of its own (``bf16-lossless`` puts raw bytes
    there, which would otherwise cost a lane the ~16 bits of its end state that carry nothing).
    Returns ``(states uint32[T*L], counts uint16[T*L], words uint16[W])``: each lane's decoder start
    state, the number of words in its stream, and all streams concatenated lane by lane.
    """
    symbols = np.asarray(symbols, dtype=np.uint8).reshape(-1)
    freqs64 = np.asarray(freqs, dtype=np.uint64)
    if np.any(freqs64[np.unique(symbols)] == 0):
        raise ValueError("a symbol to encode has frequency 0")
    per_step = 1 if bypass is None else 2  # words a lane may read in one step
    if steps * per_step >= 1 << 16:
        raise ValueError(f"{steps=} must be < {(1 << 16) // per_step} so that a lane's word count fits in 16 bits")
    cum = np.concatenate([[0], np.cumsum(freqs64)[:-1]]).astype(np.uint64)
    n = symbols.size
    positions = lane_positions(lanes, steps, run, tail)
    tiled = tile_symbols(symbols, lanes, steps, int(np.argmax(freqs64)), positions)
    t = tiled.shape[0]
    x = np.full(t * lanes, STATE_LOW, dtype=np.uint64)
    if start is not None:
        start = np.asarray(start).astype(np.uint64)
        if start.shape != x.shape or start.min() < STATE_LOW or start.max() >= 1 << 32:
            raise ValueError(f"start states must be {x.size} values in [2^16, 2^32)")
        x = start.copy()
    emitted = np.empty((steps, per_step, t * lanes), dtype=np.uint16)  # [k, 0] renormalisation, [k, 1] bypass
    emits = np.zeros((steps, per_step, t * lanes), dtype=bool)
    if bypass is not None:
        pay = tile_symbols(np.asarray(bypass, np.uint16).reshape(-1), lanes, steps, 0, positions).astype(np.uint64)
    limit_shift = np.uint64(WORD_BITS + 16 - PROB_BITS)  # x_max(s) = freq(s) << 20
    at = lane_first(t, lanes, steps, positions)
    for k in range(steps - 1, -1, -1):
        s = tiled[:, k, :].reshape(-1)
        valid = at[k] < n
        if bypass is not None:  # undo the decoder's last act of the step: the bypass word
            esc = (s == ESC) & valid
            emitted[k, 1] = x.astype(np.uint16)
            emits[k, 1] = esc
            x = np.where(esc, (x & np.uint64(0xFFFF0000)) | pay[:, k, :].reshape(-1), x)
        f = freqs64[s]
        need = (x >= (f << limit_shift)) & valid
        emitted[k, 0] = x.astype(np.uint16)  # low 16 bits; kept only where need
        emits[k, 0] = need
        x = np.where(need, x >> np.uint64(WORD_BITS), x)
        q, r = np.divmod(x, f)
        x = np.where(valid, (q << np.uint64(PROB_BITS)) + r + cum[s], x)  # padding is not coded
    # The decoder reads lane j's words in increasing step order (in a step, renormalisation before bypass):
    # exactly emitted[k, i, j] where emits[k, i, j].
    words = emitted.transpose(2, 0, 1)[emits.transpose(2, 0, 1)]
    counts = emits.sum(axis=(0, 1)).astype(np.uint16)
    return x.astype(np.uint32), counts, words


def lane_offsets(counts: np.ndarray) -> np.ndarray:
    """Where each lane's stream starts in the concatenated words (exclusive prefix sum), int64."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts.size else counts


def decode(states: np.ndarray, counts: np.ndarray, words: np.ndarray, freqs: np.ndarray,
           lanes: int, steps: int, n: int, *, ends: bool = False, bypass: bool = False, run: int = 1,
           tail: int = 0):
    """Reference decoder: the exact inverse of :func:`encode` (of the same ``run`` and ``tail``); uint8[n].

    ``bypass``: the stream codes 16 bits after every :data:`ESC`; returns ``(symbols, bits)``, the bits
    uint16[n] (0 where the symbol is not ESC), then the end states if ``ends``.

    Raises :class:`RansError` if any lane does not read exactly its stream, or (unless ``ends``) does not
    end in the default start state 2^16 (which a corrupted stream almost never does by chance). With
    ``ends=True`` it returns ``(symbols, end states uint32[T*L])``, the encoder's ``start``, for the caller
    to check.
    """
    t = num_tiles(n, lanes, steps)
    states = np.asarray(states)
    counts = np.asarray(counts)
    if states.shape != (t * lanes,) or counts.shape != (t * lanes,):
        raise RansError(f"expected {t * lanes} lane states and counts, got {states.shape} and {counts.shape}")
    words = np.asarray(words, dtype=np.uint16).reshape(-1)
    start = lane_offsets(counts)
    end = start + counts.astype(np.int64)
    if t * lanes and int(end[-1]) != words.size:
        raise RansError(f"lane word counts add up to {int(end[-1])}, stream holds {words.size} words")
    symbol, freq, bias = slot_tables(freqs)
    x = states.astype(np.uint32)
    if np.any(x < STATE_LOW):
        raise RansError("a lane's start state is below 2^16")
    ptr = start.copy()
    last = max(words.size - 1, 0)
    padded_words = words if words.size else np.zeros(1, np.uint16)
    out = np.empty((steps, t * lanes), dtype=np.uint8)
    pay = np.zeros((steps, t * lanes), dtype=np.uint16) if bypass else None
    positions = lane_positions(lanes, steps, run, tail)
    at = lane_first(t, lanes, steps, positions)
    for k in range(steps):
        valid = at[k] < n  # positions past the end of the tensor are padding: not coded
        slot = x & np.uint32(PROB_SCALE - 1)
        out[k] = symbol[slot]
        x = np.where(valid, freq[slot] * (x >> np.uint32(PROB_BITS)) + bias[slot], x)
        need = (x < np.uint32(STATE_LOW)) & valid
        w = padded_words[np.minimum(ptr, last)].astype(np.uint32)
        x = np.where(need, (x << np.uint32(WORD_BITS)) | w, x)
        ptr += need
        if bypass:
            esc = (out[k] == ESC) & valid
            pay[k] = np.where(esc, x & np.uint32(0xFFFF), 0)
            w = padded_words[np.minimum(ptr, last)].astype(np.uint32)
            x = np.where(esc, (x & np.uint32(0xFFFF0000)) | w, x)
            ptr += esc
    wrong = (ptr != end) if ends else (ptr != end) | (x != STATE_LOW)
    if np.any(wrong):
        raise RansError(corrupt_lanes(np.flatnonzero(wrong), lanes))
    def order(a):  # [steps, tiles*lanes] -> each tile's symbols at their positions -> flat, symbol order
        out = np.empty((t, steps * lanes), a.dtype)
        out[:, positions.reshape(-1)] = a.reshape(steps, t, lanes).transpose(1, 0, 2).reshape(t, -1)
        return out.reshape(-1)[:n]

    result = (order(out),) + ((order(pay),) if bypass else ()) + ((x,) if ends else ())
    return result if len(result) > 1 else result[0]


def corrupt_lanes(bad_lanes: np.ndarray, lanes: int) -> str:
    """The message for lanes whose streams do not decode (the first one named)."""
    first = int(bad_lanes[0])
    return f"rANS stream corrupt in tile {first // lanes} (lane {first % lanes})"


def coded_bits(symbol_counts: np.ndarray, freqs: np.ndarray) -> float:
    """Ideal coded size in bits of symbols with these counts under the table (for choosing predictors)."""
    c = np.asarray(symbol_counts, dtype=np.float64)
    f = np.asarray(freqs, dtype=np.float64)
    used = c > 0
    return float(np.sum(c[used] * (PROB_BITS - np.log2(f[used]))))
