"""Convert an HF checkpoint or a GGUF file into a jcodec checkpoint, and verify one.

Streams one tensor at a time: memory is bounded by one shard buffer plus a few copies of the largest
tensor, whatever the size of the model.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jcodec import codecs
from jcodec.checkpoint import Checkpoint, CheckpointError, CheckpointWriter, choose_encoding
from jcodec.models import llama
from jcodec.sources import open_source


@dataclasses.dataclass
class ConvertReport:
    out: str
    codec: str
    tensors: int
    encoded: int
    original_bytes: int
    stored_bytes: int
    seconds: float
    not_runnable: str | None = None  # why jcodec generate cannot run it (None: it can)

    @property
    def ratio(self) -> float:
        return self.stored_bytes / max(self.original_bytes, 1)


def convert(src, out, codec: str = "bf16-lossless", *, lanes: int = codecs.DEFAULT_LANES,
            steps: int | None = None, zstd_level: int = 3, shard_bytes: int = 2 << 30,
            overwrite: bool = False, progress: bool = True, pairs: bool = True) -> ConvertReport:
    """Encode every tensor of ``src`` (HF folder or .gguf) with ``codec`` into the folder ``out``. ``pairs``
    (default): ``bf16-lossless`` codes a bfloat16 tensor's exponents two values a symbol (``codecs.encode_pairs``)."""
    if codec not in codecs.CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(codecs.CODECS)}")
    t0 = time.perf_counter()
    source = open_source(src)
    if not Path(source.path).is_dir():
        source.tokenizer()  # a GGUF's tokenizer is rebuilt: fail on a bad one before the tensors, not after
    names = list(source.tensor_names())
    original = stored = encoded = 0
    opts = dict(zstd_level=zstd_level) if codec == "zstd" else dict(lanes=lanes, steps=steps, pairs=pairs)
    with CheckpointWriter(out, shard_bytes=shard_bytes, overwrite=overwrite) as writer:
        bar = tqdm(names, desc=f"convert {codec}", unit="tensor", disable=None if progress else True, leave=False)
        for name in bar:
            array = source.read(name)
            enc = choose_encoding(array, codec, **opts)
            writer.add(name, enc if enc is not None else array)
            original += array.nbytes
            stored += enc.nbytes if enc is not None else array.nbytes
            encoded += enc is not None
            bar.set_postfix(ratio=f"{stored / max(original, 1):.3f}")
        writer.finish(source.config, lambda d: _copy_tokenizer(source, d))
    return ConvertReport(str(out), codec, len(names), encoded, original, stored, time.perf_counter() - t0,
                         why_not_runnable(source.config, names))


def why_not_runnable(config: dict, names) -> str | None:
    """Why the model (jcodec.models.llama) cannot run a checkpoint of this config and these tensors, or None."""
    try:
        llama.check_tensor_names(llama.LlamaConfig.from_hf(config), names)
    except ValueError as e:
        return str(e)
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")


def _copy_tokenizer(source, directory: str) -> None:
    """Copy an HF folder's tokenizer files as they are; a GGUF's tokenizer is rebuilt by transformers."""
    folder = Path(source.path)
    if folder.is_dir():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, Path(directory) / name)
    else:
        source.save_tokenizer(directory)


@dataclasses.dataclass
class VerifyReport:
    tensors: int
    tiles: int
    compared: int


def verify(path, against=None, *, progress: bool = True) -> VerifyReport:
    """Decode every tensor of a checkpoint, checking every tile's checksum and every lane's end state;
    with ``against`` (the source checkpoint), also require bit-exact equality for lossless codecs and,
    for int8, an error of at most half a quantisation step in every channel."""
    ckpt = Checkpoint(path)
    source = None
    if against is not None:
        source = open_source(against)
        missing = sorted(set(source.tensor_names()) - set(ckpt.names()))
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} tensors of the source are missing, first {missing[0]}")
    tiles = compared = 0
    for name in tqdm(ckpt.names(), desc="verify", unit="tensor",
                     disable=None if progress else True, leave=False):
        value = ckpt.decode(name)
        rec = ckpt.record(name)
        tiles += rec.get("tiles", 1) if rec else 0
        if source is None:
            continue
        ref = source.read(name)
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise CheckpointError(f"{ckpt.where(name)}: tensor {name}: decodes to {value.dtype}{list(value.shape)}, "
                                  f"source has {ref.dtype}{list(ref.shape)}")
        if rec is not None and rec["codec"] == "int8":
            x = np.asarray(ref, np.float32).reshape(rec["rows"], rec["cols"])
            _, scales = codecs.quantize_int8(x)
            # the bound is half a step of the quantiser, plus the one rounding to the output dtype
            err = np.abs(np.asarray(value, np.float32).reshape(x.shape) - x).max(axis=1)
            ulp = np.abs(x).max(axis=1) * float(ml_dtypes.finfo(ref.dtype).eps)
            if np.any(err > scales / 2 + ulp):
                raise CheckpointError(f"{ckpt.where(name)}: tensor {name}: int8 error exceeds half a step")
        elif not np.array_equal(np.asarray(value).view(np.uint8), np.asarray(ref).view(np.uint8)):
            raise CheckpointError(f"{ckpt.where(name)}: tensor {name}: differs from the source")
        compared += 1
    return VerifyReport(len(ckpt.names()), tiles, compared)
