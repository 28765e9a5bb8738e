"""Packs (``pallas_kernels/bf16_lossless_pack.py``): many bf16-lossless tensors of one geometry decoded in one
launch of one kernel == the pure-JAX pack reference == the NumPy decoder, bit for bit; and
``api.decode_params`` (which decodes a loaded model as packs) gives what ``decode`` gives leaf by leaf.
As in test_kernels.py: ``TestPackKernel`` runs the kernel compiled (on a GPU only, skipped elsewhere with the
reason), ``TestPackKernelInterpret`` in Pallas interpret mode (anywhere)."""
from __future__ import annotations

import json
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

try:  # the kernels are installed as jcodec.pallas_kernels; from a bare checkout, alias the folder
    import jcodec.pallas_kernels  # noqa: F401
except ImportError:
    import pallas_kernels

    sys.modules["jcodec.pallas_kernels"] = pallas_kernels

from jcodec import api, codecs, tensor
from jcodec.codecs import bits_of
from jcodec.convert import convert
from jcodec.models import llama
from jcodec.pallas_kernels import bf16_lossless_pack, rans_math as rm


def host_ct(x, lanes, steps, pairs=False, run=1):
    return tensor.from_encoded(codecs.encode(x, "bf16-lossless", lanes=lanes, steps=steps, pairs=pairs, run=run),
                               to_device=False)


def make_tensors(dtype, lanes, steps, seed=0, run=1):
    """Ragged tensors of one geometry: a partial last tile, a one-tile tensor, a one-row tensor, edge bit
    patterns, an all-equal tensor, incompressible bits, and a stack of three layers. ``dtype`` "pairs":
    bfloat16 with pair symbols (sizes even: a pack takes those; a tile holds ``2 * lanes * steps`` values)."""
    pairs = dtype == "pairs"
    dtype, even, per = ("bfloat16", 1, 2) if pairs else (dtype, 0, 1)
    rng = np.random.default_rng(seed)
    np_dtype, udt = codecs.FLOAT_DTYPES[dtype][:2]
    with np.errstate(over="ignore"):  # 3e38 is +inf in float16
        edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-45, 3.0e38, 1.0], np.float32).astype(np_dtype)
    xs = [(rng.standard_normal((37, 53 + even)) * 0.02).astype(np_dtype),
          (rng.standard_normal(per * lanes * steps - 5 - even) * 0.02).astype(np_dtype),
          (rng.standard_normal((1, 301 + even)) * 0.02).astype(np_dtype),
          np.tile(edge, 29 + even),
          np.full((19, 7 + even), 0.125, np_dtype),
          rng.integers(0, np.iinfo(udt).max, size=(3 * per * lanes * steps + 11 + even,), dtype=udt,
                       endpoint=True).view(np_dtype)]
    cts = [host_ct(x, lanes, steps, pairs, run) for x in xs]
    layers = [(rng.standard_normal((23, 41 + even)) * 0.02 * (i + 1)).astype(np_dtype) for i in range(3)]
    cts.append(tensor.stack_layers([host_ct(x, lanes, steps, pairs, run) for x in layers]))
    return xs + [np.stack(layers)], cts


class TestPackKernel:
    """Runs the pack kernel compiled, on a GPU; ``TestPackKernelInterpret`` runs it in interpret mode."""

    INTERPRET = False

    def setup_method(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas kernels need a GPU (TestPackKernelInterpret runs them in interpret mode)")

    @pytest.mark.parametrize("dtype,lanes,steps,block_lanes,coarse_bits,opts", [
        ("bfloat16", 32, 24, 32, 5, {}), ("bfloat16", 24, 16, 64, 0, {}), ("float16", 16, 40, 16, 5, {}),
        ("float32", 8, 24, 32, 3, {}), ("pairs", 32, 12, 32, 5, {}), ("pairs", 16, 8, 16, 0, {}),
        ("pairs", 8, 24, 32, 3, {}), ("pairs", 32, 12, 16, 0, dict(unroll=4, raw_early=True)),
        ("bfloat16", 16, 24, 32, 5, dict(unroll=8, raw_early=True, prefetch=8)),
        ("pairs", 16, 24, 16, 0, dict(unroll=8, raw_early=True, prefetch=8)),
        ("pairs", 16, 24, 16, rm.BY_SYMBOL, dict(unroll=8, raw_early=True, prefetch=8, given=True)),
        ("float32", 8, 24, 32, rm.BY_SYMBOL, {}),
        ("pairs", 32, 13, 32, 5, dict(run=4)),
        ("pairs", 16, 25, 16, 0, dict(run=4, unroll=8, raw_early=True, prefetch=8)),
        ("bfloat16", 24, 18, 64, 5, dict(run=8)), ("float32", 8, 17, 32, 3, dict(run=2, unroll=1))])
    def test_pack_kernel_and_reference_match_numpy(self, dtype, lanes, steps, block_lanes, coarse_bits, opts):
        """(coarse_bits: the device tables hold the coarse table for 5; 0 reads past it, 3 builds its own.
        block_lanes dividing lanes: one output per program, picked by a branch; larger: a masked store per output.
        BY_SYMBOL: the lookup by symbol, from tables that hold the symbol tables (given) or built by the kernel's
        caller. run: lanes that decode runs of consecutive values.)"""
        opts = dict(opts)
        xs, cts = make_tensors(dtype, lanes, steps, run=opts.pop("run", 1))
        arrays, static = tensor.pack_float(cts)
        if opts.pop("given", False):
            arrays = (*arrays[:4], rm.with_symbol_table(arrays[4], dtype == "pairs", np), arrays[5])
        assert static["sizes"] == tuple(x.size // (2 if dtype == "pairs" else 1) for x in xs)
        got = bf16_lossless_pack.bf16_lossless_decode_pack(*arrays, **static, block_lanes=block_lanes,
                                                           coarse_bits=coarse_bits, interpret=self.INTERPRET, **opts)
        ref = bf16_lossless_pack.bf16_lossless_pack_reference(*arrays, **static)
        for x, g, r in zip(xs, got, ref):
            np.testing.assert_array_equal(bits_of(g), bits_of(x).reshape(-1))
            np.testing.assert_array_equal(bits_of(r), bits_of(x).reshape(-1))


class TestPackKernelInterpret(TestPackKernel):
    INTERPRET = True


def test_pack_groups_split_at_the_limit_and_skip_what_cannot_pack():
    _, cts = make_tensors("bfloat16", 16, 8)
    other = host_ct(np.ones((5, 5), codecs.FLOAT_DTYPES["bfloat16"][0]), 32, 8)  # another geometry
    on_device = jax.device_put(cts[0])
    groups = tensor.pack_groups(cts + [other, on_device], limit=3000)
    assert sorted(i for g in groups for i in g) == list(range(len(cts) + 1))  # the device one is left out
    assert all(sum(tensor._pack_values((cts + [other])[i]) for i in g) <= 3000 for g in groups)
    assert [len(cts)] in groups  # its own geometry, its own pack


def test_pack_rejects_mixed_geometry():
    _, cts = make_tensors("bfloat16", 16, 8)
    bf16 = codecs.FLOAT_DTYPES["bfloat16"][0]
    with pytest.raises(ValueError, match="one lanes, steps"):
        tensor.pack_float([cts[0], host_ct(np.ones(9, bf16), 32, 8)])
    with pytest.raises(ValueError, match="one lanes, steps"):  # pair symbols do not mix with one a value
        tensor.pack_float([cts[0], host_ct(np.ones(10, bf16), 16, 8, pairs=True)])
    odd = host_ct(np.ones(9, bf16), 16, 8, pairs=True)  # (its padding value: decoded the general way)
    assert tensor.pack_groups([odd]) == []
    with pytest.raises(ValueError, match="even size"):
        tensor.pack_float([odd])


def test_decode_params_equals_leafwise_decode():
    xs, cts = make_tensors("bfloat16", 16, 24, seed=1)
    tree = {"a": cts[:3], "b": {"stack": cts[-1], "plain": np.arange(4.0)}, "c": cts[3:-1]}
    out = api.decode_params(tree)
    flat = out["a"] + [out["b"]["stack"]] + out["c"]
    for x, y in zip(xs[:3] + [xs[-1]] + xs[3:-1], flat):
        assert y.shape == x.shape and isinstance(y, jax.Array)
        np.testing.assert_array_equal(bits_of(y), bits_of(x))
    np.testing.assert_array_equal(out["b"]["plain"], np.arange(4.0))


@pytest.mark.parametrize("pairs", [False, True])
def test_load_decoded_gives_the_original_weights(tmp_path, pairs):
    """``decoded`` mode reads each bf16-lossless tensor straight into its pack and decodes the model in one
    launch: every weight is bit for bit the original; tensors that cannot pack (stored raw) load as usual."""
    config = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, model_type="llama", architectures=["LlamaForCausalLM"])
    cfg = llama.LlamaConfig.from_hf(config)
    rng = np.random.default_rng(5)
    tensors = {n: (rng.standard_normal(s) * 0.05 + (1.0 if n.endswith("norm.weight") else 0.0)).astype(ml_dtypes.bfloat16)
               for n, s in llama.param_shapes(cfg).items()}
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(hf / "model.safetensors"))
    convert(str(hf), str(tmp_path / "jc"), "bf16-lossless", progress=False, pairs=pairs)
    timings = {}
    params = api.load_decoded(tmp_path / "jc", cfg, jax.numpy.bfloat16, timings=timings)
    assert set(timings) >= {"read_s", "compile_wait_s", "decode_s"}  # something was packed
    want = llama.params_from_tensors(cfg, tensors.__getitem__, jax.numpy.bfloat16)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(want)):
        assert a.shape == b.shape, path
        np.testing.assert_array_equal(bits_of(a), bits_of(b), err_msg=str(path))
