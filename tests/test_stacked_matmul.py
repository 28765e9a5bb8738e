"""The stacked skinny matmul (pallas_kernels/stacked_matmul.py) against its reference and float64.

As JAX's Pallas tests do: the base class runs the kernel compiled (on a GPU only, skipped elsewhere with the
reason), its ``*Interpret`` subclass the same tests in interpret mode; every call passes ``interpret``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcodec.pallas_kernels.stacked_matmul import default_blocks, stacked_matmul, stacked_matmul_reference


def f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def close_to_exact(got, x, w, out_dtype=jnp.bfloat16):
    """``got`` [M, N] is x @ w.T up to float32 accumulation and one rounding to ``out_dtype``; NaN and
    infinities where the float64 product has them."""
    with np.errstate(invalid="ignore", over="ignore"):
        exact = f64(x) @ f64(w).T
        scale = np.abs(f64(x)) @ np.abs(f64(w)).T
    exact = np.where(np.isfinite(exact), f64(jnp.asarray(exact, out_dtype)), exact)  # past out_dtype's range: inf
    got = f64(got)
    finite = np.isfinite(exact)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(exact))
    np.testing.assert_array_equal(got[~finite & ~np.isnan(exact)], exact[~finite & ~np.isnan(exact)])
    ulp = 2.0 ** -8 if jnp.dtype(out_dtype) == jnp.bfloat16 else 2.0 ** -23
    bound = ulp * np.abs(exact) + 2e-6 * x.shape[1] * scale + 1e-30
    with np.errstate(invalid="ignore"):  # inf - inf where both are infinite: those are compared above
        err = np.abs(got - exact)
    assert np.all(err[finite] <= bound[finite]), np.max((err / bound)[finite])


class StackedMatmulBase:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _backend(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas kernels need a GPU (the *Interpret class runs these tests in interpret mode)")

    def run(self, x, weights, layer=None, **kw):
        return stacked_matmul(x, weights, layer, interpret=self.INTERPRET, **kw)


class TestStackedMatmul(StackedMatmulBase):
    @pytest.mark.parametrize("M, K, sizes", [(1, 48, (24, 40, 8)), (1, 272, (8,)), (3, 48, (32, 48)),
                                             (16, 272, (16,)), (20, 64, (48, 16))])
    def test_every_layer_of_a_stack(self, M, K, sizes):
        rng = np.random.default_rng(M * 1000 + K)
        L = 3
        ws = [jnp.asarray(rng.standard_normal((L, n, K)), jnp.bfloat16) for n in sizes]
        x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
        for layer in range(L):
            got = self.run(x, ws, jnp.int32(layer))
            for g, w, r in zip(got, ws, stacked_matmul_reference(x, ws, layer)):
                assert g.shape == (M, w.shape[1]) and g.dtype == jnp.bfloat16
                close_to_exact(g, x, w[layer])
                # within one bfloat16 step of XLA's float32-accumulated product
                np.testing.assert_allclose(f64(g), f64(r), rtol=2 ** -7, atol=1e-3)

    def test_traced_layer_in_a_scan_reads_each_layer(self):
        rng = np.random.default_rng(1)
        L, K = 4, 64
        ws = [jnp.asarray(rng.standard_normal((L, n, K)), jnp.bfloat16) for n in (32, 16)]
        x = jnp.asarray(rng.standard_normal((1, K)), jnp.bfloat16)

        @jax.jit
        def all_layers(x, ws):
            return jax.lax.map(lambda i: self.run(x, ws, i), jnp.arange(L, dtype=jnp.int32))

        scanned = all_layers(x, ws)
        for layer in range(L):
            for s, one in zip(scanned, self.run(x, ws, jnp.int32(layer))):
                # the same kernel on the same layer: the same bits, whether the layer is traced or not
                np.testing.assert_array_equal(np.asarray(s[layer]).view(np.uint16), np.asarray(one).view(np.uint16))

    def test_matrices_and_float32_output(self):
        rng = np.random.default_rng(2)
        w = jnp.asarray(rng.standard_normal((96, 128)), jnp.bfloat16)
        for M in (1, 5):
            x = jnp.asarray(rng.standard_normal((M, 128)), jnp.bfloat16)
            (got,) = self.run(x, [w], out_dtype=jnp.float32)
            assert got.dtype == jnp.float32
            close_to_exact(got, x, w, jnp.float32)

    @pytest.mark.parametrize("M", [1, 16])
    def test_edge_values(self, M):
        """NaN payloads, infinities, subnormals, signed zeros, all-equal rows, huge products."""
        rng = np.random.default_rng(3)
        K, N = 64, 32
        w = rng.standard_normal((N, K)).astype(np.float32)
        w[0] = np.nan
        w[1, 5] = np.inf
        w[2, 7] = -np.inf
        w[3] = 1e-40  # subnormal in bfloat16 too
        w[4] = -0.0
        w[5] = 0.0
        w[6] = 0.5  # all equal
        w[7] = 3e38  # overflows float32 when summed
        w16 = jnp.asarray(w, jnp.bfloat16)
        nan_payload = jnp.asarray(np.full((1, K), 0x7FC1, np.uint16)).view(jnp.bfloat16)  # a NaN with a payload
        w16 = w16.at[8].set(nan_payload[0])
        x = jnp.asarray(np.abs(rng.standard_normal((M, K))) + 0.5, jnp.bfloat16)
        (got,) = self.run(x, [w16])
        close_to_exact(got, x, w16)

    def test_bad_shapes_raise_before_launch(self):
        x = jnp.zeros((1, 64), jnp.bfloat16)
        with pytest.raises(ValueError, match="must all be"):
            self.run(x, [jnp.zeros((2, 16, 32), jnp.bfloat16)], jnp.int32(0))
        with pytest.raises(ValueError, match="must all be"):
            self.run(x, [jnp.zeros((2, 16, 64), jnp.float32)], jnp.int32(0))
        with pytest.raises(ValueError, match="layer"):
            self.run(x, [jnp.zeros((2, 16, 64), jnp.bfloat16)])
        with pytest.raises(ValueError, match="no power-of-two blocks"):
            self.run(jnp.zeros((1, 40), jnp.bfloat16), [jnp.zeros((16, 40), jnp.bfloat16)])
        with pytest.raises(ValueError, match="block_n"):  # rows of 8 need M == 1 (plgpu.dot takes 16 and up)
            self.run(jnp.zeros((2, 64), jnp.bfloat16), [jnp.zeros((16, 64), jnp.bfloat16)], block_n=8)


class TestStackedMatmulInterpret(TestStackedMatmul):
    INTERPRET = True


def test_default_blocks_divide_the_shapes():
    for m, sizes, k in [(1, [4096, 1024, 1024], 4096), (16, [4096], 14336), (1, [576], 576), (5, [128256], 4096)]:
        block_m, block_n, block_k = default_blocks(m, sizes, k)
        assert block_m == (1 if m == 1 else max(16, pl_next_power_of_2(m)))
        assert all(n % block_n == 0 for n in sizes) and k % block_k == 0 and block_k >= 16
        assert block_m == 1 or block_n >= 16
    assert default_blocks(3, [24], 48) is None  # M > 1 needs column blocks of 16
    assert default_blocks(1, [24], 40) is None  # K has no power-of-two block of 16 or more


def pl_next_power_of_2(n):
    return 1 << (n - 1).bit_length()
