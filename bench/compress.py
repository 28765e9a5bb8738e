"""Compression ratios and CPU encode/decode speeds of every codec, with zstd and zipnn side by side.

    python bench/compress.py --out compress.json                  # SmolLM2-135M (bf16) + Gaussian 4096x14336
    python bench/compress.py --gaussian 1024x4096 --no-smollm2     # quick

Ratios are stored bytes over BF16 bytes, all metadata counted (records, tables, states, tile index; for the
whole checkpoint the safetensors file size itself). Speeds are MB/s of BF16 data on this machine's CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import ml_dtypes
import numpy as np
import zstandard

from jcodec import codecs
from jcodec.checkpoint import choose_encoding

BF16 = np.dtype(ml_dtypes.bfloat16)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def exponent_bound(tensors) -> float:
    """Order-0 entropy bound of bf16-lossless: (H(exponent byte) + 8 raw bits) / 16."""
    counts = np.zeros(256, np.int64)
    for x in tensors:
        counts += np.bincount((x.reshape(-1).view(np.uint16) >> 7).astype(np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float((-(p * np.log2(p)).sum() + 8) / 16)


def zipnn_ratio(tensors):
    try:
        import zipnn
    except ImportError:
        return None, None
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16")
    stored = total = 0
    exact = True
    for x in tensors:
        raw = x.tobytes()
        c = z.compress(raw)
        exact &= bytes(z.decompress(c)) == raw
        stored += len(c)
        total += len(raw)
    return stored / total, exact


def measure(label: str, tensors: list[np.ndarray], zstd_levels=(3, 19)) -> list[dict]:
    total = sum(x.nbytes for x in tensors)
    rows = []
    for codec in codecs.CODECS:
        stored, enc_s, dec_s, worst_err, worst_out = 0, 0.0, 0.0, 0.0, 0.0
        for x in tensors:
            enc, dt = timed(choose_encoding, x, codec)
            enc_s += dt
            if enc is None:
                stored += x.nbytes
                continue
            stored += enc.nbytes
            y, dt = timed(codecs.decode, enc)
            dec_s += dt
            if codec == "int8":  # error per channel in quantisation steps: of the float32 dequantisation, and
                # of the bf16 output (which adds up to half a bf16 ulp of rounding)
                xf = np.asarray(x, np.float32).reshape(x.shape[0], -1)
                q, scales = codecs.quantize_int8(xf)
                step = np.where(scales > 0, scales, 1)
                err_f32 = np.abs(q.astype(np.float32) * scales[:, None] - xf).max(1) / step
                err_out = np.abs(np.asarray(y, np.float32).reshape(xf.shape) - xf).max(1) / step
                worst_err = max(worst_err, float(err_f32.max()))
                worst_out = max(worst_out, float(err_out.max()))
            elif not np.array_equal(y.view(np.uint16), x.view(np.uint16)):
                raise SystemExit(f"{codec} is not bit-exact on {label}")
        row = dict(data=label, method=f"jcodec {codec}", ratio=stored / total, encode_MBps=total / 1e6 / enc_s,
                   decode_MBps=total / 1e6 / max(dec_s, 1e-9))
        if codec == "int8":
            row["max_error_steps_float32"] = worst_err
            row["max_error_steps_output"] = worst_out
        rows.append(row)
    for level in zstd_levels:
        c = zstandard.ZstdCompressor(level=level)
        stored, enc_s, dec_s = 0, 0.0, 0.0
        for x in tensors:
            frame, dt = timed(c.compress, x.tobytes())
            enc_s += dt
            stored += len(frame)
            _, dt = timed(zstandard.ZstdDecompressor().decompress, frame)
            dec_s += dt
        rows.append(dict(data=label, method=f"zstd-{level} raw bytes", ratio=stored / total,
                         encode_MBps=total / 1e6 / enc_s, decode_MBps=total / 1e6 / dec_s))
    ratio, exact = zipnn_ratio(tensors)
    if ratio is not None:
        rows.append(dict(data=label, method="zipnn 0.5 (bf16)", ratio=ratio, roundtrip_exact=exact))
    rows.append(dict(data=label, method="order-0 entropy bound", ratio=exponent_bound(tensors)))
    return rows


def smollm2_file_ratio() -> dict:
    """The real checkpoint: `jcodec convert` of the embedded SmolLM2, file bytes over BF16 tensor bytes."""
    from jcodec.convert import convert
    from jcodec.sources import default_model_path
    with tempfile.TemporaryDirectory() as d:
        rep = convert(default_model_path(), os.path.join(d, "m"), progress=False)
        files = sum(os.path.getsize(os.path.join(d, "m", f)) for f in os.listdir(os.path.join(d, "m"))
                    if f.endswith(".safetensors"))
    return dict(data="SmolLM2-135M checkpoint", method="jcodec convert bf16-lossless (file size)",
                ratio=files / rep.original_bytes, seconds=rep.seconds)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussian", default="4096x14336", help="shape of the Gaussian bf16 matrix (std 0.02)")
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--out", default=None, help="write JSON here")
    args = ap.parse_args()
    rows = []
    if not args.no_smollm2:
        from jcodec.sources import default_model_path, open_source
        src = open_source(default_model_path())
        tensors = [src.read(n) for n in src.tensor_names()]
        tensors = [t for t in tensors if t.ndim >= 2]
        rows += measure("SmolLM2-135M 2-D weights (bf16)", tensors)
        rows.append(smollm2_file_ratio())
    shape = tuple(int(s) for s in args.gaussian.split("x"))
    g = np.random.default_rng(0).normal(0, 0.02, shape).astype(BF16)
    rows += measure(f"Gaussian bf16 {args.gaussian}", [g])
    print(f"{'data':<34} {'method':<42} {'ratio':>7} {'enc MB/s':>9} {'dec MB/s':>9}")
    for r in rows:
        enc = f"{r['encode_MBps']:.1f}" if "encode_MBps" in r else ""
        dec = f"{r['decode_MBps']:.1f}" if "decode_MBps" in r else ""
        note = (f"  int8 error <= {r['max_error_steps_float32']:.3f} step (float32), {r['max_error_steps_output']:.3f} "
                f"(bf16 output)" if "max_error_steps_float32" in r else "")
        note += "  (round trip NOT exact)" if r.get("roundtrip_exact") is False else ""
        print(f"{r['data']:<34} {r['method']:<42} {r['ratio']:>7.4f} {enc:>9} {dec:>9}{note}")
    if args.out:
        meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), numpy=np.__version__)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
