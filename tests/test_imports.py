"""Data flows one way: a module may import only modules below it in this order."""

import ast
from pathlib import Path

import mmapload

ORDER = [
    {"errors", "_procmem", "_progress", "phases", "_math", "_libc"},   # leaf utilities; phase marks; libc
    {"_pagecache"},                               # what the page cache held before a load read
    {"_files"},                                   # opening shard files (regular, identity)
    {"dtypes"},                                   # every safetensors dtype: bits, torch dtype
    {"header"},                                   # one file's header: parsed, validated -> Shard
    {"checkpoint"},                               # a checkpoint's files (folder, index) -> Checkpoint
    {"readers.base"},                             # the reader interface every io mode implements
    {"readers.mapped", "readers.pread"},          # io="mmap" / io="pread"
    {"readers.direct"},                           # io="direct" (pread with a bounce buffer)
    {"readers"},                                  # open_reader: one factory
    {"ring"},                                     # slots + reader thread
    {"transfer"},                                 # slot -> device copies, events (movers)
    {"tp_group"},                                 # the TP process group: collectives with a timeout
    {"scheme"},                                   # FP8 schemes: PerTensor, PerChannel, PerBlock
    {"fp8"},                                      # device quantizer (pure numerics)
    {"result"},                                   # QuantizedTensor / QuantizedModel
    {"prequantized"},                             # FP8 checkpoints: weights joined with scales
    {"skeleton", "foreign"},                      # a model's structure as data; configs, foreign methods
    {"tp"},                                       # TP slices of one tensor (pure arithmetic)
    {"config", "policy"},                         # the load config; which tensors become FP8
    {"decide"},                                   # which policy decides: a model's, or the name rule
    {"tp_ranges"},                                # a TP slice's file bytes and scale-grid slice
    {"tp_layout"},                                # a load's TP view: each tensor's slice, its bands
    {"pieces"},                                   # one tensor cut into slot-sized pieces
    {"plan"},                                     # how to cut them; the load plan
    {"assemble", "estimate", "fill"},             # pieces -> finished tensors; memory estimate;
                                                  # the reader thread's reads and pre-passes
    {"pipeline"},                                 # one load: reader side + consumer side
    {"stream", "formats"},                        # wiring; converted checkpoints' layout
    {"writer", "outdir", "ctvalidate"},           # streaming safetensors writer; convert's output folder;
                                                  # compressed-tensors' validator in a child process
    {"converter"},                                # convert: FP8 checkpoint on disk
    {"hf"},                                       # transformers names and code, for load_into
    {"nn"},                                       # FP8Linear, load_into (torch modules)
    {"integrations", "integrations.vllm"},        # engines' loaders (vLLM plugin): convert's plan, streamed
    {"synth"},                                    # generated checkpoints
    {"bench"},                                    # the harness's names (strategy lists)
    {"bench.sampler"},                            # memory sampler: listens to phase marks
    {"bench.timeline"},                           # the sampler's CSV and plot
    {"bench.strategies"},                         # the loaders compared by profile / bench ...
    {"bench.loaders"},                            # ... each run and measured in a fresh process
    {"bench.tp"},                                 # tensor-parallel worlds of them, rank by rank
    {"cli_tp", "cli_profile"},                    # the command line's TP (torchrun's world, --tp-plan),
                                                  # and its profile command (the bench harness)
    {"cli"},                                      # command line
    {"__main__", "__init__"},                     # entry points
]
RANK = {m: i for i, group in enumerate(ORDER) for m in group}
PKG = Path(mmapload.__file__).parent


def _module(path: Path) -> str:
    """``readers/base.py`` -> "readers.base"; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _known(dotted: str) -> str:
    """The ranked module a dotted import names: the longest ranked prefix ("readers.base.X" ->
    "readers.base", "ring" -> "ring")."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    return dotted


def _imports(path: Path) -> set[str]:
    """mmapload modules ``path`` imports (relative or absolute), as ranked names."""
    here = _module(path).split(".")
    package = here[:-1] if path.name != "__init__.py" else here
    if path.name == "__init__.py" and here == ["__init__"]:
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            mod = base + (node.module.split(".") if node.module else [])
            if node.module:
                found.add(_known(".".join(mod)))
            for a in node.names:   # "from . import phases", "from .readers import base"
                name = ".".join(mod + [a.name])
                if name in RANK:
                    found.add(name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmapload."):
            found.add(_known(node.module.split(".", 1)[1]))
        elif isinstance(node, ast.Import):
            found.update(_known(a.name.split(".", 1)[1]) for a in node.names if a.name.startswith("mmapload."))
    return found - {""}


def _modules():
    return [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]


def test_every_module_has_a_rank():
    modules = {_module(p) for p in _modules()}
    assert modules - set(RANK) == set(), "add new modules to ORDER in tests/test_imports.py"


def test_imports_flow_one_way():
    bad = [f"{_module(path)} imports {dep}"
           for path in _modules() for dep in _imports(path)
           if dep in RANK and dep != _module(path) and RANK[dep] >= RANK[_module(path)]
           and not dep.startswith(_module(path) + ".")]   # a package's __init__ re-exports its modules
    assert not bad, "imports against the data flow: " + ", ".join(bad)


def test_direction_check_catches_a_backward_import(tmp_path):
    fake = tmp_path / "checkpoint.py"
    fake.write_text("from .stream import stream_quantize\nfrom mmapload.ring import Ring\n"
                    "from .readers.base import PAGE\nfrom . import phases\n")
    real = PKG / "checkpoint.py"
    orig = _module
    globals()["_module"] = lambda p: "checkpoint" if p == fake else orig(p)
    try:
        assert _imports(fake) == {"stream", "ring", "readers.base", "phases"}
    finally:
        globals()["_module"] = orig
    assert real.exists() and all(RANK[d] >= RANK["checkpoint"] for d in {"stream", "ring", "readers.base"})


def test_the_core_never_imports_the_bench_harness():
    core = [p for p in _modules() if not _module(p).startswith("bench") and _module(p) not in ("cli", "cli_tp", "cli_profile")]
    users = [_module(p) for p in core if any(d == "bench" or d.startswith("bench.") for d in _imports(p))]
    assert users == [], users


def test_only_ring_and_the_sampler_start_threads():
    for path in _modules():
        text = path.read_text()
        if _module(path) not in ("ring", "bench.sampler"):   # the reader; the opt-in memory sampler
            assert "threading.Thread" not in text and "Thread)" not in text, f"{path.name} starts a thread"


def test_library_reads_no_environment_or_argv():
    # bench/loaders.py / bench/strategies.py are the exception: they run the *peers* (Run:ai Model
    # Streamer is configured only through environment variables) in the child processes of
    # `profile` and tools/bench.py. No load path imports them (checked above). The command line
    # reads torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) for `quantize --tp`.
    for path in _modules():
        text = path.read_text()
        if _module(path) not in ("bench.loaders", "bench.strategies", "cli", "cli_tp"):
            assert "os.environ" not in text and "os.getenv" not in text, path.name
        if _module(path) not in ("cli", "cli_tp", "cli_profile", "__main__"):
            assert "sys.argv" not in text and "argparse" not in text, path.name
