"""Data flows one way: a module may import only modules below it in this order."""

import ast
from pathlib import Path

import mmapload

ORDER = [
    {"errors", "_procmem", "_progress"},          # leaf utilities
    {"_files"},                                   # opening shard files (regular, identity)
    {"dtypes"},                                   # every safetensors dtype: bits, torch dtype
    {"checkpoint"},                               # index: shards and headers
    {"mapped"},                                   # mmap reader
    {"pread"},                                    # pread / O_DIRECT readers
    {"ring"},                                     # slots + reader thread
    {"device"},                                   # slot -> device copies, events
    {"profile"},                                  # memory sampler + phase markers (stream marks)
    {"timeline"},                                 # the sampler's CSV and plot
    {"fp8"},                                      # device quantizer (pure numerics)
    {"result"},                                   # QuantizedTensor / QuantizedModel
    {"skeleton", "foreign"},                      # a model's structure as data; configs, foreign methods
    {"options", "plan", "policy"},                # options; which tensors become FP8; how to cut them
    {"assemble", "project", "fill"},              # pieces -> finished tensors; memory projection;
                                                  # the reader thread's reads and pre-passes
    {"pairs"},                                    # FP8 checkpoints: weights joined with scales
    {"stream", "formats"},                        # wiring; converted checkpoints' layout
    {"writer", "outdir"},                         # streaming safetensors writer; convert's output folder
    {"export"},                                   # convert: FP8 checkpoint on disk
    {"hf"},                                       # transformers names and code, for load_into
    {"nn"},                                       # FP8Linear, load_into (torch modules)
    {"synth"},                                    # generated checkpoints
    {"strategies"},                               # the loaders compared by profile / bench ...
    {"loaders"},                                  # ... each run and measured in a fresh process
    {"cli"},                                      # command line
    {"__main__", "__init__"},                     # entry points
]
RANK = {m: i for i, group in enumerate(ORDER) for m in group}
PKG = Path(mmapload.__file__).parent


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmapload."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mmapload."))
    return found


def test_every_module_has_a_rank():
    modules = {p.stem for p in PKG.glob("*.py")}
    assert modules - set(RANK) == set(), "add new modules to ORDER in tests/test_imports.py"


def test_imports_flow_one_way():
    bad = [f"{path.stem} imports {dep}"
           for path in PKG.glob("*.py") for dep in _imports(path)
           if dep in RANK and dep != path.stem and RANK[dep] >= RANK[path.stem]]
    assert not bad, "imports against the data flow: " + ", ".join(bad)


def test_direction_check_catches_a_backward_import(tmp_path):
    fake = tmp_path / "checkpoint.py"
    fake.write_text("from .stream import stream_quantize\nfrom mmapload.ring import Ring\n")
    assert _imports(fake) == {"stream", "ring"}
    assert all(RANK[d] >= RANK["checkpoint"] for d in _imports(fake))


def test_only_ring_and_the_sampler_start_threads():
    for path in PKG.glob("*.py"):
        text = path.read_text()
        if path.stem not in ("ring", "profile"):   # the reader; the opt-in memory sampler
            assert "threading.Thread" not in text and "Thread)" not in text, f"{path.name} starts a thread"


def test_library_reads_no_environment_or_argv():
    # loaders.py / strategies.py are the exception: they run the *peers* (Run:ai Model Streamer is
    # configured only through environment variables) in the child processes of `profile` and
    # tools/bench.py. No load path imports them (checked below).
    for path in PKG.glob("*.py"):
        text = path.read_text()
        if path.stem not in ("loaders", "strategies"):
            assert "os.environ" not in text and "os.getenv" not in text, path.name
        if path.stem not in ("cli", "__main__"):
            assert "sys.argv" not in text and "argparse" not in text, path.name
    users = [p.stem for p in PKG.glob("*.py") if {"loaders", "strategies"} & _imports(p)]
    assert set(users) <= {"cli", "loaders"}, users
