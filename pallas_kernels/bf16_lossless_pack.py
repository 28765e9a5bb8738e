"""A *pack*: many ``bf16-lossless`` tensors of one geometry decoded in ONE launch with ONE step loop.

Why: loading a ``decoded`` checkpoint compiles a kernel per distinct tensor shape (each ~0.3 s of Triton
compile, serialised), and ``bf16_lossless_decode_many`` compiles one step loop per tensor. Here the geometry
that differs between tensors is data (``info``), so one small kernel decodes a whole model.

Layout read (built on the host by ``jcodec.tensor.pack_float``; T tiles of L lanes x S steps in all):
  words   uint16[W]     every tensor's word streams, concatenated
  offsets uint32[T*L]   where each lane starts reading in ``words`` (already offset to its tensor's streams)
  states  uint32[T*L]   each lane's start state
  raw     uint8[N*rb]   the stored raw bytes of every tensor, concatenated (N values in all; a full tile's lanes
                        carry their last ``carry`` values in their end states: ``jcodec.codecs.split_carry``);
                        pair symbols (``pairs``: read "pair" for "value" throughout): uint16[N]
  tables  uint32[K, 4096 (+ 128)]  one packed slot table per tensor (a stack: one per layer); pair symbols:
                        then the pair table, 256 entries
  info    int32[T, 5]   per tile: output index, first value's offset in that output, its first stored raw
                        value's offset in ``raw`` (in values), values in the tile, table index
Outputs: one flat array per output index, of the sizes given; tile values go to consecutive positions. Every
tensor of a pack has one ``run`` (``jcodec.rans.lane_positions``), as it has one geometry.
One program decodes ``block_lanes`` consecutive lanes; its stores go to the output of each lane's tile
(one masked store per output: only one of them is live for a lane).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import launch
from . import rans_math as rm
from .lanes import (SECTOR_WORDS, STREAM, check_table, decode_lane_runs, decode_lane_steps, kernel_table, lanes_init,
                    load_raw, run_unroll, steps_with_values)

INFO = 5  # int32 fields per tile in ``info``
OUT, OUT_AT, RAW_AT, COUNT, TABLE = range(INFO)


def bf16_lossless_pack_kernel(
    words_ref,    # [W] uint16, whole array
    offsets_ref,  # [T*L] uint32, whole array
    states_ref,   # [T*L] uint32, whole array
    raw_ref,      # [N*rb] uint8 | [N] uint16 (pairs), whole array
    table_ref,    # [K * width] uint32, whole array (kernel_table's: slot, coarse or symbol, pair tables)
    info_ref,     # [T*5] int32, whole array
    *out_refs,    # per output: [size] uint16 | uint32 (the float bits); then, with prefetch, the sink:
                  # [programs * block_lanes] uint32, what the prefetching loads read (never used)
    lanes: int, steps: int, dtype: str, block_lanes: int, unroll: int, coarse_bits: int, carry: int, width: int,
    raw_early: bool = False, prefetch: int = 0, run: int = 1, pairs: bool = False,
):
    """Decode lanes ``program * block_lanes ...`` of the pack (of any of its tensors). ``raw_early`` and
    ``prefetch`` as in :func:`.bf16_lossless.bf16_lossless_decode`."""
    if prefetch:
        *out_refs, sink_ref = out_refs
    tiles = states_ref.shape[0] // lanes
    v = pl.program_id(0) * block_lanes + jnp.arange(block_lanes, dtype=jnp.int32)  # [B] lane of the pack
    live = v < tiles * lanes
    t = jnp.where(live, v // lanes, 0)
    l = jnp.where(live, v % lanes, 0)
    out_index, out_at, raw_at, count, table = (info_ref[t * INFO + f] for f in range(INFO))
    lane_state = lanes_init(words_ref, offsets_ref[t * lanes + l].astype(jnp.int32), states_ref[t * lanes + l], 0,
                            prefetch)
    table_base = table * width  # (width: each table's entries, kernel_table)
    pair_base = table_base + width - rm.PAIR_TABLE if pairs else None  # the pair table ends each table
    rb = rm.raw_bytes(dtype, pairs)

    full = count == lanes * steps  # a full tile's lanes carry their last `carry` values' raw bytes

    def read_raw(k, ok):  # [B] uint32 raw bits of step k (masked past each tile's values, and where carried)
        return load_raw(raw_ref, raw_at + l + k * lanes, ok, rb)

    # when a program's lanes lie in one tile (block_lanes divides lanes) they share one output: a branch on the
    # program's output index (uniform, so the warp takes one path) picks the one store, where otherwise every
    # output gets a masked store and its address arithmetic, every step
    one_out = len(out_refs) > 1 and lanes % block_lanes == 0
    program_out = info_ref[(pl.program_id(0) * block_lanes // lanes) * INFO + OUT] if one_out else None

    def store(pos, bits, ok, spare):
        """``bits`` to the lanes' outputs at ``pos`` in their tiles ([B], or [B, G] for runs); ``spare``: distinct
        offsets past the end for the lanes that do not write (interpret mode's masked scatter must not see two
        lanes at one address)."""
        lane = (lambda a: a[:, None]) if pos.ndim == 2 else (lambda a: a)
        for j, out_ref in enumerate(out_refs):
            if one_out:
                @pl.when(program_out == j)
                def _(out_ref=out_ref):
                    plgpu.store(out_ref.at[jnp.where(ok, lane(out_at) + pos, out_ref.shape[0] + spare)],
                                bits.astype(out_ref.dtype), mask=ok, **STREAM)
                continue
            mine = ok & (lane(out_index) == j)
            plgpu.store(out_ref.at[jnp.where(mine, lane(out_at) + pos, out_ref.shape[0] + spare)],
                        bits.astype(out_ref.dtype), mask=mine, **STREAM)

    def write(k, sym, raw, ok):
        store(l + k * lanes, rm.join_float(sym, raw, dtype, pairs), ok, v)

    if run > 1:  # runs (bf16_lossless_kernel does the same for one tensor's tiles)
        col = jnp.arange(run, dtype=jnp.int32)[None, :]
        at = (l * run)[:, None] + col  # [B, G] a lane's run 0 in its tile
        limit = jnp.minimum(count, (steps - carry) * lanes)[:, None]  # the tile's values in runs

        def run_ok(g):  # (a bound less g's values: 32-bit, see bf16_lossless_kernel)
            return (at < limit - g * (lanes * run)) & live[:, None]

        def read_run(g):
            return load_raw(raw_ref, raw_at[:, None] + g * (lanes * run) + at, run_ok(g), rb)

        def write_run(g, sym, raw):
            store(g * (lanes * run) + at, rm.join_float(sym, raw, dtype, pairs), run_ok(g), (v * run)[:, None] + col)

        def write_tail(i, sym, x_end):  # a full tile's raw bits from the end state, a partial tile's from `raw`
            k = steps - carry + i
            ok = live & (k * lanes + l < count)
            write(k, sym, jnp.where(full, rm.carried_raw(x_end, i, rb), read_raw(k, ok & ~full)), ok)

        lane_state = decode_lane_runs(words_ref, table_ref, lane_state, read_run, write_run, write_tail, run=run,
                                      steps=steps, unroll=unroll, carry=carry, coarse_bits=coarse_bits,
                                      table_base=table_base, pair_base=pair_base, prefetch=prefetch)
    else:
        # [B] the steps a lane writes in the loop, with raw bytes from `raw` (a full tile's carried ones after it)
        in_loop = jnp.where(full, steps - carry, steps_with_values(count - l, lanes, steps))
        lane_state = decode_lane_steps(words_ref, table_ref, lane_state, live, in_loop, full,
                                       read_raw, write, steps=steps, unroll=unroll, carry=carry, rb=rb,
                                       coarse_bits=coarse_bits, table_base=table_base, pair_base=pair_base,
                                       prefetch=prefetch, raw_early=raw_early)
    if prefetch:
        plgpu.store(sink_ref.at[v], lane_state.sink)  # (v: the program's lanes, as the sink is laid out)


def check_pack(words, offsets, states, raw, tables, info, sizes, lanes: int, steps: int, dtype: str,
               carry: int, run: int = 1, pairs: bool = False) -> None:
    if dtype not in rm.RAW_BYTES or (pairs and dtype != "bfloat16"):
        raise ValueError(f"{dtype=} must be one of {', '.join(rm.RAW_BYTES)}"
                         + (" (pair symbols: bfloat16)" if pairs else ""))
    if not (1 <= lanes and 1 <= steps < 1 << 16 and 0 <= carry < steps) or not sizes or min(sizes) < 1:
        raise ValueError(f"{lanes=} must be >= 1, {steps=} in [1, 65536), {carry=} in [0, steps) and "
                         f"sizes={sizes!r} >= 1 each")
    rm.check_run(run, steps, carry)
    if states.ndim != 1 or states.size % lanes or not states.size:
        raise ValueError(f"states={states.dtype}{list(states.shape)} must be uint32[T*{lanes}], T >= 1")
    t = states.size // lanes
    for name, a, dt, shape in [("offsets", offsets, jnp.uint32, (t * lanes,)),
                               ("states", states, jnp.uint32, (t * lanes,)), ("info", info, jnp.int32, (t, INFO))]:
        if a.dtype != dt or a.shape != shape:
            raise ValueError(f"{name}={a.dtype}{list(a.shape)} must be {jnp.dtype(dt).name}{list(shape)}")
    if words.dtype != jnp.uint16 or words.ndim != 1 or not 1 <= words.size <= rm.INT32_MAX:
        raise ValueError(f"words={words.dtype}{list(words.shape)} must be uint16[W], 1 <= W < 2^31")
    raw_dtype, per = rm.raw_layout(dtype, pairs)  # (pair symbols: one uint16 per pair)
    if raw.dtype != raw_dtype or raw.ndim != 1 or raw.size % per or raw.size > rm.INT32_MAX:
        raise ValueError(f"raw={raw.dtype}{list(raw.shape)} must be {jnp.dtype(raw_dtype).name}[N*{per}] "
                         f"< 2^31 elements")
    if tables.ndim != 2:
        raise ValueError(f"tables={tables.dtype}{list(tables.shape)} must be uint32[K, N] (lanes.check_table)")
    check_table(tables, tables.shape[:1], pairs)
    if max(sizes) > rm.INT32_MAX or t * lanes * steps > rm.INT32_MAX:
        raise ValueError(f"sizes={sizes!r} and the pack's {t} tiles must stay below 2^31 values")


@functools.partial(jax.jit, static_argnames=["sizes", "lanes", "steps", "dtype", "carry", "run", "pairs",
                                             "block_lanes", "unroll", "num_warps", "coarse_bits", "raw_early",
                                             "prefetch", "interpret"])
def bf16_lossless_decode_pack(words, offsets, states, raw, tables, info, *, sizes: tuple[int, ...], lanes: int,
                              steps: int, dtype: str, carry: int = 0, run: int = 1, pairs: bool = False,
                              block_lanes: int = 128, unroll: int = 4, num_warps: int = 4,
                              coarse_bits: int = rm.COARSE_BITS, raw_early: bool = False, prefetch: int = 0,
                              interpret: bool = False) -> list[jax.Array]:
    """Decode a pack (module docstring) to one flat ``dtype[size]`` array per entry of ``sizes``; bit-exact.
    Pair symbols (``pairs``, sizes and ``raw`` in pairs): bfloat16[2 * size] per entry.

    Block sizes as in :func:`.bf16_lossless.bf16_lossless_decode`. ``info`` is trusted to describe tiles inside
    the arrays (``jcodec.tensor.pack_float`` builds it from validated tensors); stores outside an output are
    masked off, reads are not.
    """
    check_pack(words, offsets, states, raw, tables, info, sizes, lanes, steps, dtype, carry, run, pairs)
    if block_lanes < 1 or block_lanes & (block_lanes - 1) or unroll < 1 or num_warps < 1:
        raise ValueError(f"{block_lanes=} must be a power of two, {unroll=} and {num_warps=} >= 1")
    if not 0 <= prefetch <= SECTOR_WORDS:
        raise ValueError(f"{prefetch=} must be in [0, {SECTOR_WORDS}] words (0: no prefetch)")
    launch.filter_triton_deprecation()
    unroll = run_unroll(unroll, steps, carry, run)
    table = kernel_table(tables, coarse_bits, pairs)
    kernel = functools.partial(bf16_lossless_pack_kernel, lanes=lanes, steps=steps, dtype=dtype,
                               block_lanes=block_lanes, unroll=unroll, coarse_bits=coarse_bits, carry=carry,
                               width=table.shape[-1], raw_early=raw_early, prefetch=prefetch, run=run, pairs=pairs)
    programs = pl.cdiv(states.size, block_lanes)
    sink = [jax.ShapeDtypeStruct((programs * block_lanes,), jnp.uint32)] if prefetch else []
    outs = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((size,), rm.bits_dtype(dtype, pairs)) for size in sizes] + sink,
        grid=(programs,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"rans_pack_b{block_lanes}_u{unroll}_w{num_warps}_{rm.lookup_name(coarse_bits)}_p{prefetch}"
             f"{'_r1' if raw_early else ''}",
    )(words, offsets, states, raw, table.reshape(-1), info.reshape(-1))
    outs = outs[:len(sizes)]
    return [lax.bitcast_convert_type(o, jnp.dtype(dtype)).reshape(-1) for o in outs]


# ----------------------------------------------------------------------------------------- reference
@functools.partial(jax.jit, static_argnames=["sizes", "lanes", "steps", "dtype", "carry", "run", "pairs"])
def bf16_lossless_pack_reference(words, offsets, states, raw, tables, info, *, sizes: tuple[int, ...], lanes: int,
                                 steps: int, dtype: str, carry: int = 0, run: int = 1,
                                 pairs: bool = False) -> list[jax.Array]:
    """Pure-JAX pack decoder: every lane at once, one ``fori_loop`` over the steps, each lane reading its
    tile's table; then the values scattered to their outputs. Bit-exact with the kernel and with NumPy."""
    check_pack(words, offsets, states, raw, tables, info, sizes, lanes, steps, dtype, carry, run, pairs)
    last_word = words.shape[0] - 1
    t = jnp.arange(states.size, dtype=jnp.int32) // lanes
    table, pair_table = tables[:, :rm.TABLE_SIZE], tables[:, -rm.PAIR_TABLE:]
    lane_table = info[t, TABLE]

    def step(k, val):
        x, ptr, out = val
        sym, x = rm.rans_step(x, table[lane_table, x & rm.SLOT_MASK])
        x, need = rm.renormalise(x, words[jnp.clip(ptr, 0, last_word)].astype(jnp.uint32))
        ptr = ptr + need.astype(ptr.dtype)
        if pairs:
            sym, x, ptr = rm.pair_step(sym, x, ptr, words[jnp.clip(ptr, 0, last_word)].astype(jnp.uint32),
                                       pair_table[lane_table, sym])
        return x, ptr, out.at[k].set(sym.astype(out.dtype))

    ends, _, sym = lax.fori_loop(0, steps, step, (states, offsets.astype(jnp.int32),
                                                  jnp.zeros((steps, states.size), jnp.uint32 if pairs else jnp.uint8)))
    k = jnp.arange(steps, dtype=jnp.int32)[:, None]
    pos = rm.run_positions(k, jnp.arange(states.size, dtype=jnp.int32) % lanes, lanes, steps, run, carry)
    ok = pos < info[t, COUNT]                                        # [steps, T*L]
    carried = (info[t, COUNT] == lanes * steps) & (k >= steps - carry)  # raw bits in the lane's end state
    i = jnp.where(ok & ~carried, info[t, RAW_AT] + pos, 0)
    rb = rm.raw_bytes(dtype, pairs)
    if rb in (1, 2):  # (2: pair symbols, raw is uint16)
        r = raw[i].astype(jnp.uint32)
    else:
        r3 = [raw[3 * i + b].astype(jnp.uint32) for b in range(3)]
        r = r3[0] | (r3[1] << 8) | (r3[2] << 16)
    for j in range(carry):
        r = jnp.where(carried & (k == steps - carry + j), rm.carried_raw(ends, j, rb)[None], r)
    bits = rm.join_float(sym.astype(jnp.uint32), r, dtype, pairs).astype(rm.bits_dtype(dtype, pairs))
    outs = []
    for j, size in enumerate(sizes):
        at = jnp.where(ok & (info[t, OUT] == j), info[t, OUT_AT] + pos, size)  # size: dropped
        o = jnp.zeros((size,), bits.dtype).at[at.reshape(-1)].set(bits.reshape(-1), mode="drop")
        outs.append(lax.bitcast_convert_type(o, jnp.dtype(dtype)).reshape(-1))
    return outs
