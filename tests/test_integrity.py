"""Nothing silently wrong: every stored byte and header field is checked at load, crafted files fail cleanly."""
import contextlib
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import jcodec
from jcodec import api, checkpoint, cli, codecs, convert
from jcodec.checkpoint import Checkpoint, CheckpointError
from jcodec.codecs import bits_of
from jcodec.sources import open_source
from conftest import _write_llama as write_llama_folder

# a Llama small enough to convert in a second, large enough that its matrices are encoded (>= 4096 values)
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
GEOMETRY = dict(lanes=16, steps=33)
UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(params=["bf16-lossless", "int8", "zstd"])
def codec(request):
    return request.param


@pytest.fixture
def converted(tmp_path, write_llama, codec):
    src = write_llama(tmp_path / "src", **SHAPE)
    out = tmp_path / "c"
    opts = GEOMETRY if codec != "zstd" else {}
    convert.convert(src, out, codec, progress=False, **opts)
    return out


def _header(folder):
    data = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(folder, header, body):
    new = json.dumps(header, separators=(",", ":")).encode()
    (folder / "model.safetensors").write_bytes(len(new).to_bytes(8, "little") + new + body)


def _flip(folder, entry, at=0.5):
    """Flip one bit of entry ``entry``'s data, ``at`` of the way into it."""
    header, body = _header(folder)
    begin, end = header[entry]["data_offsets"]
    body = bytearray(body)
    body[begin + int((end - begin - 1) * at)] ^= 0x10
    _write(folder, header, bytes(body))


def _edit_record(folder, name, **changes):
    header, body = _header(folder)
    key = checkpoint.RECORD_PREFIX + name
    rec = json.loads(header["__metadata__"][key])
    rec.update(changes)
    header["__metadata__"][key] = json.dumps(rec, separators=(",", ":"))
    _write(folder, header, body)


def _refused(folder, match):
    """Reading, verifying and loading (every mode) all refuse with one line matching ``match``."""
    with pytest.raises(CheckpointError, match=match) as e:
        for name in Checkpoint(folder).names():
            Checkpoint(folder).read(name)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=match):
        convert.verify(folder, progress=False)
    for mode in api.MODES:
        with pytest.raises(CheckpointError, match=match):
            jcodec.load(folder, mode=mode, dtype=jnp.float32)


@pytest.mark.parametrize("entry", ["words", "raw", "states", "counts", "freqs"])
def test_flipped_coded_byte_refused_naming_the_tile(tmp_path, write_llama, entry):
    src = write_llama(tmp_path / "src", **SHAPE)
    out = tmp_path / "c"
    convert.convert(src, out, progress=False, **GEOMETRY)
    _flip(out, f"{UP}.{entry}")
    # counts also give word offsets: a changed count makes the tensor inconsistent, so no tile can be named
    where = {"freqs": "(record, entry headers or tables|stored bytes do not match)", "counts": "stored bytes do not match"}.get(
        entry, "tile [0-9]+ of [0-9]+")
    _refused(out, f"model.safetensors: tensor {UP}: {where}")
    if entry in ("words", "raw", "states"):  # (counts and freqs are still checked for consistency)
        # verify=False opts out: the damaged tensor reads (it may decode wrong: that is what the opt-out means)
        Checkpoint(out).read(UP, verify=False)
        api.load_params(out, "compressed", jnp.float32, verify=False)


def test_flipped_int8_scale_refused(tmp_path, write_llama):
    src = write_llama(tmp_path / "src", **SHAPE)
    out = tmp_path / "c"
    convert.convert(src, out, "int8", progress=False, **GEOMETRY)
    _flip(out, f"{UP}.scales")
    _refused(out, f"tensor {UP}: record, entry headers or tables")


def test_raw_dtype_changed_refused(converted):
    header, body = _header(converted)
    name = "model.norm.weight"
    assert header[name]["dtype"] == "BF16"
    header[name]["dtype"] = "F16"  # the same width: the bytes still fit
    _write(converted, header, body)
    _refused(converted, f"tensor {name}: stored bytes, dtype or shape")


def test_record_field_changed_refused(converted, codec):
    """A field no validation can catch (the original dtype of a same-width float) is covered by the check."""
    if codec == "bf16-lossless":
        pytest.skip("pair symbols are bfloat16 only: validation refuses a changed dtype already")
    _edit_record(converted, UP, dtype="float16")
    _refused(converted, f"tensor {UP}: record, entry headers or tables")


def test_swapped_layers_refused(converted):
    """Layer 0's and layer 1's up_proj entries exchanged (offsets and records): each holds valid bytes of the
    wrong layer."""
    header, body = _header(converted)
    other = UP.replace("layers.0", "layers.1")
    for key in list(header):
        if key.startswith(UP):
            twin = other + key[len(UP):]
            header[key], header[twin] = header[twin], header[key]
    meta = header["__metadata__"]
    meta[checkpoint.RECORD_PREFIX + UP], meta[checkpoint.RECORD_PREFIX + other] = (
        meta[checkpoint.RECORD_PREFIX + other], meta[checkpoint.RECORD_PREFIX + UP])
    _write(converted, header, body)
    _refused(converted, "tensor model.layers.[01].mlp.up_proj.weight")


def test_pristine_loads_bit_exact(converted, codec):
    ckpt = Checkpoint(converted)
    for name in ckpt.names():
        ckpt.read(name)
    assert convert.verify(converted, converted.parent / "src", progress=False).compared > 0


def test_version_4_still_reads_and_verifies_by_decoding(tmp_path, write_llama, legacy_writer):
    """Version 4 (no checksums of stored bytes): loading verifies it by decoding it with the reference decoder."""
    src = write_llama(tmp_path / "src", **SHAPE)
    out = tmp_path / "c"
    convert.convert(src, out, progress=False, **GEOMETRY)
    assert b'"jcodec.version":"4"' in (out / "model.safetensors").read_bytes()
    api.load_params(out, "compressed", jnp.float32)
    _flip(out, f"{UP}.words")
    with pytest.raises(CheckpointError, match=f"tensor {UP}: "):
        api.load_params(out, "compressed", jnp.float32)


def test_cli_no_verify_flag():
    assert cli.build_parser().parse_args(["generate", "x", "p", "--no-verify"]).verify is False
    assert cli.build_parser().parse_args(["generate", "x", "p"]).verify is True


# ---------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("change,match", [
    (dict(carry=1.0), "carry=1.0"), (dict(carry=True), "carry=True"), (dict(tiles=True), "tiles=True"),
    (dict(lanes=16.0), "lanes=16.0"), (dict(shape=[]), "bad shape"), (dict(shape=[2.0, 4096]), "bad shape"),
    (dict(words=1e3), "words"), (dict(check="1"), "check='1'")])
def test_record_field_types(converted, codec, change, match):
    if codec == "zstd" and set(change) & {"carry", "tiles", "lanes", "words"}:
        pytest.skip("an rANS field")
    if codec == "int8" and "carry" in change:
        change, match = dict(rows=float(SHAPE["intermediate_size"])), "rows="
    _edit_record(converted, UP, **change)
    _refused(converted, f"tensor {UP}: .*{match}")


@pytest.mark.parametrize("change", [dict(codec=5), dict(dtype=["bfloat16"]), dict(shape=[1.5, 2]), dict(shape=None)])
def test_info_and_verify_on_malformed_records_exit_2(converted, change, capsys):
    _edit_record(converted, UP, **change)
    for command in (["info", str(converted)], ["verify", str(converted), "-q"]):
        assert cli.main(command) == cli.EXIT_BAD_INPUT
        assert f"tensor {UP}" in capsys.readouterr().err


def test_deeply_nested_record(converted):
    header, body = _header(converted)
    header["__metadata__"][checkpoint.RECORD_PREFIX + UP] = "[" * 50_000 + "]" * 50_000
    _write(converted, header, body)
    with pytest.raises(CheckpointError, match=f"tensor {UP}: record of 100000 bytes"):
        Checkpoint(converted)
    header["__metadata__"][checkpoint.RECORD_PREFIX + UP] = "[" * 5_000 + "]" * 5_000
    _write(converted, header, body)
    with pytest.raises(CheckpointError, match=f"tensor {UP}: record is not"):
        Checkpoint(converted)


def test_deeply_nested_config(converted):
    (converted / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="config.json: JSON nested too deep"):
        Checkpoint(converted)


def test_header_size_capped(converted):
    f = converted / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes((200 << 20).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="header of 209715200 bytes"):
        Checkpoint(converted)


def test_zstd_frame_without_size_claiming_a_huge_shape(tmp_path, write_llama):
    src = write_llama(tmp_path / "src", **SHAPE)
    out = tmp_path / "c"
    convert.convert(src, out, "zstd", progress=False)
    header, body = _header(out)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 1024)
    begin, end = header[f"{UP}.zstd"]["data_offsets"]
    assert len(frame) < end - begin
    body = body[:begin] + frame + body[begin + len(frame):]  # (what follows the frame in the entry is ignored)
    _write(out, header, body)
    _edit_record(out, UP, shape=[1 << 20, 1 << 20])
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("hidden_size")  # no bound from config: the frame's own size claim must refuse it
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"tensor {UP}: .*shape .*too large|zstd frame holds -1"):
        Checkpoint(out).read(UP, verify=False)


def test_tiny_int8_file_claiming_a_huge_shape(tmp_path, write_llama):
    """A few KB of words can claim a billion values; config.json bounds every tensor before anything is read."""
    src = write_llama(tmp_path / "src", **SHAPE)
    out = tmp_path / "c"
    convert.convert(src, out, "int8", progress=False, **GEOMETRY)
    _edit_record(out, UP, shape=[128, 1 << 22], cols=1 << 22)
    with pytest.raises(CheckpointError, match=f"tensor {UP}: shape .* more values than config.json's"):
        Checkpoint(out).read(UP, verify=False)


def test_pristine_values_exact(tmp_path, write_llama):
    src = write_llama(tmp_path / "src", **SHAPE)
    out = tmp_path / "c"
    convert.convert(src, out, progress=False, **GEOMETRY)
    source = open_source(src)
    for name in Checkpoint(out).names():
        np.testing.assert_array_equal(bits_of(Checkpoint(out).decode(name)), bits_of(source.read(name)))


# ---------------------------------------------------------------------------------------- property
@pytest.fixture(scope="module", params=["bf16-lossless", "int8", "zstd"])
def pristine(request, tmp_path_factory):
    """(folder, shard bytes, every tensor decoded) of a tiny converted Llama, once per codec."""
    tmp = tmp_path_factory.mktemp(request.param)
    src = write_llama_folder(tmp / "src", **SHAPE)
    out = tmp / "c"
    convert.convert(src, out, request.param, progress=False, **(GEOMETRY if request.param != "zstd" else {}))
    ckpt = Checkpoint(out)
    return out, (out / "model.safetensors").read_bytes(), {n: bits_of(ckpt.decode(n)) for n in ckpt.names()}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7), st.booleans()),
                      min_size=1, max_size=3))
def test_mutations_give_clean_error_or_exact_weights(pristine, flips):
    """Flipped bits anywhere (or in the JSON header): every read is a one-line CheckpointError or bit-exact."""
    out, data, ref = pristine
    b = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little")
    for at, bit, in_header in flips:
        pos = 8 + int(at * (header_end - 8)) if in_header else int(at * len(b))
        b[pos] ^= 1 << bit
    (out / "model.safetensors").write_bytes(bytes(b))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["info", str(out)]) in (0, cli.EXIT_BAD_INPUT)
    try:
        ckpt = Checkpoint(out)
        got = {n: bits_of(ckpt.decode(n)) for n in ckpt.names()}
    except CheckpointError as e:
        assert "\n" not in str(e)
    else:
        assert got.keys() == ref.keys() and all(np.array_equal(got[n], ref[n]) for n in ref)
    finally:
        (out / "model.safetensors").write_bytes(data)


def test_generate_refuses_a_flipped_byte(tmp_path, write_llama, capsys):
    src = write_llama(tmp_path / "src", **SHAPE)
    out = tmp_path / "c"
    convert.convert(src, out, progress=False, **GEOMETRY)
    _flip(out, f"{UP}.words")
    assert cli.main(["generate", str(out), "hi", "--max-new-tokens", "1"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"tensor {UP}: tile " in err and err.count("\n") == 1


def test_convert_refuses_a_deeply_nested_source_header(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = b'{"__metadata__":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    (src / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert cli.main(["convert", str(src), str(tmp_path / "out"), "-q"]) == cli.EXIT_BAD_INPUT
    assert "RecursionError" in capsys.readouterr().err


def test_zstd_frame_claiming_more_than_it_can_hold():
    """A frame header can say any content size; one larger than 2^15 times the frame is refused before a
    decompressor allocates it, while a legitimately all-zero tensor (the most a frame expands) passes."""
    zeros = codecs.encode_zstd(np.zeros((4096, 1024), np.float32))
    codecs.validate(zeros)
    fake_header = (0xFD2FB528).to_bytes(4, "little") + bytes([0xE0]) + (1 << 36).to_bytes(8, "little")
    rec = dict(zeros.record, shape=[1 << 17, 1 << 17], dtype="float32")
    frame = np.frombuffer(fake_header + bytes(64), np.uint8)
    with pytest.raises(codecs.FormatError, match="cannot hold"):
        codecs.validate(codecs.EncodedTensor(rec, dict(zstd=frame)))
