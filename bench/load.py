"""Time from loading a checkpoint to its first generated token: BF16 safetensors against jcodec.

    python -P bench/load.py --out load.json                       # on the GPU: SmolLM2- and 1B-shaped
    python -P bench/load.py --models smollm2-135m --tiny          # a dry run on CPU
    python -P bench/load.py --src SmolLM2.gguf                    # a real model (jcodec rows only)

For each model shape (RANDOM weights, Gaussian std 0.02, as in bench/generate.py) it writes an HF folder
(config.json + one BF16 safetensors file), converts it with ``jcodec convert`` (bf16-lossless), then in a
fresh process per row, once the JAX backend has started and made its first allocation (the same
~1-2 s for every row, left out: the rows' differences stand out), times ``load``
(the checkpoint read, placed on the device and, in ``decoded`` mode, decoded; ``read_s`` of it is the
file read into host arrays) and the first token (a 16-token prompt, one new token: the prefill's compile included, as a user sees it). Rows: the BF16
folder read by ``llama.load_hf``; the jcodec checkpoint in ``decoded`` mode (decoded on the device once)
and in ``compressed`` mode, each with its stored bytes verified against their checksums (the default) and
without (``no-verify``), so the checks' cost is the difference. Both files were just written, so both are read from the page cache: this
measures the work after the disk, not the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS = ("bf16 safetensors", "jcodec decoded", "jcodec decoded no-verify", "jcodec compressed",
        "jcodec compressed no-verify")


def write_hf_folder(path: str, config: dict) -> int:
    """A random-weight HF Llama folder of ``config``'s shapes; returns the safetensors file's bytes."""
    import jax
    import ml_dtypes
    from safetensors.numpy import save_file

    from jcodec.models import llama

    cfg = llama.LlamaConfig.from_hf(config)
    key = jax.random.PRNGKey(0)
    tensors = {}
    for i, (name, shape) in enumerate(llama.param_shapes(cfg).items()):
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, ml_dtypes.bfloat16)
        else:
            w = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, "float32")
            tensors[name] = np.asarray(w.astype("bfloat16"))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}, f)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return os.path.getsize(os.path.join(path, "model.safetensors"))


def child(row: str, path: str) -> dict:
    """One row, in this (fresh) process: seconds to load, and from there to the first token."""
    import jax
    import jax.numpy as jnp

    from jcodec import api, generation, schedule
    from jcodec.models import llama

    # the backend's start-up and first allocation (~1-2 s, the same for every row) are not part of loading
    jax.block_until_ready(jnp.zeros(1))
    phases = {}
    t0 = time.perf_counter()
    if row == "bf16 safetensors":
        cfg, params = llama.load_hf(path, jnp.bfloat16)
    else:
        mode, verify = row.split()[1], not row.endswith("no-verify")
        config, _, get = api.load_tensors(path, mode, verify)
        cfg = llama.LlamaConfig.from_hf(config)
        if mode == "decoded":  # as jcodec.load does it  (its peak memory is not measured here)
            params = api.load_decoded(path, cfg, jnp.bfloat16, timings=phases, verify=verify)
        else:
            params = llama.params_from_tensors(cfg, get, jnp.bfloat16)
            phases["read_s"] = time.perf_counter() - t0
            params = api.place_params(params, mode)
            params = params.replace(layers=schedule.group_layers(cfg, params.layers))
    jax.block_until_ready(params)
    t1 = time.perf_counter()
    model = generation.Model(cfg, params, None, jnp.bfloat16)
    tokens, _ = generation.generate_tokens(model, [list(range(1, 17))], max_new_tokens=1)
    t2 = time.perf_counter()
    return dict(row=row, load_s=t1 - t0, first_token_s=t2 - t1, total_s=t2 - t0, token=tokens[0][0],
                device=jax.devices()[0].device_kind, **phases)


def main(argv=None) -> int:
    child_env = dict(os.environ)
    if not (argv or sys.argv[1:])[:1] == ["--child"]:
        # this process only writes and converts: keep it off the GPU, whose memory the timed children need
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from generate import SHAPES, TINY

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run on CPU)")
    p.add_argument("--src", help="convert this HF folder or GGUF file instead of random weights (no bf16 row)")
    p.add_argument("--out")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("ROW " + json.dumps(child(*args.child)), flush=True)
        return 0
    from jcodec.convert import convert

    results = []
    for name in [args.src] if args.src else args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf, jc = os.path.join(tmp, "hf"), os.path.join(tmp, "jcodec")
            t = time.perf_counter()
            if args.src:
                hf, hf_bytes = args.src, os.path.getsize(args.src) if os.path.isfile(args.src) else sum(
                    os.path.getsize(os.path.join(args.src, f)) for f in os.listdir(args.src) if f.endswith(".safetensors"))
            else:
                hf_bytes = write_hf_folder(hf, {**SHAPES[name], **(TINY if args.tiny else {})})
            write_s = time.perf_counter() - t
            t = time.perf_counter()
            report = convert(hf, jc, "bf16-lossless", progress=False)
            convert_s = time.perf_counter() - t
            jc_bytes = sum(os.path.getsize(os.path.join(jc, f)) for f in os.listdir(jc) if f.endswith(".safetensors"))
            print(f"{name}: {'source' if args.src else 'bf16'} file {hf_bytes / 1e6:.1f} MB (written in {write_s:.1f} s), jcodec "
                  f"{jc_bytes / 1e6:.1f} MB = {jc_bytes / hf_bytes:.4f} (converted in {convert_s:.1f} s)", flush=True)
            for row in ROWS[1:] if args.src else ROWS:
                out = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), "--child", row,
                                      hf if row.startswith("bf16") else jc], capture_output=True, text=True,
                                     env=child_env)
                line = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
                if out.returncode or not line:
                    print(f"  {row}: FAILED\n{out.stderr[-2000:]}", flush=True)
                    continue
                r = dict(json.loads(line[0][4:]), model=name, file_bytes=hf_bytes if row.startswith("bf16")
                         else jc_bytes, convert_s=None if row.startswith("bf16") else convert_s)
                results.append(r)
                print(f"  {row:<20} load {r['load_s']:7.2f} s  first token +{r['first_token_s']:6.2f} s  "
                      f"total {r['total_s']:7.2f} s  (token {r['token']})", flush=True)
            del report
    if args.out:
        import jax
        with open(args.out, "w") as f:
            json.dump(dict(jax=jax.__version__, rows=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
