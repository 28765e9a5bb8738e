"""The resident layout for fused decode-matmul: a fixed-length exponent code a GEMV decodes in registers.

The file stays rANS (the smallest); this is the form a weight takes on the device so that a matmul kernel can
read only compressed bytes and decode each tile where it multiplies it. rANS cannot be decoded at a random
position, so a fused kernel that owns a block of rows needs a code whose every value sits at a known bit.

A bfloat16 matrix ``W [N, K]`` is padded to whole tiles of ``tile_n x tile_k`` and split as ``codecs.split_float``
does: the sign+mantissa byte stays raw, the exponent byte becomes a ``bits``-bit code. Per tile, the
``2**bits - 1`` consecutive exponents ``base .. base + 2**bits - 2`` that cover most of the tile are coded as
``exponent - base``; the all-ones code is an escape, whose exponent byte is the tile's next entry in a side list.
A window of consecutive exponents rather than a table of the most frequent ones: the kernel decodes with one add,
not a gather (Triton has no in-register gather), and on weights the most frequent exponents are consecutive
anyway (bench/resident.py measures both).

Arrays (``Np, Kp``: the padded sizes; ``T = Np/tile_n * Kp/tile_k`` tiles, row block major):
  planes   uint32[bits, Np, Kp/32]  bit p of the codes of weights 32w .. 32w+31 of a row, weight 32w+j at bit j
                                    (bit planes: a tile's escapes are the AND of its planes, 32 weights a word)
  raw      uint8[Np, Kp]           sign << 7 | mantissa
  base     uint8[Np/tile_n, Kp/tile_k]  the tile's first exponent, <= 256 - (2**bits - 1)
  offsets  int32[T + 1]             tile t's escapes are escapes[offsets[t] : offsets[t+1]]
  escapes  uint8[max(E, 1)]         escaped exponents, tile after tile, row-major inside a tile
Padding decodes to ``2**(base-127)`` times a zero mantissa: finite (base < 255), so products with zero-padded x
are zero. A stack of layers has a leading ``L`` axis on every array (escapes padded to the longest layer's).
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from jcodec.codecs import bits_of, join_float, split_float

BITS = (3, 4)
WORD = 32  # codes of one row per plane word


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A resident tensor's static description: its true shape, code width and tile sides."""

    shape: tuple[int, int]
    bits: int = 3
    tile_n: int = 16
    tile_k: int = 512

    def __post_init__(self):
        N, K = self.shape
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits} must be one of {BITS}")
        if N < 1 or K < 1 or self.tile_n < 1 or self.tile_k < WORD or self.tile_k % WORD:
            raise ValueError(f"shape={self.shape}, tile_n={self.tile_n}, tile_k={self.tile_k} must be positive, "
                             f"tile_k a multiple of {WORD}")

    @property
    def escape(self) -> int:
        return (1 << self.bits) - 1

    @property
    def padded(self) -> tuple[int, int]:
        N, K = self.shape
        return -(-N // self.tile_n) * self.tile_n, -(-K // self.tile_k) * self.tile_k

    @property
    def tiles(self) -> tuple[int, int]:
        Np, Kp = self.padded
        return Np // self.tile_n, Kp // self.tile_k


def tile_view(a: np.ndarray, g: Geometry) -> np.ndarray:
    """[Np, Kp] -> [T, tile_n * tile_k]: each tile's values row-major, tiles row block major."""
    (tn_count, tk_count), tn, tk = g.tiles, g.tile_n, g.tile_k
    return a.reshape(tn_count, tn, tk_count, tk).transpose(0, 2, 1, 3).reshape(tn_count * tk_count, tn * tk)


def untile(t: np.ndarray, g: Geometry) -> np.ndarray:
    """Inverse of :func:`tile_view`."""
    (tn_count, tk_count), tn, tk = g.tiles, g.tile_n, g.tile_k
    return t.reshape(tn_count, tk_count, tn, tk).transpose(0, 2, 1, 3).reshape(tn_count * tn, tk_count * tk)


def exponent_histograms(exponents: np.ndarray, counted: np.ndarray | None = None) -> np.ndarray:
    """[T, n] exponent bytes -> [T, 256] counts (of the ``counted`` values only, if given)."""
    T = exponents.shape[0]
    flat = (np.arange(T, dtype=np.int64)[:, None] * 256 + exponents).reshape(-1)
    weights = None if counted is None else counted.reshape(-1).astype(np.int64)
    return np.bincount(flat, weights, minlength=T * 256).astype(np.int64).reshape(T, 256)


def best_windows(hist: np.ndarray, width: int) -> np.ndarray:
    """Per tile, the first exponent of the ``width`` consecutive exponents with the most values (lowest wins)."""
    c = np.concatenate([np.zeros((hist.shape[0], 1), np.int64), np.cumsum(hist, axis=1)], axis=1)
    covered = c[:, width:] - c[:, :-width]  # [T, 257 - width]: windows starting at 0 .. 256 - width
    return np.argmax(covered, axis=1).astype(np.uint8)


def encode(w, bits: int = 3, tile_n: int = 16, tile_k: int = 512) -> tuple[Geometry, dict[str, np.ndarray]]:
    """A bfloat16 matrix [N, K] -> (geometry, arrays) in the resident layout (module docstring)."""
    w = np.asarray(w)
    if w.dtype != np.dtype(ml_dtypes.bfloat16) or w.ndim != 2:
        raise ValueError(f"w={w.dtype}{list(w.shape)} must be a bfloat16 matrix")
    g = Geometry(tuple(w.shape), bits, tile_n, tile_k)
    N, K = g.shape
    Np, Kp = g.padded
    exps, raw = split_float(bits_of(w).reshape(-1), "bfloat16")
    tiles_e = tile_view(np.pad(exps.reshape(N, K), ((0, Np - N), (0, Kp - K))), g)
    pad = tile_view(np.pad(np.zeros((N, K), bool), ((0, Np - N), (0, Kp - K)), constant_values=True), g)
    # padding is not counted, and takes code 0 (the window's first exponent): it never escapes
    base = best_windows(exponent_histograms(tiles_e, ~pad), g.escape)
    delta = tiles_e.astype(np.int32) - base[:, None]
    escaped = ~pad & ((delta < 0) | (delta >= g.escape))
    codes = np.where(pad, 0, np.where(escaped, g.escape, delta)).astype(np.uint32)
    counts = escaped.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    escapes = tiles_e[escaped]  # row-major over [T, n]: tile after tile, row-major inside
    codes = untile(codes, g).reshape(Np, Kp // WORD, WORD)
    shifts = np.arange(WORD, dtype=np.uint32)
    planes = np.stack([(((codes >> p) & 1) << shifts).sum(axis=2, dtype=np.uint32) for p in range(bits)])
    return g, {
        "planes": planes,
        "raw": np.pad(raw[:, 0].reshape(N, K), ((0, Np - N), (0, Kp - K))),
        "base": base.reshape(g.tiles),
        "offsets": offsets,
        "escapes": escapes if escapes.size else np.zeros(1, np.uint8),
    }


def decode(g: Geometry, a: dict[str, np.ndarray]) -> np.ndarray:
    """The reference decoder: arrays of :func:`encode` -> the bfloat16 matrix, bit for bit."""
    N, K = g.shape
    Np, Kp = g.padded
    shifts = np.arange(WORD, dtype=np.uint32)
    codes = sum(((a["planes"][p][:, :, None] >> shifts) & 1) << p for p in range(g.bits)).reshape(Np, Kp)
    codes = tile_view(codes.astype(np.int32), g)
    escaped = codes == g.escape
    counts = np.diff(a["offsets"])
    if counts.shape[0] != codes.shape[0] or np.any(counts != escaped.sum(axis=1)) or a["offsets"][-1] > a[
            "escapes"].size:
        raise ValueError(f"offsets {a['offsets'].shape} do not match the escape codes of {codes.shape[0]} tiles")
    exps = codes + a["base"].reshape(-1, 1).astype(np.int32)
    exps[escaped] = a["escapes"][:a["offsets"][-1]]
    exps = untile(exps.astype(np.uint8), g)[:N, :K]
    bits16 = join_float(exps.reshape(-1), a["raw"][:N, :K].reshape(-1, 1), "bfloat16")
    return bits16.astype(np.uint16).view(ml_dtypes.bfloat16).reshape(N, K)


def nbytes(a: dict[str, np.ndarray]) -> int:
    """Resident bytes of one tensor's arrays."""
    return sum(v.nbytes for v in a.values())


def stack(encoded: list[tuple[Geometry, dict[str, np.ndarray]]]) -> tuple[Geometry, dict[str, np.ndarray]]:
    """Layers of one geometry -> one geometry and arrays with a leading layer axis (escapes padded)."""
    geometries = {g for g, _ in encoded}
    if len(geometries) != 1:
        raise ValueError(f"layers of {len(geometries)} geometries must share one")
    longest = max(a["escapes"].size for _, a in encoded)
    out = {}
    for key in encoded[0][1]:
        parts = [a[key] if key != "escapes" else np.pad(a[key], (0, longest - a[key].size)) for _, a in encoded]
        out[key] = np.stack(parts)
    return encoded[0][0], out
