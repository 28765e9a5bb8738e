"""Shared fixtures: small HF-style checkpoints written as real safetensors folders, and tiny GGUF files."""
import json
import zlib

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jcodec import checkpoint, integrity
from jcodec.models import llama

BF16 = np.dtype(ml_dtypes.bfloat16)


def write_hf_folder(folder, tensors: dict, config: dict | None = None, shards: int = 1):
    """An HF checkpoint folder (config.json + one or more safetensors shards, with an index if sharded)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k] for k in names}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def small_tensors():
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.normal(0, 0.02, (300, 64)).astype(BF16),
        "model.layers.0.mlp.up_proj.weight": rng.normal(0, 0.02, (129, 64)).astype(BF16),
        "model.layers.0.self_attn.q_proj.weight": rng.normal(0, 0.02, (64, 64)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(64, BF16),
        "model.layers.0.noise.weight": rng.integers(0, 65535, (64, 100), dtype=np.uint16).view(BF16),
    }


@pytest.fixture
def hf_folder(tmp_path, small_tensors):
    return write_hf_folder(tmp_path / "src", small_tensors, shards=2)


TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16,
              "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _write_llama(folder, weight_dtype=BF16, shards=1, tokenizer=False, **config):
    """A tiny Llama checkpoint (every tensor the model needs, Gaussian, of ``weight_dtype``) in ``shards`` files, with a
    word-level tokenizer when ``tokenizer``; ``config``: changes to TINY_LLAMA."""
    config = {**TINY_LLAMA, **config}
    cfg = llama.LlamaConfig.from_hf(config)
    rng = np.random.default_rng(0)
    tensors = {n: rng.normal(0, 0.02, s).astype(weight_dtype) for n, s in llama.param_shapes(cfg).items()}
    write_hf_folder(folder, tensors, config, shards=shards)
    if tokenizer:
        _write_tokenizer(folder, config["vocab_size"])
    return folder


def _write_tokenizer(folder, vocab_size):
    """A word-level tokenizer: ``<unk>``, ``<eos>`` and the words w2, w3, ... (``vocab_size`` ids in all)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>").save_pretrained(str(folder))


@pytest.fixture
def llama_folder(tmp_path):
    """A tiny Llama checkpoint (every tensor the model needs, bfloat16), with no tokenizer."""
    return _write_llama(tmp_path / "llama")


@pytest.fixture
def write_llama():
    return _write_llama


def _write_gguf(path, tokens=None):
    """A tiny llama GGUF (one layer in its metadata, one F32 tensor), with a byte-level BPE tokenizer when
    ``tokens`` are given."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(context_length=64, embedding_length=8, feed_forward_length=12, block_count=1).items():
        getattr(w, f"add_{key}")(value)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5)
    if tokens is not None:
        w.add_tokenizer_model("gpt2"), w.add_token_list(tokens), w.add_token_merges(["a b"])
        w.add_bos_token_id(0), w.add_eos_token_id(1)
    w.add_tensor("token_embd.weight", np.ones((len(tokens or "ab"), 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture
def write_gguf():
    return _write_gguf


@pytest.fixture
def legacy_writer(monkeypatch):
    """Conversions in this test write format version 4 (no checksums of stored bytes; a raw tensor's CRC-32 over
    its data alone), as jcodec wrote it before version 5. Reading is unaffected."""
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 4)
    monkeypatch.setattr(integrity, "seal", lambda name, enc: enc)
    monkeypatch.setattr(integrity, "raw_check",
                        lambda name, dtype, shape, a: zlib.crc32(np.ascontiguousarray(a).tobytes()))
