"""`jcodec.load`: a checkpoint (jcodec, HF folder or GGUF) as model params, in one of three modes.

- ``decoded``: every weight decoded once at load (on the device: the Pallas kernel on GPU, the whole model's
  bf16-lossless tensors in one launch, see :func:`load_decoded`), then plain arrays.
- ``compressed``: rANS-coded weights stay compressed on the device as CompressedTensors; the forward pass
  decodes each layer inside its ``lax.scan`` step, so peak memory is the compressed model plus one layer.
- ``offload``: like ``compressed``, but the compressed weights live in host memory and each layer's are
  moved to the device inside the scan step (``jax.memory.Space.Host``; on a CPU both spaces are RAM).

zstd-coded tensors are always decoded on the host before they are put on the device.
"""
from __future__ import annotations

import functools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax

from jcodec import schedule
from jcodec.checkpoint import Checkpoint, CheckpointError, declares_jcodec
from jcodec.generation import Model, default_dtype
from jcodec.models import llama
from jcodec.pallas_kernels.rans_math import raw_bytes
from jcodec.reader import Reader
from jcodec.sources import folder_tokenizer
from jcodec.tensor import (CompressedTensor, PackBuilder, decode, decode_pack, fill_packs, host_arrays,
                           pack_float, pack_groups)

MODES = ("decoded", "compressed", "offload")


def load_tensors(path, mode: str = "compressed", verify: bool = True):
    """(config dict, folder, get(name)) for a jcodec checkpoint. ``get`` returns a NumPy array for a raw or zstd
    tensor, and a host CompressedTensor for an rANS-coded one (to be stacked with its layers, then placed by
    :func:`place_params`, and for ``decoded`` decoded by :func:`decode_params`). ``verify``: check every tensor's
    stored bytes against their checksums as it is read (``Checkpoint.read``). To read tensors of any model:
    :func:`jcodec.open`."""
    if mode not in MODES:
        raise ValueError(f"{mode=} must be one of {', '.join(MODES)}")
    reader = Reader(path, verify=verify)
    return reader.config, os.fspath(path), reader.host_form


def place_params(params, mode: str):
    """Put host CompressedTensors where ``mode`` keeps them: the layers' in host memory for ``offload``
    (moved a layer at a time by the forward pass), everything else on the device."""
    layers_space = jax.memory.Space.Host if mode == "offload" else jax.memory.Space.Device

    def place(path, x):
        if not isinstance(x, CompressedTensor):
            return x
        in_layers = any(getattr(k, "name", None) == "layers" for k in path)
        return jax.device_put(x, layers_space if in_layers else jax.memory.Space.Device)

    return jax.tree_util.tree_map_with_path(place, params, is_leaf=lambda x: isinstance(x, CompressedTensor))


def decode_params(params, *, workers: int | None = None, timings: dict | None = None):
    """Every CompressedTensor of ``params`` decoded on its device, for ``decoded`` mode.

    Loading a decoded checkpoint must not be slower than loading a BF16 one, and its cost is compiling:
    a kernel per distinct tensor geometry takes ~0.3 s of Triton compile each. So host ``bf16-lossless``
    tensors are decoded as *packs* (``tensor.pack_float``: a whole model in one launch of one small kernel,
    split only past 2^31 values), and other tensors (int8, or already on a device) field by field, a
    stack of layers per launch; all of these compile at once in ``workers`` threads while the compressed
    arrays go to the device. Peak memory: the model decoded plus the compressed pack being decoded.
    ``timings``: a dict that receives seconds spent packing, waiting for compiles, and decoding.
    """
    clock = time.perf_counter
    timings = {} if timings is None else timings
    t0 = clock()
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=lambda x: isinstance(x, CompressedTensor))
    del params  # the leaves list holds the only references (when the caller passed a temporary)
    todo = [i for i, x in enumerate(leaves) if isinstance(x, CompressedTensor)]
    if not todo:
        return jax.tree_util.tree_unflatten(treedef, leaves)
    packs = [[todo[k] for k in p] for p in pack_groups([leaves[i] for i in todo])]
    rest = sorted(set(todo) - {i for p in packs for i in p})
    decode_jit = jax.jit(decode)
    with ThreadPoolExecutor(max_workers=workers or min(len(packs) + len(rest), os.cpu_count() or 1)) as pool:
        jobs = []
        for p in packs:
            arrays, static = pack_float([leaves[i] for i in p])
            for i in p:
                leaves[i] = (leaves[i].shape, leaves[i].dtype)  # the pack holds the host arrays now
            fn = jax.jit(functools.partial(decode_pack, **static))
            jobs.append((p, arrays, pool.submit(lambda fn, a: fn.lower(a).compile(), fn, arrays)))
        compiled = {i: pool.submit(lambda ct: decode_jit.lower(ct).compile(), leaves[i]) for i in rest}
        timings["pack_s"] = clock() - t0
        for i in rest:  # (a device_put of arrays already on the device is a no-op)
            leaves[i] = jax.device_put(leaves[i], jax.memory.Space.Device)
        for p, arrays, job in jobs:
            t1 = clock()
            fn = job.result()
            timings["compile_wait_s"] = timings.get("compile_wait_s", 0.0) + clock() - t1
            outs = fn(jax.device_put(arrays))
            for i, out in zip(p, outs):
                shape, _ = leaves[i]
                leaves[i] = out.reshape(shape)
            jax.block_until_ready(outs)
            del outs, arrays
        for i in rest:
            leaves[i] = jax.block_until_ready(compiled[i].result()(leaves[i]))
    timings["decode_s"] = clock() - t0
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_decoded(path, cfg, dtype, *, timings: dict | None = None, verify: bool = True):
    """``decoded`` mode: Params of plain arrays from a jcodec checkpoint, as fast as a BF16 checkpoint loads.

    The ``bf16-lossless`` tensors are decoded as packs (``tensor.PackBuilder``: all layers of a field, and
    the embedding and head, each one output of one launch of one small kernel), laid out from the file's
    header before any tensor is read, so that the decoder compiles in a thread while the file is read;
    each tensor is read straight into its pack (no per-layer arrays, no stacking). Everything else (raw
    and zstd tensors, int8, other geometries) goes the general way (:func:`decode_params`).
    ``timings``: a dict that receives seconds spent reading, waiting for the compile, and decoding.
    """
    clock, t0 = time.perf_counter, time.perf_counter()
    timings = {} if timings is None else timings
    config, _, get = load_tensors(path, "decoded", verify)
    ckpt = Checkpoint(path)
    names = set(ckpt.names())
    L = cfg.num_layers
    groups = [(hf, [f"model.layers.{i}.{hf}" for i in range(L)]) for hf in llama.LAYER_NAMES.values()]
    groups += [(n, [n]) for n in ("model.embed_tokens.weight", "lm_head.weight") if n in names]
    items = []  # (group, geometry, raw bytes) of the groups that can be packed
    for key, members in groups:
        recs = [_pack_record(ckpt, n) if n in names else None for n in members]
        if not all(recs) or len({r[:6] for r in recs}) > 1:  # not packable: the general way (which checks it)
            continue
        items.append(((key, members, recs), recs[0][:6], sum(r[6] for r in recs) * raw_bytes(recs[0][2], recs[0][5])))
    fields, singles = {}, {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = []
        for (lanes, steps, dtype_name, carry, run, pairs), packed in fill_packs(items):
            tensors = [(j, r[6], r[7]) for j, (_, _, recs) in enumerate(packed) for r in recs]
            builder = PackBuilder(tensors, lanes, steps, dtype_name, carry, run, pairs)
            fn = jax.jit(functools.partial(decode_pack, **builder.static))
            jobs.append((packed, builder, pool.submit(lambda f, a: f.lower(a).compile(), fn, builder.abstract())))
        for packed, builder, _ in jobs:  # the file, read while the decoders compile
            i = 0
            for _, members, _ in packed:
                for n in members:
                    a = host_arrays(ckpt.read(n, verify=verify))  # (read validates the tensor against its record)
                    try:
                        builder.add(i, a["words"], a["starts"], a["bases"], a["states"], a["raw"], a["table"])
                    except ValueError as e:
                        raise CheckpointError(f"{ckpt.where(n)}: tensor {n}: {e}") from None
                    i += 1
        timings["read_s"] = clock() - t0
        for packed, builder, job in jobs:
            t1 = clock()
            decoder = job.result()
            timings["compile_wait_s"] = timings.get("compile_wait_s", 0.0) + clock() - t1
            outs = decoder(jax.device_put(builder.arrays))
            for (key, members, _), out in zip(packed, outs):
                shape = tuple(ckpt.record(members[0])["shape"])
                if key in llama.LAYER_NAMES.values():  # a field: all layers, stacked
                    fields[key] = out.reshape((L,) + shape)
                else:
                    singles[key] = out.reshape(shape)
            del builder.arrays
    params = llama.params_from_tensors(cfg, lambda n: singles[n] if n in singles else get(n), dtype, fields=fields)
    params = decode_params(params)  # what was not packed
    jax.block_until_ready(params)
    timings["decode_s"] = clock() - t0 - timings["read_s"]
    return params


def _pack_record(ckpt, name):
    """``(lanes, steps, dtype, carry, run, pairs, n, words)`` of a bf16-lossless tensor from the file's header (pair
    symbols: n in pairs), or None when
    it is of another codec or its record or entries are not as expected (then it is read the general way)."""
    r = ckpt.record(name)
    try:
        if r.get("codec") != "bf16-lossless" or r.get("dtype") not in ("bfloat16", "float16", "float32"):
            return None
        lanes, steps, shape, carry, run = r["lanes"], r["steps"], r["shape"], r.get("carry", 0), r.get("run", 1)
        if not all(type(v) is int and v >= 1 for v in [lanes, steps, run, *shape]) or type(carry) is not int:
            return None
        (words,) = ckpt.stored_shape(name, "words")
        n = math.prod(shape)
        if r.get("pairs") is True:  # the pack counts pairs; an odd size (a padding value) is read the general way
            return (lanes, steps, "bfloat16", carry, run, True, n // 2, words) if n % 2 == 0 else None
        return lanes, steps, r["dtype"], carry, run, False, n, words
    except Exception:  # noqa: BLE001 - a malformed header is reported by the general path's read
        return None


def load(path, mode: str = "compressed", dtype=None, layers_per_decode: int | None = None, *, verify: bool = True):
    """A :class:`jcodec.generation.Model` from a jcodec checkpoint (in ``mode``), an HF folder or a GGUF file.

    Plain checkpoints (HF, GGUF) load as they are, whatever ``mode``. ``dtype`` is the compute dtype
    (default: bfloat16 on GPU, float32 on CPU); compressed weights decode to their stored dtype first.
    ``layers_per_decode``: how many compressed layers one kernel launch decodes in the forward pass
    (default: chosen by ``schedule.auto_layer_group``, 1 for large layers, a few for small models).
    ``verify`` (default): refuse a jcodec checkpoint whose stored bytes do not match their checksums, naming the
    file, tensor and tile; False trusts the bytes (a flipped bit then loads as a wrong weight).
    """
    if not (os.path.isdir(path) and declares_jcodec(path)):  # (a damaged jcodec folder gets the jcodec reader's error)
        return Model.load(path, dtype)
    dtype = dtype or default_dtype()
    cfg, params = load_params(path, mode, dtype, layers_per_decode, verify=verify)
    return Model(cfg, params, folder_tokenizer(path), dtype)


def load_params(path, mode: str, dtype, layers_per_decode: int | None = None, *, verify: bool = True):
    """``(LlamaConfig, Params)`` of a jcodec checkpoint in ``mode`` (what :func:`load` builds a Model from, less
    the tokenizer; ``jcodec bench`` needs no tokenizer)."""
    config, _, get = load_tensors(path, mode, verify)
    try:
        cfg = llama.LlamaConfig.from_hf(config)
        llama.check_tensor_names(cfg, Checkpoint(path).names())
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if mode == "decoded":
        return cfg, load_decoded(path, cfg, dtype, verify=verify)
    params = place_params(llama.params_from_tensors(cfg, get, dtype), mode)
    return cfg, params.replace(layers=schedule.group_layers(cfg, params.layers, layers_per_decode))
