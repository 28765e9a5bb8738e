"""Fused ``bf16-lossless`` decoder: rANS-coded exponent bytes + raw sign/mantissa -> float bits.

Layout read (the device arrays of ``jcodec.tensor.from_encoded``; T tiles of L lanes x S steps):
  words    uint16[W]     every lane's 16-bit renormalisation words, lane by lane, each lane's in read order
  offsets  uint32[T*L]   where lane ``t*L + l`` starts reading in ``words``
  states   uint32[T*L]   each lane's start state
  raw      uint8[n*rb]   the raw bytes of value i at ``i*rb .. i*rb+rb-1`` (rb = 1, or 3 for float32)
  table    uint32[4096 + 128]  packed slot table ``symbol | (freq - 1) << 8 | bias << 20``, then the coarse
                         table of :func:`rans_common.coarse_table` (computed here when only 4096 are given)
Value ``i`` of the tensor lies in tile ``i // (L*S)``, at step ``(i % (L*S)) // L`` of lane ``i % L``.

The kernel gives every program ``block_lanes`` consecutive lanes (of one or several tiles; the lanes are
independent), one lane per vector element. Each step it looks up every lane's slot (coarse table first,
the full table only for lanes in buckets that hold a symbol boundary), updates the states, renormalises
from a word loaded at the previous step (a lane reads at most one word per step), and writes one value per
lane: the exponent joined with its raw bits, which were read ``unroll`` steps ahead. No intermediate array
is written: compressed bytes in, output bits out (plus, only with the optional word prefetch, a 4-byte sink
per lane, see ``lanes_step``). Positions past the end of the tensor in the last tile are not coded; the
kernel decodes them anyway (they end each lane's sequence, so nothing before them changes) and does not
write them. ``rans_float_decode_many`` decodes several tensors (a layer) in one launch.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import rans_common as rc


def rans_float_kernel(
    words_ref,    # [W] uint16, whole array
    offsets_ref,  # [T*L] uint32, whole array
    states_ref,   # [T*L] uint32, whole array
    raw_ref,      # [n*rb] uint8, whole array
    table_ref,    # [4096 + 4096 >> coarse_bits] uint32, whole array
    out_ref,      # [n] uint16 | uint32 (the float bits), whole array; this program writes its lanes' values
    sink_ref,     # [programs * block_lanes] uint32: what the prefetching loads read (never used); None
                  # without prefetch
    *, program, n: int, lanes: int, steps: int, dtype: str, block_lanes: int, unroll: int, coarse_bits: int,
    prefetch: int,
):
    """Decode lanes ``program * block_lanes ...`` (+ block_lanes) of one tensor."""
    total_lanes = states_ref.shape[0]
    f = program * block_lanes + jnp.arange(block_lanes, dtype=jnp.int32)  # [B] flat lane ids
    live = f < total_lanes
    # Lanes past the end read lane 0 (masked writes need no valid address, but interpret mode's masked
    # scatter must not see two lanes at one address) and write past n, where nothing is written.
    lane_state = lanes_init(words_ref, offsets_ref, states_ref, jnp.where(live, f, 0), prefetch)
    first = (f // lanes) * (lanes * steps) + f % lanes  # [B] index of each lane's value at step 0
    rb = rc.RAW_BYTES[dtype]

    def read_raw(k):  # [B] uint32 raw bits of step k (masked past the end)
        i = first + k * lanes
        ok = live & (i < n) & (k < steps)
        if rb == 1:
            return plgpu.load(raw_ref.at[i], mask=ok, other=0).astype(jnp.uint32)
        b = [plgpu.load(raw_ref.at[3 * i + c], mask=ok, other=0).astype(jnp.uint32) for c in range(3)]
        return b[0] | (b[1] << 8) | (b[2] << 16)

    def block(b, carry):  # `unroll` steps; raw bytes are loaded `unroll` steps before they are used
        lane_state, raws, touched = carry
        next_raws, next_touched = [], []
        for u in range(unroll):
            k = b * unroll + u
            sym, lane_state, t = lanes_step(words_ref, table_ref, lane_state, touched[u], coarse_bits, prefetch)
            i = first + k * lanes
            bits = rc.join_float(sym, raws[u], dtype).astype(out_ref.dtype)
            plgpu.store(out_ref.at[i], bits, mask=live & (i < n))
            next_raws.append(read_raw(k + unroll))
            next_touched.append(t)
        return lane_state, tuple(next_raws), tuple(next_touched)

    raws = tuple(read_raw(u) for u in range(unroll))
    touched = (jnp.zeros((block_lanes,), jnp.uint32),) * unroll
    lane_state, _, touched = lax.fori_loop(0, steps // unroll, block, (lane_state, raws, touched))
    if prefetch:
        plgpu.store(sink_ref.at[f], lanes_sink(lane_state, touched), mask=live)


# Word prefetch. A lane reads its words one at a time, ~0.16 (exponents) to ~0.4 (int8 residuals) per step,
# so it enters a new 32-byte sector every 40-100 steps, and the first read of a sector comes from DRAM: the
# warp then waits in the middle of its dependency chain, and with 32 lanes a warp this happens every few
# steps. So when a lane enters a sector it also loads the word `prefetch` words ahead (into L1); that value
# is first used `unroll` steps later, folded into a sink that is stored at the end (a load whose value is
# unused would be removed by the compiler, and Pallas has no prefetch instruction).
SECTOR_WORDS = 16


def check_launch(tensors, metas, unroll: int, num_warps: int, prefetch: int) -> None:
    """The arguments every multi-tensor launch (float and int8) shares, checked before it is built."""
    if len(tensors) != len(metas) or not metas:
        raise ValueError(f"{len(tensors)=} must equal {len(metas)=} and be >= 1")
    if unroll < 1 or num_warps < 1:
        raise ValueError(f"{unroll=} and {num_warps=} must be >= 1")
    if prefetch < 0 or prefetch % SECTOR_WORDS:
        raise ValueError(f"{prefetch=} must be a multiple of {SECTOR_WORDS} (0: none)")


def lanes_init(words_ref, offsets_ref, states_ref, lane, prefetch: int):
    """Start of lanes ``lane`` ([B] int32): (x, ptr, next word, sink); touches the sectors ahead."""
    last_word = words_ref.shape[0] - 1
    x = states_ref[lane]
    ptr = offsets_ref[lane].astype(jnp.int32)
    word = words_ref[jnp.minimum(ptr, last_word)].astype(jnp.uint32)
    sink = jnp.zeros_like(x)
    for d in range(SECTOR_WORDS, prefetch + 1, SECTOR_WORDS):
        sink = sink ^ words_ref[jnp.minimum(ptr + d, last_word)].astype(jnp.uint32)
    return x, ptr, word, sink


def lanes_step(words_ref, table_ref, lane_state, touched, coarse_bits: int, prefetch: int):
    """One decode step of every lane: (symbol uint32, new lane state, this step's prefetch value).

    ``touched``: the prefetch value of ``unroll`` steps ago; folding it into the sink is its first use.
    """
    x, ptr, word, sink = lane_state
    last_word = words_ref.shape[0] - 1
    sym, x = rc.rans_step(x, lookup(table_ref, x, coarse_bits))
    x, need = rc.renormalise(x, word)
    ptr = ptr + need.astype(jnp.int32)
    # the word the lane needs next (at most one a step), loaded a step before it can be needed
    word = plgpu.load(words_ref.at[jnp.minimum(ptr, last_word)], mask=need,
                      other=word.astype(jnp.uint16)).astype(jnp.uint32)
    t = touched
    if prefetch:
        sink = sink ^ touched
        enter = need & ((ptr & (SECTOR_WORDS - 1)) == 0)
        t = plgpu.load(words_ref.at[jnp.minimum(ptr + prefetch, last_word)], mask=enter,
                       other=0).astype(jnp.uint32)
    return sym, (x, ptr, word, sink), t


def lanes_sink(lane_state, touched):
    sink = lane_state[3]
    for t in touched:
        sink = sink ^ t
    return sink


def lookup(table_ref, x, coarse_bits: int):
    """Packed table entries of the lanes' slots ``x & 4095``: from the coarse table where the bucket holds one
    symbol, else (a masked gather, so only those lanes touch the 16 KiB table) from the full table."""
    slot = x & rc.SLOT_MASK
    if not coarse_bits:
        return table_ref[slot.astype(jnp.int32)]
    coarse = table_ref[(slot >> coarse_bits).astype(jnp.int32) + rc.TABLE_SIZE]
    fine = plgpu.load(table_ref.at[slot.astype(jnp.int32)], mask=coarse == jnp.uint32(rc.MIXED), other=0)
    return rc.resolve_entry(slot, coarse, fine)


def kernel_table(table, coarse_bits: int):
    """The table the kernels read: the 4096 slot entries, then the coarse table for ``coarse_bits``."""
    if not coarse_bits:
        return table[:rc.TABLE_SIZE]
    if coarse_bits == rc.COARSE_BITS and table.shape[0] == rc.TABLE_SIZE + rc.COARSE_SIZE:
        return table
    if not 1 <= coarse_bits <= 11:
        raise ValueError(f"{coarse_bits=} must be in [0, 11]")
    fine = table[:rc.TABLE_SIZE]
    return jnp.concatenate([fine, rc.coarse_table(fine, jnp, coarse_bits)])


def _many_kernel(*refs, metas, starts, block_lanes, unroll, coarse_bits, prefetch):
    """Several tensors in one launch: programs ``starts[k] .. starts[k+1]`` decode tensor ``k``."""
    k_count = len(metas)
    ins, outs, sinks = refs[:5 * k_count], refs[5 * k_count:6 * k_count], refs[6 * k_count:]
    sinks = sinks or (None,) * k_count
    pid = pl.program_id(0)

    def branch(k):
        def run():
            n, lanes, steps, dtype = metas[k]
            rans_float_kernel(*ins[5 * k:5 * k + 5], outs[k], sinks[k], program=pid - starts[k], n=n,
                              lanes=lanes, steps=steps, dtype=dtype, block_lanes=block_lanes,
                              unroll=math.gcd(unroll, steps), coarse_bits=coarse_bits, prefetch=prefetch)
        return run

    rc.run_segment(pid, starts, branch)


def _check(words, offsets, states, raw, table, n, lanes, steps, dtype):
    if dtype not in rc.RAW_BYTES:
        raise ValueError(f"{dtype=} must be one of {', '.join(rc.RAW_BYTES)}")
    if not (1 <= lanes and 1 <= steps < 1 << 16):
        raise ValueError(f"{lanes=} must be >= 1 and {steps=} must be in [1, 65536)")
    t = max(1, -(-n // (lanes * steps)))
    if n < 1 or n * rc.RAW_BYTES[dtype] > rc.INT32_MAX or t * lanes * steps > rc.INT32_MAX:
        raise ValueError(f"{n=} must be >= 1 and its padded tiles and raw bytes must have < 2^31 elements")
    for name, a, dt, size in [("offsets", offsets, jnp.uint32, t * lanes), ("states", states, jnp.uint32, t * lanes),
                              ("raw", raw, jnp.uint8, n * rc.RAW_BYTES[dtype])]:
        if a.dtype != dt or a.shape != (size,):
            raise ValueError(f"{name}={a.dtype}{list(a.shape)} must be {jnp.dtype(dt).name}[{size}]")
    check_table(table)
    if words.dtype != jnp.uint16 or words.ndim != 1 or not 1 <= words.shape[0] <= rc.INT32_MAX:
        raise ValueError(f"words={words.dtype}{list(words.shape)} must be uint16[W] with 1 <= W < 2^31")


def check_table(table):
    sizes = (rc.TABLE_SIZE, rc.TABLE_SIZE + rc.COARSE_SIZE)
    if table.dtype != jnp.uint32 or table.ndim != 1 or table.shape[0] not in sizes:
        raise ValueError(f"table={table.dtype}{list(table.shape)} must be uint32[{sizes[0]}] or uint32[{sizes[1]}]")


@functools.partial(jax.jit, static_argnames=["metas", "block_lanes", "unroll", "num_warps", "coarse_bits",
                                             "prefetch", "interpret"])
def rans_float_decode_many(tensors, *, metas, block_lanes: int = 128, unroll: int = 4, num_warps: int = 4,
                           coarse_bits: int = rc.COARSE_BITS, prefetch: int = 0,
                           interpret: bool = False) -> list[jax.Array]:
    """Decode several ``bf16-lossless`` tensors in ONE kernel launch (e.g. all weights of a layer).

    ``tensors``: a sequence of ``(words, offsets, states, raw, table)``; ``metas``: a tuple of
    ``(n, lanes, steps, dtype)`` per tensor. Returns the flat decoded tensors. Block sizes as in
    :func:`rans_float_decode`; every tensor adds a copy of the step loop to the kernel, so ``unroll``
    defaults to 4 here (a Llama layer's 7 tensors compile in ~12 s at 4, ~40-90 s at 8, at equal speed).
    """
    check_launch(tensors, metas, unroll, num_warps, prefetch)
    if block_lanes < 1 or block_lanes & (block_lanes - 1):
        raise ValueError(f"{block_lanes=} must be a power of two")
    starts = [0]
    for arrays, (n, lanes, steps, dtype) in zip(tensors, metas):
        _check(*arrays, n, lanes, steps, dtype)
        starts.append(starts[-1] + pl.cdiv(arrays[2].shape[0], block_lanes))
    rc.filter_triton_deprecation()
    kernel = functools.partial(_many_kernel, metas=tuple(metas), starts=tuple(starts), block_lanes=block_lanes,
                               unroll=unroll, coarse_bits=coarse_bits, prefetch=prefetch)
    tensors = [(*a[:4], kernel_table(a[4], coarse_bits)) for a in tensors]
    outs = pl.pallas_call(
        kernel,
        out_shape=([jax.ShapeDtypeStruct((n,), rc.BITS_DTYPE[dtype]) for n, _, _, dtype in metas]
                   + [jax.ShapeDtypeStruct(((b - a) * block_lanes,), jnp.uint32)
                      for a, b in zip(starts, starts[1:]) if prefetch]),
        grid=(starts[-1],),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"rans_float_b{block_lanes}_u{unroll}_w{num_warps}_c{coarse_bits}_p{prefetch}",
    )(*[a for arrays in tensors for a in arrays])
    return [lax.bitcast_convert_type(b, jnp.dtype(m[3])) for b, m in zip(outs[:len(metas)], metas)]


def rans_float_decode(words, offsets, states, raw, table, *, n: int, lanes: int, steps: int, dtype: str,
                      block_lanes: int = 128, unroll: int = 8, num_warps: int = 4,
                      coarse_bits: int = rc.COARSE_BITS, prefetch: int = 0, interpret: bool = False) -> jax.Array:
    """Decode a ``bf16-lossless`` tensor to ``dtype[n]`` (flat) with the Pallas kernel; bit-exact.

    ``block_lanes`` lanes per program (a power of two), ``unroll`` steps per loop iteration (also how far
    ahead raw bytes are read; reduced to a divisor of ``steps``), ``num_warps`` warps per program,
    ``coarse_bits``: log2 of the slots per coarse-table bucket (0: one gather from the full table),
    ``prefetch``: how many words ahead a lane touches when it enters a new 32-byte sector (0: never).
    """
    return rans_float_decode_many([(words, offsets, states, raw, table)], metas=((n, lanes, steps, dtype),),
                                  block_lanes=block_lanes, unroll=unroll, num_warps=num_warps,
                                  coarse_bits=coarse_bits, prefetch=prefetch, interpret=interpret)[0]


# ----------------------------------------------------------------------------------------- reference
def rans_symbols_reference(words, offsets, states, table, *, n: int, lanes: int, steps: int) -> jax.Array:
    """All lanes' decoded symbols (uint32[n], symbol order) in pure jnp: a fori_loop over the steps,
    every lane at once; the exact inverse of ``jcodec.rans.encode``."""
    last_word = words.shape[0] - 1
    total_lanes = states.shape[0]
    table = table[:rc.TABLE_SIZE]

    def step(k, carry):
        x, ptr, out = carry
        sym, x = rc.rans_step(x, table[x & rc.SLOT_MASK])
        word = words[jnp.minimum(ptr, last_word)].astype(jnp.uint32)
        x, need = rc.renormalise(x, word)
        return x, ptr + need.astype(ptr.dtype), out.at[k].set(sym.astype(jnp.uint8))

    out = jnp.zeros((steps, total_lanes), jnp.uint8)
    _, _, out = lax.fori_loop(0, steps, step, (states, offsets, out))
    tiles = total_lanes // lanes
    # [steps, tiles*lanes] -> [tiles, steps, lanes] -> symbol order
    return out.reshape(steps, tiles, lanes).transpose(1, 0, 2).reshape(-1)[:n].astype(jnp.uint32)


@functools.partial(jax.jit, static_argnames=["n", "lanes", "steps", "dtype"])
def rans_float_reference(words, offsets, states, raw, table, *, n: int, lanes: int, steps: int,
                         dtype: str) -> jax.Array:
    """Pure-JAX ``bf16-lossless`` decoder (any backend); bit-exact with the kernel and with NumPy."""
    _check(words, offsets, states, raw, table, n, lanes, steps, dtype)
    sym = rans_symbols_reference(words, offsets, states, table, n=n, lanes=lanes, steps=steps)
    if rc.RAW_BYTES[dtype] == 1:
        r = raw.astype(jnp.uint32)
    else:
        r3 = raw.reshape(n, 3).astype(jnp.uint32)
        r = r3[:, 0] | (r3[:, 1] << 8) | (r3[:, 2] << 16)
    bits = rc.join_float(sym, r, dtype).astype(rc.BITS_DTYPE[dtype])
    return lax.bitcast_convert_type(bits, jnp.dtype(dtype))
