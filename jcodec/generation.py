"""Text generation and scoring with a Llama model held as a :class:`Model` (config, params, tokenizer).

    model = Model.load("path/to/hf-folder-or.gguf")          # or jcodec.load(path, mode=...) for jcodec files
    text = generate(model, "What is the capital of France?")  # a str, with .stats and .token_ids
    print(text, text.stats)

Why it is shaped this way: the prefill and the decode step are jitted once per shape bucket (prompt length
rounded up to a power of two, cache length likewise), so a generation traces at most two functions and
never retraces per token; ``TRACES`` counts traces so tests can prove it. Sampling runs inside the jitted
step, so only B token ids cross to the host per step, and the next step is dispatched before the host waits
for the previous token, keeping the device busy while the host streams text and checks stop conditions.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jcodec.models import llama
from jcodec.sources import SourceError, open_source

TRACES: collections.Counter = collections.Counter()  # jitted function name -> times traced


@dataclasses.dataclass
class Model:
    """What :func:`generate` runs: a config, params (arrays or CompressedTensors) and a tokenizer.

    ``dtype`` is the compute dtype: bfloat16 to serve, float32 for parity and scoring; None picks
    :func:`default_dtype`.
    """

    config: llama.LlamaConfig
    params: llama.Params
    tokenizer: Any = None
    dtype: Any = None

    def __post_init__(self):
        self.dtype = jnp.dtype(self.dtype or default_dtype())

    @classmethod
    def load(cls, path, dtype=None) -> Model:
        """A plain (uncompressed) HF checkpoint folder or GGUF file, with its tokenizer."""
        src = open_source(path)
        dtype = dtype or default_dtype()
        try:
            cfg, params = llama.load_hf(src, dtype)
        except SourceError:
            raise
        except ValueError as e:  # the config or the tensors are not a Llama the model can run: say which file
            raise SourceError(f"{src.path}: {e}") from None
        return cls(cfg, params, src.tokenizer(), dtype)


def default_dtype():
    """bfloat16 on accelerators; float32 on CPU, where XLA's bfloat16 matmuls run about 8x slower
    (SmolLM2-135M, 2 cores: 5.8 vs 45 tokens/s)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@dataclasses.dataclass
class Stats:
    """Timing of one generation. ``ttft_s`` runs from the call to the first token on the host (prefill,
    and compilation when ``compiled``); decode throughput counts every row of the batch."""

    batch: int
    prompt_tokens: int      # longest prompt, before bucketing
    new_tokens: int         # tokens kept, all rows
    steps: int              # decode steps run (the first token comes from the prefill)
    ttft_s: float
    decode_s: float
    compiled: bool = False  # a jitted step was traced during this call

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens per second over all rows, after the first token."""
        return self.batch * (self.steps - 1) / self.decode_s if self.steps > 1 and self.decode_s > 0 else 0.0

    def __str__(self):
        return (f"{self.prompt_tokens} prompt tokens, {self.new_tokens} new, batch {self.batch}; "
                f"first token {self.ttft_s * 1e3:.0f} ms{' (compiling)' if self.compiled else ''}, "
                f"{self.tokens_per_s:.1f} tokens/s")


class Completion(str):
    """The generated text; ``.token_ids`` are the new tokens, ``.stats`` the timing of the call."""

    token_ids: list[int]
    stats: Stats


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static (hashable) sampling settings: changing them recompiles the steps, a new token does not."""

    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None


# ------------------------------------------------------------------------------------------ jitted steps

def sample(logits, key, s: Sampling):
    """logits [B, V] float32 -> token ids [B] int32."""
    if s.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p is not None and s.top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < s.top_p  # the smallest prefix whose mass reaches top_p
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "sampling"), donate_argnames=("cache",))
def _prefill(params, tokens, cache, key, cfg, dtype, sampling):
    TRACES["prefill"] += 1
    logits, cache = llama.forward(params, tokens, cache, cfg, dtype)
    return sample(logits, jax.random.fold_in(key, 0), sampling), cache


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "sampling"), donate_argnames=("cache",))
def _decode(params, token, cache, key, step, cfg, dtype, sampling):
    TRACES["decode"] += 1
    logits, cache = llama.forward(params, token[:, None], cache, cfg, dtype)
    return sample(logits, jax.random.fold_in(key, step), sampling), cache


def bucket(n: int, minimum: int = 16) -> int:
    """Round a length up to a power of two (at least ``minimum``): the shapes the steps compile for."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


# ------------------------------------------------------------------------------------------- generation

def generate_tokens(model: Model, prompts: list[list[int]], *, max_new_tokens: int = 64,
                    sampling: Sampling = Sampling(), seed: int = 0, stop_ids=(),
                    callback: Callable | None = None) -> tuple[list[list[int]], Stats]:
    """Generate from token-id prompts (left-padded into one batch); no tokenizer needed.

    Each row ends at a token in ``stop_ids`` (not kept) or after ``max_new_tokens``. After every step,
    ``callback(out, done)`` sees the tokens so far per row and may set ``done[b] = True`` (stop strings).
    """
    cfg, B = model.config, len(prompts)
    lens = [len(p) for p in prompts]
    if max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be at least 1")
    if B == 0 or min(lens) == 0:
        raise ValueError(f"prompts must be non-empty token lists, got lengths {lens}")
    if max(lens) + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({max(lens)}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{cfg.max_position_embeddings} positions")
    T = bucket(max(lens))
    tokens = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = p
    cache = llama.init_cache(cfg, B, bucket(T + max_new_tokens), model.dtype, start=[T - n for n in lens])
    key, stop_ids = jax.random.PRNGKey(seed), {int(t) for t in stop_ids}
    static = dict(cfg=cfg, dtype=model.dtype, sampling=sampling)
    traces = sum(TRACES.values())

    out, done = [[] for _ in range(B)], np.zeros(B, bool)
    t0 = time.perf_counter()
    token, cache = _prefill(model.params, jnp.asarray(tokens), cache, key, **static)
    ttft = t1 = 0.0
    steps = 0
    for i in range(max_new_tokens):
        host_token = token
        if i + 1 < max_new_tokens:  # dispatch the next step before waiting for this token
            token, cache = _decode(model.params, token, cache, key, np.int32(i + 1), **static)
        host = np.asarray(host_token)
        steps += 1
        if i == 0:
            ttft, t1 = time.perf_counter() - t0, time.perf_counter()
        for b in np.flatnonzero(~done):
            if int(host[b]) in stop_ids:
                done[b] = True
            else:
                out[b].append(int(host[b]))
        if callback is not None:
            callback(out, done)
        if done.all():
            break
    stats = Stats(batch=B, prompt_tokens=max(lens), new_tokens=sum(map(len, out)), steps=steps, ttft_s=ttft,
                  decode_s=time.perf_counter() - t1, compiled=sum(TRACES.values()) > traces)
    return out, stats


def _is_messages(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(m, dict) for m in p)


def encode_prompt(tokenizer, prompt, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt (a string, or a list of chat messages). ``chat=None`` applies the tokenizer's
    chat template when it has one; a message list always needs one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    if _is_messages(prompt) or chat:
        if not has_template:
            raise ValueError("this tokenizer has no chat template; pass chat=False and a plain string")
        messages = list(prompt) if _is_messages(prompt) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def generate(model: Model, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop=None,
             chat: bool | None = None, on_token: Callable | None = None):
    """Generate text for one prompt (str, or a list of chat messages) or a batch (a list of them).

    Greedy when ``temperature`` is 0; otherwise sampled (``top_k``, ``top_p``), reproducibly for a ``seed``.
    ``stop``: strings and/or token ids that end a row (the eos tokens always do; neither is returned).
    ``chat``: None applies the tokenizer's chat template when it has one. ``on_token(text)`` receives new
    text as it is generated (for a batch, ``on_token(text, row)``). Returns a :class:`Completion` (a str
    with ``.stats`` and ``.token_ids``), or a list of them for a batch.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this Model has no tokenizer; use generate_tokens with token ids")
    single = isinstance(prompt, str) or _is_messages(prompt)
    prompts = [prompt] if single else list(prompt)
    ids = [encode_prompt(tok, p, chat) for p in prompts]
    stop = [stop] if isinstance(stop, (str, int)) else list(stop or [])
    stop_strs = [s for s in stop if isinstance(s, str) and s]
    stop_ids = {s for s in stop if isinstance(s, int)} | set(model.config.eos_token_ids)
    if tok.eos_token_id is not None:
        stop_ids.add(tok.eos_token_id)
    holdback = max(map(len, stop_strs), default=1) - 1  # never stream what may start a stop string
    texts, shown = [""] * len(ids), [""] * len(ids)

    def emit(b, final):
        safe = texts[b] if final else texts[b][:len(texts[b]) - holdback].rstrip("\ufffd")
        if on_token is not None and len(safe) > len(shown[b]) and safe.startswith(shown[b]):
            new, shown[b] = safe[len(shown[b]):], safe
            on_token(new) if single else on_token(new, b)

    def callback(out, done):
        for b in np.flatnonzero(~done):
            text = tok.decode(out[b], skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in stop_strs) if i >= 0), default=-1)
            if cut >= 0:
                text, done[b] = text[:cut], True
            texts[b] = text
            emit(b, final=False)

    sampling = Sampling(float(temperature), top_k, top_p)
    out, stats = generate_tokens(model, ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                 stop_ids=stop_ids, callback=callback if on_token or stop_strs else None)
    results = []
    for b in range(len(ids)):
        if not stop_strs:  # with stop strings, the callback has already decoded (and cut) every row
            texts[b] = tok.decode(out[b], skip_special_tokens=True)
        emit(b, final=True)
        c = Completion(texts[b])
        c.token_ids, c.stats = out[b], stats
        results.append(c)
    return results[0] if single else results


# ---------------------------------------------------------------------------------------------- scoring

@dataclasses.dataclass
class Perplexity:
    """Scores of a text: next-token NLL per scored token, and the model's top-1 guess for each."""

    nll: np.ndarray          # [N] float64, natural log
    predictions: np.ndarray  # [N] int, argmax next token
    targets: np.ndarray      # [N] int

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.targets).mean())

    def agreement(self, other: Perplexity) -> float:
        """Fraction of positions where two models (on the same text) make the same top-1 guess."""
        return float((self.predictions == other.predictions).mean())


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _score(params, tokens, cfg, dtype):
    TRACES["score"] += 1
    logits = llama.logits(params, tokens, cfg, dtype)[:, :-1]                 # [1, W-1, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1)


def perplexity(model: Model, text: str, *, window: int = 512) -> Perplexity:
    """Perplexity of ``text`` in non-overlapping windows of ``window`` tokens, each scored on its own
    (the first token of a window is context only). The last window is right-padded; padding is not scored."""
    ids = np.asarray(model.tokenizer(text)["input_ids"], np.int32)
    if len(ids) < 2:
        raise ValueError("text is too short to score")
    nll, pred, tgt = [], [], []
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window]
        padded = np.zeros((1, window), np.int32)
        padded[0, :len(chunk)] = chunk
        n, p = _score(model.params, jnp.asarray(padded), cfg=model.config, dtype=model.dtype)
        k = len(chunk) - 1
        nll.append(np.asarray(n[0, :k], np.float64))
        pred.append(np.asarray(p[0, :k]))
        tgt.append(chunk[1:])
    return Perplexity(np.concatenate(nll), np.concatenate(pred), np.concatenate(tgt))
