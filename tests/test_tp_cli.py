"""``quantize --tp`` run for real under torchrun (``python -m torch.distributed.run``, which ships
with torch), and ``inspect --tp-size``: reports per rank, errors as one line on every rank."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mmapload
from mmapload.cli import main
from mmapload.estimate import estimate
from mmapload.synth import make_llama_checkpoint
from tpworld import free_port

MiB = 2**20
ROOT = Path(mmapload.__file__).parent.parent      # this checkout, not an installed mmapload
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """h=128 llama, 22 layers, ~8 MiB: every weight cut in two at TP=2 but k / v (1 kv head:
    replicated), the norms replicated."""
    return make_llama_checkpoint(tmp_path_factory.mktemp("tpcli"), 8 * MiB, shards=2)


@pytest.fixture
def indivisible(tmp_path):
    """An up_proj of 3 rows: tp_size=2 cannot cut it."""
    (tmp_path / "bad").mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(3, 64).bfloat16(),
               "model.norm.weight": torch.ones(64).bfloat16()}, tmp_path / "bad" / "model.safetensors")
    return tmp_path / "bad"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return env


def _torchrun(*args, timeout=240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node 2 ARGS`` (ARGS: ``-m mmapload ...`` or a
    script), on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def _read_mib(report: str) -> float:
    return float(re.search(r"^read\s+([\d,.]+) MiB", report, re.M).group(1).replace(",", ""))


def _no_mmapload_traceback(text: str) -> None:
    """torchrun prints its own ChildFailedError traceback when a rank fails; none of ours."""
    assert not re.search(r'File ".*mmapload/', text), text[-3000:]


@pytest.mark.timeout(300)
def test_quantize_tp_under_torchrun_prints_each_ranks_report(llama, capsys):
    assert main(["quantize", str(llama), "--policy", "names"]) == 0
    full = _read_mib(capsys.readouterr().out)
    out = _torchrun("-m", "mmapload", "quantize", llama, "--tp", "--policy", "names", "--ring-bytes", "1MiB")
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    _no_mmapload_traceback(out.stderr)
    share = estimate(llama, "cpu", policy="names", ring_bytes=MiB, tp_size=2).bytes_read / MiB
    assert 0.45 < share / full < 0.6          # about half: k, v and the norms are read by both
    lines = out.stdout.splitlines()
    for rank in (0, 1):
        mine = [ln.removeprefix(f"[rank {rank}] ") for ln in lines if ln.startswith(f"[rank {rank}] ")]
        report = "\n".join(mine)
        assert f"tensor parallel rank {rank} of 2" in report, out.stdout
        assert "retained" in report and "host RSS" in report
        assert abs(_read_mib(report) - share) <= 0.05, (report, share)   # printed to 0.1 MiB
    assert all(ln.startswith("[rank ") for ln in lines if ln.strip()), out.stdout


@pytest.mark.timeout(300)
def test_quantize_tp_errors_are_one_line_on_every_rank(indivisible):
    out = _torchrun("-m", "mmapload", "quantize", indivisible, "--tp", "--policy", "names")
    assert out.returncode != 0
    _no_mmapload_traceback(out.stderr)
    _one_line_each_and_the_cause(out.stderr)


def _one_line_each_and_the_cause(err: str) -> None:
    """Every rank says one line; at least one says why (the tensor tp_size=2 cannot cut). torchrun
    stops the others as soon as one rank has failed, so a slower rank may say only that."""
    named = 0
    for rank in (0, 1):
        lines = [ln for ln in err.splitlines() if ln.startswith(f"mmapload: error: rank {rank} of 2: ")]
        assert len(lines) == 1, err
        line = lines[0]
        cause = "model.layers.0.mlp.up_proj.weight" in line and "tp_size=2" in line and "--tp-plan" in line
        assert cause or "stopped by SIGTERM" in line, line
        named += cause
    assert named >= 1, err


SLOW_AFTER_JOIN = """
import os, sys, time
from mmapload import stream
from mmapload.cli import main
load = stream.stream_quantize
def slow(*args, **kwargs):               # rank 0 is slow to start loading: rank 1 fails first
    if os.environ["RANK"] == "0":
        time.sleep(20)
    return load(*args, **kwargs)
stream.stream_quantize = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_a_rank_stopped_right_after_joining_says_so(indivisible, tmp_path):
    """torchrun's SIGTERM may reach a rank before it has started loading (here: rank 1 failed while
    rank 0 had just joined): it says one line too, not nothing."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_AFTER_JOIN)
    out = _torchrun(script, "quantize", indivisible, "--tp", "--policy", "names", timeout=120)
    assert out.returncode != 0
    _no_mmapload_traceback(out.stderr)
    _one_line_each_and_the_cause(out.stderr)
    assert re.search(r"^mmapload: error: rank 0 of 2: stopped by SIGTERM", out.stderr, re.M), out.stderr


STALL = """
import os, sys, time
from mmapload import assemble
from mmapload.cli import main
flush, calls = assemble.Assembler.flush, []
def stalling(self):                      # rank 1 stalls mid-load, after some collectives
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        time.sleep(60)
    return flush(self)
assemble.Assembler.flush = stalling
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_a_stalled_rank_fails_the_others_with_one_line_each(llama, tmp_path):
    """Rank 0's collective times out (TPError, exit 2); torchrun then stops rank 1 with SIGTERM,
    which says so in one line too. Nobody aborts in the group's teardown."""
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    out = _torchrun(script, "quantize", llama, "--tp", "--policy", "names", "--ring-bytes", "256KiB",
                    "--tp-timeout", "5", timeout=120)
    assert out.returncode != 0
    _no_mmapload_traceback(out.stderr)
    err = out.stderr
    assert re.search(r"^mmapload: error: rank 0 of tp_size=2: the amax all-reduce .* failed", err, re.M), err
    assert re.search(r"^mmapload: error: rank 1 of 2: stopped by SIGTERM", err, re.M), err
    assert "terminate called" not in err and "exitcode: -6" not in err, err


def test_tp_without_torchrun_is_one_line_error(llama, monkeypatch, capsys):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    assert main(["quantize", str(llama), "--tp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchrun --nproc-per-node N -m mmapload quantize" in err
    assert "RANK" in err and "Traceback" not in err


def test_tp_options_are_checked(llama, capsys):
    with pytest.raises(SystemExit) as e:      # argparse: exit 2
        main(["quantize", str(llama), "--tp", "--tp-plan", "{oops"])
    assert e.value.code == 2 and "--tp-plan" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(llama), "--tp", "--tp-timeout", "0"])
    capsys.readouterr()
    assert main(["inspect", str(llama), "--tp-size", "2", "--tp-plan", '{"lm_head": "diagonal"}']) == 2
    assert "tp_plan" in capsys.readouterr().err
    plan = Path(llama) / "plan.json"
    plan.write_text('{"lm_head": "replicate"}')
    try:
        assert main(["inspect", str(llama), "--policy", "names", "--tp-size", "2", "--tp-plan", str(plan),
                     "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        replicated = estimate(llama, "cuda", policy="names", tp_size=2, tp_plan={"lm_head": "replicate"})
        assert d["bytes_read"] == replicated.bytes_read > estimate(llama, "cuda", policy="names",
                                                                    tp_size=2).bytes_read
    finally:
        plan.unlink()


def test_inspect_tp_size_projects_one_rank_next_to_tp1(llama, capsys):
    assert main(["inspect", str(llama), "--policy", "names", "--tp-size", "2", "--device-memory", "80GiB"]) == 0
    text = capsys.readouterr().out
    for want in ("tensor par.  rank 0 of 2", "bytes read", "host peak", "device peak", "vs TP=1",
                 "per rank", "each rank's device"):
        assert want in text, (want, text)
    assert main(["inspect", str(llama), "--policy", "names", "--tp-size", "2", "--tp-rank", "1",
                 "--device", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    p = estimate(llama, "cpu", policy="names", tp_size=2, tp_rank=1)
    assert (d["tp_rank"], d["tp_size"], d["bytes_read"], d["retained_bytes"], d["host_peak"]) == (
        1, 2, p.bytes_read, p.retained_bytes, p.host_peak)
    assert d["tp1"]["bytes_read"] == d["total_bytes"] and d["tp1"]["retained_bytes"] > d["retained_bytes"]
    assert d["device_peak"] is None and d["tp1"]["device_peak"] is None


def test_inspect_tp_size_that_does_not_divide_is_one_line(indivisible, capsys):
    assert main(["inspect", str(indivisible), "--policy", "names", "--tp-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmapload: error: tensor 'model.layers.0.mlp.up_proj.weight'")
    assert "tp_size=2" in err and "replicate" in err and "--tp-plan" in err


def test_a_ranks_line_is_one_write(tmp_path, monkeypatch):
    """Ranks share torchrun's pipes: a line and its newline in two writes interleaved two ranks'
    errors mid-line under load (CI). Each line, report or error, goes out in one write(2)."""
    from mmapload import cli_tp
    writes = []
    real = os.write
    monkeypatch.setattr(cli_tp.os, "write", lambda fd, data: writes.append(bytes(data)) or real(fd, data))
    with open(tmp_path / "err", "w") as f:
        cli_tp._say(f, "mmapload: error: rank 1 of 2: x\n")
        cli_tp._say(f, "[rank 0] a\n[rank 0] b\n")
    assert writes == [b"mmapload: error: rank 1 of 2: x\n", b"[rank 0] a\n[rank 0] b\n"]
    assert (tmp_path / "err").read_text() == "mmapload: error: rank 1 of 2: x\n[rank 0] a\n[rank 0] b\n"
