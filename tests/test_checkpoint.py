"""The checkpoint folder: conversion, reading back, and every kind of bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jcodec import checkpoint, convert
from jcodec.checkpoint import FORMAT_VERSION, Checkpoint, CheckpointError
from jcodec.codecs import bits_of

# small tiles so that the small test tensors have several tiles each; 33 steps: pair lanes decode runs of 4
# (33 - 1 carried step = 8 runs)
GEOMETRY = dict(lanes=16, steps=33)


@pytest.mark.parametrize("codec", ["bf16-lossless", "zstd"])
def test_convert_roundtrip_lossless(tmp_path, hf_folder, small_tensors, codec):
    out = tmp_path / "out.jcodec"
    rep = convert.convert(hf_folder, out, codec, progress=False, **GEOMETRY)
    ckpt = Checkpoint(out)
    assert sorted(ckpt.names()) == sorted(small_tensors)
    for name, ref in small_tensors.items():
        got = ckpt.decode(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(bits_of(got), bits_of(ref))
    # norms, tiny and incompressible tensors stay raw: never larger than raw
    assert ckpt.record("model.layers.0.input_layernorm.weight") is None
    assert ckpt.record("model.layers.0.noise.weight") is None
    assert rep.stored_bytes < rep.original_bytes
    assert convert.verify(out, hf_folder, progress=False).compared == len(small_tensors)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_convert_with_pair_symbols(tmp_path, hf_folder, small_tensors):
    """--pairs: bfloat16 tensors get pair symbols (format version 3) in runs (version 4), others keep one exponent a
    symbol."""
    out = tmp_path / "pairs.jcodec"
    convert.convert(hf_folder, out, progress=False, pairs=True, **GEOMETRY)
    ckpt = Checkpoint(out)
    kinds = {}
    for name, ref in small_tensors.items():
        np.testing.assert_array_equal(bits_of(ckpt.decode(name)), bits_of(ref))
        r = ckpt.record(name)
        if r is not None:
            kinds[str(ref.dtype)] = kinds.get(str(ref.dtype), set()) | {r.get("pairs", False)}
            assert r.get("run", 1) == (4 if r.get("pairs") else 1)
            assert ckpt.summary(name)["codec"] == ("bf16-lossless/pairs" if r.get("pairs") else "bf16-lossless")
    assert kinds.get("bfloat16") == {True} and all(v == {False} for k, v in kinds.items() if k != "bfloat16"), kinds
    assert convert.verify(out, hf_folder, progress=False).compared == len(small_tensors)


def test_int8_verify_against_source(tmp_path, hf_folder):
    out = tmp_path / "int8"
    convert.convert(hf_folder, out, "int8", progress=False, **GEOMETRY)
    assert Checkpoint(out).record("model.layers.0.mlp.up_proj.weight")["codec"] == "int8"
    assert convert.verify(out, hf_folder, progress=False).compared == 5


def test_sharded_output(tmp_path, hf_folder, small_tensors):
    out = tmp_path / "sharded"
    convert.convert(hf_folder, out, shard_bytes=20_000, progress=False, **GEOMETRY)
    index = json.loads((out / checkpoint.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    for name, ref in small_tensors.items():
        np.testing.assert_array_equal(bits_of(Checkpoint(out).decode(name)), bits_of(ref))


def test_refuses_to_overwrite(tmp_path, hf_folder):
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert.convert(hf_folder, out, progress=False)


def test_failed_conversion_leaves_nothing(tmp_path, hf_folder, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(RuntimeError):
        convert.convert(hf_folder, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.fixture
def converted(tmp_path, hf_folder):
    out = tmp_path / "c"
    convert.convert(hf_folder, out, progress=False, **GEOMETRY)
    return out


def test_truncated_file(converted):
    f = converted / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(converted)


def test_wrong_version(converted):
    f = converted / "model.safetensors"
    data = bytearray(f.read_bytes())
    i = data.index(b'"jcodec.version":"%d"' % FORMAT_VERSION)
    data[i + len(b'"jcodec.version":"')] = ord("9")
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="version 9"):
        Checkpoint(converted)


def test_reads_version_3(tmp_path, hf_folder, small_tensors, legacy_writer):
    """A version 3 file (no runs: 32 steps leave 31 for runs of 4) still reads; the version is the only change
    from version 4."""
    out = tmp_path / "v3"
    convert.convert(hf_folder, out, progress=False, lanes=16, steps=32)
    f = out / "model.safetensors"
    data = f.read_bytes()
    assert b'"run"' not in data and b'\\"run\\"' not in data
    f.write_bytes(data.replace(b'"jcodec.version":"4"', b'"jcodec.version":"3"'))
    for name, ref in small_tensors.items():
        np.testing.assert_array_equal(bits_of(Checkpoint(out).decode(name)), bits_of(ref))


def _edit_record(folder, name, **changes):
    """Rewrite one tensor's JSON record (data offsets are relative to the header's end, so they stay valid)."""
    f = folder / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    rec = json.loads(header["__metadata__"][checkpoint.RECORD_PREFIX + name])
    rec.update(changes)
    header["__metadata__"][checkpoint.RECORD_PREFIX + name] = json.dumps(rec, separators=(",", ":"))
    new = json.dumps(header, separators=(",", ":")).encode()
    f.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + n:])


@pytest.mark.parametrize("change", [dict(shape=[300, 65]), dict(shape=[-1, 64]), dict(tiles=1), dict(lanes=10**6),
                                    dict(codec="brotli"), dict(dtype="int4"), dict(words=5), dict(run=3),
                                    dict(run="4"), dict(run=8), dict(run=1), dict(steps=34)])
def test_lying_record(converted, change):
    _edit_record(converted, "model.embed_tokens.weight", **change)
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight"):
        Checkpoint(converted).decode("model.embed_tokens.weight")


def test_random_byte_flips_give_error_or_original(converted, small_tensors):
    """Flip random bytes anywhere in the shard: every read either fails cleanly or returns the exact original."""
    f = converted / "model.safetensors"
    pristine = f.read_bytes()
    rng = np.random.default_rng(7)
    outcomes = {"error": 0, "exact": 0}
    for trial in range(60):
        data = bytearray(pristine)
        for pos in rng.integers(0, len(data), size=1 + trial % 3):
            data[pos] ^= 1 << int(rng.integers(0, 8))
        f.write_bytes(bytes(data))
        try:
            ckpt = Checkpoint(converted)
            for name, ref in small_tensors.items():
                got = ckpt.decode(name)
                np.testing.assert_array_equal(bits_of(got), bits_of(ref))
            outcomes["exact"] += 1
        except CheckpointError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        Checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(tmp_path / "empty")


def test_index_cannot_point_outside(converted):
    (converted / checkpoint.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="not a file in the checkpoint folder"):
        Checkpoint(converted)


def test_permissions_are_ordinary(converted):
    assert os.stat(converted).st_mode & 0o055  # group/other can read, as for any folder we make


def test_leftovers_of_killed_conversions_removed(tmp_path, hf_folder):
    """A killed conversion's temporary folder (its process gone) is removed by the next one into the same folder;
    a live conversion's is not."""
    dead = tmp_path / ".out.999999999.abc123.tmp"
    old_style = tmp_path / ".out.k2j4h5g6.tmp"  # (named by an older jcodec, without a PID)
    live = tmp_path / f".out.{os.getpid()}.def456.tmp"
    for p in (dead, old_style, live):
        p.mkdir()
        (p / "model-00001.safetensors").write_bytes(b"x" * 100)
    other = tmp_path / ".another.999999999.abc.tmp"
    other.mkdir()
    convert.convert(hf_folder, tmp_path / "out", progress=False, **GEOMETRY)
    assert not dead.exists() and not old_style.exists() and live.exists() and other.exists()


def test_overwrite_is_atomic(tmp_path, hf_folder, monkeypatch):
    """--overwrite renames the old OUT away before the new one takes its place, and back if that fails."""
    out = tmp_path / "out"
    convert.convert(hf_folder, out, progress=False, **GEOMETRY)
    before = (out / "model.safetensors").read_bytes()
    real = os.replace

    def failing(src, dst):
        if os.fspath(dst) == os.fspath(out) and ".old." not in os.fspath(src):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        convert.convert(hf_folder, out, "zstd", progress=False, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    monkeypatch.setattr(checkpoint.os, "replace", real)
    convert.convert(hf_folder, out, "zstd", progress=False, overwrite=True)
    assert Checkpoint(out).record("model.embed_tokens.weight")["codec"] == "zstd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_sigterm_removes_the_temporary_folder(tmp_path, hf_folder):
    """SIGTERM is handled as SIGINT: the conversion stops with status 130 and leaves nothing behind."""
    script = (
        "import sys, time\n"
        "from jcodec import checkpoint, cli\n"
        "add = checkpoint.CheckpointWriter.add\n"
        "checkpoint.CheckpointWriter.add = lambda self, *a: (add(self, *a), time.sleep(1))[0]\n"
        f"sys.exit(cli.main(['convert', {str(hf_folder)!r}, {str(tmp_path / 'out')!r}, '-q']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob(".out.*.tmp")), "the conversion never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
