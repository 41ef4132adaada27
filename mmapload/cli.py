"""``python -m mmapload`` / ``mmapload``: the only place that parses a command line."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .errors import MmapLoadError, MmapLoadWarning, OptionsError
from .config import IO_MODES, POLICIES, RING_BYTES, SCALE_DTYPES
from .cli_profile import add_profile, run_profile
from .cli_tp import add_tp_plan, quantize_tp
from .fp8 import Granularity

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'256MiB', '1.5GiB', '700M', '4096' -> bytes (K/M/G are powers of 10, KiB/MiB/GiB of 2)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64MiB, 1.5GiB, 700M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"not a count (0 or more): {text!r}")
    return int(text)


def _block_size(text: str) -> tuple[int, int]:
    """'128x128', '64,128' -> (rows, cols) of positive ints."""
    m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not m or not int(m.group(1)) or not int(m.group(2)):
        raise argparse.ArgumentTypeError(f"not a block size: {text!r} (two positive ints, e.g. 128x128)")
    return int(m.group(1)), int(m.group(2))


def _add_load_options(p: argparse.ArgumentParser, device: str = "cpu", progress: bool = True,
                      e5m2: bool = True) -> None:
    p.add_argument("--device", default=device, help=f"cpu, cuda, cuda:N (default {device})")
    p.add_argument("--ring-bytes", type=parse_size, default=RING_BYTES,
                   help=f"ring buffer size ({RING_BYTES >> 20}MiB)")
    p.add_argument("--granularity", default="tensor", choices=[g.value for g in Granularity],
                   help="one scale per tensor (default), per output channel (row) or per block")
    p.add_argument("--block-size", type=_block_size, default=(128, 128), metavar="ROWSxCOLS",
                   help="the block of --granularity block (default 128x128)")
    p.add_argument("--fp8", default="e4m3", choices=["e4m3", "e5m2"] if e5m2 else ["e4m3"],
                   help="FP8 format (e4m3)" if e5m2 else "FP8 format: e4m3, the one both checkpoint formats store")
    p.add_argument("--scale-dtype", default="float32", choices=SCALE_DTYPES, help="scales in float32 "
                   "(default), or in the weight's dtype as compressed-tensors / llm-compressor compute them "
                   "(weight: bf16 scales for a bf16 model; convert's channel and block outputs measured "
                   "byte-equal to model_free_ptq's FP8_DYNAMIC / FP8_BLOCK)")
    p.add_argument("--skip", action="append", default=[], help="tensor name pattern kept unquantized "
                   "(glob, or a substring; repeat the option for more)")
    p.add_argument("--ignore", action="append", default=[], help="module kept unquantized: a name, "
                   "'re:REGEX' or a class name such as Embedding (compressed-tensors style; repeatable)")
    p.add_argument("--targets", action="append", default=None, help="quantize only these modules "
                   "(same patterns as --ignore; repeatable); default: the policy's rule")
    p.add_argument("--fp8-weight-scale", type=float, default=None, metavar="S", help="the scale of FP8 "
                   "Linear weights the checkpoint stores without one (convert refuses them otherwise)")
    p.add_argument("--policy", default="auto", choices=POLICIES, help="judge tensors by "
                   "the model of config.json (auto: when transformers can build it) or by names alone")
    p.add_argument("--io", default="mmap", choices=IO_MODES, help="how shards are read (default mmap); "
                   "view quantizes straight from the mapped file and dies with SIGBUS if a shard is "
                   "truncated while it loads (mmap, pread, direct raise an error instead)")
    p.add_argument("--keep-page-cache", action="store_true", help="leave the shard pages this load "
                   "read in the page cache (default: drop them once used; pages cached before stay)")
    p.add_argument("--read-threads", type=int, default=None,
                   help="threads copying into the ring (default: 2 on cpu (1 on one core), up to 4 with cuda)")
    if progress:
        p.add_argument("--progress", action="store_true", help="show a progress line on stderr")


def _load_kwargs(a: argparse.Namespace) -> dict:
    return dict(ring_bytes=a.ring_bytes, granularity=a.granularity, block_size=a.block_size, fp8_dtype=a.fp8,
                scale_dtype=a.scale_dtype, drop_page_cache=not a.keep_page_cache,
                skip=tuple(a.skip), ignore=tuple(a.ignore), targets=a.targets, policy=a.policy,
                fp8_weight_scale=a.fp8_weight_scale, progress=getattr(a, "progress", False), io=a.io,
                read_threads=a.read_threads)


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return v


def _quantize(path, a: argparse.Namespace) -> int:
    if getattr(a, "tp", False):   # demo shares this, without --tp
        return quantize_tp(path, a, _load_kwargs(a), _line)
    from .stream import stream_quantize
    model = stream_quantize(path, a.device, **_load_kwargs(a))
    print(model.report.format())
    return 0


def _line(e: MmapLoadError | OSError) -> str:
    """The one line the CLI prints for an error."""
    return _error_text(e) if isinstance(e, MmapLoadError) else _os_error(e)


# the library's keywords that errors name as a fix (``skip=[...]``), and the option that sets each here
_FLAG_OF = {"ring_bytes": "--ring-bytes", "fp8_dtype": "--fp8", "granularity": "--granularity",
            "block_size": "--block-size", "scale_dtype": "--scale-dtype", "skip": "--skip", "ignore": "--ignore",
            "targets": "--targets", "policy": "--policy", "fp8_weight_scale": "--fp8-weight-scale",
            "drop_page_cache": "--keep-page-cache", "io": "--io", "read_threads": "--read-threads",
            "tp_plan": "--tp-plan JSON", "tp_timeout": "--tp-timeout", "tp_size": "--tp-size / torchrun",
            "device": "--device"}   # overwrite: its messages name --overwrite themselves


def _error_text(e: MmapLoadError) -> str:
    """An error's one line; the library keywords its fix names (``skip=[...]``) also said as
    the command line's options."""
    text = str(e)
    flags = [f for k, f in _FLAG_OF.items() if re.search(rf"(?<![\w.]){k}=", text)]
    return text + (f" (on the command line: {', '.join(flags)})" if flags else "")


def _demo_room(where: Path, size: int) -> None:
    """OptionsError unless ``where`` is new or empty and its disk has room for ``size`` bytes."""
    if where.exists() and (not where.is_dir() or any(where.iterdir())):
        raise OptionsError(f"{where} exists and is not an empty folder; demo --keep writes a new checkpoint "
                           "(config.json, shards, index) there: give a new or empty folder")
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < size + (64 << 20):
        raise OptionsError(f"{probe}: {free:,} bytes free, the demo checkpoint needs about {size:,}: "
                           "pass a smaller --size or --keep a folder on a bigger disk")


def _demo(a: argparse.Namespace) -> int:
    from .synth import make_llama_checkpoint
    with tempfile.TemporaryDirectory(prefix="mmapload-demo-") as tmp:
        where = Path(a.keep) if a.keep else Path(tmp)
        _demo_room(where, a.size)
        print(f"generating a llama-shaped bf16 checkpoint of about {a.size / 2**30:.2f} GiB in {where} ...",
              flush=True)
        t0 = time.perf_counter()
        ckpt = make_llama_checkpoint(where, a.size, shards=2)
        size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        print(f"generated {size / 2**30:.2f} GiB ({size:,} bytes) in {time.perf_counter() - t0:.1f} s; "
              f"streaming it to {a.device} as FP8 ...\n", flush=True)
        return _quantize(ckpt, a)


def _convert(a: argparse.Namespace) -> int:
    from .converter import convert
    t0 = time.perf_counter()
    out = convert(a.src, a.dst, device=a.device, overwrite=a.overwrite, format=a.format, **_load_kwargs(a))
    n = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {n / 2**20:,.1f} MiB of safetensors in {time.perf_counter() - t0:.1f} s")
    return 0


def _inspect(a: argparse.Namespace) -> int:
    from .estimate import estimate
    p = estimate(a.checkpoint, a.device, top=a.top, tp_size=a.tp_size, tp_rank=a.tp_rank,
                 tp_plan=a.tp_plan, **_load_kwargs(a))
    print(json.dumps(p.as_dict(a.device_memory), indent=2) if a.json else p.format(a.device_memory))
    return 0


_DESCRIPTION = ("Stream safetensors checkpoints to FP8 with bounded host memory: demo, quantize (load and "
                "report), inspect (project memory from the headers), profile (memory timelines against "
                "other loaders), convert (write an FP8 checkpoint). `mmapload COMMAND --help` for each.")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is: the same clean-up as Ctrl-C (threads joined, a
    partial output removed), then exit 143."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Our warnings as one line, ``mmapload: warning: ...``; others as Python prints them."""
    if issubclass(category, MmapLoadWarning):
        print(f"mmapload: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 2 error, 130 Ctrl-C, 143 SIGTERM)."""
    try:   # SIGTERM (kill, a job scheduler, docker stop) cleans up as Ctrl-C does
        before = signal.signal(signal.SIGTERM, _on_sigterm)
        handled = True
    except ValueError:   # not the main thread: leave signals alone
        handled = False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return _main(argv)
    finally:
        if handled:   # None: a handler not set from Python; the default is the closest we can put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="mmapload", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate a checkpoint, stream it, print the memory report")
    p.add_argument("--size", type=parse_size, default=1 << 30, help="checkpoint size (1GiB)")
    p.add_argument("--keep", metavar="DIR", help="write the checkpoint to DIR and keep it")
    _add_load_options(p)
    p = sub.add_parser("quantize", help="stream_quantize a checkpoint and print the report")
    p.add_argument("checkpoint")
    _add_load_options(p)
    p.add_argument("--tp", action="store_true", help="tensor parallel, one rank per process: run under "
                   "torchrun --nproc-per-node N -m mmapload quantize CKPT --tp; each rank loads and "
                   "reports its part (gloo on cpu, nccl on cuda)")
    p.add_argument("--tp-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="with --tp: how long joining the group and each collective may wait (300)")
    add_tp_plan(p)
    p = sub.add_parser("inspect", help="totals and projected memory of a load, from the headers only")
    p.add_argument("checkpoint")
    _add_load_options(p, device="cuda", progress=False)   # plans a GPU load; needs no GPU
    p.add_argument("--device-memory", type=parse_size, help="answer whether the load fits (e.g. 80GiB)")
    p.add_argument("--top", type=_count, default=5, help="how many of the largest tensors to list (5)")
    p.add_argument("--json", action="store_true", help="print the projection as JSON")
    p.add_argument("--tp-size", type=int, default=1, metavar="N", help="project one rank of a "
                   "tensor-parallel load of N ranks (quantize --tp under torchrun), next to TP=1")
    p.add_argument("--tp-rank", type=int, default=None, metavar="R", help="which rank (default 0; every "
                   "rank has the same sizes)")
    add_tp_plan(p)
    add_profile(sub, parse_size)
    p = sub.add_parser("convert", help="write an FP8 copy of a checkpoint, streamed (host memory ~ the "
                       "ring + the largest tensor)")
    p.add_argument("src", help="a .safetensors file or a checkpoint folder")
    p.add_argument("dst", help="output folder; must not exist or be empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace dst if it is a checkpoint (a "
                   ".safetensors file, or a folder with shards, an index or config.json) or a symlink, only once "
                   "the new output is complete; anything else is refused")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "fp8"],
                   help="checkpoint layout: compressed-tensors (default) or vLLM / DeepSeek 'fp8'")
    _add_load_options(p, e5m2=False)
    a = parser.parse_args(argv)
    if a.command == "quantize" and not a.tp and (a.tp_timeout is not None or a.tp_plan is not None):
        parser.error("--tp-timeout and --tp-plan apply to a tensor-parallel load: add --tp (under torchrun)")
    if a.command == "quantize" and a.tp_timeout is None:
        a.tp_timeout = 300.0
    try:
        if a.command == "demo":
            return _demo(a)
        if a.command == "convert":
            return _convert(a)
        if a.command == "inspect":
            return _inspect(a)
        if a.command == "profile":
            return run_profile(a)
        return _quantize(a.checkpoint, a)
    except MmapLoadError as e:
        print(f"mmapload: error: {_error_text(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # the reader of our output went away (`| head`): nothing to say to it
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except OSError as e:   # missing file, permission denied, read-only or full disk, ...
        print(f"mmapload: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except _Terminated:
        print("mmapload: stopped by SIGTERM", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("mmapload: interrupted", file=sys.stderr)
        return 130


def _os_error(e: OSError) -> str:
    """One line for an OSError: what failed, on which path (both, for a rename), and the fix."""
    what = e.strerror or str(e) or type(e).__name__
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    fix = {errno.ENOSPC: "free some space or choose another destination",
           errno.EDQUOT: "free some space or choose another destination",
           errno.EROFS: "choose a writable destination",
           errno.EACCES: "check the permissions, or choose another path",
           errno.EPERM: "check the permissions, or choose another path"}.get(e.errno)
    return (f"{paths}: " if paths else "") + what + (f"; {fix}" if fix else "")
