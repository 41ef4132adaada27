"""compressed-tensors' own validator of a ``quantization_config``, without its import on the path.

``convert`` checks the config it writes with ``QuantizationConfig.model_validate`` (the library's
own rules beat a copy of them). Importing compressed-tensors imports transformers: 4-6 s and
~150 MiB of RSS on a 2-core host. So, for a conversion big enough to hide it (``BACKGROUND_BYTES``),
unless this process has it imported already, a child process imports it as soon as the
conversion starts (while the shards are read) and validates the config sent to it at the end:
the import costs no wall time and no RSS here. A small conversion validates in this process
(the import is paid once, and later conversions in the process reuse it).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

__all__ = ["Validator", "validate_in_process", "BACKGROUND_BYTES"]

# Checkpoints from this size on are read for longer than the import takes (~6 s at ~0.4 GB/s here),
# so the child's import is hidden; below it, a child per conversion would cost more CPU than it hides.
BACKGROUND_BYTES = 1 << 30

_TIMEOUT = 300   # seconds for the child's import and the validation
_CHILD = """
import json, sys
try:
    from compressed_tensors.quantization import QuantizationConfig
except ImportError:
    QuantizationConfig = None
qconfig = json.loads(sys.stdin.read())        # waits for the config: the import is done by then
if QuantizationConfig is None:
    print(json.dumps({"available": False}))
else:
    try:
        QuantizationConfig.model_validate(qconfig)
        print(json.dumps({"available": True, "error": None}))
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, or what the library raises
        print(json.dumps({"available": True, "error": f"{type(e).__name__}: {e}"}))
"""


class Validator:
    """``Validator(background=True)`` starts the import in a child process (nothing when
    compressed-tensors is imported here already or not installed; the caller decides whether the
    conversion is big enough, ``BACKGROUND_BYTES``, and memory allows a child beside it);
    ``check(qconfig)`` returns None when compressed-tensors accepts it (or is not installed), else
    its error in words; ``close()`` stops an unused child."""

    def __init__(self, background: bool):
        self._proc = None
        if (not background or "compressed_tensors" in sys.modules
                or importlib.util.find_spec("compressed_tensors") is None):
            return
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._proc = None   # check() validates in this process

    def check(self, qconfig: dict) -> str | None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            try:
                out, _ = proc.communicate(json.dumps(qconfig), timeout=_TIMEOUT)
                reply = json.loads(out)
                return reply["error"] if reply["available"] else None
            except (OSError, subprocess.SubprocessError, ValueError, KeyError):
                proc.kill()
                proc.communicate()
        return validate_in_process(qconfig)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()
        self._proc = None


def validate_in_process(qconfig: dict) -> str | None:
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return None
    try:
        QuantizationConfig.model_validate(qconfig)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None
