"""The decode schedule: when the forward's compressed weights are decoded, and in what pieces.

The model (``jcodec.models.llama``) says what is computed; this module says how the weights reach its matmuls:
- layers: one ``lax.scan`` over groups of G layers (:func:`group_layers`, :func:`auto_layer_group`). The
  compressed layer weights held on the device are decoded a group per kernel launch straight from their stacks
  (:func:`layer_stacks`); compressed weights in host memory (``offload`` mode) move to the device then, and
  are decoded in one launch too; plain layer matrices are handed over in place (:func:`matrix_stacks`);
- the output head: multiplied in chunks of rows when it is larger than a layer (:func:`head_chunk_rows`), so
  that a compressed head never decodes whole (a plain head the GPU kernel reads in place goes whole);
- the embedding: a compressed embedding decodes only the rows looked up, unless the head is tied to it and
  multiplied whole, when it is decoded once for both.

It reads sizes from the model's config (``num_layers``, ``num_params``, ``layer_params``, ``vocab_size``,
``hidden_size``) and takes the per-layer computation as a function: it knows nothing of a layer's maths; the
head is multiplied through ``jcodec.matmul.linear``. Plain and compressed params run the same matmuls on the
same blocks of columns, so they give bitwise equal logits.

``layers`` below is the model's dataclass pytree of layer weights, each stacked on a leading layer axis
``[L, ...]``, or ``[L/G, G, ...]`` once grouped.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jcodec.codecs import DEFAULT_LANES, DEFAULT_STEPS
from jcodec.matmul import LayerOf, at_least_f32, linear, reads_in_place
from jcodec.tensor import (CompressedTensor, decode_rows, decode_tiles, decode_window, materialize, materialize_all,
                           take_rows)


def _is_compressed(x) -> bool:
    return isinstance(x, CompressedTensor)


# ------------------------------------------------------------------------------------------ layer groups

def layer_group(cfg, layers) -> int:
    """Layers decoded per kernel launch: 1, or G when :func:`group_layers` stacked them as [L/G, G, ...]."""
    leading = jax.tree_util.tree_leaves(layers, is_leaf=_is_compressed)[0].shape[0]  # L, or L/G
    return cfg.num_layers // leading


def group_layers(cfg, layers, group: int | None = None):
    """``layers`` stacked [L/G, G, ...] for G = ``group`` (None or 0: :func:`auto_layer_group`'s choice): the
    forward then decodes G layers per kernel launch (more lanes in flight for small layers, at the memory of G
    decoded layers)."""
    group = group or auto_layer_group(cfg, layers)
    L = cfg.num_layers
    if group < 1 or L % group or layer_group(cfg, layers) != 1:
        raise ValueError(f"{group=} must divide the {L} layers (of ungrouped params)")
    if group == 1:
        return layers
    return jax.tree_util.tree_map(lambda a: a.reshape((L // group, group) + a.shape[1:]), layers)


def auto_layer_group(cfg, layers, *, lanes_wanted: int = 65536, memory_share: float = 0.05) -> int:
    """How many layers of compressed params to decode per launch: enough for ``lanes_wanted`` rANS lanes in
    flight (a lane is one dependent chain of steps, so fewer leave the kernel latency-bound: docs/DECODE_DESIGN.md),
    but at most as many extra decoded layers as fit in ``memory_share`` of the model's decoded weights. 1 for
    plain params (and for layers already grouped: their group)."""
    cts = [x for x in jax.tree_util.tree_leaves(layers, is_leaf=_is_compressed) if _is_compressed(x)]
    if not cts or layer_group(cfg, layers) != 1:
        return layer_group(cfg, layers)
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


# ------------------------------------------------------------------------------------------ the layer scan

def layer_stacks(cfg, layers) -> dict:
    """{field: CompressedTensor [L, ...]} of the compressed layer weights held on the device, ungrouped: the
    scan decodes them G layers at a time straight from these stacks (``decode_window``), since scanning over
    them would copy each step's compressed arrays out of the stack first. (``jcodec bench`` times the same.)"""
    G, L = layer_group(cfg, layers), cfg.num_layers
    fields = ((f.name, getattr(layers, f.name)) for f in dataclasses.fields(layers))
    return {f: jax.tree_util.tree_map(lambda a: a.reshape((L,) + a.shape[2 if G > 1 else 1:]), w)
            for f, w in fields
            if _is_compressed(w) and jax.typeof(w.arrays["states"]).memory_space != jax.memory.Space.Host}


def matrix_stacks(cfg, layers) -> dict:
    """{field: jax.Array [L, N, K]} of the plain layer matrices on the device: each layer's matmuls read them in
    place (:class:`jcodec.matmul.LayerOf`), since scanning over them would copy each layer out of the stack."""
    G, L = layer_group(cfg, layers), cfg.num_layers
    fields = ((f.name, getattr(layers, f.name)) for f in dataclasses.fields(layers))
    return {f: w.reshape((L,) + w.shape[-2:]) for f, w in fields
            if isinstance(w, jax.Array) and w.ndim == (4 if G > 1 else 3)
            and jax.typeof(w).memory_space != jax.memory.Space.Host}


def scan_layers(cfg, layers, layer: Callable, carry):
    """``carry = layer(carry, w, i)`` for every layer ``i`` in order, ``w`` its weights: vectors as arrays, matrices
    as :class:`LayerOf` a stack (read in place by the matmuls) or as arrays; returns the last carry. One
    ``lax.scan`` over groups of G layers (:func:`layer_group`), each group's compressed weights decoded together
    (one kernel launch per codec on GPU)."""
    G = layer_group(cfg, layers)
    stacks = layer_stacks(cfg, layers)
    plain = matrix_stacks(cfg, layers)
    scanned = layers.replace(**{f: None for f in (*stacks, *plain)})

    def group(carry, xs):
        w, i = xs  # this group's weights (leading L/G axis scanned away; [G, ...] if grouped), first index
        decoded = dict(zip(stacks, decode_window(list(stacks.values()), i, G))) if stacks else {}  # [G, ...] each
        w = materialize_all(w)  # the other compressed weights (offload mode: moved from host memory now)

        def one(carry, j):  # layer i + j, the j-th of the group
            at = i + j
            wj = w if G == 1 else jax.tree_util.tree_map(lambda a: a[j], w)
            wj = wj.replace(**{f: LayerOf(d, j) for f, d in decoded.items()},
                            **{f: LayerOf(s, at) for f, s in plain.items()})
            return layer(carry, wj, at), None

        if G == 1:
            return one(carry, jnp.zeros((), jnp.int32))
        # an inner scan, not an unrolled loop: the same layer body as G == 1, so the same numerics
        return jax.lax.scan(one, carry, jnp.arange(G, dtype=jnp.int32))

    first = jnp.arange(0, cfg.num_layers, G, dtype=jnp.int32)
    return jax.lax.scan(group, carry, (scanned, first))[0]


# --------------------------------------------------------------------------------- embedding and head

HEAD_CHUNK_MIN = 1 << 26  # an output head of at most this many weights is multiplied (and decoded) whole
HEAD_CHUNK_TILES = tuple(DEFAULT_LANES * s for s in DEFAULT_STEPS.values())  # the converter's default tiles


def head_chunk_rows(cfg) -> int | None:
    """Rows of the output head multiplied at a time: about half a layer's weights' worth when the head is
    larger than a layer (and than HEAD_CHUNK_MIN weights), so that a compressed head decodes in chunks that
    cost no more memory than a layer; None (all at once) otherwise. It depends on the config only, so plain and
    compressed weights run the same matmuls, and their logits stay bitwise equal. Chunks are whole tiles of
    the default geometry, so a compressed chunk is its tiles' output as is (no copy of it is sliced out)."""
    per_layer = cfg.layer_params
    if cfg.vocab_size * cfg.hidden_size <= max(per_layer, HEAD_CHUNK_MIN):
        return None
    # rows per whole number of tiles, of every codec's default geometry
    align = math.lcm(*(tile // math.gcd(cfg.hidden_size, tile) for tile in HEAD_CHUNK_TILES))
    # half a layer: XLA autotunes the chunk's matmul when it compiles, with scratch copies of its operands;
    # at a whole layer's worth that lifted the 8B batch-1 first-compile peak 0.83 GiB above its steady state
    chunk = -(-max(1, per_layer // (2 * cfg.hidden_size)) // align) * align
    return None if chunk >= cfg.vocab_size else chunk


def embed(cfg, tokens, embed_tokens, lm_head) -> tuple[jax.Array, Any]:
    """``(embed_tokens[tokens] [..., C], head)``, ``head`` the output head's weight [V, C] for :func:`head_logits`
    (``embed_tokens`` when ``lm_head`` is None: tied). A tied head multiplied whole is decoded here, once, for
    the lookup and the head; otherwise a compressed embedding decodes only the rows looked up, and the head is
    decoded by :func:`head_logits` (in chunks when it is large)."""
    if lm_head is None and head_chunk_rows(cfg) is None:
        table = materialize(embed_tokens)
        return table[tokens], table
    return take_rows(embed_tokens, tokens), embed_tokens if lm_head is None else lm_head


def head_logits(cfg, head, x, dtype):
    """x [..., C] times the output head [V, C] -> float32 logits [..., V]: the head whole, or
    :func:`head_chunk_rows` rows at a time (the last chunk runs past V: its extra rows are clamped copies, or for
    a compressed head whatever its last tiles decode to, and their outputs are dropped). A plain head that the
    GPU kernel reads in place is multiplied whole: its chunks would be copies, and the kernel's columns do not
    depend on the rows a launch covers."""
    def matmul(w):
        return linear(x, [w], dtype, at_least_f32(dtype))[0]

    chunk = head_chunk_rows(cfg)
    if chunk is None or (not _is_compressed(head) and reads_in_place(x, [head], dtype)):
        return matmul(materialize(head))
    V, C = head.shape
    ids = jnp.arange(chunk, dtype=jnp.int32)

    def rows(c):  # rows c*chunk .. c*chunk + chunk of the head
        start = c * chunk
        if not _is_compressed(head):
            return jnp.take(head, start + ids, axis=0, mode="clip")
        if chunk * C % head.meta.tile == 0:  # whole tiles: decoded in place
            k = chunk * C // head.meta.tile
            return decode_tiles(head, start * C // head.meta.tile + jnp.arange(k, dtype=jnp.int32)).reshape(chunk, C)
        window = jnp.minimum(start, V - chunk)  # another geometry: the rows that exist, then re-indexed
        return jnp.take(decode_rows(head, window, chunk), jnp.minimum(start + ids, V - 1) - window, axis=0)

    parts = jax.lax.map(lambda c: matmul(rows(c)), jnp.arange(-(-V // chunk), dtype=jnp.int32))  # [n, ..., chunk]
    parts = jnp.moveaxis(parts, 0, -2)                                                          # [..., n, chunk]
    return parts.reshape(parts.shape[:-2] + (-1,))[..., :V]
