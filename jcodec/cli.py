"""The ``jcodec`` command: a thin face over the library. Errors are one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings

import jcodec
from jcodec import codecs
from jcodec.benchmark import bench_checkpoint, report
from jcodec.checkpoint import Checkpoint, CheckpointError
from jcodec.convert import convert, verify
from jcodec.reader import natural_key
from jcodec.sources import SourceError, default_model_path

EXIT_BAD_INPUT = 2


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say e.g. 2GB or 500MB)") from None


def cmd_convert(args) -> int:
    rep = convert(args.src, args.out, args.codec, lanes=args.lanes, steps=args.steps, zstd_level=args.zstd_level,
                  pairs=args.pairs,
                  shard_bytes=args.shard_size, overwrite=args.overwrite, progress=not args.quiet)
    print(f"{rep.out}: {rep.tensors} tensors ({rep.encoded} encoded with {rep.codec}), "
          f"{_size(rep.original_bytes)} -> {_size(rep.stored_bytes)} = {rep.ratio:.4f} of the source, "
          f"{rep.seconds:.1f} s ({rep.original_bytes / 1e6 / max(rep.seconds, 1e-9):.0f} MB/s)")
    if rep.not_runnable is None:
        print("jcodec generate can run it (a Llama-family model)")
    else:
        print(f"jcodec generate cannot run it ({rep.not_runnable}); jcodec.open reads its tensors")
    return 0


def cmd_info(args) -> int:
    ckpt = Checkpoint(args.path)
    rows = [(name, ckpt.summary(name)) for name in sorted(ckpt.names(), key=natural_key)]
    total_s = sum(s["stored"] for _, s in rows)
    total_o = sum(s["original"] for _, s in rows)
    if not args.totals:
        width = max(len(n) for n, _ in rows)
        print(f"{'tensor':<{width}}  {'codec':<19} {'dtype':<8} {'shape':<16} {'stored':>10} {'original':>10} {'ratio':>6}")
        for name, s in rows:
            shape = "x".join(map(str, s["shape"])) or "scalar"
            print(f"{name:<{width}}  {s['codec']:<19} {s['dtype']:<8} {shape:<16} {_size(s['stored']):>10} "
                  f"{_size(s['original']):>10} {s['stored'] / max(s['original'], 1):>6.3f}")
    by_codec: dict[str, list[int]] = {}
    for _, s in rows:
        acc = by_codec.setdefault(s["codec"], [0, 0, 0])
        acc[0] += 1
        acc[1] += s["stored"]
        acc[2] += s["original"]
    for codec, (count, st, orig) in sorted(by_codec.items()):
        print(f"{codec}: {count} tensors, {_size(st)} of {_size(orig)} ({st / max(orig, 1):.4f})")
    print(f"total: {len(rows)} tensors, {_size(total_s)} stored, {_size(total_o)} original, ratio {total_s / max(total_o, 1):.4f}")
    return 0


def cmd_verify(args) -> int:
    rep = verify(args.path, args.against, progress=not args.quiet)
    extra = f", {rep.compared} compared with {args.against}" if args.against else ""
    print(f"{args.path}: OK, {rep.tensors} tensors, {rep.tiles} tiles decoded, all checksums match{extra}")
    return 0


def cmd_generate(args) -> int:
    model = jcodec.load(args.path, mode=args.mode, verify=args.verify)
    _answer(model, args.prompt, args)
    return 0


def cmd_bench(args) -> int:
    result = bench_checkpoint(args.path, reps=args.reps, layers_per_decode=args.layers_per_decode)
    print(report(result))
    if args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, args.json)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return 0 if result["exact"] else 1


def _answer(model, prompt: str, args) -> None:
    stream = sys.stdout
    result = jcodec.generate(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             on_token=lambda text: (stream.write(text), stream.flush()))
    stream.write("\n")
    print(f"[{result.stats}]", file=sys.stderr)


def cmd_demo(args) -> int:
    """Convert the embedded SmolLM2-135M, print its size figures, answer a question from the compressed copy."""
    src = default_model_path()
    out = args.out
    if not os.path.exists(out) or args.overwrite:
        args_c = argparse.Namespace(src=src, out=out, codec=args.codec, lanes=codecs.DEFAULT_LANES,
                                    steps=None, zstd_level=3, shard_size=2 << 30, pairs=True,
                                    overwrite=args.overwrite, quiet=False)
        cmd_convert(args_c)
    else:
        print(f"{out}: exists, reusing it (--overwrite to convert again)")
    cmd_info(argparse.Namespace(path=out, totals=True))
    print(f"> {args.prompt}")
    _answer(jcodec.load(out, mode=args.mode, verify=args.verify), args.prompt, args)
    return 0


def _add_generation_args(p) -> None:
    p.add_argument("--mode", choices=["decoded", "compressed", "offload"], default="compressed",
                   help="decoded: decode all weights at load; compressed: keep them compressed on the device and "
                        "decode each layer inside the forward pass; offload: keep them in host memory (default: compressed)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check every stored byte against its checksum while loading (default); --no-verify trusts "
                        "the file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jcodec",
        description="Compress LLM checkpoints losslessly and run them in JAX with the weights still compressed.")
    parser.add_argument("--version", action="version", version=f"jcodec {jcodec.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="compress an HF checkpoint folder or a GGUF file",
                       description="Compress every weight of SRC (an HF checkpoint folder with config.json and "
                                   "safetensors, or a .gguf file) into the jcodec checkpoint folder OUT.")
    p.add_argument("src", help="HF checkpoint folder or .gguf file")
    p.add_argument("out", help="output folder (created; written to a temporary name first)")
    p.add_argument("--codec", choices=codecs.CODECS, default="bf16-lossless",
                   help="bf16-lossless: bit-exact, about 0.66 of BF16 (default); int8: per-channel 8-bit, about 0.45, "
                        "lossy; zstd: host-side zstandard, decoded on the CPU")
    p.add_argument("--lanes", type=int, default=codecs.DEFAULT_LANES, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)  # None: the codec's default
    p.add_argument("--zstd-level", type=int, default=3, help="zstandard level for --codec zstd (default 3)")
    p.add_argument("--pairs", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16-lossless: code bfloat16 exponents two values a symbol (default; ~1.2x faster GPU "
                        "decode); --no-pairs: one exponent a symbol")
    p.add_argument("--shard-size", type=_parse_size, default=2 << 30, help="largest shard, e.g. 2GB (default)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="list tensors, codecs, sizes and ratios of a jcodec checkpoint")
    p.add_argument("path")
    p.add_argument("--totals", action="store_true", help="only the totals")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="decode every tile and check checksums (and bit-exactness against SRC)")
    p.add_argument("path")
    p.add_argument("--against", metavar="SRC", help="the source checkpoint: also compare every tensor with it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="answer a prompt with a (compressed) checkpoint")
    p.add_argument("path", help="jcodec checkpoint folder, HF checkpoint folder or .gguf file")
    p.add_argument("prompt")
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="time the layers' decode on this device, beside a plain pass over as many bytes (<= 2 GiB)",
                       description="Decode every layer of a jcodec checkpoint as the forward pass does (a group of "
                                   "layers per kernel launch, inside one jitted scan), after checking the first "
                                   "group bit for bit, and time it beside an XLA elementwise pass over as many bytes.")
    p.add_argument("path", help="jcodec checkpoint folder")
    p.add_argument("--reps", type=int, default=5, help="timed runs (default 5; the median is shown)")
    p.add_argument("--layers-per-decode", type=int, default=None,
                   help="layers a launch (default: as jcodec.load chooses)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="convert the embedded SmolLM2-135M and answer a question from the compressed copy")
    p.add_argument("--out", default="smollm2-135m.jcodec", help="where to write the compressed checkpoint")
    p.add_argument("--codec", choices=codecs.CODECS, default="bf16-lossless")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--overwrite", action="store_true")
    _add_generation_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as SIGINT: the same clean-up (a conversion removes its temporary folder)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # (signal handlers can only be set there)
        signal.signal(signal.SIGTERM, _terminated)
    # transformers advises at import that it found no torch; jcodec needs none (tokenizers and configs only).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    expected = (CheckpointError, SourceError, codecs.FormatError, FileNotFoundError, IsADirectoryError,
                NotADirectoryError, PermissionError)
    warnings.filterwarnings("ignore", message=".*Triton.*deprecated.*")
    try:
        return args.func(args)
    except expected as e:
        print(f"jcodec: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as e:  # bad option values reach the library as ValueError
        print(f"jcodec: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("jcodec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`jcodec info X | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nothing to flush at exit)
        return 1


if __name__ == "__main__":
    sys.exit(main())
