"""Llama (2, 3, 3.x, SmolLM2) in JAX, readable top to bottom.

Weights keep the HF layout ``[out, in]`` and HF names, so an encoded tensor in a jcodec checkpoint maps 1:1
to one leaf here; matmuls are ``x @ w.T`` written as einsums. The layers' weights are stacked on a leading
axis and the forward is one ``lax.scan``, so a compressed checkpoint decodes one layer at a time inside the
jitted step: every weight the scan body uses goes through ``materialize`` (identity for an array, decode
for a ``CompressedTensor``), then is cast to the compute dtype.

Dimension names, used in shape comments: B batch, T tokens in this call, S cache length, C hidden,
H query heads, K key/value heads, G = H // K query heads per kv head, D head dim, F MLP width, V vocab,
L layers.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jcodec.codecs import DEFAULT_LANES, DEFAULT_STEPS
from jcodec.tensor import (CompressedTensor, decode_rows, decode_tiles, decode_window, materialize, materialize_all,
                           stack_layers, take_rows)

Array = Any  # a jax.Array, or a CompressedTensor standing in for one


# ------------------------------------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """What the forward needs from an HF config; frozen and hashable, so it is a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) pairs of the HF rope parameters, "rope_type" among them
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        """From an HF config dict: a raw config.json (``rope_theta`` + ``rope_scaling``, transformers 4)
        or ``LlamaConfig.to_dict()`` of transformers 5 (``rope_parameters``)."""
        if d.get("model_type", "llama") not in ("llama", "mistral") or d.get("sliding_window"):
            raise ValueError(f"model_type={d.get('model_type')!r} is not a Llama model")
        for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if d.get(key, ok) != ok:
                raise ValueError(f"{key}={d[key]!r} is not supported (Llama uses {ok!r})")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, llama3, linear are)")
        scaling = () if rope_type == "default" else tuple(sorted({**rope, "rope_type": rope_type}.items()))
        eos = d.get("eos_token_id")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 2048), bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,)))

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in param_shapes(self).values())


# ------------------------------------------------------------------------------------------------ params

@struct.dataclass
class Layers:
    """The weights of all layers, each stacked on a leading L axis; fields named after HF's modules."""

    input_layernorm: Array           # [L, C]
    q_proj: Array                    # [L, H*D, C]
    k_proj: Array                    # [L, K*D, C]
    v_proj: Array                    # [L, K*D, C]
    o_proj: Array                    # [L, C, H*D]
    post_attention_layernorm: Array  # [L, C]
    gate_proj: Array                 # [L, F, C]
    up_proj: Array                   # [L, F, C]
    down_proj: Array                 # [L, C, F]


@struct.dataclass
class Params:
    embed_tokens: Array   # [V, C]
    layers: Layers
    norm: Array           # [C]
    lm_head: Array = None  # [V, C]; None when tied to embed_tokens


# Layers field -> HF name inside "model.layers.{i}."
LAYER_NAMES = {
    "input_layernorm": "input_layernorm.weight", "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight", "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight", "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight", "down_proj": "mlp.down_proj.weight",
}


def layer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Layers field -> the shape of one layer's tensor."""
    C, F, H, K, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {"input_layernorm": (C,), "q_proj": (H * D, C), "k_proj": (K * D, C), "v_proj": (K * D, C),
            "o_proj": (C, H * D), "post_attention_layernorm": (C,), "gate_proj": (F, C), "up_proj": (F, C),
            "down_proj": (C, F)}


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model needs -> its shape (no lm_head when the embeddings are tied)."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        for field, shape in layer_shapes(cfg).items():
            shapes[f"model.layers.{i}.{LAYER_NAMES[field]}"] = shape
    shapes["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def params_from_tensors(cfg: LlamaConfig, get: Callable[[str], Any], dtype=jnp.bfloat16,
                        fields: dict | None = None) -> Params:
    """Build Params from ``get(hf_name)``, called once per tensor (field by field, each over all layers).

    ``get`` returns a NumPy array, a jax.Array or a CompressedTensor. Arrays are cast to ``dtype``;
    CompressedTensors are kept as they are (decoded to their stored dtype inside the forward). NumPy layers
    are stacked in one host buffer and sent to the device once, so loading needs no device memory beyond
    the params; other leaves are stacked with ``stack_layers``. Every shape is checked against the config.
    ``fields``: layer fields already stacked ``[L, ...]`` (by HF name inside a layer, e.g. ``self_attn.q_proj.weight``:
    decoded in one launch), used as they are; their per-layer tensors are not asked for.
    """
    shapes = param_shapes(cfg)

    def load(name):
        try:
            w = get(name)
        except KeyError:
            raise ValueError(f"checkpoint has no tensor {name!r}") from None
        if tuple(w.shape) != shapes[name]:
            raise ValueError(f"{name}: shape {tuple(w.shape)} does not match the config's {shapes[name]}")
        return w

    def place(w):
        return jnp.asarray(w, dtype) if isinstance(w, (np.ndarray, jax.Array)) else w

    def stacked(hf):
        if fields and hf in fields:
            w = fields[hf]
            if tuple(w.shape) != (cfg.num_layers,) + shapes[f"model.layers.0.{hf}"]:
                raise ValueError(f"layers' {hf}: shape {tuple(w.shape)} does not match the config's")
            return place(w)
        first = load(f"model.layers.0.{hf}")
        if not isinstance(first, np.ndarray):
            return stack_layers([place(first)] + [place(load(f"model.layers.{i}.{hf}"))
                                                  for i in range(1, cfg.num_layers)])
        buf = np.empty((cfg.num_layers,) + first.shape, jnp.dtype(dtype))  # [L, ...]
        buf[0] = first
        for i in range(1, cfg.num_layers):
            buf[i] = load(f"model.layers.{i}.{hf}")
        return jnp.asarray(buf)

    layers = Layers(**{field: stacked(hf) for field, hf in LAYER_NAMES.items()})
    return Params(embed_tokens=place(load("model.embed_tokens.weight")), layers=layers,
                  norm=place(load("model.norm.weight")),
                  lm_head=None if cfg.tie_word_embeddings else place(load("lm_head.weight")))


def check_tensor_names(cfg: LlamaConfig, names) -> None:
    """Raise a ValueError listing the tensors a checkpoint lacks or has beyond what the config needs."""
    need, have = set(param_shapes(cfg)), set(names)
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # some tied checkpoints store both
    missing = sorted(need - have)
    extra = sorted(n for n in have - need - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if missing or extra:
        raise ValueError(f"checkpoint does not match its config ({len(need)} tensors expected, {len(have)} found): "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")


def load_hf(path_or_source, dtype=jnp.bfloat16) -> tuple[LlamaConfig, Params]:
    """Load an HF checkpoint folder or a GGUF file (see jcodec.sources) as plain arrays of ``dtype``."""
    from jcodec.sources import open_source
    src = open_source(path_or_source)
    cfg = LlamaConfig.from_hf(src.config)
    check_tensor_names(cfg, src.tensor_names())
    return cfg, params_from_tensors(cfg, src.read, dtype)


def init_params(cfg: LlamaConfig, key, dtype=jnp.bfloat16, scale: float = 0.02) -> Params:
    """Random weights (normal * scale, norms at 1): for tests and speed benchmarks only."""
    shapes = layer_shapes(cfg)
    keys = iter(jax.random.split(key, len(shapes) + 2))

    def w(shape):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    L = cfg.num_layers
    layers = Layers(**{f: jnp.ones((L,) + s, dtype) if f.endswith("layernorm") else w((L,) + s)
                       for f, s in shapes.items()})
    return Params(embed_tokens=w((cfg.vocab_size, cfg.hidden_size)), layers=layers,
                  norm=jnp.ones((cfg.hidden_size,), dtype),
                  lm_head=None if cfg.tie_word_embeddings else w((cfg.vocab_size, cfg.hidden_size)))


# ---------------------------------------------------------------------------------------------- KV cache

@struct.dataclass
class KVCache:
    """Keys and values of every layer, stacked: donated to each step, which writes T new slots at ``pos``.

    Prompts are left-padded: row b's tokens start at slot ``start[b]``; its RoPE position is slot - start[b].
    """

    k: jax.Array      # [L, B, S, K, D]
    v: jax.Array      # [L, B, S, K, D]
    start: jax.Array  # [B] int32, first real slot of each row
    pos: jax.Array    # [] int32, next slot to write (the same for every row)


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=jnp.bfloat16, start=None) -> KVCache:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), start=start, pos=jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------------ blocks

def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [D/2], in float32 exactly as transformers computes them (default, linear, llama3).

    transformers: ``1.0 / (theta ** (arange(0, D, 2).float() / D))``, all float32. torch's float32 power is
    the correctly rounded one for the usual theta and D (seen: all of them for theta 1e4-5e5; one of 64 is
    1 ulp apart for theta 1e6, D 128); NumPy's float32 power is 1 ulp off for ~15% of the frequencies, an
    angle error that grows with the position (2-5e-4 in cos by position 8k). So the power is rounded to
    float32 from float64 on the host (a constant: the forward computes nothing in float64). In llama3
    scaling, ``scalar / t`` is torch's ``t.reciprocal() * scalar`` (two roundings), as written here.
    """
    D = cfg.head_dim
    exponent = np.arange(0, D, 2).astype(np.float32) / np.float32(D)
    power = (np.float64(np.float32(cfg.rope_theta)) ** exponent.astype(np.float64)).astype(np.float32)
    inv_freq = (np.float32(1.0) / power).astype(np.float32)
    s = dict(cfg.rope_scaling)
    if s.get("rope_type") == "linear":
        inv_freq = inv_freq / np.float32(s["factor"])
    elif s.get("rope_type") == "llama3":
        factor, low, high = (np.float32(s[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old_len = np.float32(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (np.float32(1) / inv_freq) * np.float32(2 * math.pi)  # torch: scalar / t is 1/t * scalar
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long waves: divided by factor
        smooth = ((np.float32(1) / wavelen) * old_len - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled         # medium waves: interpolated
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def _at_least_f32(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _precision(dtype):
    """Float32 compute means float32 matmuls: on GPU the default would use TF32 (10-bit mantissas)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None


def apply_rope(x, cos, sin):
    """x [B, T, N, D]; cos, sin [B, T, D] float32. Rotates the two halves of D (HF's rotate_half layout)."""
    x32 = x.astype(_at_least_f32(x.dtype))
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def rms_norm(x, w, eps):
    """As HF: normalise in float32, cast back, then scale."""
    x32 = x.astype(_at_least_f32(x.dtype))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


def dense(x, w, dtype):
    """x [..., in] @ w[out, in].T, the weight decoded (if compressed) and cast to the compute dtype."""
    return contract(x, materialize(w).astype(dtype), dtype)


def contract(x, w, dtype, out_dtype=None):
    """x [..., in] @ w[out, in].T in ``dtype`` (``out_dtype``: the accumulator's, as ``preferred_element_type``).

    In float32 the input axis is summed in blocks of 192 and the block sums added in order, as torch's CPU
    matmul (MKL sgemm) does; XLA:CPU's dot over 192 inputs rounds as MKL's does within a block, so our
    float32 matmuls equal transformers' bit for bit (seen for 12 rows or more, and multiples of 4; below 12,
    the rows past a multiple of 4 differ). One long XLA:CPU dot rounds about twice as much (576 inputs:
    3.9e-6 from float64, torch 1.9e-6): on SmolLM2 it put our logits 0.5-1.8e-4 from transformers'.
    Other dtypes (bfloat16 on accelerators) keep one dot.
    """
    block = 192
    n = x.shape[-1]

    def dot(a, b):
        return jnp.einsum("...i,oi->...o", a, b, precision=_precision(dtype), preferred_element_type=out_dtype)

    if jnp.dtype(dtype) != jnp.float32 or n <= block:
        return dot(x, w)
    out = None
    for a in range(0, n, block):
        part = dot(x[..., a:a + block], w[:, a:a + block])
        out = part if out is None else out + part
    return out


def attention(q, k, v, mask):
    """q [B, T, H, D]; k, v [B, S, K, D]; mask [B, T, S] -> [B, T, H*D]. Grouped-query: G = H // K."""
    B, T, H, D = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, D)                                            # [B, T, K, G, D]
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=_at_least_f32(q.dtype),
                   precision=_precision(q.dtype)) * D**-0.5
    s = jnp.where(mask[:, None, None], s, -1e30)  # finite: a fully masked (padding) row stays NaN-free
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v, precision=_precision(v.dtype)).reshape(B, T, H * D)


# ----------------------------------------------------------------------------------------------- forward

def forward(params: Params, tokens, cache: KVCache, cfg: LlamaConfig, dtype=jnp.bfloat16,
            all_logits: bool = False):
    """Run tokens [B, T] at cache slots pos .. pos+T-1; return (logits, new cache).

    Logits are float32, [B, T, V] with ``all_logits`` (scoring) else [B, V] for the last token (generation).
    """
    B, T = tokens.shape
    S = cache.k.shape[2]
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    slots = cache.pos + jnp.arange(T, dtype=jnp.int32)                       # [T] slots written now
    positions = slots[None, :] - cache.start[:, None]                        # [B, T]
    keys = jnp.arange(S, dtype=jnp.int32)
    mask = (keys[None, None, :] <= slots[None, :, None]) & (keys[None, None, :] >= cache.start[:, None, None])

    freqs = positions[..., None].astype(jnp.float32) * rope_frequencies(cfg)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                           # [B, T, D]
    cos, sin = jnp.cos(emb), jnp.sin(emb)

    # A head bigger than a layer is multiplied (decoded, if compressed) in chunks of rows, and then a
    # compressed embedding decodes only the rows it looks up; else the tied embedding is materialised once.
    chunk = head_chunk_rows(cfg)
    if params.lm_head is None and chunk is None:
        embed = materialize(params.embed_tokens)
        x = embed[tokens].astype(dtype)                                      # [B, T, C]
    else:
        x = take_rows(params.embed_tokens, tokens).astype(dtype)             # [B, T, C]

    zero = jnp.zeros((), jnp.int32)

    def layer(carry, w, i):
        """One layer on decoded weights ``w`` (layer ``i``)."""
        x, k_cache, v_cache = carry
        h = rms_norm(x, w.input_layernorm, cfg.rms_norm_eps)
        q = apply_rope(dense(h, w.q_proj, dtype).reshape(B, T, H, D), cos, sin)
        k = apply_rope(dense(h, w.k_proj, dtype).reshape(B, T, K, D), cos, sin)
        v = dense(h, w.v_proj, dtype).reshape(B, T, K, D)
        at = (i, zero, cache.pos, zero, zero)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
        o = attention(q, k_cache[i].astype(dtype), v_cache[i].astype(dtype), mask)
        x = x + dense(o, w.o_proj, dtype)
        h = rms_norm(x, w.post_attention_layernorm, cfg.rms_norm_eps)
        x = x + dense(jax.nn.silu(dense(h, w.gate_proj, dtype)) * dense(h, w.up_proj, dtype), w.down_proj, dtype)
        return x, k_cache, v_cache

    G = layer_group(params)
    stacks = layer_stacks(params)
    scanned = params.layers.replace(**{f: None for f in stacks})

    def group(carry, xs):
        w, i = xs  # this group's weights (leading L/G axis scanned away; [G, ...] if grouped), first index
        if stacks:  # the whole layer (or group of G layers) decoded in one kernel launch on GPU
            decoded = decode_window(list(stacks.values()), i, G)
            w = w.replace(**{f: d if G > 1 else d[0] for f, d in zip(stacks, decoded)})
        # other compressed weights (offload mode: moved from host memory now), also in one launch
        w = materialize_all(w)
        if G == 1:
            return layer(carry, w, i), None
        # an inner scan, not an unrolled loop: the same layer body as G == 1, so the same numerics
        return jax.lax.scan(lambda c, wi: (layer(c, *wi), None), carry, (w, i + jnp.arange(G, dtype=jnp.int32)))

    first = jnp.arange(0, cfg.num_layers, G, dtype=jnp.int32)
    (x, k, v), _ = jax.lax.scan(group, (x, cache.k, cache.v), (scanned, first))
    x = rms_norm(x, materialize(params.norm), cfg.rms_norm_eps)
    if not all_logits:
        x = x[:, -1]
    if params.lm_head is None and chunk is None:
        head = embed
    else:
        head = params.embed_tokens if params.lm_head is None else params.lm_head
    return output_logits(x, head, chunk, dtype), KVCache(k=k, v=v, start=cache.start, pos=cache.pos + T)


HEAD_CHUNK_MIN = 1 << 26  # an output head of at most this many weights is multiplied (and decoded) whole
HEAD_CHUNK_TILES = tuple(DEFAULT_LANES * s for s in DEFAULT_STEPS.values())  # the converter's default tiles


def head_chunk_rows(cfg: LlamaConfig) -> int | None:
    """Rows of the output head multiplied at a time: about half a layer's weights' worth when the head is
    larger than a layer (and than HEAD_CHUNK_MIN weights), so that a compressed head decodes in chunks that
    cost no more memory than a layer; None (all at once) otherwise. It depends on the config only, so plain and
    compressed weights run the same matmuls, and their logits stay bitwise equal. Chunks are whole tiles of
    the default geometry, so a compressed chunk is its tiles' output as is (no copy of it is sliced out)."""
    per_layer = sum(math.prod(s) for s in layer_shapes(cfg).values())
    if cfg.vocab_size * cfg.hidden_size <= max(per_layer, HEAD_CHUNK_MIN):
        return None
    # rows per whole number of tiles, of every codec's default geometry
    align = math.lcm(*(tile // math.gcd(cfg.hidden_size, tile) for tile in HEAD_CHUNK_TILES))
    # half a layer: XLA autotunes the chunk's matmul when it compiles, with scratch copies of its operands;
    # at a whole layer's worth that lifted the 8B batch-1 first-compile peak 0.83 GiB above its steady state
    chunk = -(-max(1, per_layer // (2 * cfg.hidden_size)) // align) * align
    return None if chunk >= cfg.vocab_size else chunk


def output_logits(x, head, chunk: int | None, dtype):
    """x [..., C] @ head [V, C].T -> float32 logits [..., V]; ``chunk`` rows of the head at a time (the last
    chunk runs past V: its extra rows are clamped copies, or for a compressed head whatever its last
    tiles decode to, and their logits are dropped)."""
    def matmul(w):
        return contract(x, w.astype(dtype), dtype, _at_least_f32(dtype))

    if chunk is None:
        return matmul(materialize(head))
    V, C = head.shape
    ids = jnp.arange(chunk, dtype=jnp.int32)

    def rows(c):  # rows c*chunk .. c*chunk + chunk of the head
        start = c * chunk
        if not isinstance(head, CompressedTensor):
            return jnp.take(head, start + ids, axis=0, mode="clip")
        if chunk * C % head.meta.tile == 0:  # whole tiles: decoded in place
            k = chunk * C // head.meta.tile
            return decode_tiles(head, start * C // head.meta.tile + jnp.arange(k, dtype=jnp.int32)).reshape(chunk, C)
        window = jnp.minimum(start, V - chunk)  # another geometry: the rows that exist, then re-indexed
        return jnp.take(decode_rows(head, window, chunk), jnp.minimum(start + ids, V - 1) - window, axis=0)

    parts = jax.lax.map(lambda c: matmul(rows(c)), jnp.arange(-(-V // chunk), dtype=jnp.int32))  # [n, ..., chunk]
    parts = jnp.moveaxis(parts, 0, -2)                                                          # [..., n, chunk]
    return parts.reshape(parts.shape[:-2] + (-1,))[..., :V]


def layer_stacks(params: Params) -> dict:
    """{field: CompressedTensor [L, ...]} of the compressed layer weights held on the device, ungrouped: the
    forward decodes them G layers at a time straight from these stacks (``decode_window``), since scanning over
    them would copy each step's compressed arrays out of the stack first. (``jcodec bench`` times the same.)"""
    G = layer_group(params)
    L = params.layers.input_layernorm.shape[0] * G
    return {f: jax.tree_util.tree_map(lambda a: a.reshape((L,) + a.shape[2 if G > 1 else 1:]), w)
            for f, w in ((f.name, getattr(params.layers, f.name)) for f in dataclasses.fields(params.layers))
            if isinstance(w, CompressedTensor) and jax.typeof(w.arrays["states"]).memory_space != jax.memory.Space.Host}


def layer_group(params: Params) -> int:
    """Layers decoded per kernel launch: 1, or G when :func:`group_layers` stacked them as [L/G, G, ...]."""
    norm = params.layers.input_layernorm  # [L, C], or [L/G, G, C]
    return norm.shape[1] if norm.ndim == 3 else 1


def group_layers(params: Params, group: int) -> Params:
    """Params whose layers are stacked [L/G, G, ...]: the forward then decodes G layers per kernel launch
    (more lanes in flight for small layers, at the memory of G decoded layers)."""
    L = params.layers.input_layernorm.shape[0]
    if group < 1 or L % group or layer_group(params) != 1:
        raise ValueError(f"{group=} must divide the {L} layers (of ungrouped params)")
    if group == 1:
        return params
    regroup = lambda a: a.reshape((L // group, group) + a.shape[1:])  # noqa: E731
    return params.replace(layers=jax.tree_util.tree_map(regroup, params.layers))


def auto_layer_group(cfg: LlamaConfig, params: Params, *, lanes_wanted: int = 65536,
                     memory_share: float = 0.05) -> int:
    """How many layers of compressed params to decode per launch: enough for ``lanes_wanted`` rANS lanes in
    flight (fewer leave the kernel latency-bound: bench/RESULTS.md), but at most as many extra decoded
    layers as fit in ``memory_share`` of the model's decoded weights. 1 for plain params."""
    leaves = jax.tree_util.tree_leaves(params.layers, is_leaf=lambda x: isinstance(x, CompressedTensor))
    cts = [x for x in leaves if isinstance(x, CompressedTensor)]
    if not cts or layer_group(params) != 1:
        return layer_group(params)
    lanes = sum(c.arrays["states"].shape[-1] for c in cts)
    layer_bytes = sum(c.meta.size * jnp.dtype(c.meta.dtype).itemsize for c in cts)
    total_bytes = cfg.num_params * max(jnp.dtype(c.meta.dtype).itemsize for c in cts)
    best = 1
    for g in range(1, cfg.num_layers + 1):
        if cfg.num_layers % g == 0 and (g - 1) * layer_bytes <= memory_share * total_bytes:
            best = g
            if g * lanes >= lanes_wanted:
                break
    return best


# One jitted step serves prefill ([B, T_bucket]) and decode ([B, 1]): it compiles once per shape bucket.
step = jax.jit(forward, static_argnames=("cfg", "dtype", "all_logits"), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def logits(params: Params, tokens, cfg: LlamaConfig, dtype=jnp.float32, start=None):
    """Logits [B, T, V] of whole sequences (no cache kept): for parity tests and perplexity.
    ``start`` [B]: left-padding per row (default none)."""
    B, T = tokens.shape
    cache = init_cache(cfg, B, T, dtype, start)
    return forward(params, tokens, cache, cfg, dtype, all_logits=True)[0]
