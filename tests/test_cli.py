"""The jcodec command: what a user sees, including on bad input."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import jcodec
from jcodec.cli import main
from jcodec.models import llama


def run(capsys, *argv):
    rc = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("flag", [None, "--no-pairs"])
def test_convert_info_verify(tmp_path, hf_folder, capsys, flag):
    """Pair symbols by default for bfloat16 tensors (the float32 one keeps one exponent a symbol); --no-pairs
    writes none."""
    out = tmp_path / "m.jcodec"
    rc, text, _ = run(capsys, "convert", hf_folder, out, "--quiet", "--lanes", 16, "--steps", 32, *filter(None, [flag]))
    assert rc == 0 and "of the source" in text
    rc, text, _ = run(capsys, "info", out)
    assert rc == 0 and "model.embed_tokens.weight" in text and "total: 5 tensors" in text
    codec_of = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("model.")}
    assert codec_of["model.embed_tokens.weight"] == ("bf16-lossless" if flag else "bf16-lossless/pairs")
    assert codec_of["model.layers.0.self_attn.q_proj.weight"] == "bf16-lossless"  # float32
    rc, text, _ = run(capsys, "verify", out, "--against", hf_folder, "--quiet")
    assert rc == 0 and "OK" in text and "5 compared" in text


def test_bad_inputs_one_line_exit_2(tmp_path, hf_folder, write_gguf, capsys):
    out = tmp_path / "m.jcodec"
    assert run(capsys, "convert", hf_folder, out, "--quiet")[0] == 0
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    cases = [("info", out), ("verify", out), ("convert", tmp_path / "nowhere", tmp_path / "x"),
             ("convert", hf_folder, out), ("info", tmp_path)]
    if importlib.util.find_spec("gguf"):  # (the GPU machine has no gguf)
        cases.append(("convert", write_gguf(tmp_path / "no-tokenizer.gguf"), tmp_path / "x"))
    for argv in cases:
        rc, text, err = run(capsys, *argv)
        assert rc == 2, argv
        assert err.startswith("jcodec: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_unreadable_tokenizer_is_one_line(tmp_path, llama_folder, capsys):
    out = tmp_path / "m.jcodec"
    assert run(capsys, "convert", llama_folder, out, "--quiet")[0] == 0
    (out / "tokenizer.json").write_text("{ not json")
    rc, _, err = run(capsys, "generate", out, "hi", "--max-new-tokens", 1)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"jcodec: error: {out}: cannot load its tokenizer"), err


def test_flipped_payload_byte_is_reported(tmp_path, hf_folder, capsys):
    out = tmp_path / "m.jcodec"
    run(capsys, "convert", hf_folder, out, "--quiet", "--lanes", 16, "--steps", 32)
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3000] ^= 0x10  # inside the data section, far from the header
    shard.write_bytes(bytes(data))
    rc, _, err = run(capsys, "verify", out, "--quiet")
    assert rc == 2 and "model.safetensors: tensor " in err


def test_bench_decodes_every_layer_exactly(tmp_path, write_llama, capsys):
    """`jcodec bench` decodes all layers as the forward does (2 a launch here), checks the first group against the
    NumPy decoder, and reports bytes that add up; a checkpoint with nothing compressed in its layers is a clear
    error, as is a missing path."""
    src = write_llama(tmp_path / "src", num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                      num_key_value_heads=2)  # (every weight of a layer >= 4096 values: all are encoded)
    out = tmp_path / "m.jcodec"
    assert run(capsys, "convert", src, out, "--quiet", "--lanes", 16, "--steps", 33)[0] == 0
    rc, text, err = run(capsys, "bench", out, "--reps", 1, "--layers-per-decode", 2, "--json", tmp_path / "b.json")
    assert rc == 0, err
    assert "4 layers x 7 tensors (bf16-lossless), 2 a launch" in text and "NumPy decoder: yes" in text
    r = json.loads((tmp_path / "b.json").read_text())
    cfg = llama.LlamaConfig.from_hf(json.loads((src / "config.json").read_text()))
    shapes = llama.param_shapes(cfg)
    per_layer = sum(2 * np.prod(shapes[f"model.layers.0.{hf}"]) for f, hf in llama.LAYER_NAMES.items()
                    if not f.endswith("layernorm"))
    assert r["exact"] is True and r["layers"] == 4 and r["decoded_bytes"] == 4 * per_layer
    assert r["stored_bytes"] > 0 and r["decode_gbs"] > 0 and r["ceiling_gbs"] > 0  # (tiny tensors: tables dominate)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    zstd = tmp_path / "z.jcodec"
    assert run(capsys, "convert", src, zstd, "--quiet", "--codec", "zstd")[0] == 0
    for path in (zstd, tmp_path / "nowhere"):
        rc, _, err = run(capsys, "bench", path)
        assert rc == 2 and err.startswith("jcodec: error: ") and err.count("\n") == 1, err
    assert "no compressed layer weights" in run(capsys, "bench", zstd)[2]


def test_help_as_a_subprocess():
    res = subprocess.run([sys.executable, "-P", "-m", "jcodec.cli", "convert", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--codec" in res.stdout and "bf16-lossless" in res.stdout
    res = subprocess.run([sys.executable, "-P", "-m", "jcodec.cli", "info", "/definitely/not/here"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("jcodec: error:") and "Traceback" not in res.stderr


def test_convert_says_whether_generate_can_run_it(tmp_path, write_llama, hf_folder, capsys):
    rc, text, _ = run(capsys, "convert", write_llama(tmp_path / "llama"), tmp_path / "a", "--quiet")
    assert rc == 0 and text.splitlines()[-1] == "jcodec generate can run it (a Llama-family model)"
    rc, text, _ = run(capsys, "convert", hf_folder, tmp_path / "b", "--quiet")  # tensors of no model in particular
    assert rc == 0 and text.splitlines()[-1].startswith("jcodec generate cannot run it ("), text
    assert "jcodec.open reads its tensors" in text.splitlines()[-1]


def test_info_lists_layers_in_order(tmp_path, write_llama, capsys):
    out = tmp_path / "m.jcodec"
    assert run(capsys, "convert", write_llama(tmp_path / "llama", num_hidden_layers=12), out, "--quiet")[0] == 0
    rc, text, _ = run(capsys, "info", out)
    layers = [int(line.split(".")[2]) for line in text.splitlines() if line.startswith("model.layers.")]
    assert rc == 0 and len(layers) == 12 * 9 and layers == sorted(layers)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"jcodec {jcodec.__version__}"
