"""The resident layout (jcodec/resident.py): exact round trips on awkward shapes and every kind of bit pattern."""
import ml_dtypes
import numpy as np
import pytest

from jcodec import resident
from jcodec.codecs import bits_of


def bf16_from_bits(bits):
    return np.asarray(bits, np.uint16).view(ml_dtypes.bfloat16)


def edge_matrix(rng, N, K):
    """Gaussian weights with rows of NaN payloads, infinities, subnormals, signed zeros and constants."""
    w = rng.standard_normal((N, K)).astype(np.float32).astype(ml_dtypes.bfloat16)
    b = bits_of(w).copy()
    specials = [0x7FC1, 0xFF81, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x0000, 0x8000, 0x3F00]
    for i, s in enumerate(specials):
        b[i % N, (7 * i) % K] = s
    if N > 2:
        b[2] = 0x3F00  # an all-equal row
    return bf16_from_bits(b)


def round_trip(w, **kw):
    g, a = resident.encode(w, **kw)
    back = resident.decode(g, a)
    np.testing.assert_array_equal(bits_of(back), bits_of(w))
    return g, a


@pytest.mark.parametrize("bits", resident.BITS)
@pytest.mark.parametrize("N, K, tile_n, tile_k", [(1, 1, 1, 32), (3, 513, 2, 64), (17, 1023, 16, 512),
                                                   (40, 96, 8, 32), (64, 640, 16, 128)])
def test_round_trip_awkward_shapes(N, K, tile_n, tile_k, bits):
    rng = np.random.default_rng(N * 7 + K)
    g, a = round_trip(edge_matrix(rng, N, K), bits=bits, tile_n=tile_n, tile_k=tile_k)
    Np, Kp = g.padded
    assert a["planes"].shape == (bits, Np, Kp // 32) and a["planes"].dtype == np.uint32
    assert a["raw"].shape == (Np, Kp) and a["base"].shape == g.tiles
    assert a["offsets"].shape == (g.tiles[0] * g.tiles[1] + 1,)
    assert np.all(a["base"].astype(int) + g.escape - 1 <= 255)


@pytest.mark.parametrize("bits", resident.BITS)
def test_every_bit_pattern(bits):
    """All 65536 bfloat16 patterns, shuffled: tiles with far more than 2**bits - 1 exponents escape the rest."""
    rng = np.random.default_rng(bits)
    w = bf16_from_bits(rng.permutation(np.arange(1 << 16, dtype=np.uint16)).reshape(256, 256))
    g, a = round_trip(w, bits=bits, tile_n=8, tile_k=64)
    assert a["offsets"][-1] > 0.9 * w.size  # incompressible: almost every exponent escapes


def test_all_equal_tiles_have_no_escapes():
    for pattern in (0x0000, 0x8000, 0x7F80, 0x7FC1, 0x3F80):
        w = bf16_from_bits(np.full((20, 70), pattern, np.uint16))
        g, a = round_trip(w, bits=3, tile_n=4, tile_k=32)
        assert a["offsets"][-1] == 0 and a["escapes"].size == 1


def test_padding_decodes_finite():
    """Padded weights must be finite, so zero-padded activations make their products zero."""
    w = bf16_from_bits(np.full((3, 5), 0x7FC1, np.uint16))  # NaN everywhere: the window starts at its top
    g, a = round_trip(w, bits=3, tile_n=4, tile_k=32)
    assert int(a["base"].max()) <= 255 - (g.escape - 1) < 255


def test_window_covers_most():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 512)) * 0.02).astype(ml_dtypes.bfloat16)
    g, a = round_trip(w, bits=3)
    assert a["offsets"][-1] < 0.05 * w.size  # a Gaussian's 7 most frequent exponents hold > 95% of it
    assert resident.nbytes(a) < 0.72 * w.nbytes


def test_stack_pads_escapes():
    rng = np.random.default_rng(1)
    layers = [resident.encode(edge_matrix(rng, 16, 64) * s, tile_n=8, tile_k=32) for s in (1, 1e-20)]
    g, a = resident.stack(layers)
    assert a["planes"].shape[0] == 2 and a["escapes"].shape[0] == 2
    for i, (_, one) in enumerate(layers):
        np.testing.assert_array_equal(bits_of(resident.decode(g, {k: v[i] for k, v in a.items()})),
                                      bits_of(resident.decode(g, one)))


def test_bad_arguments_raise():
    w = np.zeros((4, 4), ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="bits"):
        resident.encode(w, bits=5)
    with pytest.raises(ValueError, match="tile_k"):
        resident.encode(w, tile_k=48)
    with pytest.raises(ValueError, match="bfloat16 matrix"):
        resident.encode(np.zeros((4, 4), np.float32))
    g, a = resident.encode(w, tile_n=2, tile_k=32)
    a["offsets"][1] += 1  # one tile claims an escape its codes do not have
    with pytest.raises(ValueError, match="offsets"):
        resident.decode(g, a)
