"""A *pack*: many ``bf16-lossless`` tensors of one geometry decoded in ONE launch with ONE step loop.

Why: loading a ``decoded`` checkpoint compiles a kernel per distinct tensor shape (each ~0.3 s of Triton
compile, serialised), and ``rans_float_decode_many`` compiles one step loop per tensor. Here the geometry
that differs between tensors is data (``info``), so one small kernel decodes a whole model.

Layout read (built on the host by ``jcodec.tensor.pack_float``; T tiles of L lanes x S steps in all):
  words   uint16[W]     every tensor's word streams, concatenated
  offsets uint32[T*L]   where each lane starts reading in ``words`` (already offset to its tensor's streams)
  states  uint32[T*L]   each lane's start state
  raw     uint8[N*rb]   the stored raw bytes of every tensor, concatenated (N values in all; a full tile's lanes
                        carry their last ``carry`` values in their end states: ``jcodec.codecs.split_carry``);
                        pair symbols (dtype "bfloat16x2": read "pair" for "value" throughout): uint16[N]
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

from . import rans_common as rc
from .rans_float import (SECTOR_WORDS, STREAM, check_table, decode_lane_runs, decode_lane_steps, kernel_table,
                         lanes_init, load_raw, run_unroll, steps_with_values, value_dtype)

INFO = 5  # int32 fields per tile in ``info``
OUT, OUT_AT, RAW_AT, COUNT, TABLE = range(INFO)


def rans_pack_kernel(
    words_ref,    # [W] uint16, whole array
    offsets_ref,  # [T*L] uint32, whole array
    states_ref,   # [T*L] uint32, whole array
    raw_ref,      # [N*rb] uint8, whole array
    table_ref,    # [K * width] uint32, whole array (kernel_table's: slot, coarse, pair tables)
    info_ref,     # [T*5] int32, whole array
    *out_refs,    # per output: [size] uint16 | uint32 (the float bits); then, with prefetch, the sink:
                  # [programs * block_lanes] uint32, what the prefetching loads read (never used)
    lanes: int, steps: int, dtype: str, block_lanes: int, unroll: int, coarse_bits: int, carry: int, width: int,
    raw_early: bool = False, prefetch: int = 0, run: int = 1,
):
    """Decode lanes ``program * block_lanes ...`` of the pack (of any of its tensors). ``raw_early`` and
    ``prefetch`` as in ``rans_float``."""
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
    pairs = dtype == rc.PAIRS
    table_base = table * width  # (width: each table's entries, kernel_table)
    pair_base = table_base + width - rc.PAIR_TABLE if pairs else None  # the pair table ends each table
    rb = rc.RAW_BYTES[dtype]

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
        store(l + k * lanes, rc.join_float(sym, raw, dtype), ok, v)

    if run > 1:  # runs (rans_float's kernel does the same for one tensor's tiles)
        col = jnp.arange(run, dtype=jnp.int32)[None, :]
        at = (l * run)[:, None] + col  # [B, G] a lane's run 0 in its tile
        limit = jnp.minimum(count, (steps - carry) * lanes)[:, None]  # the tile's values in runs

        def run_ok(g):
            return (at < limit - g * (lanes * run)) & live[:, None]  # (a bound less g's values: 32-bit, see rans_float)

        def read_run(g):
            return load_raw(raw_ref, raw_at[:, None] + g * (lanes * run) + at, run_ok(g), rb)

        def write_run(g, sym, raw):
            store(g * (lanes * run) + at, rc.join_float(sym, raw, dtype), run_ok(g), (v * run)[:, None] + col)

        def write_tail(i, sym, x_end):  # a full tile's raw bits from the end state, a partial tile's from `raw`
            k = steps - carry + i
            ok = live & (k * lanes + l < count)
            write(k, sym, jnp.where(full, rc.carried_raw(x_end, i, rb), read_raw(k, ok & ~full)), ok)

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
        plgpu.store(sink_ref.at[v], lane_state[3])  # (v: the program's lanes, as the sink is laid out)


def check_pack(words, offsets, states, raw, tables, info, sizes, lanes: int, steps: int, dtype: str,
               carry: int, run: int = 1) -> None:
    if dtype not in rc.RAW_BYTES:
        raise ValueError(f"{dtype=} must be one of {', '.join(rc.RAW_BYTES)}")
    if not (1 <= lanes and 1 <= steps < 1 << 16 and 0 <= carry < steps) or not sizes or min(sizes) < 1:
        raise ValueError(f"{lanes=} must be >= 1, {steps=} in [1, 65536), {carry=} in [0, steps) and "
                         f"sizes={sizes!r} >= 1 each")
    rc.check_run(run, steps, carry)
    if states.ndim != 1 or states.size % lanes or not states.size:
        raise ValueError(f"states={states.dtype}{list(states.shape)} must be uint32[T*{lanes}], T >= 1")
    t = states.size // lanes
    for name, a, dt, shape in [("offsets", offsets, jnp.uint32, (t * lanes,)), ("states", states, jnp.uint32, (t * lanes,)),
                               ("info", info, jnp.int32, (t, INFO))]:
        if a.dtype != dt or a.shape != shape:
            raise ValueError(f"{name}={a.dtype}{list(a.shape)} must be {jnp.dtype(dt).name}{list(shape)}")
    if words.dtype != jnp.uint16 or words.ndim != 1 or not 1 <= words.size <= rc.INT32_MAX:
        raise ValueError(f"words={words.dtype}{list(words.shape)} must be uint16[W], 1 <= W < 2^31")
    pairs = dtype == rc.PAIRS
    raw_dtype, per = rc.raw_layout(dtype)  # (pair symbols: one uint16 per pair)
    if raw.dtype != raw_dtype or raw.ndim != 1 or raw.size % per or raw.size > rc.INT32_MAX:
        raise ValueError(f"raw={raw.dtype}{list(raw.shape)} must be {jnp.dtype(raw_dtype).name}[N*{per}] "
                         f"< 2^31 elements")
    if tables.ndim != 2:
        raise ValueError(f"tables={tables.dtype}{list(tables.shape)} must be uint32[K, N] (rans_float.check_table)")
    check_table(tables, tables.shape[:1], pairs)
    if max(sizes) > rc.INT32_MAX or t * lanes * steps > rc.INT32_MAX:
        raise ValueError(f"sizes={sizes!r} and the pack's {t} tiles must stay below 2^31 values")


@functools.partial(jax.jit, static_argnames=["sizes", "lanes", "steps", "dtype", "carry", "run", "block_lanes", "unroll",
                                             "num_warps", "coarse_bits", "raw_early", "prefetch", "interpret"])
def rans_float_decode_pack(words, offsets, states, raw, tables, info, *, sizes: tuple[int, ...], lanes: int,
                           steps: int, dtype: str, carry: int = 0, run: int = 1, block_lanes: int = 128, unroll: int = 4,
                           num_warps: int = 4, coarse_bits: int = rc.COARSE_BITS, raw_early: bool = False,
                           prefetch: int = 0, interpret: bool = False) -> list[jax.Array]:
    """Decode a pack (module docstring) to one flat ``dtype[size]`` array per entry of ``sizes``; bit-exact.
    Pair symbols (``dtype="bfloat16x2"``, sizes and ``raw`` in pairs): bfloat16[2 * size] per entry.

    Block sizes as in ``rans_float.rans_float_decode``. ``info`` is trusted to describe tiles inside the
    arrays (``jcodec.tensor.pack_float`` builds it from validated tensors); stores outside an output are
    masked off, reads are not.
    """
    check_pack(words, offsets, states, raw, tables, info, sizes, lanes, steps, dtype, carry, run)
    if block_lanes < 1 or block_lanes & (block_lanes - 1) or unroll < 1 or num_warps < 1:
        raise ValueError(f"{block_lanes=} must be a power of two, {unroll=} and {num_warps=} >= 1")
    if not 0 <= prefetch <= SECTOR_WORDS:
        raise ValueError(f"{prefetch=} must be in [0, {SECTOR_WORDS}] words (0: no prefetch)")
    rc.filter_triton_deprecation()
    unroll = run_unroll(unroll, steps, carry, run)
    table = kernel_table(tables, coarse_bits, dtype == rc.PAIRS)
    kernel = functools.partial(rans_pack_kernel, lanes=lanes, steps=steps, dtype=dtype, block_lanes=block_lanes,
                               unroll=unroll, coarse_bits=coarse_bits, carry=carry, width=table.shape[-1],
                               raw_early=raw_early, prefetch=prefetch, run=run)
    programs = pl.cdiv(states.size, block_lanes)
    sink = [jax.ShapeDtypeStruct((programs * block_lanes,), jnp.uint32)] if prefetch else []
    outs = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((size,), rc.BITS_DTYPE[dtype]) for size in sizes] + sink,
        grid=(programs,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"rans_pack_b{block_lanes}_u{unroll}_w{num_warps}_{rc.lookup_name(coarse_bits)}_p{prefetch}{'_r1' if raw_early else ''}",
    )(words, offsets, states, raw, table.reshape(-1), info.reshape(-1))
    outs = outs[:len(sizes)]
    return [lax.bitcast_convert_type(o, value_dtype(dtype)).reshape(-1) for o in outs]


# ----------------------------------------------------------------------------------------- reference
@functools.partial(jax.jit, static_argnames=["sizes", "lanes", "steps", "dtype", "carry", "run"])
def rans_float_pack_reference(words, offsets, states, raw, tables, info, *, sizes: tuple[int, ...], lanes: int,
                              steps: int, dtype: str, carry: int = 0, run: int = 1) -> list[jax.Array]:
    """Pure-JAX pack decoder: every lane at once, one ``fori_loop`` over the steps, each lane reading its
    tile's table; then the values scattered to their outputs. Bit-exact with the kernel and with NumPy."""
    check_pack(words, offsets, states, raw, tables, info, sizes, lanes, steps, dtype, carry, run)
    last_word = words.shape[0] - 1
    t = jnp.arange(states.size, dtype=jnp.int32) // lanes
    pairs = dtype == rc.PAIRS
    table, pair_table = tables[:, :rc.TABLE_SIZE], tables[:, -rc.PAIR_TABLE:]
    lane_table = info[t, TABLE]

    def step(k, carry):
        x, ptr, out = carry
        sym, x = rc.rans_step(x, table[lane_table, x & rc.SLOT_MASK])
        x, need = rc.renormalise(x, words[jnp.minimum(ptr, last_word)].astype(jnp.uint32))
        ptr = ptr + need.astype(ptr.dtype)
        if pairs:
            sym, x, ptr = rc.pair_step(sym, x, ptr, words[jnp.minimum(ptr, last_word)].astype(jnp.uint32),
                                       pair_table[lane_table, sym])
        return x, ptr, out.at[k].set(sym.astype(out.dtype))

    ends, _, sym = lax.fori_loop(0, steps, step, (states, offsets.astype(jnp.int32),
                                                  jnp.zeros((steps, states.size), jnp.uint32 if pairs else jnp.uint8)))
    k = jnp.arange(steps, dtype=jnp.int32)[:, None]
    pos = rc.run_positions(k, jnp.arange(states.size, dtype=jnp.int32) % lanes, lanes, steps, run, carry)
    ok = pos < info[t, COUNT]                                        # [steps, T*L]
    carried = (info[t, COUNT] == lanes * steps) & (k >= steps - carry)  # raw bits in the lane's end state
    i = jnp.where(ok & ~carried, info[t, RAW_AT] + pos, 0)
    if rc.RAW_BYTES[dtype] in (1, 2):  # (2: pair symbols, raw is uint16)
        r = raw[i].astype(jnp.uint32)
    else:
        r = raw[3 * i].astype(jnp.uint32) | (raw[3 * i + 1].astype(jnp.uint32) << 8) | (raw[3 * i + 2].astype(jnp.uint32) << 16)
    for j in range(carry):
        r = jnp.where(carried & (k == steps - carry + j), rc.carried_raw(ends, j, rc.RAW_BYTES[dtype])[None], r)
    bits = rc.join_float(sym.astype(jnp.uint32), r, dtype).astype(rc.BITS_DTYPE[dtype])
    outs = []
    for j, size in enumerate(sizes):
        at = jnp.where(ok & (info[t, OUT] == j), info[t, OUT_AT] + pos, size)  # size: dropped
        o = jnp.zeros((size,), bits.dtype).at[at.reshape(-1)].set(bits.reshape(-1), mode="drop")
        outs.append(lax.bitcast_convert_type(o, value_dtype(dtype)).reshape(-1))
    return outs
