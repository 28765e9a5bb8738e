"""A jcodec checkpoint of a benchmarked model's shapes with random weights (for ``jcodec bench`` on the GPU
machine, where the embedded model cannot travel and no hub is reachable).

    python3 -P bench/random_checkpoint.py llama-3-8b /tmp/l8 --layers 2 --vocab 4096   # -> /tmp/l8.jcodec

Writes an HF folder (config.json + safetensors; Gaussian weights, std 0.02, norms 1, as bench/generate.py
draws them) at OUT.src, then converts it with ``jcodec convert`` (default codec) to OUT.jcodec.
``--layers`` and ``--vocab`` shrink the model (the layers keep their shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate  # noqa: E402  (bench/generate.py: SHAPES, random_tensors)

from jcodec.cli import main as jcodec_main  # noqa: E402
from jcodec.models import llama  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(generate.SHAPES))
    ap.add_argument("out", help="prefix: OUT.src (HF folder) and OUT.jcodec are written")
    ap.add_argument("--layers", type=int, help="layers (default: the model's)")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: the model's)")
    ap.add_argument("--codec", default="bf16-lossless")
    args = ap.parse_args()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **generate.SHAPES[args.model]}
    if args.layers:
        config["num_hidden_layers"] = args.layers
    if args.vocab:
        config["vocab_size"] = args.vocab
    cfg = llama.LlamaConfig.from_hf(config)
    get = generate.random_tensors(cfg)
    src = f"{args.out}.src"
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({name: get(name) for name in llama.param_shapes(cfg)}, os.path.join(src, "model.safetensors"))
    return jcodec_main(["convert", src, f"{args.out}.jcodec", "--codec", args.codec, "--overwrite", "--quiet"])


if __name__ == "__main__":
    sys.exit(main())
