"""Random byte mutations of a converted tiny Llama, per codec, through ``jcodec verify`` and ``jcodec.load`` + decode.

    python -P bench/fuzz.py --n 300 --out fuzz.json        # CPU; a few minutes

Each case flips 1-3 random bits of the checkpoint's one safetensors file (a third of the cases inside its JSON
header, where one flipped bit changes a field or a name, the rest anywhere) and runs two entry points on it:
``jcodec verify`` (``cli.main``: exit status 2 is a clean error; 0 means it said OK, and the weights it decodes
are then compared with the pristine file's) and ``jcodec.load(mode="compressed")`` with every weight decoded.
Outcomes: a clean error (an error type the CLI reports in one line), bit-exact weights, silently different
weights (the failure this exists to find), or a traceback (any other exception). Cases run in this process:
a hang would stop the run, and the peak RSS (``max_rss_mb``) covers all of them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jcodec import api, cli, codecs
from jcodec.checkpoint import Checkpoint, CheckpointError
from jcodec.convert import convert
from jcodec.sources import SourceError
from jcodec.tensor import CompressedTensor, decode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load import write_hf_folder  # noqa: E402

CODECS = ("bf16-lossless", "int8", "zstd")
# a Llama whose matrices are large enough to be encoded (>= 4096 values), in several tiles each
CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
GEOMETRY = dict(lanes=16, steps=33)
CLEAN = (CheckpointError, SourceError, codecs.FormatError, ValueError, OSError)  # what the CLI reports in one line
OUTCOMES = ("clean error", "bit-exact", "silently different", "traceback")


def build(folder: str, codec: str) -> str:
    src = os.path.join(folder, "src")
    write_hf_folder(src, CONFIG)
    out = os.path.join(folder, "c")
    convert(src, out, codec, progress=False, **({} if codec == "zstd" else GEOMETRY))
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """1-3 flipped bits: in the JSON header for a third of the cases, anywhere otherwise."""
    b = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little")
    in_header = rng.random() < 1 / 3
    for _ in range(int(rng.integers(1, 4))):
        pos = int(rng.integers(8, header_end)) if in_header else int(rng.integers(0, len(b)))
        b[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def verified_weights(path: str) -> dict:
    """``jcodec verify`` as a user runs it; its weights when it says OK."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main(["verify", path, "-q"])
    if rc == cli.EXIT_BAD_INPUT:
        raise CheckpointError("verify refused it")
    ckpt = Checkpoint(path)
    return {n: codecs.bits_of(ckpt.decode(n)).copy() for n in ckpt.names()}


def loaded_weights(path: str) -> dict:
    """``jcodec.load(mode="compressed")``'s params, every compressed weight decoded (as the forward pass does)."""
    _, params = api.load_params(path, "compressed", jnp.float32)
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, CompressedTensor))
    return {jax.tree_util.keystr(k): codecs.bits_of(np.asarray(decode(v) if isinstance(v, CompressedTensor) else v))
            for k, v in leaves}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def classify(fn, path: str, pristine: dict) -> str:
    try:
        got = fn(path)
    except CLEAN:
        return "clean error"
    except Exception:  # noqa: BLE001 - anything else is a traceback a user would see
        return "traceback"
    return "bit-exact" if same(got, pristine) else "silently different"


ENTRY_POINTS = {"jcodec verify": verified_weights, 'jcodec.load(mode="compressed") + decode': loaded_weights}


def run(n: int, seed: int, codecs_: list[str]) -> list[dict]:
    rows = []
    for codec in codecs_:
        with tempfile.TemporaryDirectory() as tmp:
            path = build(tmp, codec)
            shard = os.path.join(path, "model.safetensors")
            pristine_bytes = open(shard, "rb").read()
            pristine = {name: fn(path) for name, fn in ENTRY_POINTS.items()}
            counts = {name: dict.fromkeys(OUTCOMES, 0) for name in ENTRY_POINTS}
            examples = {name: {} for name in ENTRY_POINTS}
            rng = np.random.default_rng(seed)
            work = os.path.join(tmp, "m")
            shutil.copytree(path, work)  # an unmutated copy must come out bit-exact, or the outcomes mean nothing
            assert all(classify(fn, work, pristine[name]) == "bit-exact" for name, fn in ENTRY_POINTS.items())
            for i in range(n):
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(path, work)
                with open(os.path.join(work, "model.safetensors"), "wb") as f:
                    f.write(mutate(pristine_bytes, rng))
                for name, fn in ENTRY_POINTS.items():
                    outcome = classify(fn, work, pristine[name])
                    counts[name][outcome] += 1
                    examples[name].setdefault(outcome, i)
            for name in ENTRY_POINTS:
                rows.append(dict(codec=codec, entry_point=name, cases=n, **counts[name],
                                 first_case=examples[name]))
                print(f"{codec:<14} {name:<42} " + " ".join(f"{counts[name][o]:>6}" for o in OUTCOMES), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| codec | entry point | " + " | ".join(OUTCOMES) + " |", "|---|---|" + "---|" * len(OUTCOMES)]
    for r in rows:
        lines.append(f"| {r['codec']} | `{r['entry_point']}` | " + " | ".join(str(r[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="mutations per codec (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--out", help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = run(args.n, args.seed, args.codecs.split(","))
    print(table(rows))
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {max_rss_mb:.0f} MB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(n=args.n, seed=args.seed, max_rss_mb=max_rss_mb, jax=jax.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
