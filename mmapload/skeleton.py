"""A model's structure as plain data: which module owns each parameter and what class it is.

The policy (policy.py) judges checkpoint tensors by the module that owns them. The model comes
from the checkpoint's config.json, built by transformers on the ``meta`` device (no weight is read
or allocated), or from the module given to ``load_into``. :func:`describe` turns it into a
:class:`Skeleton` (names, shapes, class names: nothing that holds on to the model).

Importing transformers and a model's modeling code costs about 150 MiB of RSS here (measured:
+153 MiB for a Llama on a 2-core CPU host, 4-5 s), which would stay for the whole load and sit on
top of the ring in a container's limit. So unless transformers is already imported in this process,
the config is built in a short-lived child process (``python -c``, the config folder on stdin) and
only its description comes back; descriptions are remembered per config.json content.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Pending", "Skeleton", "describe", "from_config", "start"]

_CHILD_TIMEOUT = 300    # seconds a child may take to import transformers and build the model
_MEMO: dict[str, tuple[Skeleton | None, str]] = {}


@dataclass(frozen=True)
class Skeleton:
    """``params``: parameter name -> shape; ``modules``: module name -> class names (MRO, most
    derived first); ``linear``: modules that are ``nn.Linear``; ``heads``: the output embeddings."""

    source: str
    prefix: str = ""
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    modules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    linear: frozenset[str] = frozenset()
    heads: frozenset[str] = frozenset()
    keep_fp32: tuple[str, ...] = ()

    def as_json(self) -> str:
        return json.dumps({"source": self.source, "prefix": self.prefix, "params": self.params,
                           "modules": self.modules, "linear": sorted(self.linear),
                           "heads": sorted(self.heads), "keep_fp32": list(self.keep_fp32)})

    @classmethod
    def from_json(cls, text: str) -> "Skeleton":
        d = json.loads(text)
        return cls(d["source"], d["prefix"], {k: tuple(v) for k, v in d["params"].items()},
                   {k: tuple(v) for k, v in d["modules"].items()}, frozenset(d["linear"]),
                   frozenset(d["heads"]), tuple(d["keep_fp32"]))


def describe(model: torch.nn.Module) -> Skeleton:
    modules = dict(model.named_modules(remove_duplicate=False))
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return Skeleton(
        source=type(model).__name__, prefix=getattr(model, "base_model_prefix", "") or "",
        params={n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)},
        modules={n: tuple(c.__name__ for c in type(m).__mro__) for n, m in modules.items()},
        linear=frozenset(n for n, m in modules.items() if isinstance(m, torch.nn.Linear)),
        heads=frozenset(n for n, m in modules.items() if out is not None and m is out),
        keep_fp32=tuple(sorted(keep)))


def _build(root: Path, archs: list[str]) -> tuple[Skeleton | None, str]:
    """In this process: the model of ``root``/config.json on meta, or None and why not."""
    try:
        import transformers
    except ImportError:
        return None, "name rule (transformers is not installed)"
    try:
        config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
        cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - whatever transformers cannot build, the names decide
        return None, f"name rule (transformers cannot build {archs}: {type(e).__name__}: {str(e)[:200]})"
    skeleton = describe(model)
    return skeleton, skeleton.source


def _child_main() -> None:
    """The child: config folder and architectures as JSON on stdin, the description on stdout."""
    req = json.loads(sys.stdin.read())
    skeleton, why = _build(Path(req["root"]), req["archs"])
    sys.stdout.write(json.dumps({"skeleton": skeleton.as_json() if skeleton else None, "why": why}))


class Pending:
    """The skeleton of a config.json, being built (a child process) or already known. ``ready()``
    says whether ``result()`` would return at once; ``result()`` waits for it (and remembers it);
    ``cancel()`` stops the child (a load that failed meanwhile)."""

    def __init__(self, key: str, value: tuple[Skeleton | None, str] | None = None,
                 proc: subprocess.Popen | None = None, reply=None):
        self._key, self._value, self._proc, self._reply = key, value, proc, reply

    def ready(self) -> bool:
        return self._value is not None or self._proc.poll() is not None

    def result(self) -> tuple[Skeleton | None, str]:
        if self._value is None:
            try:
                self._proc.wait(_CHILD_TIMEOUT)
                self._reply.seek(0)
                reply = json.loads(self._reply.read())
                self._value = ((Skeleton.from_json(reply["skeleton"]), reply["why"]) if reply["skeleton"]
                               else (None, reply["why"]))
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                self.cancel()
                self._value = None, f"name rule (building the model in a child process failed: {type(e).__name__}: {e})"
            except BaseException:   # Ctrl-C, a TP rank's SIGTERM: the child goes too
                self.cancel()
                raise
            finally:
                if self._value is not None:
                    self._reply.close()
            _MEMO[self._key] = self._value
        return self._value

    def cancel(self) -> None:
        if self._value is None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _child(key: str, root: Path, archs: list[str]) -> Pending:
    pkg = str(Path(__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {pkg!r}); from mmapload.skeleton import _child_main; _child_main()"
    try:
        # the reply goes to a file, not a pipe: it can exceed a pipe's 64 KiB (T5-base: 72 KB), and a
        # child blocked writing would never look finished to ready()
        reply = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=reply,
                                stderr=subprocess.DEVNULL, text=True)
        with proc.stdin:   # a few hundred bytes: the pipe takes them without the child reading yet
            proc.stdin.write(json.dumps({"root": str(root), "archs": archs}))
        proc.stdin = None   # closed: communicate() must not flush it
    except OSError as e:
        return Pending(key, (None, f"name rule (building the model in a child process failed: {type(e).__name__}: {e})"))
    return Pending(key, proc=proc, reply=reply)


def start(root: Path, cfg: dict) -> Pending:
    """Start building the skeleton of the model ``cfg`` (``root``/config.json) describes: in this
    process (at once) if transformers is imported already, else in a child process (see the module
    docstring) that runs while the caller goes on. Remembered per config.json content."""
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    key = json.dumps(cfg, sort_keys=True)
    if key in _MEMO:
        return Pending(key, _MEMO[key])
    if "transformers" in sys.modules:
        _MEMO[key] = _build(root, archs)
        return Pending(key, _MEMO[key])
    if importlib.util.find_spec("transformers") is None:
        return Pending(key, (None, "name rule (transformers is not installed)"))
    return _child(key, root, archs)


def from_config(root: Path, cfg: dict) -> tuple[Skeleton | None, str]:
    """The skeleton of the model ``cfg`` (``root``/config.json) describes, or None and why the
    name rule decides instead (``start(root, cfg).result()``)."""
    return start(root, cfg).result()
