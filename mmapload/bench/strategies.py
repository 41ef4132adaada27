"""What each strategy of ``loaders`` does, inside its fresh process.

Each strategy loads a checkpoint onto a device and quantizes its weights with the same FP8
quantizer, so only the loading differs:
- ``mmapload``: ``stream_quantize`` (the ring, any ``io`` mode);
- ``naive``: ``safetensors.torch.load_file`` of every shard, then quantize (vLLM's old path);
- ``safe_open``: ``safetensors.safe_open`` one tensor at a time (vLLM's default iterator).

Peers, optional (``pip install mmapload[bench]``); without the package a run raises
``StrategyUnavailable``:
- ``runai``: Run:ai Model Streamer's ``SafetensorsStreamer`` with its defaults (memory limit
  ``RUNAI_STREAMER_MEMORY_LIMIT`` unset: 40 GB, so the whole checkpoint is buffered);
- ``runai_capped``: the same with ``RUNAI_STREAMER_MEMORY_LIMIT`` = ``ring_bytes``, raised to
  the largest tensor when the ring is smaller (the streamer refuses a limit below it; the
  result's ``note`` says so);
- ``fastsafetensors``: ``SafeTensorsFileLoader(nogds=True)``, one shard at a time, as vLLM's
  fastsafetensors iterator does (whole shard in one host / device buffer);
- ``fastsafetensors_capped``: its ``ParallelLoader`` with ``max_batch_bytes=ring_bytes``
  (each shard loaded in sub-file chunks of at most that span; raised to the largest tensor
  like ``runai_capped``).

Every runner is ``run(ckpt, device, options, notes) -> (kept, retained bytes)``; ``notes``
collects what the report should say about how it ran.
"""

from __future__ import annotations

import os

__all__ = ["RUNNERS"]


def _by_mmapload(ckpt, dev, opts, notes):
    from ..stream import stream_quantize
    model = stream_quantize(ckpt.root, dev, **opts.as_kwargs())
    return model, model.nbytes


_POLICIES: dict = {}


def _policy(ckpt, opts):
    """mmapload's policy for this checkpoint, built once: every loader quantizes the same tensors."""
    from ..decide import policy_for
    key = (ckpt.root, opts)
    if key not in _POLICIES:
        _POLICIES[key] = policy_for(ckpt, opts)
    return _POLICIES[key]


def _keep(name, t, ckpt, dev, opts, keep: dict) -> int:
    """Quantize ``t`` (moved to ``dev``) as mmapload would; returns the bytes kept."""
    from ..fp8 import quantize
    from .sampler import mark
    if _policy(ckpt, opts)(ckpt[name]):
        t = t.to(dev)
        mark("quantize")
        keep[name] = q, s = quantize(t, opts.granularity, opts.fp8_dtype, opts.block_size, name=name)
        return q.numel() * q.element_size() + s.numel() * s.element_size()
    # an owned copy, as an engine copies into its parameters: a view would keep the loader's
    # buffer (a whole shard's map, a streamer's ring buffer) alive after the load
    keep[name] = t = t.to(dev, copy=True)
    return t.numel() * t.element_size()


def _by_naive(ckpt, dev, opts, notes):
    """Every shard read whole into host RAM (safetensors.torch.load_file), then each weight
    moved to the device and quantized there: the plain "load, then quantize" path."""
    from safetensors.torch import load_file
    from .._progress import Progress
    from .sampler import mark
    progress = Progress(2 * ckpt.total_bytes, enabled=opts.progress, desc="naive")
    mark("read")
    loaded = []
    for shard in ckpt.shards:
        loaded.append(load_file(shard.path))
        progress.update(sum(t.nbytes for t in shard.tensors))
    keep, retained = {}, 0
    for sd in loaded:
        for name, t in sd.items():
            retained += _keep(name, t, ckpt, dev, opts, keep)
            progress.update(ckpt[name].nbytes)
    progress.close()
    return keep, retained   # the loaded state dicts go once the model is built


def _by_safe_open(ckpt, dev, opts, notes):
    """``safetensors.safe_open(shard, "pt", device=...)``, one tensor at a time, each
    quantized as it arrives; only the results are kept."""
    from safetensors import safe_open
    from .._progress import Progress
    from .sampler import mark
    progress = Progress(ckpt.total_bytes, enabled=opts.progress, desc="safe_open")
    keep, retained = {}, 0
    mark("read")
    for shard in ckpt.shards:
        with safe_open(str(shard.path), "pt", device=str(dev)) as f:
            for name in f.keys():
                retained += _keep(name, f.get_tensor(name), ckpt, dev, opts, keep)
                progress.update(ckpt[name].nbytes)
    progress.close()
    return keep, retained


def _consume(pairs, ckpt, dev, opts, desc: str):
    """Quantize every (name, tensor) of a peer's iterator as it arrives; keep only the results."""
    from .._progress import Progress
    from .sampler import mark
    progress = Progress(ckpt.total_bytes, enabled=opts.progress, desc=desc)
    keep, retained = {}, 0
    mark("read")
    for name, t in pairs:
        retained += _keep(name, t, ckpt, dev, opts, keep)
        progress.update(ckpt[name].nbytes)
        del t   # the peer's buffer may go as soon as we are done with it
        mark("read")
    progress.close()
    if len(keep) != len(ckpt.tensors):
        raise RuntimeError(f"{desc} delivered {len(keep)} of {len(ckpt.tensors)} tensors")
    return keep, retained


def _runai_pairs(ckpt):
    from runai_model_streamer import SafetensorsStreamer
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(s.path) for s in ckpt.shards])   # to host memory, as vLLM does
        yield from streamer.get_tensors()


def _by_runai(ckpt, dev, opts, notes):
    """Run:ai Model Streamer with its defaults: C++ reader threads into one host buffer
    sized by ``RUNAI_STREAMER_MEMORY_LIMIT`` (unset: 40 GB, i.e. the whole checkpoint here)."""
    limit = os.environ.get("RUNAI_STREAMER_MEMORY_LIMIT")
    notes.append("memory limit: default (40 GB)" if limit is None else f"RUNAI_STREAMER_MEMORY_LIMIT={limit} "
                 "from the environment")
    return _consume(_runai_pairs(ckpt), ckpt, dev, opts, "runai")


def _by_runai_capped(ckpt, dev, opts, notes):
    """Run:ai Model Streamer with ``RUNAI_STREAMER_MEMORY_LIMIT`` = our ring (or the largest
    tensor, the smallest limit it accepts, when the ring is smaller)."""
    largest = max((t.nbytes for t in ckpt.tensors), default=0)
    limit = max(opts.ring_bytes, largest)
    os.environ["RUNAI_STREAMER_MEMORY_LIMIT"] = str(limit)   # read when streaming starts
    notes.append(f"memory limit {limit} B" + (
        "" if limit == opts.ring_bytes else f" = the largest tensor (runai refuses less; the ring is "
                                             f"{opts.ring_bytes} B)"))
    return _consume(_runai_pairs(ckpt), ckpt, dev, opts, "runai_capped")


def _fst_device(dev) -> str:
    return "cpu" if dev.type == "cpu" else f"cuda:{dev.index if dev.index is not None else 0}"


def _fst_pairs(ckpt, dev):
    """vLLM's fastsafetensors iterator with one process: one shard at a time, copied whole
    into a host (CPU) or device buffer by ``nogds`` bounce-buffer reads, then yielded."""
    from fastsafetensors import SafeTensorsFileLoader
    for shard in ckpt.shards:
        loader = SafeTensorsFileLoader(None, _fst_device(dev), nogds=True)
        try:
            loader.add_filenames({0: [str(shard.path)]})
            fb = loader.copy_files_to_device()
            try:
                for name in list(fb.key_to_rank_lidx.keys()):
                    yield name, fb.get_tensor(name)
            finally:
                fb.close()
        finally:
            loader.close()


def _by_fastsafetensors(ckpt, dev, opts, notes):
    notes.append("nogds=True, one shard per batch")
    return _consume(_fst_pairs(ckpt, dev), ckpt, dev, opts, "fastsafetensors")


def _by_fastsafetensors_capped(ckpt, dev, opts, notes):
    """fastsafetensors' ParallelLoader with ``max_batch_bytes`` = our ring (or the largest
    tensor, the smallest span it accepts): each shard read in sub-file chunks."""
    from fastsafetensors import ParallelLoader
    largest = max((t.nbytes for t in ckpt.tensors), default=0)
    limit = max(opts.ring_bytes, largest)
    notes.append(f"nogds=True, ParallelLoader max_batch_bytes={limit}" + (
        "" if limit == opts.ring_bytes else f" = the largest tensor (it refuses less; the ring is "
                                             f"{opts.ring_bytes} B)"))
    pl = ParallelLoader(None, [str(s.path) for s in ckpt.shards], device=_fst_device(dev), nogds=True,
                        max_batch_bytes=limit, use_tqdm_on_load=False)
    try:
        it = pl.iterate_weights()
        try:
            return _consume(it, ckpt, dev, opts, "fastsafetensors_capped")
        finally:
            it.close()
    finally:
        pl.close()


RUNNERS = {"mmapload": _by_mmapload, "naive": _by_naive, "safe_open": _by_safe_open, "runai": _by_runai,
           "runai_capped": _by_runai_capped, "fastsafetensors": _by_fastsafetensors,
           "fastsafetensors_capped": _by_fastsafetensors_capped}
