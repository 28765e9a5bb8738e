"""`jcodec.open`: one tensor at a time from a jcodec checkpoint, shaped like ``safetensors.safe_open``.

    with jcodec.open("model.jcodec", framework="jax") as f:
        for name in f.keys():
            w = f.get_tensor(name)         # decoded: a jax.Array (a NumPy array with framework="numpy")
        ct = f.get_compressed(name)        # a CompressedTensor: jcodec.decode(ct) inside jit

Any architecture: nothing here knows a model, only the folder's tensors (tensor names as the source had them).
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jcodec import codecs
from jcodec.checkpoint import Checkpoint, CheckpointError
from jcodec.tensor import CompressedTensor, decode, from_encoded

FRAMEWORKS = {"numpy": "numpy", "np": "numpy", "jax": "jax", "flax": "jax"}  # safetensors' names for the two
DEVICE_CODECS = ("bf16-lossless", "int8")  # decoded by jcodec.decode; zstd is decoded on the host


def natural_key(name: str) -> list:
    """Sort key that puts layer 2 before layer 10 (``model.layers.2`` < ``model.layers.10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class Reader:
    """A jcodec checkpoint folder opened for reading (headers read and checked now, tensors on demand)."""

    def __init__(self, path: str | os.PathLike, framework: str = "numpy", verify: bool = True):
        if framework not in FRAMEWORKS:
            raise ValueError(f"{framework=} must be one of {', '.join(FRAMEWORKS)}")
        self.framework = FRAMEWORKS[framework]
        self.verify = verify  # check each tensor's stored bytes against their checksums as it is read
        self.checkpoint = Checkpoint(path)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    @property
    def config(self) -> dict:
        """The model's config.json."""
        return self.checkpoint.config

    def keys(self) -> list[str]:
        """Tensor names (not the entries that encode them), layers in numeric order."""
        return sorted(self.checkpoint.names(), key=natural_key)

    def metadata(self) -> dict[str, str]:
        """The shards' ``__metadata__`` less the per-tensor records and checksums: format and version."""
        return dict(self.checkpoint.metadata)

    def get_tensor(self, name: str):
        """The tensor decoded to its stored dtype and shape (every checksum checked on the NumPy path; on the
        JAX path, rANS-coded tensors are decoded on the device by :func:`jcodec.decode`)."""
        if self.framework == "numpy":
            return self.checkpoint.decode(self._known(name))
        value = self.get_compressed(name)
        return decode(value) if isinstance(value, CompressedTensor) else value

    def get_compressed(self, name: str):
        """A :class:`CompressedTensor` on the default device for an rANS-coded tensor, for ``jcodec.decode``
        inside ``jit``; a tensor stored raw, or zstd-coded (no device decoder), comes back as an array."""
        value = self.host_form(name)
        if isinstance(value, CompressedTensor):
            return jax.device_put(value)
        return jnp.asarray(value) if self.framework == "jax" else value

    def host_form(self, name: str):
        """``name`` in host memory: a NumPy CompressedTensor for an rANS-coded tensor, else a NumPy array."""
        value = self.checkpoint.read(self._known(name), verify=self.verify)
        if isinstance(value, np.ndarray):
            return value
        if value.record["codec"] not in DEVICE_CODECS:
            try:
                return codecs.decode(value)
            except codecs.FormatError as e:
                raise CheckpointError(f"{self.checkpoint.where(name)}: tensor {name}: {e}") from None
        return from_encoded(value, to_device=False)


    def _known(self, name: str) -> str:
        if name not in self.checkpoint.names():
            raise KeyError(f"{self.checkpoint.path}: no tensor named {name}")
        return name


def open(path: str | os.PathLike, framework: str = "numpy", verify: bool = True) -> Reader:  # noqa: A001 - as safe_open
    """Open a jcodec checkpoint folder to read tensors one at a time (``framework``: "numpy" or "jax"; ``verify``:
    check each tensor's stored bytes against their checksums as it is read)."""
    return Reader(path, framework, verify)
