"""The rANS coder on its own: round trips, edge distributions, corruption detection."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jcodec import rans


def roundtrip(symbols, lanes, steps):
    freqs = rans.normalize_freqs(np.bincount(symbols, minlength=256))
    states, counts, words = rans.encode(symbols, freqs, lanes, steps)
    out = rans.decode(states, counts, words, freqs, lanes, steps, symbols.size)
    np.testing.assert_array_equal(out, symbols)
    return words


@pytest.mark.parametrize("n", [1, 3, 513, 1023, 4096, 70001])
@pytest.mark.parametrize("lanes,steps", [(1, 1), (32, 16), (128, 64), (7, 13)])
def test_roundtrip_sizes(n, lanes, steps):
    rng = np.random.default_rng(n * lanes + steps)
    roundtrip(np.clip(rng.normal(120, 2, n), 0, 255).astype(np.uint8), lanes, steps)


def test_single_symbol_needs_no_words():
    assert roundtrip(np.full(5000, 9, np.uint8), 32, 16).size == 0


def test_uniform_bytes_cost_about_eight_bits():
    sym = np.random.default_rng(1).integers(0, 256, 200_000).astype(np.uint8)
    lanes = 128 * rans.num_tiles(sym.size, 128, 1024)
    bits = (roundtrip(sym, 128, 1024).size * 16 + lanes * 32) / sym.size  # words + start states
    assert 7.99 <= bits < 8.1


def test_rare_symbols_keep_nonzero_frequency():
    counts = np.zeros(256, np.int64)
    counts[0] = 10**9
    counts[1:] = 1
    f = rans.normalize_freqs(counts)
    assert f.sum() == rans.PROB_SCALE and f.min() >= 1


def test_size_is_near_entropy():
    rng = np.random.default_rng(2)
    sym = np.clip(rng.normal(100, 3, 1_000_000), 0, 255).astype(np.uint8)
    p = np.bincount(sym, minlength=256) / sym.size
    entropy = -np.sum(p[p > 0] * np.log2(p[p > 0]))
    lanes = 128 * rans.num_tiles(sym.size, 128, 1024)
    bits = (roundtrip(sym, 128, 1024).size * 16 + lanes * 32) / sym.size  # words + start states
    assert entropy <= bits < entropy + 0.05


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.integers(1, 40), st.integers(1, 40))
def test_roundtrip_property(data, lanes, steps):
    roundtrip(np.frombuffer(data, np.uint8), lanes, steps)


def test_corrupted_state_is_detected():
    sym = np.clip(np.random.default_rng(3).normal(120, 2, 20000), 0, 255).astype(np.uint8)
    freqs = rans.normalize_freqs(np.bincount(sym, minlength=256))
    states, counts, words = rans.encode(sym, freqs, 32, 64)
    states = states.copy()
    states[5] ^= 1 << 20
    with pytest.raises(rans.RansError):
        rans.decode(states, counts, words, freqs, 32, 64, sym.size)


def test_packed_table_matches_tables():
    freqs = rans.normalize_freqs(np.bincount(np.arange(256).repeat(np.arange(1, 257)), minlength=256))
    packed = rans.packed_slot_table(freqs)
    sym, freq, bias = rans.slot_tables(freqs)
    np.testing.assert_array_equal((packed >> 12) & 0xFF, sym)
    np.testing.assert_array_equal((packed >> 20) + 1, freq)
    np.testing.assert_array_equal(np.arange(4096) - (packed & 0xFFF), bias)


@pytest.mark.parametrize("n,lanes,steps", [(1, 1, 1), (777, 32, 16), (5000, 7, 13)])
def test_bypass_after_escapes(n, lanes, steps):
    """ESC symbols carry 16 bypass bits each; a lane may read two words in one step, in the right order."""
    rng = np.random.default_rng(n)
    sym = np.where(rng.random(n) < 0.3, rans.ESC, rng.integers(0, 4, n)).astype(np.uint8)
    bits = rng.integers(0, 1 << 16, n).astype(np.uint16)
    freqs = rans.normalize_freqs(np.bincount(sym, minlength=256))
    states, counts, words = rans.encode(sym, freqs, lanes, steps, bypass=bits)
    assert counts.max() <= 2 * steps
    got, got_bits = rans.decode(states, counts, words, freqs, lanes, steps, n, bypass=True)
    np.testing.assert_array_equal(got, sym)
    np.testing.assert_array_equal(got_bits, np.where(sym == rans.ESC, bits, 0))
    if words.size:  # a flipped bypass word changes what decodes, or where the lane ends
        bad = words.copy()
        bad[words.size // 2] ^= 0x0100
        try:
            out = rans.decode(states, counts, bad, freqs, lanes, steps, n, bypass=True)
        except rans.RansError:
            return
        assert not (np.array_equal(out[0], got) and np.array_equal(out[1], got_bits))
