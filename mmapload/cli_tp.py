"""The command line's side of tensor parallelism: ``quantize --tp`` joins the world torchrun set
up (its environment: the CLI may read it, the library never does) and loads this rank's part;
``--tp-plan`` parses the sharding overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .errors import MmapLoadError

__all__ = ["quantize_tp", "tp_plan_arg", "add_tp_plan"]


def tp_plan_arg(text: str) -> dict:
    """--tp-plan: a JSON object (pattern -> "column" | "row" | "replicate"), or a file holding one."""
    src = text
    if not text.lstrip().startswith("{") and Path(text).is_file():
        src = Path(text).read_text()
    try:
        plan = json.loads(src)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object (or a file of one): {text!r} ({e})") from None
    if not isinstance(plan, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of name pattern -> 'column' | 'row' | "
                                         f"'replicate', got {text!r}")
    return plan   # its patterns and styles are checked by the load (OptionsError)


def add_tp_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp-plan", type=tp_plan_arg, default=None, metavar="JSON",
                   help='overrides of the TP sharding rule: a JSON object (or a file of one) of name '
                        'pattern -> column | row | replicate, e.g. \'{"model.extra": "row"}\'')


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")   # what init_process_group reads


def quantize_tp(path, a: argparse.Namespace, load_kwargs: dict, error_text) -> int:
    """``quantize --tp`` on one rank of a torchrun world: join the group torchrun set up (its
    environment), load this rank's part, print its report, every line prefixed ``[rank R]``.
    Errors are one line each, on every rank, prefixed with the rank (``error_text(e)``: the CLI's
    line for an MmapLoadError or OSError)."""
    missing = [k for k in _TORCHRUN_ENV if not os.environ.get(k)]
    if missing:
        print(f"mmapload: error: --tp needs the environment torchrun sets ({', '.join(missing)} unset): "
              f"run torchrun --nproc-per-node N -m mmapload quantize {path} --tp", file=sys.stderr)
        return 2
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        print(f"mmapload: error: --tp: RANK={os.environ['RANK']!r} and WORLD_SIZE="
              f"{os.environ['WORLD_SIZE']!r} must be ints (torchrun sets them)", file=sys.stderr)
        return 2
    import datetime

    import torch
    import torch.distributed as dist

    from .stream import stream_quantize
    tag = f"rank {rank} of {world}"
    device = a.device
    if device == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        device = f"cuda:{os.environ['LOCAL_RANK']}"   # one GPU per local rank
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    code, msg = 0, None
    try:
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=a.tp_timeout))
        # every rank has joined before any may leave: a rank that failed fast (bad options, a
        # tp_size that does not cut a tensor) and exited would break a slower one's joining
        dist.barrier()
    except (RuntimeError, ValueError) as e:   # DistStoreError (a timeout, no rendezvous), a bad device
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        code, msg = 2, (f"could not join the torch.distributed group (backend {backend}, "
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): {first}")
    # torchrun stops the other ranks (SIGTERM) once one has failed: from here on a rank says so in
    # one line. (Not during the join: a Python handler cannot run while the rendezvous blocks in
    # C++, so a SIGTERM there would wait for the join's timeout instead of ending the rank.)
    prev = signal.signal(signal.SIGTERM, _stop)
    try:
        if msg is None:
            try:
                model = stream_quantize(path, device, tp_size=world, tp_rank=rank, tp_plan=a.tp_plan,
                                        tp_timeout=a.tp_timeout, **load_kwargs)
                _say(sys.stdout, "".join(f"[rank {rank}] {line}\n" for line in model.report.format().splitlines()))
                signal.signal(signal.SIGTERM, prev)
                dist.destroy_process_group()
                return 0
            except (MmapLoadError, OSError) as e:
                code, msg = 2, error_text(e)
    except _Stopped:      # also while this rank's own error was being worded: that error wins
        if msg is None:
            code, msg = 143, ("stopped by SIGTERM (torchrun stops every rank once one has failed: that "
                              "rank's error says why)")
    except KeyboardInterrupt:
        if msg is None:
            code, msg = 130, "interrupted"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the one line below is said whole
    if not msg.startswith(f"rank {rank} of tp_size="):   # tp_group's errors name the rank already
        msg = f"{tag}: {msg}"
    _say(sys.stderr, f"mmapload: error: {msg}\n")
    # A failed load may leave a collective pending or a peer gone: tearing the group down (or the
    # interpreter's exit doing it) can then abort inside gloo / NCCL ("terminate called without an
    # active exception"). Leave at once, with our own exit status.
    sys.stdout.flush()
    os._exit(code)


def _say(stream, text: str) -> None:
    """``text`` in one write(2) on ``stream``'s file descriptor: the ranks share torchrun's pipes,
    and print() writes a line and its newline separately, so two ranks' lines could interleave
    mid-line (seen: "...JSON)mmapload: error: rank 0..."). One write of up to PIPE_BUF (4 KiB) bytes
    to a pipe is atomic."""
    stream.flush()
    data = text.encode(errors="backslashreplace")
    while data:
        data = data[os.write(stream.fileno(), data):]


class _Stopped(BaseException):
    """SIGTERM under ``quantize --tp`` (torchrun stopping the ranks after one failed)."""


def _stop(signum, frame):
    raise _Stopped()
