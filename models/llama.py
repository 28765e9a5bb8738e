"""Llama (2, 3, 3.x, SmolLM2) in JAX, readable top to bottom: config, params, KV cache, blocks, layer, forward.

Weights keep the HF layout ``[out, in]`` and HF names, so an encoded tensor in a jcodec checkpoint maps 1:1
to one leaf here; matmuls are ``x @ w.T`` written as einsums. The layers' weights are stacked on a leading
axis and the forward is one ``lax.scan`` over them. Weights may be ``CompressedTensor``s: when and in what
pieces they are decoded (layers per kernel launch, the output head in chunks of rows, offloaded weights moved
to the device) is the decode schedule's business, ``jcodec.schedule``: the forward hands it the per-layer
function, and multiplies through ``jcodec.matmul.linear``, which takes a weight however the schedule holds it
(an array, a layer of a stack read in place, a compressed tensor) and computes in the compute dtype.

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

from jcodec import schedule
from jcodec.matmul import at_least_f32, linear, precision
from jcodec.sources import open_source
from jcodec.tensor import materialize, stack_layers

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
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"the config has no {', '.join(missing)}")
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

    @property
    def layer_params(self) -> int:
        """Weights in one layer."""
        return sum(math.prod(s) for s in layer_shapes(self).values())


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


def rope_tables(positions, cfg: LlamaConfig):
    """cos, sin [B, T, D] float32 of positions [B, T] (the frequencies repeated over both halves of D)."""
    freqs = positions[..., None].astype(jnp.float32) * rope_frequencies(cfg)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                           # [B, T, D]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, N, D]; cos, sin [B, T, D] float32. Rotates the two halves of D (HF's rotate_half layout)."""
    x32 = x.astype(at_least_f32(x.dtype))
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def rms_norm(x, w, eps):
    """As HF: normalise in float32, cast back, then scale."""
    x32 = x.astype(at_least_f32(x.dtype))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


def dot_product_attention(q, k, v, mask):
    """q [B, T, H, D]; k, v [B, S, K, D]; mask [B, T, S] -> [B, T, H*D]. Grouped-query: G = H // K."""
    B, T, H, D = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, D)                                            # [B, T, K, G, D]
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=at_least_f32(q.dtype),
                   precision=precision(q.dtype)) * D**-0.5
    s = jnp.where(mask[:, None, None], s, -1e30)  # finite: a fully masked (padding) row stays NaN-free
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v, precision=precision(v.dtype)).reshape(B, T, H * D)


def attention(x, w: Layers, k_cache, v_cache, i, pos, cos, sin, mask, cfg: LlamaConfig, dtype):
    """Self-attention of layer ``i`` on x [B, T, C] -> ([B, T, C], k_cache, v_cache): this call's keys and values
    are written into the caches [L, B, S, K, D] at layer ``i``, slots pos .. pos+T-1, then attended over."""
    B, T, _ = x.shape
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = linear(x, [w.q_proj, w.k_proj, w.v_proj], dtype)
    q = apply_rope(q.reshape(B, T, H, D), cos, sin)                          # [B, T, H, D]
    k = apply_rope(k.reshape(B, T, K, D), cos, sin)                          # [B, T, K, D]
    v = v.reshape(B, T, K, D)                                                # [B, T, K, D]
    zero = jnp.zeros((), jnp.int32)
    at = (i, zero, pos, zero, zero)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
    o = dot_product_attention(q, k_cache[i].astype(dtype), v_cache[i].astype(dtype), mask)  # [B, T, H*D]
    return linear(o, [w.o_proj], dtype)[0], k_cache, v_cache


def mlp(x, w: Layers, dtype):
    """SwiGLU: x [B, T, C] -> [B, T, C] through F hidden units."""
    gate, up = linear(x, [w.gate_proj, w.up_proj], dtype)                    # [B, T, F] each
    return linear(jax.nn.silu(gate) * up, [w.down_proj], dtype)[0]


# ------------------------------------------------------------------------------------------------- layer

def layer(carry, w: Layers, i, *, cos, sin, mask, pos, cfg: LlamaConfig, dtype):
    """Layer ``i`` on its decoded weights ``w`` (one layer's Layers, no L axis): pre-norm attention, then
    pre-norm MLP, each added to the residual stream. carry: (x [B, T, C], k_cache, v_cache [L, B, S, K, D])."""
    x, k_cache, v_cache = carry
    h = rms_norm(x, w.input_layernorm, cfg.rms_norm_eps)
    o, k_cache, v_cache = attention(h, w, k_cache, v_cache, i, pos, cos, sin, mask, cfg, dtype)
    x = x + o
    x = x + mlp(rms_norm(x, w.post_attention_layernorm, cfg.rms_norm_eps), w, dtype)
    return x, k_cache, v_cache


# ----------------------------------------------------------------------------------------------- forward

def forward(params: Params, tokens, cache: KVCache, cfg: LlamaConfig, dtype=jnp.bfloat16,
            all_logits: bool = False):
    """Run tokens [B, T] at cache slots pos .. pos+T-1; return (logits, new cache).

    Logits are float32, [B, T, V] with ``all_logits`` (scoring) else [B, V] for the last token (generation).
    """
    B, T = tokens.shape
    S = cache.k.shape[2]
    slots = cache.pos + jnp.arange(T, dtype=jnp.int32)                       # [T] slots written now
    positions = slots[None, :] - cache.start[:, None]                        # [B, T]
    keys = jnp.arange(S, dtype=jnp.int32)                                    # [S] cache slots
    # [B, T, S]: a token sees its row's slots from the row's first real one up to its own
    mask = (keys[None, None, :] <= slots[None, :, None]) & (keys[None, None, :] >= cache.start[:, None, None])
    cos, sin = rope_tables(positions, cfg)                                   # [B, T, D]

    x, head = schedule.embed(cfg, tokens, params.embed_tokens, params.lm_head)
    x = x.astype(dtype)                                                      # [B, T, C]
    body = functools.partial(layer, cos=cos, sin=sin, mask=mask, pos=cache.pos, cfg=cfg, dtype=dtype)
    x, k, v = schedule.scan_layers(cfg, params.layers, body, (x, cache.k, cache.v))
    x = rms_norm(x, materialize(params.norm), cfg.rms_norm_eps)
    if not all_logits:
        x = x[:, -1]                                                         # [B, C]
    logits = schedule.head_logits(cfg, head, x, dtype)                       # [B, (T,) V] float32
    return logits, KVCache(k=k, v=v, start=cache.start, pos=cache.pos + T)


# One jitted step serves prefill ([B, T_bucket]) and decode ([B, 1]): it compiles once per shape bucket.
step = jax.jit(forward, static_argnames=("cfg", "dtype", "all_logits"), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def logits(params: Params, tokens, cfg: LlamaConfig, dtype=jnp.float32, start=None):
    """Logits [B, T, V] of whole sequences (no cache kept): for parity tests and perplexity.
    ``start`` [B]: left-padding per row (default none)."""
    B, T = tokens.shape
    cache = init_cache(cfg, B, T, dtype, start)
    return forward(params, tokens, cache, cfg, dtype, all_logits=True)[0]
