"""The forward step's device memory as XLA plans it, from abstract shapes: no weights are made or encoded.

    python -P bench/memory.py --models llama-3-8b --out memory.json          # on the GPU
    python -P bench/memory.py --models smollm2-135m --tiny                   # a dry run on CPU

For each model shape and params kind (``bf16``: plain arrays; ``bf16-lossless``/``int8``: CompressedTensors
stacked per layer, as ``compressed`` mode holds them) it lowers and compiles ``llama.step`` (a decode step,
batch B of T tokens: T=1 a decode step, T=128 a prefill; a KV cache of S slots) on ``jax.ShapeDtypeStruct`` params and prints XLA's memory analysis:
arguments (weights + cache), temporaries (the decoded layer, the head chunk, everything else), and the
issue-4 budget for compressed mode: 0.72 x the BF16 weights + one decoded layer + the KV cache. The word
streams' lengths are not known without encoding, so they are set from the measured bits per value (bf16
exponents 2.65, int8 residuals 6.6). ``--dump DIR`` also writes XLA's buffer assignment there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

BITS_PER_VALUE = {"bf16-lossless": 2.65, "int8": 6.6}  # coded bits per value (as bench/compress.py measures them)
# kind "bf16-pairs": bf16-lossless with pair symbols (codecs.encode_pairs), as `jcodec convert --pairs` writes it


def abstract_ct(codec: str, shape, layers: int | None, lanes: int = 128, steps: int | None = None):
    """A CompressedTensor of ShapeDtypeStructs: one tensor, or a stack of ``layers`` of them (``steps`` None:
    the encoder's default for ``codec``)."""
    import jax
    import jax.numpy as jnp
    from jcodec import codecs
    from jcodec.pallas_kernels import rans_math as rc
    from jcodec.tensor import CompressedTensor, TensorMeta, starts_dtype

    n = math.prod(shape)
    pairs = codec == "bf16-pairs"
    codec = "bf16-lossless" if pairs else codec
    steps = steps or (codecs.PAIR_STEPS if pairs else codecs.DEFAULT_STEPS[codec])
    symbols = -(-n // 2) if pairs else n
    tiles = -(-symbols // (lanes * steps))
    lead = () if layers is None else (layers,)
    sds = lambda size, dt: jax.ShapeDtypeStruct(lead + (size,), dt)  # noqa: E731
    arrays = dict(words=sds(max(1, math.ceil(n * BITS_PER_VALUE[codec] / 16)), jnp.uint16),
                  starts=sds(tiles * lanes, starts_dtype(lanes, steps * (2 if pairs else 1))),
                  bases=sds(tiles, jnp.uint32), states=sds(tiles * lanes, jnp.uint32),
                  table=sds(rc.device_table_size(pairs, by_symbol=codec == "int8"), jnp.uint32))
    if pairs:
        carry = codecs.carry_values("bfloat16", steps, pairs=True)
        arrays["raw"] = sds(codecs.stored_raw_values(symbols, lanes, steps, carry), jnp.uint16)
        meta = TensorMeta(codec, tuple(shape), "bfloat16", lanes, steps, carry=carry, pairs=True)
    elif codec == "bf16-lossless":
        carry = codecs.carry_values("bfloat16", steps)
        arrays["raw"] = sds(codecs.stored_raw_values(n, lanes, steps, carry), jnp.uint8)
        meta = TensorMeta(codec, tuple(shape), "bfloat16", lanes, steps, carry=carry)
    else:
        arrays.update(scales=sds(shape[0], jnp.float32), predictors=sds(tiles, jnp.int32))
        meta = TensorMeta(codec, tuple(shape), "bfloat16", lanes, steps, shape[0], math.prod(shape[1:]), (0,))
    return CompressedTensor(arrays, meta)


def abstract_params(cfg, kind: str):
    """Params of ShapeDtypeStructs as ``llama.params_from_tensors`` + ``place_params`` would build them."""
    import jax
    import jax.numpy as jnp
    from jcodec.models import llama

    shapes = llama.param_shapes(cfg)

    def get(name):
        shape = shapes[name]
        if kind == "bf16" or name.endswith("norm.weight"):
            return jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        return abstract_ct(kind, shape, None)

    def field(hf):
        first = get(f"model.layers.0.{hf}")
        if isinstance(first, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((cfg.num_layers,) + first.shape, first.dtype)
        return abstract_ct(kind, first.meta.shape, cfg.num_layers)

    return llama.Params(embed_tokens=get("model.embed_tokens.weight"),
                        layers=llama.Layers(**{f: field(hf) for f, hf in llama.LAYER_NAMES.items()}),
                        norm=get("model.norm.weight"),
                        lm_head=None if cfg.tie_word_embeddings else get("lm_head.weight"))


def analyse(model: str, kind: str, batch: int, slots: int, tiny: bool, dump: str | None, tokens: int = 1) -> dict:
    import jax
    import jax.numpy as jnp
    from generate import SHAPES, TINY
    from jcodec import schedule
    from jcodec.models import llama
    from jcodec.tensor import CompressedTensor

    cfg = llama.LlamaConfig.from_hf({**SHAPES[model], **(TINY if tiny else {})})
    params = abstract_params(cfg, kind)
    if kind != "bf16":
        params = params.replace(layers=schedule.group_layers(cfg, params.layers))
    cache = jax.eval_shape(lambda: llama.init_cache(cfg, batch, slots, jnp.bfloat16))
    compiled = llama.step.lower(params, jax.ShapeDtypeStruct((batch, tokens), jnp.int32), cache, cfg,
                                jnp.bfloat16).compile()
    m = compiled.memory_analysis()
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, CompressedTensor))
    weights = sum(x.nbytes if isinstance(x, CompressedTensor) else math.prod(x.shape) * x.dtype.itemsize
                  for x in leaves)
    bf16_weights = 2 * cfg.num_params
    group = schedule.layer_group(cfg, params.layers)
    layer = 2 * cfg.layer_params * group
    kv = 2 * math.prod(cache.k.shape) * 2
    row = dict(model=model, kind=kind, batch=batch, tokens=tokens, slots=slots, layers_per_decode=group,
               weights=weights, kv_cache=kv, decoded_layer=layer, bf16_weights=bf16_weights,
               argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
               temp=m.temp_size_in_bytes, device=jax.devices()[0].device_kind)
    row["planned_peak"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
    row["budget"] = 0.72 * bf16_weights + layer + kv
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, f"{model}-{kind}-b{batch}-t{tokens}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
    return row


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama-3-8b")
    p.add_argument("--kinds", default="bf16,bf16-lossless,int8", help="also bf16-pairs (pair symbols)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--tokens", default="1,128", help="tokens per step: 1 (a decode step), or a prefill's bucket")
    p.add_argument("--slots", type=int, default=256, help="KV cache slots (prompt + new tokens, bucketed)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--dump", help="folder for the compiled HLO text")
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = []
    gib = lambda b: f"{b / 2**30:8.3f}"  # noqa: E731
    print(f"{'model':<14} {'params':<14} {'B':>3} {'T':>4} {'weights':>8} {'temp':>8} {'layer':>8} {'KV':>8} "
          f"{'planned':>8} {'budget':>8}  (GiB)")
    for model in args.models.split(","):
        for kind in args.kinds.split(","):
            for b, t in [(b, t) for b in map(int, args.batches.split(",")) for t in map(int, args.tokens.split(","))]:
                r = analyse(model, kind, b, args.slots, args.tiny, args.dump, t)
                rows.append(r)
                print(f"{model:<14} {kind:<14} {b:>3} {t:>4} {gib(r['weights'])} {gib(r['temp'])} {gib(r['decoded_layer'])} "
                      f"{gib(r['kv_cache'])} {gib(r['planned_peak'])} {gib(r['budget']) if kind != 'bf16' else '':>8}",
                      flush=True)
    if args.out:
        import jax
        with open(args.out, "w") as f:
            json.dump(dict(jax=jax.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
