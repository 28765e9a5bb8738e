"""The compressed checkpoint folder: writing it safely and reading it defensively (docs/FORMAT.md).

A jcodec checkpoint looks like an HF checkpoint: ``config.json``, tokenizer files, safetensors shards and
``model.safetensors.index.json``. A tensor kept raw is the entry ``NAME``; an encoded tensor is the entries
``NAME.<array>`` plus a JSON record under ``jcodec.tensor.NAME`` in its shard's ``__metadata__``.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import safetensors
from safetensors.numpy import save_file

from jcodec import codecs, integrity
from jcodec.sources import MAX_HEADER_BYTES, SAFETENSORS_DTYPES

FORMAT_VERSION = 5
# version 1: no carried raw bytes (a record without `carry`); version 2: no pair symbols (no `pairs`); version 3:
# no runs (no `run`); version 4: no checksums of stored bytes (jcodec.integrity), so verifying one decodes it
READS_VERSIONS = ("1", "2", "3", "4", "5")
SEALED_VERSION = "5"
MAX_RECORD_BYTES = 1 << 16  # a record is a few hundred bytes; a longer one is not ours (and may nest deep)
MAX_JSON_BYTES = 100 << 20  # config.json and the index
VERSION_KEY = "jcodec.version"
RECORD_PREFIX = "jcodec.tensor."
RAW_CRC_PREFIX = "jcodec.crc32."  # a raw tensor's CRC-32, so that every stored byte is checked
INDEX_NAME = "model.safetensors.index.json"
MIN_ENCODED_ELEMENTS = 4096  # below this, tables and states outweigh any gain: store raw


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file and tensor."""


def choose_encoding(array: np.ndarray, codec: str, **opts) -> codecs.EncodedTensor | None:
    """The encoding stored for one tensor, or None to keep it raw.

    Raw when coding cannot pay: not a float, 1-D (norms, biases), tiny, or when the encoding is not
    smaller than the raw bytes (incompressible data). ``int8`` falls back to ``bf16-lossless`` for a tensor
    that holds NaN or Inf, since it cannot represent them. ``pairs`` (default True): bfloat16 tensors coded
    ``bf16-lossless`` get pair symbols (their GPU decode is 1.16-1.26x faster, bench/decode.py).
    """
    if array.dtype not in [dt for dt, _, _ in codecs.FLOAT_DTYPES.values()]:
        return None
    if array.ndim < 2 or array.size < MIN_ENCODED_ELEMENTS:
        return None
    if codec == "int8" and not np.all(np.isfinite(np.asarray(array, np.float32))):
        codec = "bf16-lossless"
    opts = dict(opts)
    pairs = opts.pop("pairs", True)
    if pairs and codec == "bf16-lossless" and array.dtype == codecs.FLOAT_DTYPES["bfloat16"][0]:
        opts["pairs"] = True  # (pair symbols code bfloat16 only: other dtypes keep one exponent a symbol)
    enc = codecs.encode(array, codec, **opts)
    return enc if enc.nbytes < array.nbytes else None


def declaration() -> dict:
    """The ``quantization_config`` a jcodec folder's config.json carries, so that other tools refuse the folder.

    It has no ``quant_method`` on purpose: transformers (5.x) skips a ``quantization_config`` whose method it does
    not know, with a warning, and then loads random weights in place of the encoded tensors; one without the key
    makes ``from_pretrained`` raise (tests/test_load.py holds it to that)."""
    return {"format": "jcodec", "format_version": str(FORMAT_VERSION),
            "load_with": "jcodec.load(path): these tensors are jcodec-encoded; transformers cannot read them"}


def declares_jcodec(path: str | os.PathLike) -> bool:
    """Whether the folder ``path`` says it is a jcodec checkpoint (config.json's ``quantization_config``, or its
    index's or first shard's metadata, names the format), damaged or not: a plain HF folder says nothing of the
    kind, and is read as it is."""
    path = Path(path)
    index = path / INDEX_NAME
    try:
        quantization = json.loads((path / "config.json").read_text()).get("quantization_config")
        if isinstance(quantization, dict) and quantization.get("format") == "jcodec":
            return True
    except Exception:  # noqa: BLE001 - an unreadable config.json claims nothing; the reader that opens it says why
        pass
    try:
        if index.is_file():
            data = json.loads(index.read_text())
            if VERSION_KEY in (data.get("metadata") or {}):
                return True
            shard = min(data["weight_map"].values())
        else:
            shard = "model.safetensors"
        with safetensors.safe_open(str(path / Path(shard).name), framework="numpy") as f:
            return VERSION_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - an unreadable index or shard claims nothing; the reader that opens it says why
        return False


class CheckpointWriter:
    """Writes a checkpoint into a temporary folder beside ``out`` and renames it into place on success,
    so an interrupted or failed conversion leaves nothing behind; what a killed one left (``.OUT.PID.*.tmp``
    of a process that is gone) the next one into the same folder removes. Tensors are buffered into shards of
    about ``shard_bytes`` and written as each shard fills, so memory stays bounded."""

    def __init__(self, out: str | os.PathLike, *, shard_bytes: int = 2 << 30, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out}: already exists (pass --overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.{os.getpid()}.", suffix=".tmp",
                                         dir=self.out.parent))
        self.shard_bytes = shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._records: dict[str, str] = {}
        self._pending_bytes = 0
        self._weight_map: dict[str, str] = {}
        self._shards: list[str] = []
        self.total_bytes = 0

    def add(self, name: str, value: codecs.EncodedTensor | np.ndarray) -> None:
        if name in self._weight_map or name in self._pending:
            raise CheckpointError(f"tensor {name} added twice")
        if isinstance(value, codecs.EncodedTensor):
            value = integrity.seal(name, value)
            entries = {f"{name}.{k}": np.ascontiguousarray(v) for k, v in value.arrays.items()}
            self._records[RECORD_PREFIX + name] = json.dumps(value.record, separators=(",", ":"))
        else:
            a = np.ascontiguousarray(value)
            entries = {name: a}
            self._records[RAW_CRC_PREFIX + name] = str(integrity.raw_check(
                name, integrity.safetensors_dtype(a.dtype), a.shape, a))
        for k, v in entries.items():
            self._pending[k] = v
            self._pending_bytes += v.nbytes
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        shard = f"model-{len(self._shards) + 1:05d}.safetensors"
        meta = {VERSION_KEY: str(FORMAT_VERSION), "format": "jcodec", **self._records}
        save_file(self._pending, str(self.tmp / shard), metadata=meta)
        self._shards.append(shard)
        for k in self._pending:
            self._weight_map[k] = shard
        self.total_bytes += self._pending_bytes
        self._pending, self._records, self._pending_bytes = {}, {}, 0

    def finish(self, config: dict, save_tokenizer=None) -> Path:
        """Write the last shard, the index, config.json and the tokenizer, then move into place."""
        self._flush()
        if len(self._shards) == 1:  # a single shard gets the conventional name
            os.replace(self.tmp / self._shards[0], self.tmp / "model.safetensors")
            self._weight_map = {k: "model.safetensors" for k in self._weight_map}
        index = {"metadata": {"total_size": self.total_bytes, VERSION_KEY: str(FORMAT_VERSION)},
                 "weight_map": dict(sorted(self._weight_map.items()))}
        (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = {**config, "quantization_config": declaration()}
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if save_tokenizer is not None:
            save_tokenizer(str(self.tmp))
        umask = os.umask(0)
        os.umask(umask)
        for f in self.tmp.iterdir():  # mkdtemp made everything private; give it the usual permissions
            f.chmod(0o666 & ~umask)
        self.tmp.chmod(0o777 & ~umask)
        if not self.out.exists():
            os.replace(self.tmp, self.out)
            return self.out
        # replace OUT atomically: renamed away first (a kill from here on leaves OUT or its replacement, and the
        # old one under a leftover's name), and back if the new one cannot take its place
        old = self.tmp.with_name(self.tmp.name[:-len(".tmp")] + ".old.tmp")
        os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except BaseException:
            os.replace(old, self.out)
            raise
        _remove(old)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def remove_leftovers(out: Path) -> None:
    """Remove the temporary folders (``.OUT.PID.*.tmp``) of conversions into ``out`` whose process is gone (killed:
    SIGKILL runs no clean-up), and those of an older jcodec, which named them without a PID."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        pid = p.name[len(out.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OverflowError:  # a PID no process can have
        return False
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


class Checkpoint:
    """A jcodec checkpoint opened for reading. Headers are read and checked at open; tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a folder (a jcodec checkpoint is a folder)")
        self.config = self._read_json(self.path / "config.json")
        shard_names = self._shard_names()
        self._tensor_shard: dict[str, str] = {}
        self._records: dict[str, dict] = {}
        self._entries: dict[str, set[str]] = {}
        self._raw_crcs: dict[str, int] = {}
        self._versions: dict[str, str] = {}  # shard -> its format version
        self._handles: dict[str, object] = {}  # open shards: a header is parsed once, not per tensor read
        self.metadata: dict[str, str] = {}  # the shards' metadata less records and checksums (format, version)
        self.max_elements = _max_elements(self.config)
        for shard in shard_names:
            self._scan_shard(shard)

    # ---------------------------------------------------------------------------------- opening
    def _read_json(self, p: Path) -> dict:
        try:
            if p.stat().st_size > MAX_JSON_BYTES:
                raise CheckpointError(f"{p}: larger than {MAX_JSON_BYTES} bytes")
            value = json.loads(p.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{p}: missing") from None
        except RecursionError:
            raise CheckpointError(f"{p}: JSON nested too deep") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{p}: expected a JSON object")
        return value

    def _shard_names(self) -> list[str]:
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = self._read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: no weight_map of entry -> file")
            names = sorted(set(weight_map.values()))
            for n in names:
                if Path(n).name != n or not n.endswith(".safetensors"):
                    raise CheckpointError(f"{index}: shard name {n!r} is not a file in the checkpoint folder")
            return names
        if (self.path / "model.safetensors").exists():
            return ["model.safetensors"]
        raise CheckpointError(f"{self.path}: no model.safetensors or {INDEX_NAME}")

    def _open(self, shard: str):
        """The shard opened once (its header holds a record per tensor: parsing it per read cost ~1 ms)."""
        if shard in self._handles:
            return contextlib.nullcontext(self._handles[shard])
        p = self.path / shard
        try:
            with open(p, "rb") as f:  # safetensors would parse a header of any size (and time) first
                n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{p}: header of {n} bytes, more than the {MAX_HEADER_BYTES} safetensors allows")
            self._handles[shard] = safetensors.safe_open(str(p), framework="numpy")
            return contextlib.nullcontext(self._handles[shard])
        except FileNotFoundError:
            raise CheckpointError(f"{p}: missing") from None
        except CheckpointError:
            raise
        except Exception as e:  # safetensors reports truncation and bad headers with its own error types
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None

    def _scan_shard(self, shard: str) -> None:
        p = self.path / shard
        with self._open(shard) as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
        version = meta.get(VERSION_KEY)
        if version is None:
            raise CheckpointError(f"{p}: not a jcodec checkpoint (no {VERSION_KEY} in its metadata)")
        if version not in READS_VERSIONS:
            raise CheckpointError(f"{p}: format version {version}, this jcodec reads versions "
                                  f"{', '.join(READS_VERSIONS)}")
        self.metadata.update({k: v for k, v in meta.items() if not k.startswith((RECORD_PREFIX, RAW_CRC_PREFIX))})
        encoded, crcs = {}, {}
        for key, text in meta.items():
            if key.startswith(RAW_CRC_PREFIX):
                crcs[key[len(RAW_CRC_PREFIX):]] = text
            if key.startswith(RECORD_PREFIX):
                name = key[len(RECORD_PREFIX):]
                if len(text) > MAX_RECORD_BYTES:
                    raise CheckpointError(f"{p}: tensor {name}: record of {len(text)} bytes, more than "
                                          f"{MAX_RECORD_BYTES}")
                try:
                    encoded[name] = json.loads(text)
                except (json.JSONDecodeError, RecursionError):
                    raise CheckpointError(f"{p}: tensor {name}: record is not valid JSON") from None
                if not isinstance(encoded[name], dict):
                    raise CheckpointError(f"{p}: tensor {name}: record is not a JSON object")
                if version == SEALED_VERSION and integrity.CHECK_FIELD not in encoded[name]:
                    raise CheckpointError(f"{p}: tensor {name}: record has no {integrity.CHECK_FIELD} "
                                          f"(version {version} requires one)")
        by_prefix: dict[str, set[str]] = {}  # NAME -> its entries NAME.ARRAY (one pass: headers hold ~10^6 keys)
        for k in keys:
            head, dot, _ = k.rpartition(".")
            if dot:
                by_prefix.setdefault(head, set()).add(k)
        claimed = set()
        for name in encoded:
            entries = by_prefix.get(name, set())
            if not entries:
                raise CheckpointError(f"{p}: tensor {name}: record without entries")
            self._entries[name] = entries
            claimed |= entries
        self._versions[shard] = version
        for name in list(encoded) + [k for k in keys if k not in claimed]:
            if name in self._tensor_shard:
                raise CheckpointError(f"{p}: tensor {name} also stored in {self._tensor_shard[name]}")
            self._tensor_shard[name] = shard
            if name in encoded:
                self._records[name] = encoded[name]
            elif name in crcs and crcs[name].isdigit():
                self._raw_crcs[name] = int(crcs[name])
            else:
                raise CheckpointError(f"{p}: tensor {name}: no checksum recorded")

    # ---------------------------------------------------------------------------------- reading
    def names(self) -> list[str]:
        return list(self._tensor_shard)

    def record(self, name: str) -> dict | None:
        """The encoding record of ``name``, or None for a tensor stored raw."""
        self._check_name(name)
        return self._records.get(name)

    def _check_name(self, name: str) -> None:
        if name not in self._tensor_shard:
            raise CheckpointError(f"{self.path}: no tensor named {name}")

    def stored_shape(self, name: str, key: str) -> tuple[int, ...]:
        """The shape of entry ``key`` (e.g. ``words``) of encoded tensor ``name``, from the header alone."""
        self._check_name(name)
        with self._open(self._tensor_shard[name]) as f:
            return tuple(f.get_slice(f"{name}.{key}").get_shape())

    def where(self, name: str) -> str:
        return str(self.path / self._tensor_shard[name])

    def read(self, name: str, *, verify: bool = True) -> codecs.EncodedTensor | np.ndarray:
        """The stored form of ``name``: an EncodedTensor (validated) or the raw array. ``verify``: check its
        stored bytes against their checksums first (a version 1-4 tensor, which has none, is decoded and its
        tiles' checksums and lanes' end states checked); False reads faster and trusts the bytes."""
        self._check_name(name)
        shard = self._tensor_shard[name]
        where = f"{self.path / shard}: tensor {name}"
        sealed = self._versions[shard] == SEALED_VERSION
        with self._open(shard) as f:
            if name not in self._records:
                value = self._get(f, shard, name, name)
                if verify:
                    if sealed:
                        sl = f.get_slice(name)
                        crc = integrity.raw_check(name, sl.get_dtype(), sl.get_shape(), value)
                    else:
                        crc = zlib.crc32(np.ascontiguousarray(value).tobytes())
                    if crc != self._raw_crcs[name]:
                        raise CheckpointError(f"{where}: stored bytes, dtype or shape do not match the CRC-32 "
                                              "(pass verify=False or --no-verify to load anyway)")
                return value
            self._check_size(name)
            prefix = len(name) + 1
            arrays = {k[prefix:]: self._get(f, shard, name, k) for k in sorted(self._entries[name])}
        enc = codecs.EncodedTensor(self._records[name], arrays)
        try:
            if verify and sealed:
                integrity.check_sealed(name, enc)
            codecs.validate(enc)
            if verify and not sealed:
                codecs.decode(enc)
        except codecs.FormatError as e:
            raise CheckpointError(f"{where}: {e}" + (" (pass verify=False or --no-verify to load anyway)"
                                                     if verify else "")) from None
        return enc

    def _check_size(self, name: str) -> None:
        """Refuse a record whose shape is larger than config.json's largest matrix, before its entries are read or
        anything is allocated for its values (a few KB of int8 words can claim gigabytes)."""
        shape = self._records[name].get("shape")
        if (self.max_elements is not None and isinstance(shape, list) and all(type(d) is int for d in shape)
                and math.prod(shape) > self.max_elements):
            raise CheckpointError(f"{self.where(name)}: tensor {name}: shape {shape} holds more values than "
                                  f"config.json's largest matrix ({self.max_elements})")

    def _get(self, f, shard, name, key) -> np.ndarray:
        try:
            return f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path / shard}: tensor {name}: entry {key} unreadable ({e})") from None

    def decode(self, name: str) -> np.ndarray:
        """The tensor decoded with the NumPy reference decoders, every checksum checked."""
        # (a version 1-4 tensor is verified by the decode itself: read need not decode it twice)
        sealed = self._versions[self._tensor_shard[name]] == SEALED_VERSION
        value = self.read(name, verify=sealed or name not in self._records)
        if isinstance(value, np.ndarray):
            return value
        try:
            return codecs.decode(value)
        except codecs.FormatError as e:
            raise CheckpointError(f"{self.where(name)}: tensor {name}: {e}") from None

    def summary(self, name: str) -> dict:
        """codec, shape, dtype, stored and original bytes of one tensor (headers only, no decoding)."""
        self._check_name(name)
        rec = self._records.get(name)
        with self._open(self._tensor_shard[name]) as f:
            if rec is None:
                sl = f.get_slice(name)
                shape, dtype = list(sl.get_shape()), sl.get_dtype()
                nbytes = math.prod(shape) * _itemsize(dtype)
                return dict(codec="raw", shape=shape, dtype=dtype.lower(), stored=nbytes, original=nbytes)
            stored = len(json.dumps(rec, separators=(",", ":")))
            for k in self._entries[name]:
                sl = f.get_slice(k)
                stored += math.prod(sl.get_shape()) * _itemsize(sl.get_dtype())
        codec, shape, dtype = rec.get("codec"), rec.get("shape"), rec.get("dtype")
        if not (type(codec) is str and type(dtype) is str and type(shape) is list
                and all(type(d) is int and d >= 0 for d in shape)):  # (info lists without validating each tensor)
            raise CheckpointError(f"{self.where(name)}: tensor {name}: record lacks a codec, dtype or shape")
        dt = codecs.FLOAT_DTYPES.get(dtype, (np.dtype(np.uint8),))[0]
        codec += "/pairs" if rec.get("pairs") is True else ""  # pair symbols shown as a kind
        return dict(codec=codec, shape=shape, dtype=dtype, stored=stored, original=math.prod(shape) * dt.itemsize)


def _max_elements(config: dict) -> int | None:
    """The most values one tensor of this model can hold (the embedding or an MLP matrix), from config.json;
    None when it does not say."""
    hidden = config.get("hidden_size")
    others = [config.get(k) for k in ("vocab_size", "intermediate_size", "hidden_size")]
    others = [v for v in others if type(v) is int and v > 0]
    if type(hidden) is not int or hidden <= 0 or not others:
        return None
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if type(heads) is int and type(head_dim) is int:  # (q_proj is heads * head_dim wide, which may exceed hidden)
        others.append(heads * head_dim)
    return hidden * max(others)


def _itemsize(safetensors_dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (0 for one we do not know)."""
    dt = SAFETENSORS_DTYPES.get(safetensors_dtype)
    return 0 if dt is None else np.dtype(dt).itemsize
