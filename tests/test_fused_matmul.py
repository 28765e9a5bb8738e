"""The fused decode-matmul (pallas_kernels/fused_matmul.py) against its reference, bit for bit where it decodes.

As tests/test_stacked_matmul.py: the base class runs the kernel compiled (on a GPU only, skipped elsewhere with
the reason), its ``*Interpret`` subclass the same tests in interpret mode; every call passes ``interpret``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcodec import resident
from jcodec.codecs import bits_of
from jcodec.pallas_kernels.fused_matmul import decode_reference, fused_matmul, fused_matmul_reference
from test_resident import edge_matrix
from test_stacked_matmul import StackedMatmulBase, close_to_exact


def finite_edges(rng, N, K):
    """Edge patterns whose products stay finite: subnormals, signed zeros, constant rows, wide exponents."""
    w = edge_matrix(rng, N, K)
    b = bits_of(w).copy()
    b[(b & 0x7F80) == 0x7F80] = 0x0001  # NaN and infinities -> the least subnormal
    b[:, ::5] ^= 0x3000  # exponents far from the window: escapes
    return np.asarray(b, np.uint16).view(jnp.bfloat16)


class FusedMatmulBase(StackedMatmulBase):  # its GPU-or-skip fixture and INTERPRET = False
    def run(self, x, weights, layer=None, **kw):
        return fused_matmul(x, weights, layer, interpret=self.INTERPRET, **kw)


class TestFusedMatmul(FusedMatmulBase):
    @pytest.mark.parametrize("bits", resident.BITS)
    @pytest.mark.parametrize("N, K, tile_n, tile_k", [(3, 40, 1, 32), (17, 100, 16, 64), (33, 96, 8, 32)])
    def test_decodes_bit_for_bit(self, N, K, tile_n, tile_k, bits):
        """x = one-hot rows picks single columns: y is W's own bits (finite W: 0 * inf would be NaN)."""
        rng = np.random.default_rng(N + K + bits)
        w = finite_edges(rng, N, K)
        enc = resident.encode(w, bits, tile_n, tile_k)
        np.testing.assert_array_equal(bits_of(np.asarray(decode_reference(*enc))), bits_of(w))
        for k0 in range(0, K, 37):
            x = jnp.zeros((1, K), jnp.bfloat16).at[0, k0].set(1)
            (y,) = self.run(x, [enc])
            np.testing.assert_array_equal(bits_of(np.asarray(y))[0], bits_of(w)[:, k0])

    @pytest.mark.parametrize("M", [1, 3, 16])
    def test_products_and_several_weights(self, M):
        rng = np.random.default_rng(M)
        K = 200
        ws = [finite_edges(rng, n, K) for n in (32, 48)]
        encs = [resident.encode(w, 3, 16, 64) for w in ws]
        x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
        for got, w, ref in zip(self.run(x, encs), ws, fused_matmul_reference(x, encs)):
            assert got.shape == (M, w.shape[0]) and got.dtype == jnp.bfloat16
            close_to_exact(got, x, jnp.asarray(w))
            np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref, np.float64), rtol=2 ** -7,
                                       atol=1e-3)

    def test_edge_values_and_traced_layer(self):
        """NaN payloads and infinities in a stack of layers read by a traced index."""
        rng = np.random.default_rng(5)
        layers = [edge_matrix(rng, 16, 64) for _ in range(3)]
        g, stacked = resident.stack([resident.encode(w, 3, 16, 32) for w in layers])
        x = jnp.asarray(np.abs(rng.standard_normal((1, 64))) + 0.5, jnp.bfloat16)
        run = jax.jit(lambda i: self.run(x, [(g, stacked)], i, out_dtype=jnp.float32))
        for i, w in enumerate(layers):
            (got,) = run(jnp.int32(i))
            close_to_exact(got, x, jnp.asarray(w), jnp.float32)

    def test_bad_arguments_raise_before_launch(self):
        enc = resident.encode(np.zeros((16, 64), jnp.bfloat16), 3, 8, 32)
        with pytest.raises(ValueError, match="K=32"):
            self.run(jnp.zeros((1, 32), jnp.bfloat16), [enc])
        with pytest.raises(ValueError, match="tile_n"):
            self.run(jnp.zeros((2, 64), jnp.bfloat16), [enc])
        with pytest.raises(ValueError, match="layer"):
            self.run(jnp.zeros((1, 64), jnp.bfloat16), [resident.stack([enc, enc])])


class TestFusedMatmulInterpret(TestFusedMatmul):
    INTERPRET = True
