"""Measuring loads, outside the load path: the memory sampler (``sampler.MemorySampler``), its
CSV and plot (``timeline``), and the loaders users compare mmapload with (``strategies``), each
run in a fresh process (``loaders``). The core never imports this package; the CLI imports it
lazily for ``profile``. The peers themselves are the ``bench`` extra; each is optional.
"""

__all__ = ["STRATEGIES", "PEER_STRATEGIES", "ALL_STRATEGIES"]

# STRATEGIES need nothing beyond our own dependencies: what `mmapload profile` runs by default.
# PEER_STRATEGIES need an optional package each; loaders.run_in_fresh_process takes ALL_STRATEGIES.
STRATEGIES = ("mmapload", "naive", "safe_open")
PEER_STRATEGIES = ("runai", "runai_capped", "fastsafetensors", "fastsafetensors_capped")
ALL_STRATEGIES = STRATEGIES + PEER_STRATEGIES
