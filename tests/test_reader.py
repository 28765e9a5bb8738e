"""jcodec.open: a jcodec folder read tensor by tensor as safetensors.safe_open reads a file, for any model."""
import jax
import numpy as np
import pytest

import jcodec
from jcodec import convert
from jcodec.checkpoint import FORMAT_VERSION

from conftest import BF16, write_hf_folder


def _bytes(a):
    """The array's bytes, so that arrays compare bit for bit whatever their dtype."""
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


@pytest.fixture
def bert(tmp_path):
    """A BERT-named checkpoint (not a Llama): layers 2 and 10, bf16 and fp32 weights, an int64 buffer, a norm."""
    rng = np.random.default_rng(1)
    tensors = {"embeddings.position_ids": np.arange(128, dtype=np.int64)[None],
               "embeddings.LayerNorm.weight": np.ones(64, BF16)}
    for i in (2, 10):
        tensors[f"encoder.layer.{i}.attention.self.query.weight"] = rng.normal(0, 0.02, (64, 96)).astype(BF16)
        tensors[f"encoder.layer.{i}.output.dense.weight"] = rng.normal(0, 0.02, (96, 64)).astype(np.float32)
    return write_hf_folder(tmp_path / "bert", tensors, {"model_type": "bert", "architectures": ["BertModel"]}), tensors


@pytest.mark.parametrize("codec", ["bf16-lossless", "zstd"])
def test_open_reads_every_tensor_as_it_was(tmp_path, bert, codec):
    src, tensors = bert
    out = tmp_path / "bert.jcodec"
    convert.convert(src, out, codec, progress=False, **({} if codec == "zstd" else dict(lanes=16, steps=33)))
    with jcodec.open(out) as f:
        assert f.keys() == ["embeddings.LayerNorm.weight", "embeddings.position_ids",
                            "encoder.layer.2.attention.self.query.weight", "encoder.layer.2.output.dense.weight",
                            "encoder.layer.10.attention.self.query.weight", "encoder.layer.10.output.dense.weight"]
        assert f.metadata() == {"format": "jcodec", "jcodec.version": str(FORMAT_VERSION)}
        assert f.config["model_type"] == "bert"
        for name, ref in tensors.items():
            got = f.get_tensor(name)
            assert isinstance(got, np.ndarray) and got.dtype == ref.dtype and got.shape == ref.shape, name
            np.testing.assert_array_equal(_bytes(got), _bytes(ref), err_msg=name)
    with jcodec.open(out, framework="jax") as f:
        for name, ref in tensors.items():
            if ref.dtype == np.int64:
                continue  # (JAX holds int32 unless x64 is enabled)
            got = f.get_tensor(name)
            assert isinstance(got, jax.Array) and got.dtype == ref.dtype, name
            np.testing.assert_array_equal(_bytes(got), _bytes(ref), err_msg=name)


def test_get_compressed_decodes_inside_jit(tmp_path, bert):
    src, tensors = bert
    out = tmp_path / "bert.jcodec"
    convert.convert(src, out, progress=False, lanes=16, steps=33)
    with jcodec.open(out) as f:
        name = "encoder.layer.10.attention.self.query.weight"
        ct = f.get_compressed(name)
        assert isinstance(ct, jcodec.CompressedTensor) and ct.shape == (64, 96)
        got = jax.jit(lambda ct: jcodec.decode(ct).astype(np.float32) * 2)(ct)
        np.testing.assert_array_equal(np.asarray(got), tensors[name].astype(np.float32) * 2)
        raw = f.get_compressed("embeddings.LayerNorm.weight")  # kept raw: an array
        np.testing.assert_array_equal(raw, tensors["embeddings.LayerNorm.weight"])


def test_open_refuses_clearly(tmp_path, bert):
    src, _ = bert
    with pytest.raises(jcodec.checkpoint.CheckpointError, match="not a jcodec checkpoint"):
        jcodec.open(src)  # a plain folder: safetensors.safe_open reads it
    out = tmp_path / "bert.jcodec"
    convert.convert(src, out, progress=False)
    with pytest.raises(ValueError, match="framework"):
        jcodec.open(out, framework="pt")
    with jcodec.open(out) as f, pytest.raises(KeyError, match="no tensor named encoder.layer.3"):
        f.get_tensor("encoder.layer.3.attention.self.query.weight")
