"""On the GPU: bf16-lossless weights give bit for bit the logits of the original BF16 weights, in BF16 compute,
with every compressed-mode path on (layers decoded in groups inside the scan, the output head decoded in
chunks of rows, embedding rows decoded alone), and the same greedy tokens.

    python -P bench/bitwise.py --out bitwise.json          # SmolLM2- and Llama-3.2-1B-shaped, random weights
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import MODES, SHAPES, TINY, random_tensors  # noqa: E402

from jcodec import generation as gen, schedule  # noqa: E402
from jcodec.models import llama  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        cfg = llama.LlamaConfig.from_hf({**SHAPES[name], **(TINY if args.tiny else {})})
        get = random_tensors(cfg)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 33)), jnp.int32)
        prompts = tokens.tolist()
        results = {}
        for mode in ("bf16", "bf16-lossless decoded", "bf16-lossless compressed", "bf16-lossless offload"):
            params = MODES[mode](cfg, get)
            logits = np.asarray(llama.logits(params, tokens, cfg, jnp.bfloat16))
            out, _ = gen.generate_tokens(gen.Model(cfg, params, None, jnp.bfloat16), prompts, max_new_tokens=16)
            results[mode] = (logits, out, schedule.layer_group(cfg, params.layers), schedule.head_chunk_rows(cfg))
            del params
        base_logits, base_tokens = results["bf16"][:2]
        for mode, (logits, out, group, chunk) in results.items():
            row = dict(model=name, mode=mode, layers_per_decode=group, head_chunk_rows=chunk,
                       logits_bitwise=bool(np.array_equal(logits.view(np.uint32), base_logits.view(np.uint32))),
                       max_abs=float(np.abs(logits - base_logits).max()), tokens_equal=out == base_tokens)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f, indent=1)
    return 0 if all(r["logits_bitwise"] and r["tokens_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
