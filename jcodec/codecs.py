"""The codecs: NumPy encoders, and NumPy decoders that are the reference for every other decoder.

An encoded tensor is an :class:`EncodedTensor`: a JSON-able record plus named uint arrays, exactly what the
checkpoint stores (docs/FORMAT.md). Codecs:

- ``bf16-lossless``: the byte holding a float's exponent is rANS coded; the other bits are stored raw.
  Works for bfloat16, float16 and float32 sources, bit-exact for every bit pattern.
- ``int8``: symmetric per-row (output channel) quantisation, a residual predictor chosen per tile, rANS.
- ``zstd``: byte planes compressed with zstandard, decoded on the host.
"""
from __future__ import annotations

import dataclasses
import json
import zlib

import ml_dtypes
import numpy as np
import zstandard

from jcodec import rans

CODECS = ("bf16-lossless", "int8", "zstd")
RANS_CODECS = ("bf16-lossless", "int8")
DEFAULT_LANES = 128
# Steps per lane by codec. Shorter lanes mean more of them to decode in parallel, at 5 bytes (start state,
# word count) per lane: bf16-lossless at 240 steps (8-bit counts, raw bytes carried in the end states) costs
# 0.6639 of BF16 against 0.6609 at 1024 (Gaussian 4096 x 14336), and that matrix decoded 1.24-1.67x faster on
# the H100 (bench/decode.py, one run each). int8 keeps 1024: at 240 steps its file grows 1.4% (0.4415 -> 0.4475),
# for 1.19x on the matrix in a single, unrepeated run (bench/decode.py).
DEFAULT_STEPS = {"bf16-lossless": 240, "int8": 1024}
MAX_LANES = 4096

# dtype name -> (numpy dtype, unsigned view, raw bytes per value)
FLOAT_DTYPES = {
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16), 1),
    "float16": (np.dtype(np.float16), np.dtype(np.uint16), 1),
    "float32": (np.dtype(np.float32), np.dtype(np.uint32), 3),
}
PREDICTORS = ("none", "left", "up")
# Carried raw bytes (docs/FORMAT.md): in every FULL tile, each lane's last CARRY[rb] values keep their raw
# bytes in the lane's encoder start state, 2^bits | raw (bits = 8 * rb * CARRY[rb]), where its decoder ends.
# A lane's end state otherwise carries nothing, and costs ~24 bits of the file; carried, the lane costs
# ~8.5 bits (16 fewer raw bits, ~0.5 more in words), so shorter lanes (more of them in flight on a GPU)
# cost less ratio.
CARRY = {1: 2, 2: 1, 3: 1}  # raw bytes per symbol -> symbols carried per lane (2: a pair of bfloat16 values)
# Pair symbols (bfloat16, format version 3): one rANS symbol codes the exponents of two adjacent values, so a
# decoder pays its table gather, state update and renormalisation once per two values, and moves their raw
# bytes and output bits as one 16- and one 32-bit access. Symbols are the ranks of the tensor's most frequent
# exponent pairs; every other pair is rans.ESC followed by its 16 bits. On the H100 pairs decoded 1.16-1.26x
# faster than one exponent a symbol, side by side (bench/decode.py, its matrix and layer rows); on Gaussian
# weights the pairs cost 2.554 bits per exponent against 2.550. A lane's steps count pairs: 105 steps, 104 of them
# in runs of PAIR_RUN. Shorter lanes cost ratio (each has its state and start) and give more, shorter programs: a
# Llama-3-8B layer in one launch on the H100, side by side, 1223.7 / 1181.8 GB/s at 121 steps (7,044 programs,
# 3.34 waves of 132 SMs x 16, ratio 0.6641), 1264.7 / 1267.4 at 105 (8,119, 3.84 waves, 0.6648); 101 steps
# (3.996 waves, 1289.5) cost 0.66501 (bench/decode.py). A launch's last, partial wave leaves SMs idle for about
# one program's time, and a program is shorter with fewer steps.
PAIR_STEPS = 105
# Runs (format version 4, ``rans.lane_positions``): a lane decodes PAIR_RUN consecutive symbols of its tile at a
# time, not symbols ``lanes`` apart, so a GPU lane loads a run's raw bytes in one load and stores its values in one
# store (pairs: 8 and 16 bytes) where it would make 4 narrow accesses of each. bench/decode.py's pair layer on the
# H100, side by side in one run: 1188.9 / 1203.1 GB/s with runs of 4 against 1077.9 / 1074.3 without (runs of 8,
# tried in a prototype kernel, decoded at 580.5). A lane's last ``carry`` steps (its carried values) are not in
# runs, so runs need (steps - carry) % run == 0: 105 - 1 = 104 steps, 26 runs.
PAIR_RUN = 4
RUNS = (1, 2, 4, 8)
PAIR_ALPHABETS = (15, 31, 63, 127, 191, 255)  # alphabet sizes (ESC included) the encoder tries


# A zstd block holds at most 128 KiB and costs at least 4 bytes (an RLE block: 3 bytes of header, 1 of content), so a
# frame never holds more than 2^15 times its own size: a frame that says it does is refused before allocating.
ZSTD_MAX_EXPANSION = (128 << 10) // 4


class FormatError(ValueError):
    """An encoded tensor that is inconsistent, corrupted, or of an unknown kind."""


@dataclasses.dataclass
class EncodedTensor:
    """One encoded tensor: its metadata record and its arrays (keyed by entry suffix, e.g. ``words``)."""

    record: dict
    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        """Bytes stored for this tensor, metadata record included."""
        return sum(a.nbytes for a in self.arrays.values()) + len(json.dumps(self.record, separators=(",", ":")))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.record["shape"])

    @property
    def dtype(self) -> np.dtype:
        return FLOAT_DTYPES[self.record["dtype"]][0]


def bits_of(a) -> np.ndarray:
    """The bits of an array of 1-, 2- or 4-byte values as unsigned integers of that size (a view of
    ``np.asarray(a)``), so that two arrays compare bit for bit: NaN payloads and -0.0 included."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def dtype_name(dtype) -> str:
    for name, (dt, _, _) in FLOAT_DTYPES.items():
        if np.dtype(dtype) == dt:
            return name
    raise ValueError(f"unsupported dtype {np.dtype(dtype)}; jcodec codes bfloat16, float16 and float32")


# ---------------------------------------------------------------------------------------------- floats
def split_float(bits: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned bit patterns -> (symbol byte holding the exponent, raw bytes [n, raw_bytes])."""
    if dtype == "bfloat16":  # s eeeeeeee mmmmmmm: symbol = exponent, raw = s mmmmmmm
        sym = (bits >> 7).astype(np.uint8)
        raw = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)[:, None]
    elif dtype == "float16":  # s eeeee mm | mmmmmmmm: symbol = high byte, raw = low byte
        sym = (bits >> 8).astype(np.uint8)
        raw = (bits & 0xFF).astype(np.uint8)[:, None]
    else:  # float32: symbol = exponent, raw = s + 23 mantissa bits, 3 bytes little-endian
        sym = ((bits >> 23) & 0xFF).astype(np.uint8)
        raw24 = ((bits >> 8) & 0x800000) | (bits & 0x7FFFFF)
        raw = raw24.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
    return sym, np.ascontiguousarray(raw)


def join_float(sym: np.ndarray, raw: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of :func:`split_float`: unsigned bit patterns."""
    if dtype == "bfloat16":
        s, r = sym.astype(np.uint16), raw[:, 0].astype(np.uint16)
        return ((r & 0x80) << 8) | (s << 7) | (r & 0x7F)
    if dtype == "float16":
        return (sym.astype(np.uint16) << 8) | raw[:, 0].astype(np.uint16)
    raw24 = raw[:, 0].astype(np.uint32) | (raw[:, 1].astype(np.uint32) << 8) | (raw[:, 2].astype(np.uint32) << 16)
    return ((raw24 & 0x800000) << 8) | (sym.astype(np.uint32) << 23) | (raw24 & 0x7FFFFF)


def _tile_crcs(data: np.ndarray, tile_elems: int, tiles: int) -> np.ndarray:
    """CRC-32 of each tile's slice of ``data`` (elements in symbol order)."""
    flat = np.ascontiguousarray(data).reshape(-1)
    return np.array([zlib.crc32(flat[t * tile_elems:(t + 1) * tile_elems].tobytes()) for t in range(tiles)],
                    dtype=np.uint32)


def _rans_arrays(symbols, lanes, steps, start=None, bypass=None, run: int = 1, tail: int = 0):
    """rANS-code ``symbols`` with a per-tensor table: freqs, states, counts, words and the word bases.
    ``bypass``: the 16 bits coded after each ESC (pair symbols; up to two words a step); ``run``, ``tail``:
    lanes decode runs (``rans.lane_positions``)."""
    freqs = rans.normalize_freqs(np.bincount(symbols, minlength=rans.ALPHABET))
    states, counts, words = rans.encode(symbols, freqs, lanes, steps, start, bypass, run, tail)
    if words.size >= 1 << 32:
        raise ValueError("tensor too large for one stream; split it")
    bases = rans.lane_offsets(counts)[::lanes].astype(np.uint32)
    return freqs, states, counts.astype(counts_dtype(steps, 1 if bypass is None else 2)), words, bases


def counts_dtype(steps: int, per_step: int = 1):
    """A lane reads at most ``per_step`` words a step (2 with pair symbols): uint8 word counts when
    ``steps * per_step`` <= 255 (8 bits less per lane, which matters for short lanes), else uint16."""
    return np.dtype(np.uint8 if steps * per_step < 256 else np.uint16)


def encode_float(x: np.ndarray, lanes: int = DEFAULT_LANES, steps: int | None = None, *,
                 carry: bool = True, pairs: bool = False, run: int | None = None) -> EncodedTensor:
    """``bf16-lossless``: rANS on the exponent byte, raw sign+mantissa. Bit-exact for every pattern.
    ``carry=False`` stores every raw byte in ``raw`` (format version 1's layout). ``pairs`` (bfloat16 only):
    one symbol per two values' exponents (:data:`PAIR_STEPS`). ``run``: lanes decode runs of that many
    symbols (:data:`PAIR_RUN`); None: :data:`PAIR_RUN` with pairs where the steps allow it, else 1."""
    if pairs:
        return encode_pairs(x, lanes, PAIR_STEPS if steps is None else steps, carry=carry, run=run)
    steps = DEFAULT_STEPS["bf16-lossless"] if steps is None else steps
    name = dtype_name(x.dtype)
    _, udt, _ = FLOAT_DTYPES[name]
    bits = np.ascontiguousarray(x).reshape(-1).view(udt)
    n = bits.size
    if n == 0:
        raise ValueError("cannot encode an empty tensor")
    sym, raw = split_float(bits, name)
    carry = carry_values(name, steps) if carry else 0
    run = check_run(run or 1, steps, carry)
    stored, start = split_carry(raw, lanes, steps, carry)
    freqs, states, counts, words, bases = _rans_arrays(sym, lanes, steps, start, run=run, tail=carry)
    t = rans.num_tiles(n, lanes, steps)
    tiles = np.zeros((t, 3), np.uint32)
    tiles[:, 0] = bases
    tiles[:, 1] = _tile_crcs(bits, lanes * steps, t)
    record = dict(codec="bf16-lossless", shape=list(x.shape), dtype=name, lanes=lanes, steps=steps,
                  prob_bits=rans.PROB_BITS, tiles=t, words=int(words.size), carry=carry, **run_field(run))
    arrays = dict(freqs=freqs, states=states, counts=counts, words=words, raw=stored, tiles=tiles)
    return EncodedTensor(record, arrays)


def pair_symbols(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bfloat16 bit patterns (uint16[2m]) -> ``(symbols uint8[m], bits uint16[m], pairs uint16[256])``.

    Pair ``j`` is values ``2j, 2j+1``; its 16 bits are ``e1 | e2 << 8`` (their exponents). Symbol ``s`` < ESC
    stands for the pair ``pairs[s]`` (the tensor's most frequent pairs, by rank); ESC for any other, whose
    bits follow it in the stream. The alphabet size is the one of :data:`PAIR_ALPHABETS` that codes smallest
    (an ESC costs its 16 bits on top of its own symbol)."""
    e = ((bits >> 7) & 0xFF).astype(np.int64)
    both = e[0::2] | (e[1::2] << 8)
    counts = np.bincount(both, minlength=1 << 16)
    order = np.argsort(-counts, kind="stable")
    best = None
    for k in PAIR_ALPHABETS:
        top = order[:k - 1][counts[order[:k - 1]] > 0]
        sym_counts = np.zeros(rans.ALPHABET, np.int64)
        sym_counts[:top.size] = counts[top]
        sym_counts[rans.ESC] = both.size - sym_counts.sum()
        freqs = rans.normalize_freqs(sym_counts)
        size = rans.coded_bits(sym_counts, freqs) + 16 * sym_counts[rans.ESC]
        if best is None or size < best[0]:
            best = (size, top)
        if top.size < k - 1:  # every pair present already has a symbol
            break
    top = best[1]
    sym_of = np.full(1 << 16, rans.ESC, np.uint8)
    sym_of[top] = np.arange(top.size)
    pairs = np.zeros(rans.ALPHABET, np.uint16)
    pairs[:top.size] = top
    return sym_of[both], both.astype(np.uint16), pairs


def encode_pairs(x: np.ndarray, lanes: int = DEFAULT_LANES, steps: int = PAIR_STEPS, *,
                 carry: bool = True, run: int | None = None) -> EncodedTensor:
    """``bf16-lossless`` with pair symbols (format version 3, docs/FORMAT.md "Pair symbols"): a bfloat16
    tensor of odd size gets one +0 value appended (coded, never returned). ``run``: as in
    :func:`encode_float`."""
    if dtype_name(x.dtype) != "bfloat16":
        raise ValueError(f"pair symbols code bfloat16 tensors, not {dtype_name(x.dtype)}")
    n = x.size
    if n == 0:
        raise ValueError("cannot encode an empty tensor")
    m = -(-n // 2)
    bits = np.zeros(2 * m, np.uint16)
    bits[:n] = np.ascontiguousarray(x).reshape(-1).view(np.uint16)
    symbols, both, pairs = pair_symbols(bits)
    _, raw = split_float(bits, "bfloat16")
    carry = carry_values("bfloat16", steps, pairs=True) if carry else 0  # a pair's 2 raw bytes in each end state
    if run is None:
        run = PAIR_RUN if (steps - carry) % PAIR_RUN == 0 else 1
    run = check_run(run, steps, carry)
    stored, start = split_carry(raw.reshape(m, 2), lanes, steps, carry)
    freqs, states, counts, words, bases = _rans_arrays(symbols, lanes, steps, start, bypass=both, run=run,
                                                       tail=carry)
    t = rans.num_tiles(m, lanes, steps)
    tiles = np.zeros((t, 3), np.uint32)
    tiles[:, 0] = bases
    tiles[:, 1] = _tile_crcs(bits, 2 * lanes * steps, t)
    record = dict(codec="bf16-lossless", shape=list(x.shape), dtype="bfloat16", lanes=lanes, steps=steps,
                  prob_bits=rans.PROB_BITS, tiles=t, words=int(words.size), carry=carry, pairs=True, **run_field(run))
    arrays = dict(freqs=freqs, states=states, counts=counts, words=words, raw=stored, tiles=tiles, pairs=pairs)
    return EncodedTensor(record, arrays)


def run_fits(run, steps: int, carry: int) -> bool:
    """A run length the format allows: one of :data:`RUNS`, dividing the steps that are not carried."""
    return type(run) is int and run in RUNS and (steps - carry) % run == 0


def check_run(run: int, steps: int, carry: int) -> int:
    """``run`` for the encoder, checked (:func:`run_fits`)."""
    if not run_fits(run, steps, carry):
        raise ValueError(f"{run=} must be one of {RUNS} and divide steps - carry = {steps} - {carry}")
    return run


def run_field(run: int) -> dict:
    """The record's ``run`` field: written only for runs (absent: 1, as format versions 1-3 read)."""
    return dict(run=run) if run > 1 else {}


def carry_values(dtype: str, steps: int, pairs: bool = False) -> int:
    """Symbols (values, or with ``pairs`` pairs of values) per lane whose raw bytes ride in its start state (0
    for lanes too short to carry them)."""
    c = CARRY[2 if pairs else FLOAT_DTYPES[dtype][2]]
    return c if steps > c else 0


def stored_raw_values(n: int, lanes: int, steps: int, carry: int) -> int:
    """Values whose raw bytes ``raw`` stores: all but the carried ones (``carry`` values of every lane of the
    full tiles). (``pallas_kernels.bf16_lossless.raw_size`` is its twin: the kernels do not import jcodec.)"""
    return n - n // (lanes * steps) * carry * lanes


def split_carry(raw: np.ndarray, lanes: int, steps: int, carry: int) -> tuple[np.ndarray, np.ndarray]:
    """raw uint8[n, rb] -> (the raw bytes stored, uint8[stored_raw_values * rb]; the lanes' encoder start states).

    Stored: each full tile's raw bytes of steps ``0 .. steps - carry - 1`` (value order), then the last,
    partial tile's. Start state of a lane of a full tile: ``2^(8 rb carry) | R``, R its last ``carry``
    values' raw bytes, little-endian in step order; of any other lane ``2^16``."""
    n, rb = raw.shape
    full = n // (lanes * steps)
    start = np.full(rans.num_tiles(n, lanes, steps) * lanes, rans.STATE_LOW, np.uint32)
    if not carry or not full:
        return raw.reshape(-1).copy(), start
    tiled = raw[:full * lanes * steps].reshape(full, steps, lanes, rb)
    kept = tiled[:, :steps - carry].reshape(-1)
    carried = tiled[:, steps - carry:].transpose(0, 2, 1, 3).reshape(full * lanes, carry * rb).astype(np.uint32)
    start[:full * lanes] = (1 << 8 * carry * rb) | np.bitwise_or.reduce(carried << (8 * np.arange(carry * rb, dtype=np.uint32)), axis=1)
    return np.concatenate([kept, raw[full * lanes * steps:].reshape(-1)]), start


def join_carry(stored: np.ndarray, ends: np.ndarray, n: int, lanes: int, steps: int, carry: int,
               rb: int) -> np.ndarray:
    """Inverse of :func:`split_carry`, given the lanes' decoder end states: raw uint8[n, rb]. Raises
    :class:`FormatError` for a lane whose end state is not of the form its tile implies (corruption)."""
    full = n // (lanes * steps) if carry else 0
    ends = np.asarray(ends, np.uint32)
    bits = 8 * carry * rb
    ok = np.concatenate([ends[:full * lanes] >> np.uint32(bits) == 1 if full else np.zeros(0, bool),
                         ends[full * lanes:] == rans.STATE_LOW])
    if not ok.all():
        raise FormatError(rans.corrupt_lanes(np.flatnonzero(~ok), lanes))
    if not full:
        return stored.reshape(n, rb)
    head = stored[:full * (steps - carry) * lanes * rb].reshape(full, steps - carry, lanes, rb)
    r = ends[:full * lanes, None] >> (8 * np.arange(carry * rb, dtype=np.uint32))
    carried = (r & 0xFF).astype(np.uint8).reshape(full, lanes, carry, rb).transpose(0, 2, 1, 3)
    tail = stored[full * (steps - carry) * lanes * rb:].reshape(-1, rb)
    return np.concatenate([np.concatenate([head, carried], axis=1).reshape(-1, rb), tail])


# ---------------------------------------------------------------------------------------------- int8
def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantisation of a [rows, cols] float array: (q int8, scales float32[rows])."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("int8 needs finite weights (NaN or Inf found); use bf16-lossless for this tensor")
    amax = np.max(np.abs(x), axis=1)
    scales = (amax / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray, dtype: str) -> np.ndarray:
    """float32(q) * scale[row], rounded once to ``dtype`` (round to nearest even): the exact definition."""
    return (q.astype(np.float32) * scales.astype(np.float32)[:, None]).astype(FLOAT_DTYPES[dtype][0])


def _predict(q: np.ndarray, cols: int, tile_elems: int, predictor: int) -> np.ndarray:
    """Residuals (uint8, mod 256) of flat int8 ``q`` under one predictor; neighbours stay inside a tile."""
    q8 = q.view(np.uint8).astype(np.int16)
    if predictor == 0:
        return q.view(np.uint8).copy()
    idx = np.arange(q.size, dtype=np.int32 if q.size < 2**31 else np.int64)
    back = 1 if predictor == 1 else cols
    has = (idx % tile_elems) >= back
    if predictor == 1:
        has &= (idx % cols) != 0
    prev = np.zeros_like(q8)
    prev[back:] = q8[:-back] if back < q.size else prev[back:]
    return ((q8 - np.where(has, prev, 0)) & 0xFF).astype(np.uint8)


def _unpredict(r: np.ndarray, cols: int, tile_elems: int, predictors: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_predict` per tile: prefix sums along the predictor's direction, mod 256."""
    n = r.size
    out = np.empty(n, np.uint8)
    for t, p in enumerate(predictors):
        lo, hi = t * tile_elems, min(n, (t + 1) * tile_elems)
        seg = r[lo:hi].astype(np.int64)
        if p == 0:
            out[lo:hi] = seg
        elif p == 1:  # running sum that restarts at every row start and at the tile start
            cs = np.cumsum(seg)
            starts = np.flatnonzero((np.arange(lo, hi) % cols == 0) | (np.arange(lo, hi) == lo))
            run_start = np.maximum.accumulate(np.where(np.isin(np.arange(hi - lo), starts), np.arange(hi - lo), 0))
            before = np.where(run_start > 0, cs[run_start - 1], 0)
            out[lo:hi] = (cs - before) & 0xFF
        else:  # chains j, j-cols, ... inside the tile: columns of the tile folded into rows of width cols
            m = hi - lo
            rows = -(-m // cols)
            folded = np.zeros(rows * cols, np.int64)
            folded[:m] = seg
            out[lo:hi] = (np.cumsum(folded.reshape(rows, cols), axis=0).reshape(-1)[:m]) & 0xFF
    return out


def encode_int8(x: np.ndarray, lanes: int = DEFAULT_LANES, steps: int = DEFAULT_STEPS["int8"]) -> EncodedTensor:
    """``int8``: quantise per row, pick each tile's predictor by coded size, rANS code the residuals."""
    name = dtype_name(x.dtype)
    if x.ndim < 2:
        raise ValueError("int8 quantises per output channel and needs a tensor of 2 or more dimensions")
    rows = x.shape[0]
    cols = int(np.prod(x.shape[1:]))
    q, scales = quantize_int8(np.asarray(x, np.float32).reshape(rows, cols))
    flat = q.reshape(-1)
    n, te = flat.size, lanes * steps
    t = rans.num_tiles(n, lanes, steps)
    residuals = np.stack([_predict(flat, cols, te, p) for p in range(len(PREDICTORS))])  # [P, n]
    # per tile and predictor: residual histograms (a loop over tiles keeps memory at a few bytes per weight)
    hist = np.array([[np.bincount(r[i * te:(i + 1) * te], minlength=256) for r in residuals] for i in range(t)])
    # first pick by each tile's own entropy, then re-pick twice under the shared table that choice gives
    p_hist = hist / np.maximum(hist.sum(-1, keepdims=True), 1)
    choice = np.argmin(-np.sum(hist * np.log2(np.where(p_hist > 0, p_hist, 1)), -1), axis=1)
    for _ in range(2):
        freqs = rans.normalize_freqs(hist[np.arange(t), choice].sum(0))
        f = freqs.astype(np.float64)
        bits_per_symbol = np.where(f > 0, rans.PROB_BITS - np.log2(np.maximum(f, 1)), 1e9)  # 1e9: not codable
        cost = hist @ bits_per_symbol
        choice = np.argmin(cost, axis=1)
    symbols = np.empty(n, np.uint8)
    for i, p in enumerate(choice):
        symbols[i * te:(i + 1) * te] = residuals[p, i * te:(i + 1) * te]
    del residuals
    freqs, states, counts, words, bases = _rans_arrays(symbols, lanes, steps)
    tiles = np.zeros((t, 3), np.uint32)
    tiles[:, 0] = bases
    tiles[:, 1] = _tile_crcs(flat, te, t)
    tiles[:, 2] = choice
    record = dict(codec="int8", shape=list(x.shape), dtype=name, lanes=lanes, steps=steps,
                  prob_bits=rans.PROB_BITS, tiles=t, words=int(words.size), rows=rows, cols=cols)
    arrays = dict(freqs=freqs, states=states, counts=counts, words=words, scales=scales, tiles=tiles)
    return EncodedTensor(record, arrays)


# ---------------------------------------------------------------------------------------------- zstd
def encode_zstd(x: np.ndarray, level: int = 3) -> EncodedTensor:
    """``zstd``: the value bytes regrouped into byte planes (all low bytes, then ...), one zstd frame."""
    name = dtype_name(x.dtype)
    data = np.ascontiguousarray(x).reshape(-1)
    planes = data.view(np.uint8).reshape(data.size, data.itemsize).T
    frame = zstandard.ZstdCompressor(level=level).compress(np.ascontiguousarray(planes).tobytes())
    record = dict(codec="zstd", shape=list(x.shape), dtype=name, level=level, crc32=zlib.crc32(data.tobytes()))
    return EncodedTensor(record, dict(zstd=np.frombuffer(frame, np.uint8).copy()))


# ---------------------------------------------------------------------------------------------- checks
def _need(cond: bool, what: str):
    if not cond:
        raise FormatError(what)


def _is_int(v) -> bool:
    """An int field: JSON's 1.0 and true are not ints here (they pass ``==`` and fail later as indices)."""
    return type(v) is int


def validate(enc: EncodedTensor) -> None:
    """Check every field's type and value and every array's size before anything is decoded from it."""
    r, a = enc.record, enc.arrays
    _need(isinstance(r, dict) and r.get("codec") in CODECS, f"unknown codec {r.get('codec') if isinstance(r, dict) else r!r}")
    _need(type(r.get("dtype")) is str and r["dtype"] in FLOAT_DTYPES, f"unknown dtype {r.get('dtype')!r}")
    shape = r.get("shape")
    _need(isinstance(shape, list) and len(shape) >= (2 if r["codec"] == "int8" else 1)
          and all(_is_int(d) and d >= 0 for d in shape), f"bad shape {shape!r}")
    n = int(np.prod(shape, dtype=np.int64))
    _need(n > 0 and all(d < 1 << 40 for d in shape) and n < 1 << 40, f"shape {shape} is empty or too large")
    paired = r.get("pairs", False)
    _need(type(paired) is bool and (not paired or (r["codec"] == "bf16-lossless" and r["dtype"] == "bfloat16")),
          f"pairs={paired!r}: pair symbols are a bf16-lossless layout of bfloat16 tensors")
    sealed = "check" in r  # format version 5: stored bytes checksummed (jcodec.integrity)
    _need(not sealed or _is_int(r["check"]), f"check={r.get('check')!r} must be an int")
    expected = {"zstd": {"zstd"}, "bf16-lossless": {"freqs", "states", "counts", "words", "raw", "tiles"},
                "int8": {"freqs", "states", "counts", "words", "scales", "tiles"}}[r["codec"]] | ({"pairs"} if paired else set())
    if sealed and r["codec"] in RANS_CODECS:
        expected |= {"checks"}
    _need(set(a) == expected, f"entries {sorted(a)} do not match codec {r['codec']} (expected {sorted(expected)})")
    if r["codec"] == "zstd":
        _need(a["zstd"].dtype == np.uint8 and a["zstd"].ndim == 1, "zstd frame must be uint8[m]")
        _need(_is_int(r.get("crc32")), "zstd record lacks its crc32")
        # the frame must say how much it holds, and hold the shape's bytes, before a decompressor allocates them
        try:
            size = zstandard.frame_content_size(a["zstd"][:18].tobytes())  # (18: the longest frame header)
        except zstandard.ZstdError as e:
            raise FormatError(f"zstd frame header corrupt: {e}") from None
        want = n * FLOAT_DTYPES[r["dtype"]][0].itemsize
        _need(size == want, f"zstd frame holds {size} bytes (-1: not said), shape needs {want}")
        _need(want <= a["zstd"].size * ZSTD_MAX_EXPANSION, f"a zstd frame of {a['zstd'].size} bytes cannot hold {want}")
        return
    lanes, steps = r.get("lanes"), r.get("steps")
    _need(_is_int(lanes) and 1 <= lanes <= MAX_LANES, f"lanes={lanes!r} out of range")
    _need(_is_int(steps) and 1 <= steps < 1 << 16, f"steps={steps!r} out of range")
    _need(_is_int(r.get("prob_bits")) and r["prob_bits"] == rans.PROB_BITS, f"prob_bits={r.get('prob_bits')!r}, this version reads {rans.PROB_BITS}")
    m = -(-n // 2) if paired else n  # symbols
    t = rans.num_tiles(m, lanes, steps)
    _need(_is_int(r.get("tiles")) and r["tiles"] == t, f"tiles={r.get('tiles')!r} but shape and geometry give {t}")
    arrays_expected = [("freqs", np.uint16, (rans.ALPHABET,)), ("states", np.uint32, (t * lanes,)),
                       ("counts", counts_dtype(steps, 2 if paired else 1), (t * lanes,)), ("tiles", np.uint32, (t, 3))]
    arrays_expected += [("pairs", np.uint16, (rans.ALPHABET,))] if paired else []
    arrays_expected += [("checks", np.uint32, (t,))] if sealed else []
    for key, dt, shp in arrays_expected:
        ok = a[key].dtype == dt or (key == "counts" and a[key].dtype == np.uint16)  # (version 1: always 16 bits)
        _need(ok and a[key].shape == shp, f"{key} must be {np.dtype(dt).name}{list(shp)}, "
                                          f"found {a[key].dtype.name}{list(a[key].shape)}")
    _need(int(a["freqs"].astype(np.int64).sum()) == rans.PROB_SCALE, "frequency table does not sum to 4096")
    total = int(a["counts"].astype(np.int64).sum())
    _need(a["words"].dtype == np.uint16 and a["words"].shape == (total,) and _is_int(r.get("words"))
          and r["words"] == total,
          f"words must be uint16[{total}] (the sum of lane counts), found {a['words'].dtype.name}{list(a['words'].shape)}")
    _need(np.array_equal(a["tiles"][:, 0], rans.lane_offsets(a["counts"])[::lanes].astype(np.uint32)),
          "tile word offsets disagree with lane counts")
    if r["codec"] == "bf16-lossless":
        rb = 2 if paired else FLOAT_DTYPES[r["dtype"]][2]  # raw bytes per symbol
        carry = r.get("carry", 0)  # absent in version 1: nothing carried
        most = carry_values(r["dtype"], steps, paired)
        _need(_is_int(carry) and carry in (0, most), f"carry={carry!r}, must be 0 or {most} for {r['dtype']}")
        size = stored_raw_values(m, lanes, steps, carry) * rb
        _need(a["raw"].dtype == np.uint8 and a["raw"].shape == (size,), f"raw must be uint8[{size}]")
        run = r.get("run", 1)
        _need(run_fits(run, steps, carry), f"run={run!r}, must be one of {RUNS} and divide steps - carry = "
                                           f"{steps - carry}")
    else:
        rows, cols = r.get("rows"), r.get("cols")
        _need(_is_int(rows) and _is_int(cols) and rows == shape[0] and rows * cols == n,
              f"rows={rows!r}, cols={cols!r} do not fit shape {shape}")
        _need(a["scales"].dtype == np.float32 and a["scales"].shape == (rows,), f"scales must be float32[{rows}]")
        _need(bool(np.all(np.isfinite(a["scales"]))) and bool(np.all(a["scales"] >= 0)), "scales must be finite and >= 0")
        _need(int(a["tiles"][:, 2].max()) < len(PREDICTORS), "unknown predictor id")


# ---------------------------------------------------------------------------------------------- decode
def decode(enc: EncodedTensor) -> np.ndarray:
    """Decode to the original dtype and shape with NumPy, checking every tile's CRC-32."""
    validate(enc)
    r, a = enc.record, enc.arrays
    shape, name = tuple(r["shape"]), r["dtype"]
    dt, udt, rb = FLOAT_DTYPES[name]
    n = int(np.prod(shape, dtype=np.int64))
    if r["codec"] == "zstd":
        try:
            data = zstandard.ZstdDecompressor().decompress(a["zstd"].tobytes(), max_output_size=n * dt.itemsize)
        except zstandard.ZstdError as e:
            raise FormatError(f"zstd frame corrupt: {e}") from None
        _need(len(data) == n * dt.itemsize, f"zstd frame holds {len(data)} bytes, shape needs {n * dt.itemsize}")
        values = np.frombuffer(data, np.uint8).reshape(dt.itemsize, n).T.copy().reshape(-1).view(dt)
        _need(zlib.crc32(values.tobytes()) == r["crc32"], "checksum mismatch after zstd decode")
        return values.reshape(shape)
    lanes, steps = r["lanes"], r["steps"]
    if r.get("pairs"):
        return _decode_pairs(r, a, n).reshape(shape)
    float_codec = r["codec"] == "bf16-lossless"
    try:
        sym = rans.decode(a["states"], a["counts"], a["words"], a["freqs"], lanes, steps, n, ends=float_codec,
                          run=r.get("run", 1), tail=r.get("carry", 0))
    except rans.RansError as e:
        raise FormatError(str(e)) from None
    te = lanes * steps
    if float_codec:
        sym, ends = sym
        raw = join_carry(a["raw"], ends, n, lanes, steps, r.get("carry", 0), rb)
        bits = join_float(sym, raw, name).astype(udt)
        _check_tiles(bits, te, a["tiles"][:, 1])
        return bits.view(dt).reshape(shape)
    q = _unpredict(sym, r["cols"], te, a["tiles"][:, 2]).view(np.int8)
    _check_tiles(q, te, a["tiles"][:, 1])
    return dequantize_int8(q.reshape(r["rows"], r["cols"]), a["scales"], name).reshape(shape)


def _decode_pairs(r: dict, a: dict, n: int) -> np.ndarray:
    """A validated pair-symbol tensor -> bfloat16[n] (flat)."""
    lanes, steps, m = r["lanes"], r["steps"], -(-n // 2)
    try:
        sym, escaped, ends = rans.decode(a["states"], a["counts"], a["words"], a["freqs"], lanes, steps, m,
                                         ends=True, bypass=True, run=r.get("run", 1), tail=r.get("carry", 0))
    except rans.RansError as e:
        raise FormatError(str(e)) from None
    both = np.where(sym == rans.ESC, escaped, a["pairs"][sym])
    exps = np.stack([both & 0xFF, both >> 8], axis=1).reshape(-1).astype(np.uint8)
    raw = join_carry(a["raw"], ends, m, lanes, steps, r.get("carry", 0), 2).reshape(-1, 1)
    bits = join_float(exps, raw, "bfloat16").astype(np.uint16)
    _check_tiles(bits, 2 * lanes * steps, a["tiles"][:, 1])
    return bits[:n].view(ml_dtypes.bfloat16)


def _check_tiles(data: np.ndarray, tile_elems: int, crcs: np.ndarray) -> None:
    got = _tile_crcs(data, tile_elems, crcs.size)
    bad = np.flatnonzero(got != crcs)
    _need(bad.size == 0, f"checksum mismatch in tile {int(bad[0]) if bad.size else -1} of {crcs.size}")


def encode(x: np.ndarray, codec: str, *, lanes: int = DEFAULT_LANES, steps: int | None = None,
           zstd_level: int = 3, pairs: bool = False, run: int | None = None) -> EncodedTensor:
    """``steps`` None: the codec's default (:data:`DEFAULT_STEPS`; :data:`PAIR_STEPS` with ``pairs``).
    ``pairs``: ``bf16-lossless`` of a bfloat16 tensor with pair symbols (:func:`encode_pairs`); ``run``:
    ``bf16-lossless`` lanes decode runs (:func:`encode_float`)."""
    if (pairs or run not in (None, 1)) and codec != "bf16-lossless":
        raise ValueError(f"pair symbols and runs are bf16-lossless layouts, not {codec}")
    if codec == "bf16-lossless":
        return encode_float(x, lanes, steps, pairs=pairs, run=run)
    if codec in RANS_CODECS and steps is None:
        steps = DEFAULT_STEPS[codec]
    if codec == "int8":
        return encode_int8(x, lanes, steps)
    if codec == "zstd":
        return encode_zstd(x, zstd_level)
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
