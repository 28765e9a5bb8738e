"""Many tensors in ONE launch: the launcher both codecs' ``*_decode_many`` share.

A launch's grid holds one program per tile decoded, tensor after tensor: programs ``starts[k] ..
starts[k+1]`` decode tensor ``k``, which a program finds by a chain of uniform branches on its id
(:func:`run_segment`), so each tensor gets its own step loop compiled for its geometry. A tensor is one
tensor's arrays, or a stack of tensors of one meta (layers: a leading ``copies`` axis on every array, read
flattened, copy ``c`` at ``c`` times each array's row length); per tensor, ``tiles`` (int32[R]) picks the tiles
to decode, and a *window* (``start``, a traced int32, and ``window`` copies) picks copies ``start .. start +
window`` of every stack, read in place. Why one launch: a layer's tensors launched together keep many more
lanes in flight than a launch each (a Llama-3-8B layer on the H100: 668-687 GB/s in one launch against
237-246 GB/s in seven; bench/decode.py).

The refs a tensor's kernel gets, in the launch's order: its inputs, its ``tiles`` (or None), its output, then
one ref (or None) per scratch group; keyword arguments ``meta``, ``program`` (its place among the tensor's
programs), ``copies``, ``start_ref`` and ``window``.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .lanes import SECTOR_WORDS

# jax 0.11 warns at every lowering of a Triton-backend pallas_call; these kernels use that backend on
# purpose (DESIGN.md, "The Pallas backend"). The warning is raised when the enclosing jit lowers, which can
# be after our function returned, so it is filtered by its exact text, once, when a kernel is first used.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated and will be removed in a future JAX version"


@functools.cache
def filter_triton_deprecation() -> None:
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def launch_options(metas, one: dict, several: dict, **given) -> tuple:
    """The ``given`` options' values, in order: each as given, or (None) from ``one`` for a launch of one
    tensor, ``several`` for more (each codec's ONE_TENSOR / SEVERAL_TENSORS)."""
    defaults = one if len(metas) == 1 else several
    return tuple(defaults[k] if v is None else v for k, v in given.items())


def check_launch(tensors, metas, unroll: int, num_warps: int, prefetch: int, tiles, start, window: int):
    """The arguments every launch of many tensors shares, checked before it is built. Returns ``(tiles,
    extra)``: ``tiles`` as a list with one entry (None or an int32 array) per tensor, and the call's extra
    input (a window's ``[start]`` as int32[1], or none)."""
    if len(tensors) != len(metas) or not metas:
        raise ValueError(f"{len(tensors)=} must equal {len(metas)=} and be >= 1")
    if unroll < 1 or num_warps < 1:
        raise ValueError(f"{unroll=} and {num_warps=} must be >= 1")
    if not 0 <= prefetch <= SECTOR_WORDS:
        raise ValueError(f"{prefetch=} must be in [0, {SECTOR_WORDS}] words (0: no prefetch)")
    tiles = [None] * len(metas) if tiles is None else list(tiles)
    if len(tiles) != len(metas):
        raise ValueError(f"{len(tiles)=} must equal {len(metas)=}")
    if not window:
        if start is not None:
            raise ValueError(f"start={start!r} needs window >= 1")
        return tiles, []
    if window < 1 or start is None or any(t is not None for t in tiles):
        raise ValueError(f"{window=} must be >= 1, with a start and without tiles")
    for arrays in tensors:
        states = arrays[3]
        if states.ndim != 2 or states.shape[0] < window:
            raise ValueError(f"a window of {window} copies needs stacks of at least {window}, got "
                             f"states{list(states.shape)}")
    return tiles, [jnp.asarray(start, jnp.int32).reshape(1)]


def launch_shape(states, tiles, lanes: int) -> tuple[int, int]:
    """``(copies, programs)`` of one tensor of a launch (``states``: its states array): a stack's copies (the
    arrays' leading axis, 1 for one tensor), and its programs, one per tile decoded."""
    copies = states.shape[0] if states.ndim == 2 else 1
    decoded = states.shape[-1] // lanes if tiles is None else tiles.shape[0]
    if tiles is not None and (copies != 1 or tiles.dtype != jnp.int32 or tiles.ndim != 1 or not decoded):
        raise ValueError(f"tiles={tiles.dtype}{list(tiles.shape)} must be int32[R], R >= 1, of one tensor "
                         f"(not a stack)")
    return copies, copies * decoded


def unpack_refs(refs, inputs: tuple[int, ...], has_tiles, has_start: bool, *optional):
    """The refs of a launch, in call order: ``inputs[k]`` for each tensor k, the ``tiles`` arrays of the
    tensors that have them, a window's ``start`` if it has one, one output per tensor, then each ``optional``
    group (one flag per tensor: a ref where set, None where not). Returns ``(ins, tiles, start, outs,
    *groups)``, ``ins`` a list of each tensor's input refs."""
    refs = list(refs)
    ins = [[refs.pop(0) for _ in range(count)] for count in inputs]
    tiles = [refs.pop(0) if has else None for has in has_tiles]
    start = refs.pop(0) if has_start else None
    outs = [refs.pop(0) for _ in inputs]
    return (ins, tiles, start, outs, *[[refs.pop(0) if flag else None for flag in flags] for flags in optional])


def run_segment(pid, starts, branch) -> None:
    """Run ``branch(k)()`` for the tensor k whose programs ``starts[k] <= pid < starts[k+1]`` hold: the
    dispatch of a launch that decodes several tensors, as a chain of ``lax.cond`` on the program id."""
    def chain(k):  # if pid < starts[k+1]: tensor k, else the rest
        if k == len(starts) - 2:
            return branch(k)
        return lambda: lax.cond(pid < starts[k + 1], branch(k), chain(k + 1))

    chain(0)()


def many_kernel(*refs, tensor_kernel, metas, inputs, starts, copies, has_tiles, window, has_scratch):
    """The launch's kernel: programs ``starts[k] .. starts[k+1]`` run ``tensor_kernel`` on tensor ``k``'s refs."""
    ins, tiles, start, outs, *groups = unpack_refs(refs, inputs, has_tiles, bool(window), *has_scratch)
    pid = pl.program_id(0)

    def branch(k):
        def decode_tensor():
            tensor_kernel(*ins[k], tiles[k], outs[k], *(group[k] for group in groups), meta=metas[k],
                          program=pid - starts[k], copies=copies[k], start_ref=start, window=window)
        return decode_tensor

    run_segment(pid, starts, branch)


def decode_many(tensor_kernel, inputs, metas, *, states, tiles, extra, window: int, out_dtypes, value_dtypes,
                scratch=(), sink: bool, num_warps: int, interpret: bool, name: str) -> list[jax.Array]:
    """ONE ``pallas_call`` that decodes every tensor (module docstring); returns per tensor its values, flat:
    ``[n]``, ``[copies, n]``, ``[window, n]``, or ``[R * L*S]`` for ``tiles`` (tile ``tiles[r]`` at ``r * L*S``).

    ``tensor_kernel``: the codec's kernel of one tensor (module docstring for its refs and keywords);
    ``inputs``: per tensor its kernel inputs as the kernel reads them (each passed flat); ``metas``: per tensor
    a meta with fields ``n``, ``lanes`` and ``steps``; ``states``: per tensor its states array (whose leading
    axis says a stack's copies); ``tiles`` and ``extra``: from :func:`check_launch`. ``out_dtypes``: per tensor
    the dtype the kernel stores, viewed as ``value_dtypes`` afterwards. ``scratch``: functions ``(meta,
    programs)`` -> a ``jax.ShapeDtypeStruct`` or None: scratch outputs per tensor, each a group of refs after the
    outputs; ``sink``: then one more group, the word prefetch's sink (``programs * next_power_of_2(L)``
    uint32 each), what the prefetching loads read (never used)."""
    starts, copies = [0], []
    for a, meta, tl in zip(states, metas, tiles):
        c, programs = launch_shape(a, tl, meta.lanes)
        copies.append(c)
        starts.append(starts[-1] + (programs // c * window if window else programs))
    programs = [b - a for a, b in zip(starts, starts[1:])]
    groups = [[make(m, p) for m, p in zip(metas, programs)] for make in scratch]
    groups.append([jax.ShapeDtypeStruct((p * pl.next_power_of_2(m.lanes),), jnp.uint32) if sink else None
                   for m, p in zip(metas, programs)])
    filter_triton_deprecation()
    kernel = functools.partial(
        many_kernel, tensor_kernel=tensor_kernel, metas=tuple(metas), inputs=tuple(len(i) for i in inputs),
        starts=tuple(starts), copies=tuple(copies), has_tiles=tuple(tl is not None for tl in tiles),
        window=window, has_scratch=tuple(tuple(s is not None for s in group) for group in groups))
    sizes = [(window or c) * m.n if tl is None else tl.shape[0] * m.lanes * m.steps
             for c, m, tl in zip(copies, metas, tiles)]
    outs = pl.pallas_call(
        kernel,
        out_shape=([jax.ShapeDtypeStruct((size,), dt) for size, dt in zip(sizes, out_dtypes)]
                   + [s for group in groups for s in group if s is not None]),
        grid=(starts[-1],),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*[a.reshape(-1) for arrays in inputs for a in arrays], *[tl for tl in tiles if tl is not None], *extra)
    outs = [o if o.dtype == vd else lax.bitcast_convert_type(o, vd) for o, vd in zip(outs, value_dtypes)]
    return [o.reshape((window or c, -1) if a.ndim == 2 else (-1,)) for o, c, a in zip(outs, copies, states)]
