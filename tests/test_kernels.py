"""The Pallas rANS kernels == the pure-JAX references == the NumPy decoder, bit for bit.

As JAX's Pallas tests do: each test class runs the kernels compiled (``INTERPRET = False``: on a GPU only,
skipped elsewhere with the reason), and its ``*Interpret`` subclass runs the same tests in Pallas interpret
mode (anywhere); so a GPU run checks both. Sizes are ragged on purpose (a partial last tile, a one-tile tensor,
a one-row tensor, lanes and steps that are not powers of two).
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

try:  # the kernels are installed as jcodec.pallas_kernels; from a bare checkout, alias the folder
    import jcodec.pallas_kernels  # noqa: F401
except ImportError:
    import pallas_kernels

    sys.modules["jcodec.pallas_kernels"] = pallas_kernels

from jcodec import codecs, rans, tensor
from jcodec.codecs import bits_of
from jcodec.pallas_kernels import bf16_lossless, int8, rans_math as rm

FLOATS = ("bfloat16", "float16", "float32")


def device_args(ct: tensor.CompressedTensor):
    """``tensor.kernel_args`` as the one-tensor kernels take them: (arrays, keyword arguments)."""
    arrays, meta = tensor.kernel_args(ct)
    kw = meta._asdict()
    kw.pop("predictors_used", None)  # (int8: the kernel's default)
    return arrays, kw


def random_float(rng, shape, dtype, kind="gauss"):
    np_dtype = codecs.FLOAT_DTYPES[dtype][0]
    if kind == "gauss":
        return (rng.standard_normal(shape) * 0.02).astype(np_dtype)
    if kind == "bits":  # incompressible: every exponent, NaN payloads, infinities, subnormals
        udt = codecs.FLOAT_DTYPES[dtype][1]
        return rng.integers(0, np.iinfo(udt).max, size=shape, dtype=udt, endpoint=True).view(np_dtype)
    raise ValueError(kind)


def special_values(dtype) -> np.ndarray:
    """Edge bit patterns: signed zeros, infinities, NaNs with payloads, subnormals, extremes."""
    np_dtype = codecs.FLOAT_DTYPES[dtype][0]
    udt = codecs.FLOAT_DTYPES[dtype][1]
    fi = ml_dtypes.finfo(np_dtype)
    vals = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, float(fi.max), float(fi.min),
                     float(fi.tiny), -float(fi.tiny), float(fi.smallest_subnormal),
                     -float(fi.smallest_subnormal), float(fi.tiny) / 3], dtype=np.float64).astype(np_dtype)
    width = 8 * np.dtype(udt).itemsize
    nan_payloads = np.array([(1 << width) - 1, (1 << (width - 1)) + 1 + (np.iinfo(udt).max >> 1) - 1,
                             np.iinfo(udt).max >> 1], dtype=np.uint64).astype(udt).view(np_dtype)
    return np.concatenate([vals, nan_payloads])


def smooth(rng, shape, predictor) -> np.ndarray:
    """Data whose int8 residuals shrink under a predictor: 1, ramps along rows (a random sign per row,
    so `up` does not win); 2, a double running sum down the columns."""
    if predictor == 1:
        ramp = 1 + 0.5 * np.arange(shape[1]) / shape[1]
        return 0.02 * ramp * np.sign(rng.standard_normal((shape[0], 1))) * (1 + 1e-2 * rng.standard_normal(shape))
    return 0.02 * np.cumsum(np.cumsum(rng.standard_normal(shape), axis=0), axis=0)


def three_predictors() -> np.ndarray:
    """bfloat16[96, 64] whose int8 tiles (32 lanes x 16 steps) choose each of the three predictors."""
    x = np.random.default_rng(4).standard_normal((96, 64))
    x[32:64] = np.cumsum(x[32:64], axis=1)
    x[64:] = np.cumsum(x[64:], axis=0)
    return (x * 0.02).astype(ml_dtypes.bfloat16)


class KernelTestBase:
    """Runs the kernels compiled, on a GPU; a subclass with ``INTERPRET = True`` runs them in interpret mode.
    Every kernel call passes ``interpret=self.INTERPRET``."""

    INTERPRET = False

    def setup_method(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas kernels need a GPU (the *Interpret class runs these tests in interpret mode)")

    def check_float(self, x: np.ndarray, lanes: int, steps: int, run=None, **blocks):
        enc = codecs.encode(x, "bf16-lossless", lanes=lanes, steps=steps, run=run)
        assert enc.record.get("run", 1) == (run or 1)
        want = bits_of(codecs.decode(enc)).reshape(-1)
        np.testing.assert_array_equal(want, bits_of(x).reshape(-1))
        args, kw = device_args(tensor.from_encoded(enc))
        ref = bf16_lossless.bf16_lossless_reference(*args, **kw)
        np.testing.assert_array_equal(bits_of(ref), want)
        out = bf16_lossless.bf16_lossless_decode(*args, **kw, **blocks, interpret=self.INTERPRET)
        assert out.dtype == jnp.dtype(x.dtype) and out.shape == (x.size,)
        np.testing.assert_array_equal(bits_of(out), want)

    def check_int8(self, x: np.ndarray, lanes: int, steps: int, predictors=None, **blocks):
        enc = codecs.encode(x, "int8", lanes=lanes, steps=steps)
        if predictors is not None:  # the data must make the predictor we mean to test win somewhere
            assert predictors in set(enc.arrays["tiles"][:, 2].tolist()), enc.arrays["tiles"][:, 2]
        want = bits_of(codecs.decode(enc)).reshape(-1)
        args, kw = device_args(tensor.from_encoded(enc))
        ref = int8.int8_reference(*args, **kw)
        np.testing.assert_array_equal(bits_of(ref), want)
        used = tensor.from_encoded(enc).meta.predictors
        out = int8.int8_decode(*args, **kw, predictors_used=used, **blocks, interpret=self.INTERPRET)
        assert out.dtype == jnp.dtype(x.dtype) and out.shape == (x.size,)
        np.testing.assert_array_equal(bits_of(out), want)


class TestFloatKernel(KernelTestBase):
    @pytest.mark.parametrize("dtype", FLOATS)
    @pytest.mark.parametrize("n,lanes,steps", [(3, 32, 16), (513, 32, 16), (1023, 32, 16), (1, 1, 1), (700, 7, 5)])
    def test_ragged_sizes(self, dtype, n, lanes, steps):
        rng = np.random.default_rng(n * 7 + lanes)
        self.check_float(random_float(rng, (n,), dtype), lanes, steps)

    @pytest.mark.parametrize("lanes,steps,unroll,num_warps,coarse_bits,prefetch,raw_early", [
        (32, 16, 1, 1, 5, 0, False), (24, 16, 4, 2, 0, 16, True), (100, 8, 8, 4, 3, 1, False),
        (128, 8, 8, 4, 8, 8, True)])
    def test_block_sizes(self, lanes, steps, unroll, num_warps, coarse_bits, prefetch, raw_early):
        """Lanes that fill the program's vector or leave padding lanes (24, 100 of 32, 128), one tile or several."""
        rng = np.random.default_rng(lanes + unroll)
        x = random_float(rng, (37, 41), "bfloat16", "bits" if prefetch else "gauss")
        self.check_float(x, lanes, steps, unroll=unroll, num_warps=num_warps, coarse_bits=coarse_bits,
                         prefetch=prefetch, raw_early=raw_early)

    def test_many_tensors_one_launch(self):
        rng = np.random.default_rng(9)
        xs = [random_float(rng, (300,), "bfloat16"), random_float(rng, (5, 7), "float16"),
              random_float(rng, (1000,), "float32", "bits"), np.zeros((64,), ml_dtypes.bfloat16)]
        geometry = [(32, 16), (8, 4), (32, 8), (32, 16)]
        encs = [codecs.encode(x, "bf16-lossless", lanes=l, steps=s) for x, (l, s) in zip(xs, geometry)]
        args = [device_args(tensor.from_encoded(e)) for e in encs]
        metas = tuple(bf16_lossless.LosslessMeta(**kw) for _, kw in args)
        outs = bf16_lossless.bf16_lossless_decode_many([a for a, _ in args], metas=metas, interpret=self.INTERPRET)
        for out, x in zip(outs, xs):
            np.testing.assert_array_equal(bits_of(out), bits_of(x).reshape(-1))

    @pytest.mark.parametrize("dtype", FLOATS)
    def test_carried_raw_bytes(self, dtype):
        """The lanes of full tiles carry their last values' raw bytes in their end states: the file is smaller
        by exactly those bytes, and a stream without carry (format version 1's layout) decodes the same."""
        x = random_float(np.random.default_rng(5), (3 * 32 * 16 + 100,), dtype, "bits")  # 3 full tiles + 100
        on, off = codecs.encode_float(x, 32, 16), codecs.encode_float(x, 32, 16, carry=False)
        rb = codecs.FLOAT_DTYPES[dtype][2]
        assert (on.record["carry"], off.record["carry"]) == (codecs.CARRY[rb], 0)
        assert off.arrays["raw"].size - on.arrays["raw"].size == 3 * 32 * codecs.CARRY[rb] * rb
        assert on.arrays["counts"].dtype == np.uint8  # steps <= 255: one byte per lane
        off.arrays["counts"] = off.arrays["counts"].astype(np.uint16)  # as version 1 wrote them
        np.testing.assert_array_equal(bits_of(codecs.decode(off)), bits_of(x))
        for enc in (on, off):
            args, kw = device_args(tensor.from_encoded(enc))
            outs = [bf16_lossless.bf16_lossless_reference(*args, **kw)]
            outs += [bf16_lossless.bf16_lossless_decode(*args, **kw, unroll=u, raw_early=r, interpret=self.INTERPRET)
                     for u, r in ((1, False), (4, True))]
            for out in outs:
                np.testing.assert_array_equal(bits_of(out), bits_of(x))

    @pytest.mark.parametrize("dtype,lanes,steps,run,blocks", [
        ("bfloat16", 32, 18, 4, {}), ("bfloat16", 24, 10, 8, dict(unroll=16, prefetch=8)),
        ("float16", 7, 6, 2, dict(unroll=1, num_warps=1)), ("float32", 32, 9, 8, dict(unroll=8, coarse_bits=0)),
        ("float32", 100, 5, 4, dict(unroll=4, raw_early=False))])
    def test_runs(self, dtype, lanes, steps, run, blocks):
        """Lanes that decode runs of consecutive values (a wide load and store a run): three full tiles, then a
        partial one whose last run is cut short; edge patterns and incompressible values among them."""
        rng = np.random.default_rng(lanes * run)
        x = random_float(rng, (3 * lanes * steps + lanes * run + 3,), dtype)
        special = special_values(dtype)
        x[:special.size] = special
        x[-lanes * run - 3:] = random_float(rng, (lanes * run + 3,), dtype, "bits")
        self.check_float(x, lanes, steps, run=run, **blocks)

    @pytest.mark.parametrize("dtype", FLOATS)
    def test_runs_without_carry(self, dtype):
        """Runs over every step (no carried values: format version 1's raw layout)."""
        x = random_float(np.random.default_rng(8), (2 * 16 * 8 + 21,), dtype, "bits")
        enc = codecs.encode_float(x, 16, 8, carry=False, run=4)
        assert (enc.record["carry"], enc.record["run"]) == (0, 4)
        np.testing.assert_array_equal(bits_of(codecs.decode(enc)), bits_of(x))
        args, kw = device_args(tensor.from_encoded(enc))
        for out in (bf16_lossless.bf16_lossless_reference(*args, **kw),
                    bf16_lossless.bf16_lossless_decode(*args, **kw, interpret=self.INTERPRET)):
            np.testing.assert_array_equal(bits_of(out), bits_of(x))

    @pytest.mark.parametrize("dtype", FLOATS)
    def test_incompressible_bits(self, dtype):
        self.check_float(random_float(np.random.default_rng(1), (2000,), dtype, "bits"), 32, 16)

    @pytest.mark.parametrize("dtype", FLOATS)
    def test_edge_bit_patterns(self, dtype):
        rng = np.random.default_rng(2)
        special = special_values(dtype)
        x = random_float(rng, (1500,), dtype)
        x[rng.integers(0, x.size, 300)] = special[rng.integers(0, special.size, 300)]
        x[:special.size] = special
        self.check_float(x, 32, 16)

    @pytest.mark.parametrize("dtype,value", [("bfloat16", 0.0), ("float16", 1.5), ("float32", -2.0)])
    def test_all_equal(self, dtype, value):
        # one symbol with frequency 4096: states never leave 2^16 and no word is ever read
        x = np.full((9, 100), value, dtype=codecs.FLOAT_DTYPES[dtype][0])
        enc = codecs.encode(x, "bf16-lossless", lanes=32, steps=16)
        assert enc.arrays["words"].size == 0
        self.check_float(x, 32, 16)

    @pytest.mark.parametrize("dtype,kind,shape,lanes,steps,blocks", [
        ("bfloat16", "gauss", (37, 46), 32, 16, dict()),  # an odd word count, padded by from_encoded
        ("float32", "bits", (1000,), 32, 8, dict(prefetch=16, unroll=1)),
        ("float16", "gauss", (700,), 7, 5, dict()),
        ("bfloat16", "equal", (9, 100), 32, 16, dict())])  # no words at all: two padding words
    def test_word_pairs(self, dtype, kind, shape, lanes, steps, blocks):
        rng = np.random.default_rng(shape[0] + lanes)
        x = (np.full(shape, 1.5, codecs.FLOAT_DTYPES[dtype][0]) if kind == "equal"
             else random_float(rng, shape, dtype, kind))
        enc = codecs.encode(x, "bf16-lossless", lanes=lanes, steps=steps)
        w = enc.arrays["words"].size
        if (dtype, kind) == ("bfloat16", "gauss"):
            assert w % 2, w  # this case is the odd word count
        assert tensor.from_encoded(enc).arrays["words"].shape == (max(2, w + w % 2),)
        self.check_float(x, lanes, steps, word_group=2, **blocks)

    def test_exact_tiles_and_default_geometry(self):
        rng = np.random.default_rng(3)
        self.check_float(random_float(rng, (1024,), "bfloat16"), 32, 16)  # two full tiles
        self.check_float(random_float(rng, (5000,), "bfloat16"), 128, 8)
        self.check_float(random_float(rng, (3, 128 * 1024 + 77), "bfloat16"), 128, 1024)


class TestFloatKernelInterpret(TestFloatKernel):
    INTERPRET = True


class TestInt8Kernel(KernelTestBase):
    @pytest.mark.parametrize("dtype,shape,lanes,steps", [
        ("bfloat16", (1, 513), 32, 16), ("float16", (1, 513), 32, 16), ("float32", (1, 513), 32, 16),
        ("bfloat16", (33, 31), 32, 16), ("bfloat16", (3, 1), 8, 16), ("float32", (40, 200), 32, 8),
        ("bfloat16", (7, 100), 7, 5), ("float16", (64, 300), 128, 8)])
    def test_ragged_sizes(self, dtype, shape, lanes, steps):
        rng = np.random.default_rng(shape[0] * 1000 + shape[1])
        self.check_int8(random_float(rng, shape, dtype), lanes, steps)

    @pytest.mark.parametrize("predictor,shape,lanes,steps", [
        (1, (40, 200), 32, 8), (1, (200, 40), 32, 8), (1, (33, 31), 32, 16), (1, (64, 5), 32, 4),
        (1, (1, 700), 32, 16), (1, (50, 64), 32, 8),
        (2, (40, 200), 32, 8), (2, (200, 40), 32, 8), (2, (33, 31), 32, 16), (2, (64, 5), 32, 4),
        (2, (300, 3), 32, 16), (2, (50, 64), 32, 8)])
    def test_predictors(self, predictor, shape, lanes, steps):
        # rows or tiles shorter and longer than a step (32 lanes), several rows per step, rows across tiles
        self.check_int8(smooth(np.random.default_rng(predictor * 100 + shape[1]), shape, predictor)
                        .astype(ml_dtypes.bfloat16), lanes, steps, predictors=predictor)

    def test_mixed_predictors(self):
        x = three_predictors()
        enc = codecs.encode(x, "int8", lanes=32, steps=16)
        assert set(enc.arrays["tiles"][:, 2].tolist()) == {0, 1, 2}
        self.check_int8(x, 32, 16)

    @pytest.mark.parametrize("unroll,num_warps,coarse_bits,prefetch", [(1, 1, 0, 0), (16, 4, 5, 8)])
    def test_block_sizes(self, unroll, num_warps, coarse_bits, prefetch):
        x = np.cumsum(np.random.default_rng(5).standard_normal((48, 80)), axis=0) * 0.02
        self.check_int8(x.astype(np.float16), 32, 16, unroll=unroll, num_warps=num_warps, coarse_bits=coarse_bits,
                        prefetch=prefetch)

    def test_many_tensors_one_launch(self):
        rng = np.random.default_rng(10)
        xs = [random_float(rng, (20, 30), "bfloat16"), smooth(rng, (40, 200), 1).astype(np.float16),
              smooth(rng, (33, 31), 2).astype(np.float32)]
        encs = [codecs.encode(x, "int8", lanes=32, steps=8) for x in xs]
        args = [device_args(tensor.from_encoded(e)) for e in encs]
        metas = tuple(int8.Int8Meta(**kw, predictors_used=(0, 1, 2)) for _, kw in args)
        outs = int8.int8_decode_many([a for a, _ in args], metas=metas, interpret=self.INTERPRET)
        for out, e in zip(outs, encs):
            np.testing.assert_array_equal(bits_of(out), bits_of(codecs.decode(e)).reshape(-1))

    def test_all_equal_and_zero_rows(self):
        x = np.zeros((20, 60), np.float32)
        x[5] = 0.25  # a constant row; the others are all zero (scale 0)
        self.check_int8(x, 32, 16)
        self.check_int8(np.zeros((4, 4096), ml_dtypes.bfloat16), 32, 16)

    # every row's scale differs, so a scale read for the wrong step shows
    @pytest.mark.parametrize("shape,lanes,steps,blocks", [
        ((96, 64), 32, 16, dict(word_group=2, unroll=2)),  # all three predictors, rows of exactly one block
        ((33, 31), 32, 16, dict(word_group=2, prefetch=16, unroll=1)),  # rows shorter than a step
        ((7, 100), 7, 16, dict(unroll=8)),  # padding lanes, rows across tiles
        ((40, 200), 32, 8, dict(word_group=2)),  # unroll 8: 256 values a block, rows of 200
        ((40, 200), 16, 16, dict(unroll=16, prefetch=4))])  # a row starts anywhere in a block
    def test_word_pairs_and_row_scales(self, shape, lanes, steps, blocks):
        rng = np.random.default_rng(shape[0] * 3 + lanes)
        x = rng.standard_normal(shape)
        x[shape[0] // 3:2 * shape[0] // 3] = np.cumsum(x[shape[0] // 3:2 * shape[0] // 3], axis=1)
        x[2 * shape[0] // 3:] = np.cumsum(x[2 * shape[0] // 3:], axis=0)
        x *= 10.0 ** rng.uniform(-3, 3, (shape[0], 1))  # every row's scale differs: a stale scale shows
        self.check_int8(x.astype(ml_dtypes.bfloat16), lanes, steps, **blocks)

    def test_extreme_scales(self):
        rng = np.random.default_rng(6)
        x = rng.standard_normal((6, 300)) * np.array([1e-30, 1e-3, 1.0, 1e3, 1e30, 3e38 / 4])[:, None]
        self.check_int8(x.astype(np.float32), 32, 16)
        self.check_int8((rng.standard_normal((6, 300)) * 1e-6).astype(np.float16), 32, 16)


class TestInt8KernelInterpret(TestInt8Kernel):
    INTERPRET = True


class TestInsideJit(KernelTestBase):
    """Stacked layers through jit + lax.scan, as the model decodes them."""

    @pytest.mark.parametrize("codec", ["bf16-lossless", "int8"])
    @pytest.mark.parametrize("backend", ["pallas", "reference"])
    def test_scan_over_stacked_layers(self, codec, backend):
        rng = np.random.default_rng(7)
        layers = [(rng.standard_normal((24, 70)) * 0.02 * (i + 1)).astype(ml_dtypes.bfloat16) for i in range(3)]
        layers[1][0, :5] = 0  # different word counts per layer: the stack pads the word streams
        encs = [codecs.encode(x, codec, lanes=32, steps=16) for x in layers]
        want = np.stack([bits_of(codecs.decode(e)) for e in encs])
        stacked = tensor.stack_layers([tensor.from_encoded(e) for e in encs])
        assert stacked.shape == (3, 24, 70)

        @jax.jit
        def run(st):
            def body(acc, ct):
                w = tensor.decode(ct, backend=backend, interpret=self.INTERPRET)
                # a checksum of the bit patterns (a float sum would let XLA skip the bf16 rounding of the
                # reference's product on GPU: xla_allow_excess_precision)
                return acc + jnp.sum(lax.bitcast_convert_type(w, jnp.uint16).astype(jnp.uint32)), w
            return lax.scan(body, jnp.uint32(0), st)

        total, ys = run(stacked)
        np.testing.assert_array_equal(bits_of(ys), want)
        assert int(total) == int(want.astype(np.uint64).sum() % (1 << 32))
        # the batched path of decode (lax.map over the stack) agrees too
        np.testing.assert_array_equal(bits_of(tensor.decode(stacked, backend=backend, interpret=self.INTERPRET)),
                                      want)


class TestInsideJitInterpret(TestInsideJit):
    INTERPRET = True


class TestLaneStarts(KernelTestBase):
    """Each lane's start within its tile is summed on the host: uint16 for short tiles, uint32 past 65535 words."""

    @pytest.mark.parametrize("codec", ["bf16-lossless", "int8"])
    def test_starts_past_16_bits(self, codec):
        lanes, steps = 128, 1400  # incompressible symbols read ~0.5 words a step: ~90k words in a full tile
        rng = np.random.default_rng(21)
        n = lanes * steps + 1000  # a full tile and a partial one
        x = (random_float(rng, (n,), "bfloat16", "bits") if codec == "bf16-lossless"
             else rng.uniform(-1, 1, (10, n // 10)).astype(ml_dtypes.bfloat16))
        ct = tensor.from_encoded(codecs.encode(x, codec, lanes=lanes, steps=steps))
        starts = np.asarray(ct.arrays["starts"])
        assert starts.dtype == np.uint32 and starts.max() > 0xFFFF
        assert tensor.starts_dtype(lanes, 240) == np.uint16 and tensor.starts_dtype(lanes, 517) == np.uint32
        if codec == "bf16-lossless":
            self.check_float(x, lanes, steps)
        else:
            self.check_int8(x, lanes, steps)


class TestLaneStartsInterpret(TestLaneStarts):
    INTERPRET = True


class TestStacksAndTiles(KernelTestBase):
    """A stack of layers in one launch, and decoding only some tiles (rows of an embedding, chunks of a head)."""

    @pytest.mark.parametrize("codec", ["bf16-lossless", "int8"])
    def test_stack_in_one_launch(self, codec):
        rng = np.random.default_rng(12)
        layers = [(rng.standard_normal((24, 70)) * 0.02 * (i + 1)).astype(ml_dtypes.bfloat16) for i in range(3)]
        layers[2] = np.cumsum(layers[2].astype(np.float32), axis=1).astype(ml_dtypes.bfloat16)  # other predictors
        layers[1][0, :9] = 0
        encs = [codecs.encode(x, codec, lanes=32, steps=16) for x in layers]
        stacked = tensor.stack_layers([tensor.from_encoded(e) for e in encs])
        want = np.stack([bits_of(codecs.decode(e)) for e in encs])
        out = tensor.decode_many([stacked], interpret=self.INTERPRET)[0]
        assert out.shape == (3, 24 * 70)
        np.testing.assert_array_equal(bits_of(out).reshape(want.shape), want)
        # mixed with a single tensor of the same codec, as materialize_all launches a layer group
        single = tensor.from_encoded(encs[0])
        both = tensor.materialize_all({"a": stacked, "b": single}, backend="pallas", interpret=self.INTERPRET)
        np.testing.assert_array_equal(bits_of(both["a"]), want)
        np.testing.assert_array_equal(bits_of(both["b"]), want[0])

    @pytest.mark.parametrize("codec", ["bf16-lossless", "int8"])
    def test_window_of_a_stack_read_in_place(self, codec):
        """Layers start .. start + window of a stack (start traced, clamped), with a second stack of another
        shape in the same launch, as the model's scan decodes a group of layers."""
        rng = np.random.default_rng(13)
        shapes = [(24, 70), (9, 33)]
        stacks, wants = [], []
        for shape in shapes:
            layers = [(rng.standard_normal(shape) * 0.02 * (i + 1)).astype(ml_dtypes.bfloat16) for i in range(4)]
            layers[3] = np.cumsum(layers[3].astype(np.float32), axis=1).astype(ml_dtypes.bfloat16)
            encs = [codecs.encode(x, codec, lanes=32, steps=16) for x in layers]
            stacks.append(tensor.stack_layers([tensor.from_encoded(e) for e in encs]))
            wants.append(np.stack([bits_of(codecs.decode(e)) for e in encs]))
        window = jax.jit(lambda cts, s: tensor.decode_window(cts, s, 2, backend="pallas", interpret=self.INTERPRET))
        for start, first in [(1, 1), (0, 0), (3, 2), (-5, 0)]:  # past either end: clamped
            outs = window(stacks, jnp.int32(start))
            for out, want, shape in zip(outs, wants, shapes):
                assert out.shape == (2,) + shape
                np.testing.assert_array_equal(bits_of(out), want[first:first + 2])
        ref = tensor.decode_window(stacks, jnp.int32(1), 2, backend="reference")
        for out, want in zip(ref, wants):
            np.testing.assert_array_equal(bits_of(out), want[1:3])
        with pytest.raises(ValueError, match="stacks of >= window=5"):
            tensor.decode_window(stacks, 0, 5, backend="pallas", interpret=self.INTERPRET)

    @pytest.mark.parametrize("codec", ["bf16-lossless", "int8"])
    def test_word_pairs_stack_and_tiles(self, codec):
        rng = np.random.default_rng(11)
        layers = [(rng.standard_normal((24, 70)) * 0.02 * 10.0 ** rng.uniform(-2, 2, (24, 1)))
                  .astype(ml_dtypes.bfloat16) for _ in range(3)]
        encs = [codecs.encode(x, codec, lanes=32, steps=16) for x in layers]
        counts = [e.arrays["words"].size for e in encs]
        assert any(w % 2 for w in counts), counts
        # odd streams as another builder might hand them over (from_encoded's padding word cut off):
        # stack_layers pads every row to an even count
        cts = [tensor.from_encoded(e, to_device=False) for e in encs]
        cts = [tensor.CompressedTensor({**c.arrays, "words": c.arrays["words"][:w]}, c.meta) for c, w in zip(cts, counts)]
        stacked = tensor.stack_layers(cts)
        assert stacked.arrays["words"].shape[-1] % 2 == 0
        want = np.stack([bits_of(codecs.decode(e)).reshape(-1) for e in encs])
        decode_many, opts = ((bf16_lossless.bf16_lossless_decode_many, dict(word_group=2))
                             if codec == "bf16-lossless"
                             else (int8.int8_decode_many, dict(word_group=2)))
        args, meta = tensor.kernel_args(stacked)
        out = decode_many([args], metas=(meta,), **opts, interpret=self.INTERPRET)[0]
        np.testing.assert_array_equal(bits_of(out), want)
        # a subset of the tiles of one tensor, the partial last tile first
        args, meta = tensor.kernel_args(tensor.from_encoded(encs[0]))
        tile, count = 32 * 16, -(-want.shape[1] // (32 * 16))
        ids = jnp.asarray([count - 1, 0, 1], jnp.int32)
        got = bits_of(decode_many([args], metas=(meta,), tiles=[ids], **opts, interpret=self.INTERPRET)[0])
        for r, t in enumerate(np.asarray(ids)):
            part = want[0, t * tile:(t + 1) * tile]
            np.testing.assert_array_equal(got[r * tile:r * tile + part.size], part)
        with pytest.raises(ValueError, match="word_group"):  # an odd stream is refused, not read past its end
            decode_many([(args[0][:-1], *args[1:])], metas=(meta,), **opts, interpret=self.INTERPRET)

    @pytest.mark.parametrize("codec", ["bf16-lossless", "int8"])
    @pytest.mark.parametrize("shape,lanes,steps", [((37, 41), 32, 16), ((40, 64), 16, 8), ((3, 500), 32, 4)])
    def test_tiles_rows_and_embedding_lookup(self, codec, shape, lanes, steps):
        rng = np.random.default_rng(shape[0] + shape[1])
        x = (rng.standard_normal(shape) * 0.02).astype(ml_dtypes.bfloat16)
        x[1] = np.cumsum(x[1].astype(np.float32)).astype(ml_dtypes.bfloat16)
        enc = codecs.encode(x, codec, lanes=lanes, steps=steps)
        ct = tensor.from_encoded(enc)
        want = bits_of(codecs.decode(enc))  # [rows, cols]
        flat = want.reshape(-1)
        tile, count = lanes * steps, ct.meta.tiles
        ids = jnp.asarray([count - 1, 0, count - 1, min(1, count - 1)], jnp.int32)  # the partial last tile too
        for backend in ("pallas", "reference"):
            got = bits_of(tensor.decode_tiles(ct, ids, backend=backend, interpret=self.INTERPRET)).reshape(4, tile)
            for r, t in enumerate(np.asarray(ids)):
                part = flat[t * tile:(t + 1) * tile]
                np.testing.assert_array_equal(got[r, :part.size], part)
            for start, n in [(0, 1), (shape[0] - 1, 1), (1, shape[0] - 1), (shape[0] // 2, 2)]:
                n = min(n, shape[0])
                rows = jax.jit(lambda s: tensor.decode_rows(ct, s, n, backend=backend, interpret=self.INTERPRET))
                np.testing.assert_array_equal(bits_of(rows(jnp.int32(start))), want[start:start + n])
            tokens = jnp.asarray(rng.integers(0, shape[0], (2, 5)), jnp.int32)
            emb = jax.jit(lambda t: tensor.take_rows(ct, t, chunk=3, backend=backend, interpret=self.INTERPRET))
            np.testing.assert_array_equal(bits_of(emb(tokens)), want[np.asarray(tokens)])


class TestStacksAndTilesInterpret(TestStacksAndTiles):
    INTERPRET = True


class TestPairSymbols(KernelTestBase):
    """bfloat16 with one symbol per two values (codecs.encode_pairs): escapes read a second word in a step."""

    def check_pairs(self, x, lanes, steps, run=None, **blocks):
        enc = codecs.encode(x, "bf16-lossless", lanes=lanes, steps=steps, pairs=True, run=run)
        if run is not None:
            assert enc.record.get("run", 1) == run
        want = bits_of(codecs.decode(enc)).reshape(-1)
        np.testing.assert_array_equal(want, bits_of(x).reshape(-1))
        ct = tensor.from_encoded(enc)
        args, meta = tensor.kernel_args(ct)
        assert meta.n == -(-x.size // 2) and meta.pairs and meta.dtype == "bfloat16"
        np.testing.assert_array_equal(bits_of(tensor.decode(ct, backend="reference")).reshape(-1), want)
        out = bf16_lossless.bf16_lossless_decode_many([args], metas=(meta,), **blocks, interpret=self.INTERPRET)[0]
        assert out.dtype == jnp.bfloat16 and out.shape == (2 * meta.n,)
        np.testing.assert_array_equal(bits_of(out)[:x.size], want)
        return enc

    @pytest.mark.parametrize("n,lanes,steps,run,blocks", [
        (1, 32, 8, 1, {}), (3, 32, 8, 1, {}), (1025, 32, 8, 1, {}), (700, 7, 5, 1, {}), (700, 7, 5, 2, {}),
        (1025, 32, 9, 4, {}), (3 * 2 * 24 * 13 + 77, 24, 13, 4, dict(unroll=8, prefetch=8, coarse_bits=0)),
        (2 * 32 * 17 + 9, 32, 17, 8, dict(unroll=8, raw_early=False)),
        (64 * 2 * codecs.PAIR_STEPS + 6, 128, codecs.PAIR_STEPS, None, {})])
    def test_ragged_sizes_edges_and_escapes(self, n, lanes, steps, run, blocks):
        """(run None: the encoder's default, runs of codecs.PAIR_RUN at the default steps.)"""
        rng = np.random.default_rng(n + lanes)
        x = random_float(rng, (n,), "bfloat16")
        edges = special_values("bfloat16")
        x[:min(n, edges.size)] = edges[:min(n, edges.size)]
        x[n // 2:n // 2 + 40] = random_float(rng, (len(x[n // 2:n // 2 + 40]),), "bfloat16", "bits")
        enc = self.check_pairs(x, lanes, steps, run, **blocks)
        if steps == codecs.PAIR_STEPS:
            assert enc.record["run"] == codecs.PAIR_RUN

    @pytest.mark.parametrize("unroll,num_warps,coarse_bits,prefetch,raw_early", [
        (1, 1, 5, 0, False), (4, 2, 0, 16, True), (8, 4, 3, 1, False)])
    def test_block_sizes(self, unroll, num_warps, coarse_bits, prefetch, raw_early):
        rng = np.random.default_rng(unroll)
        self.check_pairs(random_float(rng, (3, 700), "bfloat16"), 24, 16, unroll=unroll, num_warps=num_warps,
                         coarse_bits=coarse_bits, prefetch=prefetch, raw_early=raw_early)

    @pytest.mark.parametrize("kind", ["bits", "equal"])
    def test_incompressible_and_all_equal(self, kind):
        rng = np.random.default_rng(3)
        x = random_float(rng, (1500,), "bfloat16", "bits") if kind == "bits" else np.full(1501, -2.5, ml_dtypes.bfloat16)
        enc = self.check_pairs(x, 32, 16)
        assert (enc.arrays["words"].size == 0) == (kind == "equal")

    def test_with_other_tensors_in_one_launch_and_scan(self):
        """Pairs, one-exponent bfloat16 and float32 tensors in one launch; stacked pair layers in a scan."""
        rng = np.random.default_rng(4)
        xs = [random_float(rng, (33, 71), "bfloat16"), random_float(rng, (500,), "bfloat16"),
              random_float(rng, (97,), "float32")]
        encs = [codecs.encode(xs[0], "bf16-lossless", lanes=32, steps=8, pairs=True),
                codecs.encode(xs[1], "bf16-lossless", lanes=32, steps=16),
                codecs.encode(xs[2], "bf16-lossless", lanes=32, steps=16)]
        outs = tensor.materialize_all([tensor.from_encoded(e) for e in encs], backend="pallas",
                                      interpret=self.INTERPRET)
        for out, x in zip(outs, xs):
            np.testing.assert_array_equal(bits_of(out), bits_of(x))
        layers = [random_float(rng, (24, 69), "bfloat16") * (i + 1) for i in range(3)]
        stacked = tensor.stack_layers([tensor.from_encoded(codecs.encode(x, "bf16-lossless", lanes=32, steps=8,
                                                                         pairs=True)) for x in layers])

        @jax.jit
        def run(st, start):
            ys = lax.scan(lambda c, ct: (c, tensor.decode(ct, backend="pallas", interpret=self.INTERPRET)), 0, st)[1]
            return ys, tensor.decode_window([st], start, 2, backend="pallas", interpret=self.INTERPRET)[0]

        ys, window = run(stacked, jnp.int32(1))
        np.testing.assert_array_equal(bits_of(ys), bits_of(np.stack(layers)))
        np.testing.assert_array_equal(bits_of(window), bits_of(np.stack(layers[1:])))

    @pytest.mark.parametrize("shape,lanes,steps", [((37, 41), 32, 8), ((3, 500), 32, 4)])
    def test_tiles_rows_and_embedding_lookup(self, shape, lanes, steps):
        rng = np.random.default_rng(shape[0])
        x = random_float(rng, shape, "bfloat16")
        ct = tensor.from_encoded(codecs.encode(x, "bf16-lossless", lanes=lanes, steps=steps, pairs=True))
        tile, count = 2 * lanes * steps, ct.meta.tiles
        assert ct.meta.tile == tile
        flat = bits_of(x).reshape(-1)
        ids = jnp.asarray([count - 1, 0, min(1, count - 1)], jnp.int32)
        for backend in ("pallas", "reference"):
            got = bits_of(tensor.decode_tiles(ct, ids, backend=backend, interpret=self.INTERPRET)).reshape(3, tile)
            for r, t in enumerate(np.asarray(ids)):
                part = flat[t * tile:(t + 1) * tile]
                np.testing.assert_array_equal(got[r, :part.size], part)
            rows = jax.jit(lambda s: tensor.decode_rows(ct, s, 2, backend=backend, interpret=self.INTERPRET))
            np.testing.assert_array_equal(bits_of(rows(jnp.int32(shape[0] - 2))), bits_of(x[-2:]))
            tokens = jnp.asarray(rng.integers(0, shape[0], (2, 3)), jnp.int32)
            emb = jax.jit(lambda t: tensor.take_rows(ct, t, chunk=2, backend=backend, interpret=self.INTERPRET))
            np.testing.assert_array_equal(bits_of(emb(tokens)), bits_of(x[np.asarray(tokens)]))

    def test_refused_options(self):
        x = random_float(np.random.default_rng(5), (300,), "bfloat16")
        ct = tensor.from_encoded(codecs.encode(x, "bf16-lossless", lanes=32, steps=8, pairs=True))
        args, meta = tensor.kernel_args(ct)
        with pytest.raises(ValueError, match="word_group=2 must be 1 for pair symbols"):
            bf16_lossless.bf16_lossless_decode_many([args], metas=(meta,), word_group=2, interpret=self.INTERPRET)
        with pytest.raises(ValueError, match="raw=uint8"):
            bf16_lossless.bf16_lossless_decode_many([(*args[:4], args[4].view(jnp.uint8), args[5])], metas=(meta,),
                                                    interpret=self.INTERPRET)


class TestPairSymbolsInterpret(TestPairSymbols):
    INTERPRET = True


class TestCoarseTable:
    def test_coarse_lookup_equals_full_table(self):
        rng = np.random.default_rng(11)
        slot = np.arange(4096, dtype=np.uint32)
        for _ in range(20):
            counts = np.zeros(256, np.int64)
            k = int(rng.integers(1, 200))
            counts[rng.choice(256, k, replace=False)] = rng.integers(1, 10 ** int(rng.integers(1, 6)), k)
            table = rans.packed_slot_table(rans.normalize_freqs(counts))
            for bits_ in (1, 5, 8):
                coarse = rm.coarse_table(table, np, bits_)
                np.testing.assert_array_equal(np.asarray(rm.coarse_table(jnp.asarray(table), jnp, bits_)), coarse)
                # what lanes.lookup's masked load gives: the full table's entry where MIXED, else the coarse one
                got = np.where(coarse[slot >> bits_] == rm.MIXED, table, coarse[slot >> bits_])
                np.testing.assert_array_equal(got, table)


class TestErrors(KernelTestBase):
    def test_bad_arguments(self):
        x = random_float(np.random.default_rng(8), (100,), "bfloat16")
        args, kw = device_args(tensor.from_encoded(codecs.encode(x, "bf16-lossless", lanes=32, steps=16)))
        with pytest.raises(ValueError, match="starts"):
            bf16_lossless.bf16_lossless_decode(args[0], args[1].astype(jnp.int32), *args[2:], **kw,
                                               interpret=self.INTERPRET)
        with pytest.raises(ValueError, match="bases"):
            bf16_lossless.bf16_lossless_decode(args[0], args[1], args[2][:-1], *args[3:], **kw,
                                               interpret=self.INTERPRET)
        with pytest.raises(ValueError, match="dtype"):
            bf16_lossless.bf16_lossless_decode(*args, **{**kw, "dtype": "int8"}, interpret=self.INTERPRET)
        with pytest.raises(ValueError, match="states"):
            bf16_lossless.bf16_lossless_reference(*args[:3], args[3][:-1], *args[4:], **kw)
        with pytest.raises(ValueError, match="word_group"):
            bf16_lossless.bf16_lossless_decode(*args, **kw, word_group=4, interpret=self.INTERPRET)
        x8 = codecs.encode(random_float(np.random.default_rng(8), (10, 10), "bfloat16"), "int8", lanes=32, steps=16)
        args8, kw8 = device_args(tensor.from_encoded(x8))
        with pytest.raises(ValueError, match="word_group"):
            int8.int8_decode(args8[0][:-1], *args8[1:], **kw8, word_group=2, interpret=self.INTERPRET)


class TestErrorsInterpret(TestErrors):
    INTERPRET = True


class TestSymbolLayout(KernelTestBase):
    """The lookup by symbol (``coarse_bits=rans_math.BY_SYMBOL``): the symbol tables after the slot table
    (int8's device tables hold them; the float kernels build them when asked) decode the same bits."""

    def test_symbol_lookup_equals_packed_table(self):
        rng = np.random.default_rng(12)
        slot = np.arange(4096, dtype=np.uint32)
        for k in [1, 2, 255, 256] + [int(rng.integers(1, 256)) for _ in range(16)]:
            counts = np.zeros(256, np.int64)
            counts[rng.choice(256, k, replace=False)] = rng.integers(1, 10 ** int(rng.integers(1, 6)), k)
            table = rans.packed_slot_table(rans.normalize_freqs(counts))
            sym = rm.symbol_table(table, np)
            assert sym.shape == (rm.SYMBOL_TABLE,) and sym.dtype == np.uint32
            np.testing.assert_array_equal(np.asarray(rm.symbol_table(jnp.asarray(table))), sym)
            device = rm.with_symbol_table(np.concatenate([table, rm.coarse_table(table, np)])[None], xp=np)[0]
            assert device.shape == (rm.device_table_size(by_symbol=True),)
            info, s = rm.symbol_lookup(jnp.asarray(device), jnp.asarray(slot))
            np.testing.assert_array_equal(np.asarray(info | (s << 12)), table)

    @pytest.mark.parametrize("dtype", FLOATS)
    def test_float(self, dtype):
        rng = np.random.default_rng(7)
        x = random_float(rng, (1000,), dtype)
        x[:special_values(dtype).size] = special_values(dtype)
        x[500:540] = random_float(rng, (40,), dtype, "bits")
        enc = codecs.encode(x, "bf16-lossless", lanes=32, steps=9)
        args, kw = device_args(tensor.from_encoded(enc))
        given = (*args[:5], jnp.asarray(rm.with_symbol_table(np.asarray(args[5]), xp=np)))
        for arrays, blocks in ((args, dict(unroll=4)), (given, dict(unroll=3, prefetch=8, raw_early=True))):
            out = bf16_lossless.bf16_lossless_decode(*arrays, **kw, coarse_bits=rm.BY_SYMBOL, **blocks,
                                                     interpret=self.INTERPRET)
            np.testing.assert_array_equal(bits_of(out), bits_of(x))

    def test_pairs_stack_and_window(self):
        rng = np.random.default_rng(8)
        layers = [random_float(rng, (701,), "bfloat16") * (i + 1) for i in range(3)]
        layers[1][100:140] = random_float(rng, (40,), "bfloat16", "bits")  # escapes
        st = tensor.stack_layers([tensor.from_encoded(codecs.encode(x, "bf16-lossless", lanes=32, steps=8, pairs=True))
                                  for x in layers])
        args, meta = tensor.kernel_args(st)
        for kw in (dict(), dict(window=2, start=jnp.int32(1))):
            out = bf16_lossless.bf16_lossless_decode_many([args], metas=(meta,), coarse_bits=rm.BY_SYMBOL, **kw,
                                                          interpret=self.INTERPRET)[0]
            want = np.stack(layers[1:] if kw else layers)
            np.testing.assert_array_equal(bits_of(out)[:, :701], bits_of(want))

    def test_int8_every_predictor_every_lookup(self):
        x = three_predictors()
        args, _ = device_args(tensor.from_encoded(codecs.encode(x, "int8", lanes=32, steps=16)))
        assert args[4].shape == (rm.device_table_size(by_symbol=True),)  # int8's device table holds them
        for coarse_bits in (rm.BY_SYMBOL, 0, 5):
            for blocks in (dict(unroll=4), dict(unroll=16, prefetch=8)):
                self.check_int8(x, 32, 16, coarse_bits=coarse_bits, **blocks)


class TestSymbolLayoutInterpret(TestSymbolLayout):
    INTERPRET = True
