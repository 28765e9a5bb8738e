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
from jcodec.pallas_kernels import bf16_lossless, bf16_lossless_pack, int8, rans_math
from jcodec.pallas_kernels.bf16_lossless_pack import COUNT, OUT, OUT_AT, RAW_AT, TABLE

# Arrays a CompressedTensor holds on the device, by codec (see docs/FORMAT.md for the file's arrays).
#   words   uint16[W]     every lane's word stream, concatenated lane by lane; W even (zero words pad it, and
#                         a stack's rows to the longest), so the kernels may read it as uint32 word pairs
#   starts  uint16|uint32[T*L]  where each lane starts reading, in words from its tile's base: the sum of the
#                         file's counts of the lanes before it in the tile (summed here, once: a prefix sum
#                         in the kernels made them up to 2.7x slower, bench/decode.py)
#   bases   uint32[T]     where each tile's first lane starts in `words` (the file's tile offsets)
#   states  uint32[T*L]   each lane's start state
#   table   uint32[4096+128]  packed slot table: cum | symbol << 12 | (freq - 1) << 20, then the kernels'
#                         coarse table (one entry per 32 slots; pallas_kernels/rans_math.py); with pair
#                         symbols then 256 more: each symbol's two exponents in place, e1 << 7 | e2 << 23;
#                         int8: uint32[4096+1280], the slot table then the symbol tables (rans_math.symbol_table)
#   raw     uint8[m*rb]   bf16-lossless: the raw sign+mantissa bytes stored (all but those the lanes of full tiles
#                         carry in their states: `codecs.split_carry`); with pair symbols uint16[m], a pair's two
#                         bytes in one element
#   scales  float32[rows], predictors int32[T]   int8 only
DEVICE_ARRAYS = {
    "bf16-lossless": ("words", "starts", "bases", "states", "table", "raw"),
    "int8": ("words", "starts", "bases", "states", "table", "scales", "predictors"),
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
    predictors: tuple[int, ...] = ()  # int8: the predictor ids its tiles use (the kernel compiles one loop each)
    carry: int = 0  # bf16-lossless: steps per lane of a full tile whose raw bytes its end state carries
    pairs: bool = False  # bf16-lossless of bfloat16: one symbol per two values (codecs.encode_pairs)
    run: int = 1  # bf16-lossless: a lane decodes runs of this many symbols (jcodec.rans.lane_positions)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def symbols(self) -> int:
        """Coded symbols: the values, or with pair symbols the pairs (an odd size's last pair is padded)."""
        return -(-self.size // 2) if self.pairs else self.size

    @property
    def tile(self) -> int:
        """Values per tile."""
        return self.lanes * self.steps * (2 if self.pairs else 1)

    @property
    def tiles(self) -> int:
        return max(1, -(-self.symbols // (self.lanes * self.steps)))


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


def starts_dtype(lanes: int, steps: int):
    """A lane reads at most one word a step (two with pair symbols: pass twice the steps), so its start within
    the tile is at most ``(lanes - 1) * steps``: uint16 when that fits (one byte a lane more than the file's
    8-bit counts at 240 steps), else uint32."""
    return np.dtype(np.uint16 if (lanes - 1) * steps < 1 << 16 else np.uint32)


def host_arrays(enc: codecs.EncodedTensor) -> dict[str, np.ndarray]:
    """The arrays the kernels read (``DEVICE_ARRAYS``) of a validated EncodedTensor, as NumPy arrays; the
    word stream as stored (not padded)."""
    codecs.validate(enc)
    r, a = enc.record, enc.arrays
    if r["codec"] not in DEVICE_ARRAYS:
        raise ValueError(f"codec {r['codec']} is decoded on the host, not kept compressed on the device")

    slots = rans.packed_slot_table(a["freqs"])
    bases = np.ascontiguousarray(a["tiles"][:, 0])  # each tile's first lane offset (validate checked them)
    starts = rans.lane_offsets(a["counts"]) - np.repeat(bases.astype(np.int64), r["lanes"])
    per_step = 2 if r.get("pairs") else 1
    host = dict(words=a["words"], starts=starts.astype(starts_dtype(r["lanes"], r["steps"] * per_step)),
                bases=bases, states=a["states"],
                table=np.concatenate([slots, rans_math.symbol_table(slots, np) if r["codec"] == "int8"
                                      else rans_math.coarse_table(slots, np)]))
    if r.get("pairs"):
        host["table"] = np.concatenate([host["table"], pair_table(a["pairs"])])
        host["raw"] = a["raw"].view(np.uint16)
    elif r["codec"] == "bf16-lossless":
        host["raw"] = a["raw"]
    else:
        host["scales"] = a["scales"]
        host["predictors"] = a["tiles"][:, 2].astype(np.int32)
    return host


def pair_table(pairs: np.ndarray) -> np.ndarray:
    """The file's ``pairs`` (uint16[256], a symbol's ``e1 | e2 << 8``) as the kernels read them: uint32[256]
    ``e1 << 7 | e2 << 23``, each exponent where the output's bfloat16 pair holds it."""
    both = np.asarray(pairs).astype(np.uint32)
    return ((both & 0xFF) << 7) | ((both >> 8) << 23)


def from_encoded(enc: codecs.EncodedTensor, device=None, *, to_device: bool = True) -> CompressedTensor:
    """Put an rANS-coded :class:`~jcodec.codecs.EncodedTensor` on a device, in the kernels' layout.

    ``device``: a device, sharding or memory space for ``jax.device_put``. With ``to_device=False`` the
    arrays stay NumPy arrays in host memory (stack them with :func:`stack_layers`, then ``device_put`` once).
    """
    r = enc.record
    host = host_arrays(enc)
    # zero words to an even count (at least 2: a zero-length array cannot be gathered from), so that the
    # kernels can read the stream as uint32 word pairs (word_group=2) without a copy; padding is never read
    w = host["words"]
    host["words"] = np.pad(w, (0, max(2, w.size + w.size % 2) - w.size))
    meta = TensorMeta(r["codec"], tuple(r["shape"]), r["dtype"], r["lanes"], r["steps"],
                      r.get("rows", 0), r.get("cols", 0),
                      tuple(sorted(set(host["predictors"].tolist()))) if "predictors" in host else (),
                      r.get("carry", 0), bool(r.get("pairs", False)), r.get("run", 1))
    if not to_device:
        return CompressedTensor(host, meta)
    return CompressedTensor({k: jax.device_put(v, device) for k, v in host.items()}, meta)


def stack_layers(leaves: list):
    """Stack per-layer leaves on a new leading axis: arrays with ``jnp.stack``; CompressedTensors of one
    meta by stacking their arrays, the word streams zero-padded to the longest, rounded up to an even count
    (word pairs, as in :func:`from_encoded`; padding is never read)."""
    first = leaves[0]
    kinds = {isinstance(c, CompressedTensor) for c in leaves}
    if len(kinds) > 1:
        raise ValueError("cannot stack layers of which some are compressed and some raw (a layer's tensor "
                         "did not compress); load this checkpoint with mode='decoded'")
    if not isinstance(first, CompressedTensor):
        return np.stack(leaves) if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack(leaves)
    if any(dataclasses.replace(c.meta, predictors=()) != dataclasses.replace(first.meta, predictors=())
           for c in leaves):
        raise ValueError("stack_layers needs CompressedTensors of one codec, shape and geometry")
    used = tuple(sorted({p for c in leaves for p in c.meta.predictors}))
    out = {}
    for k in first.arrays:
        parts = [c.arrays[k] for c in leaves]
        xp = np if all(isinstance(p, np.ndarray) for p in parts) else jnp  # host arrays stay on the host
        longest = max(p.shape[-1] for p in parts)
        longest += (longest & 1) if k == "words" else 0
        out[k] = xp.stack([xp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, longest - p.shape[-1])]) for p in parts])
    return CompressedTensor(out, dataclasses.replace(first.meta, predictors=used))


def default_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def _check_backend(ct, backend):
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"decode needs a CompressedTensor, got {type(ct).__name__}")
    backend = backend or default_backend()
    if backend not in ("pallas", "reference"):
        raise ValueError(f"{backend=} must be 'pallas' or 'reference'")
    return backend


def kernel_args(ct: CompressedTensor):
    """``(arrays, meta)`` as the kernels' ``*_decode_many`` take them (for one tensor or a stack): a
    ``bf16_lossless.LosslessMeta`` (with pair symbols n counts pairs) or an ``int8.Int8Meta``."""
    m, a = ct.meta, ct.arrays
    if m.codec == "bf16-lossless":
        return (tuple(a[k] for k in ("words", "starts", "bases", "states", "raw", "table")),
                bf16_lossless.LosslessMeta(m.symbols, m.lanes, m.steps, m.dtype, m.carry, m.run, m.pairs))
    return (tuple(a[k] for k in ("words", "starts", "bases", "states", "table", "scales", "predictors")),
            int8.Int8Meta(m.size, m.rows, m.cols, m.lanes, m.steps, m.dtype, m.predictors or (0, 1, 2)))


def _reference(ct: CompressedTensor) -> jax.Array:
    """The pure-JAX decoder of one (unstacked) tensor, flat."""
    args, meta = kernel_args(ct)
    if ct.meta.codec == "bf16-lossless":
        return bf16_lossless.bf16_lossless_reference(*args, **meta._asdict())[:ct.meta.size]
    return int8.int8_reference(*args, n=meta.n, rows=meta.rows, cols=meta.cols, lanes=meta.lanes, steps=meta.steps,
                               dtype=meta.dtype)


def decode_many(cts: list, *, tiles=None, start=None, window: int = 0, interpret: bool = False) -> list[jax.Array]:
    """Decode CompressedTensors (each one tensor or a stack with one leading axis) with the Pallas kernels:
    all of one codec in ONE launch. ``tiles``: None, or per tensor None or int32[R] (see ``decode_tiles``);
    ``start``/``window``: copies ``start .. start + window`` of every stack (see ``decode_window``).
    Returns flat arrays: ``[n]``, ``[copies, n]``, ``[window, n]`` or ``[R * tile]``."""
    tiles = [None] * len(cts) if tiles is None else list(tiles)
    out = [None] * len(cts)
    for codec, fn in (("bf16-lossless", bf16_lossless.bf16_lossless_decode_many),
                      ("int8", int8.int8_decode_many)):
        idx = [i for i, c in enumerate(cts) if c.meta.codec == codec]
        if idx:
            args = [kernel_args(cts[i]) for i in idx]
            decoded = fn([a for a, _ in args], metas=tuple(m for _, m in args), tiles=[tiles[i] for i in idx],
                         start=start, window=window, interpret=interpret)
            for i, d in zip(idx, decoded):
                m = cts[i].meta
                if m.pairs and m.size % 2 and tiles[i] is None:  # the padding value of an odd size
                    d = d[..., :m.size]
                out[i] = d
    return out


def decode(ct: CompressedTensor, *, backend: str | None = None, interpret: bool = False) -> jax.Array:
    """Decode to the original dtype and shape; usable inside ``jit`` and ``lax.scan``.

    ``backend``: ``"pallas"`` (the GPU kernel; with ``interpret=True`` it also runs on CPU) or
    ``"reference"`` (pure JAX, any device). Default: pallas on GPU, reference elsewhere. A stack of layers
    (one leading axis) decodes in one launch on the Pallas backend.
    """
    backend = _check_backend(ct, backend)
    if len(ct.batch_shape) > 1 or (ct.batch_shape and backend == "reference"):  # one tensor at a time
        flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[len(ct.batch_shape):]), ct)
        out = jax.lax.map(lambda one: decode(one, backend=backend, interpret=interpret), flat)
        return out.reshape(ct.shape)
    if backend == "reference":
        return _reference(ct).reshape(ct.shape)
    return decode_many([ct], interpret=interpret)[0].reshape(ct.shape)


def decode_window(cts: list, start, window: int, *, backend: str | None = None,
                  interpret: bool = False) -> list[jax.Array]:
    """Layers ``start .. start + window`` of stacks of layers (one leading axis each): ``[window, *shape]``
    per stack, all in one launch per codec on the Pallas backend, which reads the stacks' arrays in place.
    Why: a ``lax.scan`` over stacked compressed layers slices each step's arrays out first, and a slice
    that feeds a kernel is a copy (a layer's compressed bytes written and read once more, and held as a
    temporary). ``start`` may be traced; it is clamped so that the window exists."""
    backend = backend or default_backend()
    for c in cts:
        _check_backend(c, backend)
        if len(c.batch_shape) != 1 or not 1 <= window <= c.batch_shape[0]:
            raise ValueError(f"decode_window needs stacks of >= {window=} layers (one leading axis), got {c.shape}")
    if backend == "pallas":
        outs = decode_many([jax.device_put(c, jax.memory.Space.Device) for c in cts], start=start, window=window,
                           interpret=interpret)
        return [o.reshape((window,) + c.meta.shape) for o, c in zip(outs, cts)]
    out = []
    for c in cts:  # the reference: slice, then decode
        first = jnp.clip(jnp.asarray(start, jnp.int32), 0, c.batch_shape[0] - window)
        part = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, first, window), c)
        out.append(decode(part, backend=backend))
    return out


def decode_tiles(ct: CompressedTensor, tiles, *, backend: str | None = None, interpret: bool = False) -> jax.Array:
    """The values of tiles ``tiles`` (int32[R], traced values welcome) of one tensor, flat ``[R * tile]``:
    tile ``tiles[r]`` at ``r * tile``, positions past the tensor's end unspecified (ids are clamped to the
    tensor). Tiles hold consecutive values, so a range of rows is a range of tiles: this is how an
    embedding's rows or a chunk of an output head are decoded without decoding the whole tensor."""
    backend = _check_backend(ct, backend)
    if ct.batch_shape:
        raise ValueError("decode_tiles takes one tensor, not a stack")
    tiles = jnp.asarray(tiles, jnp.int32)
    if backend == "pallas":
        return decode_many([ct], tiles=[tiles], interpret=interpret)[0]
    m = ct.meta
    full = jnp.pad(_reference(ct), (0, m.tiles * m.tile - m.size)).reshape(m.tiles, m.tile)
    return full[jnp.clip(tiles, 0, m.tiles - 1)].reshape(-1)


def _row_tiles(meta: TensorMeta, rows: int) -> int:
    """The most tiles ``rows`` consecutive rows can touch (rows start at multiples of gcd(cols, tile))."""
    span = rows * meta.shape[-1]
    return min(meta.tiles, -(-(span + meta.tile - math.gcd(meta.shape[-1], meta.tile)) // meta.tile))


def decode_rows(ct: CompressedTensor, start, count: int, **kw) -> jax.Array:
    """Rows ``start .. start + count`` ([count, cols]) of a 2-D tensor, decoding only the tiles they lie in;
    ``start`` may be traced (it is clamped so that the rows exist)."""
    m = ct.meta
    if len(m.shape) != 2 or not 1 <= count <= m.shape[0]:
        raise ValueError(f"decode_rows needs a 2-D tensor and 1 <= {count=} <= {m.shape[0]} rows")
    cols = m.shape[1]
    start = jnp.clip(jnp.asarray(start, jnp.int32), 0, m.shape[0] - count)
    k = _row_tiles(m, count)
    first = jnp.minimum(start * cols // m.tile, m.tiles - k)
    values = decode_tiles(ct, first + jnp.arange(k, dtype=jnp.int32), **kw)
    return jax.lax.dynamic_slice(values, (start * cols - first * m.tile,), (count * cols,)).reshape(count, cols)


def take_rows(w, ids, *, chunk: int = 256, **kw) -> jax.Array:
    """``w[ids]`` for a 2-D weight (an embedding lookup): a CompressedTensor decodes only the tiles that
    hold those rows, ``chunk`` ids per launch (so a long prompt needs no more than ``chunk`` rows' tiles)."""
    if not isinstance(w, CompressedTensor):
        return w[ids]
    w = jax.device_put(w, jax.memory.Space.Device)
    m = w.meta
    if len(m.shape) != 2 or w.batch_shape:
        raise ValueError(f"take_rows needs one 2-D tensor, got shape {w.shape}")
    cols, k = m.shape[1], _row_tiles(m, 1)
    flat_ids = jnp.clip(ids.reshape(-1).astype(jnp.int32), 0, m.shape[0] - 1)
    n = flat_ids.shape[0]
    size = min(chunk, n)
    padded = jnp.pad(flat_ids, (0, -(-n // size) * size - n)).reshape(-1, size)

    def rows(c):  # [size] ids -> [size, cols]
        first = jnp.minimum(c * cols // m.tile, m.tiles - k)                       # [size]
        values = decode_tiles(w, (first[:, None] + jnp.arange(k, dtype=jnp.int32)).reshape(-1), **kw)
        values = values.reshape(size, k * m.tile)
        return jax.vmap(lambda v, off: jax.lax.dynamic_slice(v, (off,), (cols,)))(values, c * cols - first * m.tile)

    out = jax.lax.map(rows, padded).reshape(-1, cols)[:n]
    return out.reshape(ids.shape + (cols,))


def materialize(w):
    """The weight as a dense array: decoded if compressed, unchanged otherwise (the model calls this).

    A CompressedTensor kept in host memory (``mode="offload"``) is first moved to the device; for one
    already there the move is a no-op."""
    if not isinstance(w, CompressedTensor):
        return w
    return decode(jax.device_put(w, jax.memory.Space.Device))


def materialize_all(tree, *, backend: str | None = None, interpret: bool = False):
    """:func:`materialize` every leaf of ``tree`` (e.g. one layer's weights, or a group of stacked layers).
    On the Pallas backend all CompressedTensors of a codec are decoded together in ONE kernel launch: many
    more lanes in flight than a launch per tensor (measured on the H100: a Llama-3-8B layer at 668-687 GB/s
    in one launch against 237-246 GB/s in seven, bench/decode.py's layer rows)."""
    is_ct = lambda x: isinstance(x, CompressedTensor)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_ct)
    backend = backend or default_backend()
    batch = [i for i, x in enumerate(leaves) if is_ct(x) and len(x.batch_shape) <= 1]
    if backend != "pallas" or not batch:
        return jax.tree_util.tree_unflatten(treedef, [materialize(x) for x in leaves])
    cts = [jax.device_put(leaves[i], jax.memory.Space.Device) for i in batch]
    outs = decode_many(cts, interpret=interpret)
    leaves = [x if i in batch else materialize(x) for i, x in enumerate(leaves)]
    for i, c, out in zip(batch, cts, outs):
        leaves[i] = out.reshape(c.shape)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------------------------------------ packs
PACK_LIMIT = (1 << 31) - 1  # values (and raw bytes, and words) per pack: the kernel's 32-bit offsets


class PackBuilder:
    """The host arrays of one pack (``pallas_kernels/bf16_lossless_pack.py``), laid out before any tensor is read.

    ``tensors``: per tensor ``(output, n, words)``: which output it goes to (its values follow the output's
    earlier tensors: a stack's layers are consecutive tensors of one output), its value count and the words
    reserved for its stream. The shapes are fixed here, so the pack's decoder can be compiled while the
    tensors are still being read; :meth:`add` then copies each tensor's arrays into place.
    """

    def __init__(self, tensors: list[tuple[int, int, int]], lanes: int, steps: int, dtype: str, carry: int = 0,
                 run: int = 1, pairs: bool = False):
        tile = lanes * steps
        outs = 1 + max(j for j, _, _ in tensors)
        sizes = [0] * outs
        self.slots = []  # per tensor: (words at, lanes at, stored raw values at, output, value in the output, n)
        words = lanes_at = values = 0
        for j, n, w in tensors:
            self.slots.append((words, lanes_at, values, j, sizes[j], n))
            words, lanes_at = words + w, lanes_at + -(-n // tile) * lanes
            values += codecs.stored_raw_values(n, lanes, steps, carry)
            sizes[j] += n
        rb = rans_math.raw_bytes(dtype, pairs)
        raw_dtype, self.raw_per = rans_math.raw_layout(dtype, pairs)  # bytes, or with pair symbols one uint16 a pair
        raw = np.zeros(values * self.raw_per, raw_dtype)
        width = rans_math.device_table_size(pairs)
        if max(words, values * rb, lanes_at * steps) > PACK_LIMIT or min(sizes) < 1:
            raise ValueError(f"a pack holds < 2^31 words, raw bytes and tile values, and every output >= 1 value "
                             f"(got {words} words, {values} values, outputs {sizes})")
        self.lanes, self.steps, self.dtype, self.carry, self.tile = lanes, steps, dtype, carry, tile
        self.arrays = (np.zeros(max(words, 1), np.uint16), np.zeros(lanes_at, np.uint32),
                       np.zeros(lanes_at, np.uint32), raw, np.zeros((len(tensors), width), np.uint32),
                       np.zeros((lanes_at // lanes, bf16_lossless_pack.INFO), np.int32))
        self.static = dict(sizes=tuple(sizes), lanes=lanes, steps=steps, dtype=dtype, carry=carry, run=run,
                           pairs=pairs)

    def abstract(self):
        """The arrays as ``jax.ShapeDtypeStruct``s (to compile the decoder before they are filled)."""
        return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self.arrays)

    def add(self, i: int, words, starts, bases, states, raw, table) -> None:
        """Tensor ``i``'s arrays in the kernels' layout (``host_arrays``); the pack's lanes start at absolute
        word offsets (their tile's base plus their start, moved to the tensor's words)."""
        words_at, lanes_at, values_at, j, out_at, n = self.slots[i]
        w = words.reshape(-1)
        end = self.slots[i + 1][0] if i + 1 < len(self.slots) else self.arrays[0].size
        tiles = -(-n // self.tile)
        stored = codecs.stored_raw_values(n, self.lanes, self.steps, self.carry)
        if (w.size > end - words_at or starts.size != tiles * self.lanes or bases.size != tiles
                or raw.size != stored * self.raw_per or table.size != self.arrays[4].shape[1]):
            raise ValueError(f"tensor {i} does not match the pack's layout ({w.size} words for {end - words_at}, "
                             f"{starts.size} lanes for {tiles * self.lanes}, {bases.size} tiles for {tiles}, "
                             f"{raw.size} raw bytes for {n} values)")
        all_words, all_offsets, all_states, all_raw, tables, info = self.arrays
        all_words[words_at:words_at + w.size] = w
        all_offsets[lanes_at:lanes_at + starts.size] = (np.repeat(bases.astype(np.int64), self.lanes)
                                                        + starts.reshape(-1) + words_at)
        all_states[lanes_at:lanes_at + states.size] = states
        per = self.raw_per
        all_raw[values_at * per:(values_at + stored) * per] = raw.reshape(-1)
        tables[i] = table
        first = np.arange(tiles, dtype=np.int64) * self.tile
        rows = info[lanes_at // self.lanes:lanes_at // self.lanes + tiles]
        rows[:, OUT] = j
        rows[:, OUT_AT] = out_at + first
        rows[:, RAW_AT] = values_at + np.arange(tiles, dtype=np.int64) * (self.steps - self.carry) * self.lanes
        rows[:, COUNT] = np.minimum(self.tile, n - first)
        rows[:, TABLE] = i


def pack_float(cts: list) -> tuple[tuple[np.ndarray, ...], dict]:
    """Host ``bf16-lossless`` CompressedTensors of one geometry (each one tensor or a stack with one leading
    axis) as ONE pack: ``(words, offsets, states, raw, tables, info)`` NumPy arrays and the static
    arguments ``dict(sizes, lanes, steps, dtype, carry, run, pairs)``. Output ``j`` is ``cts[j]`` flat (``[copies * n]``).
    A whole model decodes in one launch of one small kernel: one compile."""
    m0 = cts[0].meta
    entries = []
    for j, ct in enumerate(cts):
        m = ct.meta
        if (m.codec, m.lanes, m.steps, m.dtype, m.carry, m.pairs, m.run) != (
                "bf16-lossless", m0.lanes, m0.steps, m0.dtype, m0.carry, m0.pairs, m0.run) \
                or len(ct.batch_shape) > 1 or (m.pairs and m.size % 2):
            raise ValueError("pack_float needs bf16-lossless tensors (or stacks of one axis) of one lanes, steps, "
                             "dtype, carry, run and symbols (pair-coded ones of even size)")
        copies = ct.batch_shape[0] if ct.batch_shape else 1
        rows = {k: np.asarray(a).reshape(copies, -1) for k, a in ct.arrays.items()}
        entries += [(j, m.symbols, {k: r[c] for k, r in rows.items()}) for c in range(copies)]
    pack = PackBuilder([(j, n, a["words"].size) for j, n, a in entries], m0.lanes, m0.steps, m0.dtype,
                       m0.carry, m0.run, m0.pairs)
    for i, (_, _, a) in enumerate(entries):
        pack.add(i, a["words"], a["starts"], a["bases"], a["states"], a["raw"], a["table"])
    return pack.arrays, pack.static


def decode_pack(arrays, *, sizes, lanes: int, steps: int, dtype: str, carry: int = 0, run: int = 1,
                pairs: bool = False, backend: str | None = None, interpret: bool = False,
                unroll: int = 1) -> list[jax.Array]:
    """Decode a pack: the Pallas kernel on GPU (``unroll`` 1: it compiles fastest, and a load decodes
    once), the pure-JAX reference elsewhere."""
    backend = backend or default_backend()
    static = dict(sizes=tuple(sizes), lanes=lanes, steps=steps, dtype=dtype, carry=carry, run=run, pairs=pairs)
    if backend == "pallas":
        return bf16_lossless_pack.bf16_lossless_decode_pack(*arrays, **static, unroll=unroll, interpret=interpret)
    return bf16_lossless_pack.bf16_lossless_pack_reference(*arrays, **static)


def fill_packs(items, limit: int = PACK_LIMIT) -> list[tuple]:
    """``items`` of ``(key, geometry, size)`` (size in raw bytes) into packs, in order: one geometry per pack,
    a new pack when the next item would pass ``limit``; an item larger than ``limit`` fits none and is left
    out. Returns ``[(geometry, [key, ...]), ...]``."""
    chains: dict[tuple, list] = {}
    for key, geometry, size in items:
        if size > limit:
            continue
        chain = chains.setdefault(geometry, [])
        if not chain or chain[-1][0] + size > limit:
            chain.append([0, []])
        chain[-1][0] += size
        chain[-1][1].append(key)
    return [(geometry, keys) for geometry, chain in chains.items() for _, keys in chain]


def pack_groups(cts: list, limit: int = PACK_LIMIT) -> list[list[int]]:
    """Indices of ``cts`` grouped into packs: host ``bf16-lossless`` tensors of one geometry, each pack below
    ``limit`` values; tensors that fit no pack (or are on a device) are left out."""
    items = [(i, (ct.meta.lanes, ct.meta.steps, ct.meta.dtype, ct.meta.carry, ct.meta.run, ct.meta.pairs),
              _pack_values(ct)) for i, ct in enumerate(cts)
             if ct.meta.codec == "bf16-lossless" and len(ct.batch_shape) <= 1 and not (ct.meta.pairs and ct.meta.size % 2)
             and all(isinstance(a, np.ndarray) for a in ct.arrays.values())]
    return [keys for _, keys in fill_packs(items, limit)]


def _pack_values(ct) -> int:
    copies = ct.batch_shape[0] if ct.batch_shape else 1
    return ct.meta.symbols * copies * rans_math.raw_bytes(ct.meta.dtype, ct.meta.pairs)
