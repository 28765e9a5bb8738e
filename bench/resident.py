"""Ratio of the resident layout (jcodec/resident.py) beside bf16-lossless rANS and the order-0 entropy bound.

    python bench/resident.py --out resident.json                       # SmolLM2-135M matrices + a Gaussian one
    python bench/resident.py --tensors 'layers\\.0\\.' --no-rans         # quick

Per code width and tile, two resident variants: "window" (what jcodec.resident stores: the 2**bits - 1
consecutive exponents covering most of a tile; its arrays' real bytes) and "table" (the 2**bits - 1 most frequent
exponents of a tile, ZipServ-style, its bytes computed from the tile histograms: codes, raw bytes, a table of
2**bits - 1 bytes and an int32 offset a tile, one byte an escape). Ratios are bytes over BF16 bytes, CPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from compress import exponent_bound  # noqa: E402  (bench/compress.py)

from jcodec import codecs, resident  # noqa: E402
from jcodec.codecs import bits_of, split_float  # noqa: E402
from jcodec.sources import default_model_path, open_source  # noqa: E402

TILES = ((16, 512), (16, 64), (64, 64))  # tile_k 512: the largest power of two <= 512 dividing K (padding costs)


def tile_k_for(K: int, tk: int) -> int:
    while tk > resident.WORD and K % tk:
        tk //= 2
    return tk


def table_bytes(w: np.ndarray, bits: int, tile_n: int, tile_k: int) -> int:
    """Bytes of a per-tile table of the 2**bits - 1 most frequent exponents (escapes aside)."""
    g = resident.Geometry(w.shape, bits, tile_n, tile_k)
    N, K = w.shape
    Np, Kp = g.padded
    exps = split_float(bits_of(w).reshape(-1), "bfloat16")[0].reshape(N, K)
    counted = np.pad(np.ones((N, K), bool), ((0, Np - N), (0, Kp - K)))
    hist = resident.exponent_histograms(resident.tile_view(np.pad(exps, ((0, Np - N), (0, Kp - K))), g),
                                        resident.tile_view(counted, g))
    escapes = int(N * K - np.sort(hist, axis=1)[:, -g.escape:].sum())
    tiles = hist.shape[0]
    return Np * Kp * bits // 8 + Np * Kp + tiles * g.escape + 4 * (tiles + 1) + escapes


def measure(label: str, tensors: dict[str, np.ndarray], rans: bool) -> list[dict]:
    bf16 = sum(w.nbytes for w in tensors.values())
    rows = [{"weights": label, "layout": "order-0 exponent entropy bound", "ratio": exponent_bound(tensors.values())}]
    if rans:
        stored = sum(codecs.encode(w, "bf16-lossless", pairs=True).nbytes for w in tensors.values())
        rows.append({"weights": label, "layout": "bf16-lossless rANS (file default)", "ratio": stored / bf16})
    for bits in resident.BITS:
        for tn, tk in TILES:
            window = escapes = 0
            for w in tensors.values():
                g, a = resident.encode(w, bits, tn, tile_k_for(w.shape[1], tk))
                window += resident.nbytes(a)
                escapes += int(a["offsets"][-1])
            table = sum(table_bytes(w, bits, tn, tile_k_for(w.shape[1], tk)) for w in tensors.values())
            n = sum(w.size for w in tensors.values())
            for kind, size in (("window", window), ("table", table)):
                rows.append({"weights": label, "layout": f"resident {kind}, {bits}-bit, tile {tn}x{tk if tk < 512 else '(<=512)'}",
                             "ratio": size / bf16, "escaped": escapes / n if kind == "window" else None})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tensors", default=r"\.weight$", help="regex of the SmolLM2 matrices to measure")
    p.add_argument("--no-rans", action="store_true", help="skip the (slow) rANS encode")
    p.add_argument("--gaussian", default="1024x4096", help="a Gaussian (std 0.02) matrix too; '' for none")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    src = open_source(default_model_path())
    names = [n for n in src.tensor_names() if re.search(args.tensors, n) and len(src.shape(n)) == 2]
    rows += measure(f"SmolLM2-135M ({len(names)} matrices, GGUF Q4_1 dequantised)",
                    {n: src.read(n) for n in names}, not args.no_rans)
    if args.gaussian:
        N, K = map(int, args.gaussian.split("x"))
        w = (np.random.default_rng(0).standard_normal((N, K)) * 0.02).astype(ml_dtypes.bfloat16)
        rows += measure(f"Gaussian {N}x{K}", {"w": w}, not args.no_rans)
    print(f"| weights | layout | ratio | escaped |\n|---|---|---|---|")
    for r in rows:
        esc = "" if r.get("escaped") is None else f"{r['escaped']:.4%}"
        print(f"| {r['weights']} | {r['layout']} | {r['ratio']:.4f} | {esc} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
