"""The jcodec command: what a user sees, including on bad input."""
import importlib.util
import subprocess
import sys

import pytest

from jcodec.cli import main


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


def test_help_as_a_subprocess():
    res = subprocess.run([sys.executable, "-P", "-m", "jcodec.cli", "convert", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--codec" in res.stdout and "bf16-lossless" in res.stdout
    res = subprocess.run([sys.executable, "-P", "-m", "jcodec.cli", "info", "/definitely/not/here"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("jcodec: error:") and "Traceback" not in res.stderr
