"""How many cache lines (L1 tag requests) one warp's table lookup touches, per table layout (CPU, no GPU).

    python -P bench/table_lines.py            # pair symbols of a Gaussian 512 x 4096 bf16 matrix

A warp decodes 32 lanes whose slots ``x & 4095`` are uniform; the L1 serves a gather with one tag request per
distinct 128-byte line. ncu counted 28.4 per lookup into the 16 KiB slot table on the H100 (bench/RESULTS.md,
session 14), which the first row reproduces. The other rows are layouts the kernels use or could use.
"""
from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

from jcodec import codecs, tensor
from jcodec.pallas_kernels import rans_common as rc

LINE = 128  # bytes


def distinct_lines(line_of_slot, slots) -> float:
    """Mean distinct lines over warps: ``line_of_slot[slot]`` for the [warps, 32] ``slots``."""
    lines = line_of_slot[slots]
    return float(np.mean([np.unique(w).size for w in lines]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warps", type=int, default=20000)
    a = ap.parse_args()
    x = (np.random.default_rng(0).standard_normal((512, 4096), np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    arrays, _ = tensor.kernel_args(tensor.from_encoded(codecs.encode(x, "bf16-lossless", pairs=True)))
    table = np.asarray(arrays[5]).reshape(-1)[:rc.TABLE_SIZE]
    sym = (table >> 12) & 0xFF
    slot = np.arange(rc.TABLE_SIZE)
    slots = np.random.default_rng(1).integers(0, rc.TABLE_SIZE, size=(a.warps, 32))
    bucket = slot >> rc.COARSE_BITS
    pure = np.array([np.unique(sym[bucket == i]).size == 1 for i in range(rc.COARSE_SIZE)])
    mixed = ~pure[slots >> rc.COARSE_BITS]
    masked_full = float(np.mean([np.unique(s[m] * 4 // LINE).size for s, m in zip(slots, mixed)]))
    rows = [
        ("slot table, 4096 x 4 B (c0)", distinct_lines(slot * 4 // LINE, slots)),
        ("coarse table, 128 x 4 B (c5, every lane)", distinct_lines(bucket * 4 // LINE, slots)),
        ("  + the slot table for lanes in MIXED buckets (c5)", masked_full),
        ("slot -> symbol bytes, 4 KiB (by symbol)", distinct_lines(slot // LINE, slots)),
        ("  + symbol -> entry, 256 x 4 B", distinct_lines(sym * 4 // LINE, slots)),
        ("alias buckets, 256 x 8 B (not built)", distinct_lines((slot >> 4) * 8 // LINE, slots)),
        ("alias buckets, 256 x 12 B (not built)", distinct_lines((slot >> 4) * 12 // LINE, slots)),
    ]
    print(f"pair symbols: {np.unique(sym).size} present; {pure.sum()} of {rc.COARSE_SIZE} coarse buckets pure, "
          f"{np.mean(~pure[bucket]):.1%} of slots in MIXED buckets")
    print("| layout | lines a warp's lookup touches |\n|---|---|")
    for name, lines in rows:
        print(f"| {name} | {lines:.1f} |")


if __name__ == "__main__":
    main()
