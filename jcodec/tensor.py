"""`CompressedTensor`: an rANS-coded tensor as a JAX pytree, and `decode`, which works inside `jit`.

The device arrays are the pytree's children, so a CompressedTensor passes through `jit`, `lax.scan` over a
stacked layer axis, `device_put` and sharding like any array; the codec and geometry are static aux data.
`decode` picks the Pallas kernel on GPU and the pure-JAX reference elsewhere; both are bit-exact with the
NumPy decoder in `jcodec.codecs`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jcodec import codecs, rans

# Arrays a CompressedTensor holds on the device, by codec (see docs/FORMAT.md for the file's arrays).
#   words   uint16[W]     every lane's word stream, concatenated lane by lane (padded when stacked)
#   offsets uint32[T*L]   where each lane's stream starts in `words` (prefix sum of the file's counts)
#   states  uint32[T*L]   each lane's start state
#   table   uint32[4096+128]  packed slot table: symbol | (freq - 1) << 8 | bias << 20, then the kernels'
#                         coarse table (one entry per 32 slots; pallas_kernels/rans_common.py)
#   raw     uint8[n*rb]   bf16-lossless: the raw sign+mantissa bytes
#   scales  float32[rows], predictors int32[T]   int8 only
DEVICE_ARRAYS = {
    "bf16-lossless": ("words", "offsets", "states", "table", "raw"),
    "int8": ("words", "offsets", "states", "table", "scales", "predictors"),
}


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """Static description of one (per-layer) compressed tensor: hashable, so it can be jit aux data."""

    codec: str
    shape: tuple[int, ...]
    dtype: str
    lanes: int
    steps: int
    rows: int = 0  # int8: the 2-D view quantised per row
    cols: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@jax.tree_util.register_pytree_node_class
class CompressedTensor:
    """A tensor that stays rANS-coded in device memory until :func:`decode` is called on it.

    ``arrays`` may carry leading batch axes (a stack of same-shaped layers); ``meta.shape`` is the shape of
    one decoded tensor, so ``ct.shape`` is ``batch_shape + meta.shape``.
    """

    def __init__(self, arrays: dict, meta: TensorMeta):
        self.arrays = dict(arrays)
        self.meta = meta

    def tree_flatten(self):
        keys = tuple(sorted(self.arrays))
        return tuple(self.arrays[k] for k in keys), (keys, self.meta)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, meta = aux
        return cls(dict(zip(keys, children)), meta)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.arrays["states"].shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.batch_shape + self.meta.shape

    @property
    def dtype(self):
        return jnp.dtype(self.meta.dtype)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in self.arrays.values())

    def __repr__(self):
        return f"CompressedTensor({self.meta.codec}, shape={self.shape}, dtype={self.meta.dtype}, {self.nbytes} bytes)"


def from_encoded(enc: codecs.EncodedTensor, device=None, *, to_device: bool = True) -> CompressedTensor:
    """Put an rANS-coded :class:`~jcodec.codecs.EncodedTensor` on a device, in the kernels' layout.

    ``device``: a device, sharding or memory space for ``jax.device_put``. With ``to_device=False`` the
    arrays stay NumPy arrays in host memory (stack them with :func:`stack_layers`, then ``device_put`` once).
    """
    codecs.validate(enc)
    r, a = enc.record, enc.arrays
    if r["codec"] not in DEVICE_ARRAYS:
        raise ValueError(f"codec {r['codec']} is decoded on the host, not kept compressed on the device")
    from jcodec.pallas_kernels import rans_common

    slots = rans.packed_slot_table(a["freqs"])
    host = dict(words=a["words"], offsets=rans.lane_offsets(a["counts"]).astype(np.uint32),
                states=a["states"], table=np.concatenate([slots, rans_common.coarse_table(slots, np)]))
    if r["codec"] == "bf16-lossless":
        host["raw"] = a["raw"]
    else:
        host["scales"] = a["scales"]
        host["predictors"] = a["tiles"][:, 2].astype(np.int32)
    if host["words"].size == 0:  # a zero-length array cannot be gathered from; one spare word is never read
        host["words"] = np.zeros(1, np.uint16)
    meta = TensorMeta(r["codec"], tuple(r["shape"]), r["dtype"], r["lanes"], r["steps"],
                      r.get("rows", 0), r.get("cols", 0))
    if not to_device:
        return CompressedTensor(host, meta)
    return CompressedTensor({k: jax.device_put(v, device) for k, v in host.items()}, meta)


def stack_layers(leaves: list):
    """Stack per-layer leaves on a new leading axis: arrays with ``jnp.stack``; CompressedTensors of one
    meta by stacking their arrays, the word streams zero-padded to the longest (padding is never read)."""
    first = leaves[0]
    kinds = {isinstance(c, CompressedTensor) for c in leaves}
    if len(kinds) > 1:
        raise ValueError("cannot stack layers of which some are compressed and some raw (a layer's tensor "
                         "did not compress); load this checkpoint with mode='decoded'")
    if not isinstance(first, CompressedTensor):
        return np.stack(leaves) if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack(leaves)
    if any(c.meta != first.meta for c in leaves):
        raise ValueError("stack_layers needs CompressedTensors of one codec, shape and geometry")
    out = {}
    for k in first.arrays:
        parts = [c.arrays[k] for c in leaves]
        xp = np if all(isinstance(p, np.ndarray) for p in parts) else jnp  # host arrays stay on the host
        longest = max(p.shape[-1] for p in parts)
        out[k] = xp.stack([xp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, longest - p.shape[-1])]) for p in parts])
    return CompressedTensor(out, first.meta)


def default_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def decode(ct: CompressedTensor, *, backend: str | None = None, interpret: bool = False) -> jax.Array:
    """Decode to the original dtype and shape; usable inside ``jit`` and ``lax.scan``.

    ``backend``: ``"pallas"`` (the GPU kernel; with ``interpret=True`` it also runs on CPU) or
    ``"reference"`` (pure JAX, any device). Default: pallas on GPU, reference elsewhere.
    """
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"decode needs a CompressedTensor, got {type(ct).__name__}")
    backend = backend or default_backend()
    if backend not in ("pallas", "reference"):
        raise ValueError(f"{backend=} must be 'pallas' or 'reference'")
    if ct.batch_shape:  # a stack of layers: decode one at a time (inside scan, this branch is not taken)
        flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[len(ct.batch_shape):]), ct)
        out = jax.lax.map(lambda one: decode(one, backend=backend, interpret=interpret), flat)
        return out.reshape(ct.shape)
    m, a = ct.meta, ct.arrays
    if m.codec == "bf16-lossless":
        from jcodec.pallas_kernels import rans_float as k
        args = (a["words"], a["offsets"], a["states"], a["raw"], a["table"])
        kw = dict(n=m.size, lanes=m.lanes, steps=m.steps, dtype=m.dtype)
        flat = (k.rans_float_decode(*args, **kw, interpret=interpret) if backend == "pallas"
                else k.rans_float_reference(*args, **kw))
    else:
        from jcodec.pallas_kernels import rans_int8 as k
        args = (a["words"], a["offsets"], a["states"], a["table"], a["scales"], a["predictors"])
        kw = dict(n=m.size, rows=m.rows, cols=m.cols, lanes=m.lanes, steps=m.steps, dtype=m.dtype)
        flat = (k.rans_int8_decode(*args, **kw, interpret=interpret) if backend == "pallas"
                else k.rans_int8_reference(*args, **kw))
    return flat.reshape(m.shape)


def materialize(w):
    """The weight as a dense array: decoded if compressed, unchanged otherwise (the model calls this).

    A CompressedTensor kept in host memory (``mode="offload"``) is first moved to the device; for one
    already there the move is a no-op."""
    if not isinstance(w, CompressedTensor):
        return w
    return decode(jax.device_put(w, jax.memory.Space.Device))


def materialize_all(tree, *, backend: str | None = None, interpret: bool = False):
    """:func:`materialize` every leaf of ``tree`` (e.g. one layer's weights). On the Pallas backend the
    ``bf16-lossless`` tensors are decoded together in ONE kernel launch: many more lanes in flight than a
    launch per tensor (measured on the H100: a Llama-3-8B layer at 668-687 GB/s in one launch against
    237-246 GB/s in seven; bench/DECODE_NOTES.md)."""
    is_ct = lambda x: isinstance(x, CompressedTensor)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_ct)
    backend = backend or default_backend()
    batch = [i for i, x in enumerate(leaves) if is_ct(x) and x.meta.codec == "bf16-lossless" and not x.batch_shape]
    if backend != "pallas" or len(batch) < 2:
        return jax.tree_util.tree_unflatten(treedef, [materialize(x) for x in leaves])
    from jcodec.pallas_kernels import rans_float
    cts = [jax.device_put(leaves[i], jax.memory.Space.Device) for i in batch]
    outs = rans_float.rans_float_decode_many(
        [tuple(c.arrays[k] for k in ("words", "offsets", "states", "raw", "table")) for c in cts],
        metas=tuple((c.meta.size, c.meta.lanes, c.meta.steps, c.meta.dtype) for c in cts), interpret=interpret)
    leaves = [materialize(x) for x in leaves]
    for i, c, out in zip(batch, cts, outs):
        leaves[i] = out.reshape(c.meta.shape)
    return jax.tree_util.tree_unflatten(treedef, leaves)
