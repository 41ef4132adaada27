"""Run a function on every rank of a gloo world of spawned processes on 127.0.0.1, each rank's
outcome (a value or the exception's type and message) saved to a file the parent reads back.

Never hangs: every process gets a deadline and is killed after it; the load's own collectives
have their ``tp_timeout``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world: int, port: int, out: str, args) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts on it
        result = ("error", type(e).__name__, str(e), traceback.format_exc())
    torch.save(result, out)
    os._exit(0)   # no destroy_process_group: a peer may be dead; the parent judges by the file


def run_world(fn, world: int, tmp: Path, *args, deadline: float = 240.0) -> list[tuple]:
    """``fn(rank, world, *args)`` on ``world`` spawned ranks; per rank ``("ok", value)`` or
    ``("error", type name, message, traceback)``, or ``("died", exitcode)`` without a file."""
    ctx = mp.get_context("spawn")
    port = free_port()
    outs = [str(tmp / f"rank{r}-{port}.pt") for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, outs[r], args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(deadline)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [torch.load(o, weights_only=False) if Path(o).exists() else ("died", p.exitcode)
            for o, p in zip(outs, procs)]
