"""`jcodec.load`: a checkpoint (jcodec, HF folder or GGUF) as model params, in one of three modes.

- ``decoded``: every weight decoded once at load (on the device: the Pallas kernel on GPU, one launch per
  stacked field of all layers), then plain arrays.
- ``compressed``: rANS-coded weights stay compressed on the device as CompressedTensors; the forward pass
  decodes each layer inside its ``lax.scan`` step, so peak memory is the compressed model plus one layer.
- ``offload``: like ``compressed``, but the compressed weights live in host memory and each layer's are
  moved to the device inside the scan step (``jax.memory.Space.Host``; on a CPU both spaces are RAM).

zstd-coded tensors are always decoded on the host before they are put on the device.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jcodec import codecs
from jcodec.checkpoint import Checkpoint, CheckpointError
from jcodec.tensor import CompressedTensor, decode, from_encoded

MODES = ("decoded", "compressed", "offload")


def is_jcodec_checkpoint(path) -> bool:
    try:
        Checkpoint(path)
    except CheckpointError:
        return False
    return True


def load_tensors(path, mode: str = "compressed"):
    """(config dict, tokenizer folder, get(name)) for a jcodec checkpoint. ``get`` returns a NumPy array
    for a raw or zstd tensor, and a host CompressedTensor for an rANS-coded one (to be stacked with its
    layers, then placed by :func:`place_params`, and for ``decoded`` decoded by :func:`decode_params`)."""
    if mode not in MODES:
        raise ValueError(f"{mode=} must be one of {', '.join(MODES)}")
    ckpt = Checkpoint(path)

    def get(name: str):
        if name not in ckpt.names():
            raise KeyError(name)
        value = ckpt.read(name)
        if isinstance(value, np.ndarray):
            return value
        if value.record["codec"] not in ("bf16-lossless", "int8"):  # zstd: the host path
            try:
                return codecs.decode(value)
            except codecs.FormatError as e:
                raise CheckpointError(f"{ckpt.where(name)}: tensor {name}: {e}") from None
        return from_encoded(value, to_device=False)  # stacked on the host, then placed once by place_params

    return ckpt.config, os.fspath(path), get


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


def decode_params(params, *, workers: int | None = None):
    """Every CompressedTensor of ``params`` decoded on its device, for ``decoded`` mode.

    Loading a decoded checkpoint must not be slower than loading a BF16 one, and its cost is compiling:
    a kernel per distinct tensor geometry takes ~0.3 s of Triton compile each. So host ``bf16-lossless``
    tensors are decoded as *packs* (``tensor.pack_float``: a whole model in one launch of one small kernel,
    split only past 2^31 values), and other tensors (int8, or already on a device) field by field, a
    stack of layers per launch; all of these compile at once in ``workers`` threads while the compressed
    arrays go to the device. Peak memory: the model decoded plus the compressed pack being decoded.
    """
    from jcodec.tensor import decode_pack, pack_float, pack_groups

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
        for i in rest:  # (a device_put of arrays already on the device is a no-op)
            leaves[i] = jax.device_put(leaves[i], jax.memory.Space.Device)
        for p, arrays, job in jobs:
            outs = job.result()(jax.device_put(arrays))
            for i, out in zip(p, outs):
                shape, _ = leaves[i]
                leaves[i] = out.reshape(shape)
            jax.block_until_ready(outs)
            del outs, arrays
        for i in rest:
            leaves[i] = jax.block_until_ready(compiled[i].result()(leaves[i]))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def compressed_bytes(tree) -> int:
    """Bytes of a params pytree as it sits in memory, CompressedTensors counted compressed."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, CompressedTensor))
    return sum(x.nbytes if isinstance(x, CompressedTensor) else int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in leaves if hasattr(x, "shape"))


def load(path, mode: str = "compressed", dtype=None, layers_per_decode: int | None = None):
    """A :class:`jcodec.generation.Model` from a jcodec checkpoint (in ``mode``), an HF folder or a GGUF file.

    Plain checkpoints (HF, GGUF) load as they are, whatever ``mode``. ``dtype`` is the compute dtype
    (default: bfloat16 on GPU, float32 on CPU); compressed weights decode to their stored dtype first.
    ``layers_per_decode``: how many compressed layers one kernel launch decodes in the forward pass
    (default: chosen by ``llama.auto_layer_group``, 1 for large layers, a few for small models).
    """
    from jcodec.generation import Model, default_dtype
    from jcodec.models import llama

    if not is_jcodec_checkpoint(path):
        if os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path)):
            Checkpoint(path)  # an unreadable jcodec folder: raise its own error rather than a vaguer one
        return Model.load(path, dtype)
    config, folder, get = load_tensors(path, mode)
    cfg = llama.LlamaConfig.from_hf(config)
    ckpt_names = Checkpoint(path).names()
    try:
        llama.check_tensor_names(cfg, ckpt_names)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    dtype = dtype or default_dtype()
    if mode == "decoded":  # placed by decode_params, while the decoders compile
        params = decode_params(llama.params_from_tensors(cfg, get, dtype))
    else:
        params = place_params(llama.params_from_tensors(cfg, get, dtype), mode)
        params = llama.group_layers(params, layers_per_decode or llama.auto_layer_group(cfg, params))
    from transformers import AutoTokenizer
    return Model(cfg, params, AutoTokenizer.from_pretrained(folder), dtype)
