"""Hostile and odd inputs to convert and the CLI (issue 13, part B): OSErrors and Ctrl-C in the CLI,
long names, symlinks, stale partial folders, the empty round trip, the index size cap."""

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmapload import HeaderError, MmapLoadWarning, ShardIndexError, convert, stream_quantize
from mmapload import cli, checkpoint, outdir
from mmapload import converter as export
from mmapload.checkpoint import INDEX_NAME, open_checkpoint


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    save_file({"layer.q.weight": torch.randn(8, 16), "layer.norm.weight": torch.ones(16)},
              d / "model.safetensors")
    return d


# -- 1. the CLI: one line, no traceback, for every OSError and for Ctrl-C -----------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO])
def test_cli_turns_oserrors_into_one_line(src, tmp_path, monkeypatch, capsys, code, no_thread_leak):
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):   # the partial output folder cannot be made: full / read-only / denied
        if outdir.PARTIAL_MARK in self.name:
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert cli.main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmapload: error: ") and err.count("\n") == 1, err
    assert os.strerror(code) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_destination_under_a_file(src, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["convert", str(src), str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmapload: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "file" in err


def test_cli_missing_checkpoint_names_it(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmapload: error: ") and "nope.safetensors" in err and err.count("\n") == 1


def test_cli_ctrl_c_is_one_line_and_exit_130(src, tmp_path, monkeypatch, capsys, no_thread_leak):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(export, "copy_extras", interrupt)
    assert cli.main(["convert", str(src), str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]   # the partial folder is gone


def test_cli_sigterm_cleans_up_as_ctrl_c_and_exits_143(src, tmp_path, monkeypatch, capsys, no_thread_leak):
    import signal

    def terminate(*a, **k):   # a SIGTERM arrives while the output is being finished
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(export, "copy_extras", terminate)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["convert", str(src), str(tmp_path / "out")]) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SIGTERM" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]   # the partial folder is gone
    assert signal.getsignal(signal.SIGTERM) is before              # the caller's handler is back


def test_cli_warnings_are_one_line_and_a_closed_pipe_is_quiet(tmp_path):
    d = tmp_path / "gpt"
    d.mkdir()
    save_file({"h.0.attn.c_attn.weight": torch.randn(8, 24), "h.0.ln_1.weight": torch.ones(8)},
              d / "model.safetensors")
    out = subprocess.run([sys.executable, "-m", "mmapload", "convert", str(d), str(tmp_path / "out"),
                          "--skip", "c_attn"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    warned = [ln for ln in out.stderr.splitlines() if "warning" in ln]
    assert warned and all(ln.startswith("mmapload: warning: ") for ln in warned), out.stderr
    assert "no tensor is quantized" in out.stderr and "sys.exit" not in out.stderr
    head = subprocess.run(f"{sys.executable} -m mmapload inspect {d} --device cpu --top 50 | head -1",
                          shell=True, capture_output=True, text=True, timeout=300)
    assert "Broken pipe" not in head.stderr and "Traceback" not in head.stderr, head.stderr


# -- 2. convert ---------------------------------------------------------------------------------

def test_a_252_character_shard_name_converts(tmp_path, no_thread_leak):
    d = tmp_path / "src"
    d.mkdir()
    name = "s" * 240 + ".safetensors"   # 252 characters: legal, and '.<name>.partial' is not
    assert len(name) == 252
    save_file({"x.weight": torch.randn(4, 8)}, d / name)
    out = convert(d, tmp_path / "out")
    assert (out / name).is_file()
    assert stream_quantize(out, "cpu")["x.weight"].data.dtype == torch.float8_e4m3fn


def test_a_long_destination_name_converts(src, tmp_path, no_thread_leak):
    dst = tmp_path / ("d" * 250)
    assert convert(src, dst) == dst and (dst / "model.safetensors").is_file()
    assert convert(src, dst, overwrite=True) == dst   # the moved-aside old dst has a short name too
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", dst.name])


def test_extra_files_linking_out_of_the_source_are_not_copied(src, tmp_path, no_thread_leak):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (src / "tokenizer.json").symlink_to(secret)
    (src / "vocab.txt").write_text("a b c")
    (src / "vocab_link.txt").symlink_to("vocab.txt")   # a link inside the folder is fine
    with pytest.warns(MmapLoadWarning, match="tokenizer.json.*outside the source folder"):
        out = convert(src, tmp_path / "out")
    assert not (out / "tokenizer.json").exists()
    assert (out / "vocab_link.txt").read_text() == "a b c" and not (out / "vocab_link.txt").is_symlink()


def test_hf_cache_snapshot_links_into_blobs_are_copied(tmp_path, no_thread_leak):
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"x.weight": torch.randn(4, 8)}, repo / "blobs" / "b1")
    (repo / "blobs" / "b2").write_text('{"a": 1}')
    (snap / "model.safetensors").symlink_to("../../blobs/b1")
    (snap / "tokenizer.json").symlink_to("../../blobs/b2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MmapLoadWarning)
        out = convert(snap, tmp_path / "out")
    assert (out / "tokenizer.json").read_text() == '{"a": 1}'
    assert set(load_file(out / "model.safetensors")) == {"x.weight", "x.weight_scale"}


def test_stale_partial_folders_of_dead_processes_are_removed(src, tmp_path, no_thread_leak):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    dst = tmp_path / "out"
    stale = outdir.work_name(dst, pid=dead_pid)
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"half")
    alive = outdir.work_name(dst, pid=os.getppid())   # a running process: left alone
    alive.mkdir()
    other = outdir.work_name(tmp_path / "other", pid=dead_pid)   # another destination's: left alone
    other.mkdir()
    convert(src, dst)
    assert not stale.exists() and alive.is_dir() and other.is_dir()


def test_overwrite_replaces_a_symlink_destination_not_its_target(src, tmp_path, no_thread_leak):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for link, points_to in [(tmp_path / "link", target), (tmp_path / "dangling", tmp_path / "nowhere"),
                            (tmp_path / "to_file", target / "keep.txt")]:
        link.symlink_to(points_to)
        assert convert(src, link, overwrite=True) == link
        assert link.is_dir() and not link.is_symlink() and (link / "model.safetensors").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"


def test_empty_checkpoint_round_trips(tmp_path, no_thread_leak):
    d = tmp_path / "src"
    d.mkdir()
    save_file({}, d / "model.safetensors")
    out = convert(d, tmp_path / "out")
    assert json.loads((out / INDEX_NAME).read_text())["weight_map"] == {}
    assert open_checkpoint(out).tensors == ()
    assert len(stream_quantize(out, "cpu")) == 0
    again = convert(out, tmp_path / "again")
    assert open_checkpoint(again).tensors == ()


def test_empty_weight_map_still_checks_the_shards(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / INDEX_NAME).write_text('{"weight_map": {}}')
    with pytest.raises(ShardIndexError, match="absent from weight_map"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ShardIndexError, match="weight_map is empty"):
        open_checkpoint(tmp_path)


def test_index_over_the_size_cap_is_refused_unread(tmp_path, monkeypatch):
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "model.safetensors"},
                                                   "pad": "y" * 5000}))
    monkeypatch.setattr(checkpoint, "MAX_INDEX_BYTES", 4096)
    monkeypatch.setattr(checkpoint.json, "loads", lambda *a, **k: pytest.fail("read past the cap"))
    with pytest.raises(ShardIndexError, match="4096-byte limit"):
        open_checkpoint(tmp_path)


# -- 3. header parsing: the safetensors library's verdict, input by input -------------------------

def _raw_shard(path: Path, header_text: str, data: bytes = b"xy") -> Path:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _verdicts(path: Path):
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            theirs = sorted(f.keys())
    except Exception:   # safetensors raises its own SafetensorError
        theirs = None
    try:
        ours = sorted(s.name for s in checkpoint.read_header(path).tensors)
    except HeaderError:
        ours = None
    return ours, theirs


_ENTRY = '"dtype":"U8","shape":[2],"data_offsets":[0,2]'


@pytest.mark.parametrize("header, accepted", [
    ('{"a":{%s,"extra":1}}' % _ENTRY, True),                         # extra key: safetensors ignores it
    ('{"a":{%s,"extra":{"x":[1,{"y":null}]}}}' % _ENTRY, True),
    ('{"\\ud800":{%s}}' % _ENTRY, False),                               # lone high surrogate
    ('{"a\\udc00b":{%s}}' % _ENTRY, False),                             # lone low surrogate
    ('{"__metadata__":{"k":"\\udbff"},"a":{%s}}' % _ENTRY, False),
    ('{"\\ud83d\\ude00":{%s}}' % _ENTRY, True),                         # a pair is one character
    ('{"a\\\\ud800":{%s}}' % _ENTRY, True),                             # a backslash, then text
    ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"dtype":"U8"}}', False),
    ('{"a":{"dtype":"U8","shape":[2]}}', False),
])
def test_headers_get_the_safetensors_verdict(tmp_path, header, accepted):
    ours, theirs = _verdicts(_raw_shard(tmp_path / "h.safetensors", header))
    assert (ours is not None) == (theirs is not None) == accepted, (ours, theirs)
    assert ours == theirs


def test_we_differ_on_purpose(tmp_path):
    """Repeated keys: safetensors keeps the last one silently (and for an unknown key inside an
    entry, ignores both); a repeated name is ambiguous, so mmapload refuses any repeated key."""
    for header in ['{"a":{%s},"a":{%s}}' % (_ENTRY, _ENTRY), '{"a":{%s,"extra":1,"extra":2}}' % _ENTRY]:
        ours, theirs = _verdicts(_raw_shard(tmp_path / "h.safetensors", header))
        assert ours is None and theirs == ["a"]


def test_lone_surrogate_names_are_refused_before_convert_writes(tmp_path, no_thread_leak):
    d = tmp_path / "src"
    d.mkdir()
    _raw_shard(d / "model.safetensors", '{"x\\ud800.weight":{%s}}' % _ENTRY)
    with pytest.raises(HeaderError, match="surrogate"):
        convert(d, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_full_disk_names_the_file_and_the_tensor_being_written(tmp_path):
    from mmapload.writer import SafetensorsWriter
    w = SafetensorsWriter(tmp_path / "a.safetensors", [("x", torch.float32, (4,))])

    class Full:   # the file object of a full disk: write() fails without a file name
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, k):
            return getattr(self.f, k)
    w._f = Full(w._f)
    with pytest.raises(OSError) as e:
        w.write("x", torch.ones(4))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(w.tmp) and "'x'" in str(e.value)
    assert "free some space" in cli._os_error(e.value) and str(w.tmp) in cli._os_error(e.value)
    w.discard()
    assert list(tmp_path.iterdir()) == []
