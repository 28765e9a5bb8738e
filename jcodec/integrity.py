"""Checksums of stored bytes (format version 5, docs/FORMAT.md "Integrity"): what the writer seals a tensor
with, and what a reader checks before it trusts a byte.

A tile's CRC-32 in ``tiles`` covers its *decoded* values, so checking it needs a full decode; these cover the
*stored* bytes, so loading checks them at the speed of ``zlib.crc32`` (a few calls per tensor, large buffers,
the GIL released) and refuses a flipped byte before any decoder runs. Each checksum starts from a binding
that holds the tensor's name, record and entries' dtypes and shapes, so a header field changed, or a layer's
bytes swapped with another's, fails as a flipped data byte does.
"""
from __future__ import annotations

import json
import zlib

import numpy as np

from jcodec import codecs
from jcodec.sources import SAFETENSORS_DTYPES

CHECK_FIELD = "check"  # the record field: CRC-32 of the binding and every entry's bytes
CHECKS_ENTRY = "checks"  # rANS codecs: uint32[T], CRC-32 of each tile's stored bytes (to name the bad tile)
TILED = ("words", "states", "counts", "raw")  # entries cut by tile; the rest (tables, scales, ...) are per tensor


def safetensors_dtype(dtype) -> str:
    """The safetensors header's name of a NumPy dtype (``BF16`` ...)."""
    for name, dt in SAFETENSORS_DTYPES.items():
        if np.dtype(dt) == np.dtype(dtype):
            return name
    raise ValueError(f"dtype {np.dtype(dtype)} has no safetensors name")


def _bytes(a) -> np.ndarray:
    """An array's bytes as uint8, without a copy when contiguous (zlib reads any buffer; bfloat16 has no buffer
    format of its own)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _binding(name: str, record: dict | None, entries: dict[str, tuple[str, list[int]]]) -> bytes:
    """What a checksum starts from: the tensor's name, its record (less ``check``) and every entry's safetensors
    dtype and shape, as compact JSON with sorted keys."""
    rec = None if record is None else {k: v for k, v in record.items() if k != CHECK_FIELD}
    doc = {"name": name, "record": rec, "entries": {k: [d, list(s)] for k, d, s in sorted(
        (k, d, s) for k, (d, s) in entries.items())}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def raw_check(name: str, dtype: str, shape, data) -> int:
    """CRC-32 of a raw tensor: its binding (name, safetensors ``dtype``, ``shape``), then its data bytes."""
    return zlib.crc32(_bytes(data),
                      zlib.crc32(_binding(name, None, {"": (dtype, list(shape))})))


def _tensor_check(name: str, record: dict, arrays: dict[str, np.ndarray]) -> int:
    entries = {k: (safetensors_dtype(a.dtype), list(a.shape)) for k, a in arrays.items()}
    crc = zlib.crc32(_binding(name, record, entries))
    for k in sorted(arrays):
        crc = zlib.crc32(_bytes(arrays[k]), crc)
    return crc


def _tile_slices(record: dict, arrays: dict[str, np.ndarray]):
    """Per tile, the stored byte ranges it owns: its lanes' words, states and counts, and its ``raw`` bytes (a full
    tile's ``(steps - carry) * lanes`` symbols' worth, the last tile the rest). Needs a validated tensor."""
    lanes, steps, t = record["lanes"], record["steps"], record["tiles"]
    bases = arrays["tiles"][:, 0].astype(np.int64).tolist() + [arrays["words"].size]
    raw = arrays.get("raw")
    if raw is not None:
        rb = 2 if record.get("pairs") else codecs.FLOAT_DTYPES[record["dtype"]][2]
        per_tile = (steps - record.get("carry", 0)) * lanes * rb
    for i in range(t):
        parts = [arrays["words"][bases[i]:bases[i + 1]], arrays["states"][i * lanes:(i + 1) * lanes],
                 arrays["counts"][i * lanes:(i + 1) * lanes]]
        if raw is not None:
            parts.append(raw[i * per_tile:(i + 1) * per_tile if i + 1 < t else raw.size])
        yield parts


def _tile_crcs(record: dict, arrays: dict[str, np.ndarray]) -> np.ndarray:
    out = np.empty(record["tiles"], np.uint32)
    for i, parts in enumerate(_tile_slices(record, arrays)):
        crc = 0
        for p in parts:
            crc = zlib.crc32(_bytes(p), crc)
        out[i] = crc
    return out


def seal(name: str, enc: codecs.EncodedTensor) -> codecs.EncodedTensor:
    """``enc`` as version 5 stores it under ``name``: rANS codecs gain the ``checks`` entry, every record the
    ``check`` field."""
    arrays = dict(enc.arrays)
    if enc.record["codec"] in codecs.RANS_CODECS:
        arrays[CHECKS_ENTRY] = _tile_crcs(enc.record, arrays)
    record = {k: v for k, v in enc.record.items() if k != CHECK_FIELD}
    record[CHECK_FIELD] = _tensor_check(name, record, arrays)
    return codecs.EncodedTensor(record, arrays)


def check_sealed(name: str, enc: codecs.EncodedTensor) -> None:
    """Raise :class:`codecs.FormatError` naming the first tile (or else the header and tables) whose stored bytes
    do not match their checksums. Runs before validation: a damaged byte is reported as damage, not as the
    inconsistency it may cause."""
    if _tensor_check(name, enc.record, enc.arrays) == enc.record.get(CHECK_FIELD):
        return
    try:
        codecs.validate(enc)  # (tiles can be cut only from a consistent tensor)
    except codecs.FormatError as e:
        raise codecs.FormatError(f"stored bytes do not match the tensor's CRC-32 ({e})") from None
    if enc.record["codec"] in codecs.RANS_CODECS:
        bad = np.flatnonzero(_tile_crcs(enc.record, enc.arrays) != enc.arrays[CHECKS_ENTRY])
        if bad.size:
            raise codecs.FormatError(f"tile {int(bad[0])} of {enc.record['tiles']}: stored bytes do not match "
                                     "their CRC-32")
    raise codecs.FormatError("record, entry headers or tables do not match the tensor's CRC-32 (its name "
                             "or bytes changed)")
