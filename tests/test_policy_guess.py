"""A fresh process has no transformers: the model of config.json is built in a child process (seconds
of imports), and stream_quantize / convert load on the name rule meanwhile (stream.prepare_soon).
The result must be the model's policy's, whether the guess stands (Llama) or not (T5 keeps its
``wo`` in float32; the name rule would quantize it): then the load is done again."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed")

import archs  # noqa: E402
from mmapload import QuantizedTensor, convert, stream_quantize  # noqa: E402

# In the child: count the guesses and their verdicts (and whether this process had imported
# transformers by then: it must not have), then load or convert.
CHILD = """
import json, sys, torch
from mmapload import stream, QuantizedTensor
verdicts = []
settle = stream.Guess.settle
def counting(self):
    verdicts.append([settle(self), "transformers" in sys.modules])
    return verdicts[-1][0]
stream.Guess.settle = counting
import gc, weakref
refs, alive, collect, results = [], [], stream._collect, stream.results
def recording(pipe, *a, **k):           # weak references to every tensor a load yields
    for name, t in results(pipe, *a, **k):
        refs.append(weakref.ref(t))
        yield name, t
def collecting(pipe, guess):            # how many of the first load's tensors live when the second starts
    if refs:
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
    return collect(pipe, guess)
stream.results, stream._collect = recording, collecting
from mmapload import convert, stream_quantize
mode, folder, out = sys.argv[1:]
if mode == "convert":
    convert(folder, out, granularity="channel")
    print(json.dumps({"verdicts": verdicts}))
else:
    m = stream_quantize(folder, granularity="channel")
    print(json.dumps({
        "verdicts": verdicts, "policy": m.report.policy, "alive_at_reload": alive,
        "tensors": {n: [t.data.view(torch.uint8).flatten().tolist()[:4096], t.scale.flatten().tolist()[:64]]
                    if isinstance(t, QuantizedTensor) else ["kept", t.float().flatten().tolist()[:64]]
                    for n, t in m.items()}}))
"""


def _in_fresh_process(mode, folder, out=""):
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind, stands", [("llama", True), ("t5", False)])
def test_a_load_on_the_guess_is_the_models_load(kind, stands, tmp_path):
    folder = archs.build(kind, tmp_path / "src")
    got = _in_fresh_process("stream", folder)
    assert got["verdicts"] == [[stands, False]], got["verdicts"]   # one guess; a wrong one: loaded again
    assert got["alive_at_reload"] == ([] if stands else [0])        # the wrong load is gone before the next
    # here transformers is imported: the model is built in this process, no guess
    want = stream_quantize(folder, granularity="channel")
    assert got["policy"] == want.report.policy == archs.model_class(kind).__name__
    assert set(got["tensors"]) == set(want)
    for name, t in want.items():
        if isinstance(t, QuantizedTensor):
            assert got["tensors"][name] == [t.data.view(torch.uint8).flatten().tolist()[:4096],
                                            t.scale.flatten().tolist()[:64]], name
        else:
            assert got["tensors"][name] == ["kept", t.float().flatten().tolist()[:64]], name
    if kind == "t5":   # the name rule would have quantized it
        assert got["tensors"]["encoder.block.0.layer.1.DenseReluDense.wo.weight"][0] == "kept"
    assert _in_fresh_process("convert", folder, tmp_path / "guessed")["verdicts"] == [[stands, False]]
    convert(folder, tmp_path / "direct", granularity="channel")
    assert _files(tmp_path / "guessed") == _files(tmp_path / "direct")


@pytest.mark.timeout(600)
def test_an_error_of_the_guess_alone_is_not_raised(tmp_path):
    """A NaN in T5's ``wo``: the name rule would quantize it (NonFiniteError), the model keeps it
    in float32 and so loads it as it is. The guess's error waits for the model's verdict."""
    from safetensors.torch import load_file, save_file
    folder = archs.build("t5", tmp_path / "src")
    name = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    (shard,) = folder.glob("*.safetensors")
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    got = _in_fresh_process("stream", folder)
    assert got["verdicts"] == [[False, False]] and got["tensors"][name][0] == "kept"
    assert stream_quantize(folder, granularity="channel")[name].isnan().any()   # the model's load, here


VALIDATE = """
import json, sys
from mmapload.ctvalidate import Validator
v = Validator(background=True)
good = json.loads(sys.argv[1])
children = [v._proc is not None]
bad = Validator(background=True)
children.append(bad._proc is not None)
print(json.dumps({"good": v.check(good), "bad": bad.check(good | {"format": 3}), "children": children,
                  "imported": "compressed_tensors" in sys.modules or "transformers" in sys.modules,
                  "small": Validator(background=False)._proc is None}))
"""


@pytest.mark.timeout(600)
def test_convert_validates_its_config_in_a_child_process(tmp_path):
    """compressed-tensors' own validator judges the quantization_config convert writes; in a process
    without it imported the import (transformers: seconds, ~150 MiB) happens in a child, while
    the shards are read, and its verdict is the in-process one."""
    pytest.importorskip("compressed_tensors")
    from mmapload.ctvalidate import validate_in_process
    folder = archs.build("llama", tmp_path / "src")
    dst = convert(folder, tmp_path / "out", granularity="channel")
    good = json.loads((dst / "config.json").read_text())["quantization_config"]
    done = subprocess.run([sys.executable, "-c", VALIDATE, json.dumps(good)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["good"] is None and validate_in_process(good) is None
    assert got["bad"] and "format" in got["bad"] and validate_in_process(good | {"format": 3})
    assert got["imported"] is False and got["children"] == [True, True]
    assert got["small"] is True   # not in the background: validated in this process
    from mmapload import CheckpointError, LoadOptions
    from mmapload.checkpoint import open_checkpoint
    from mmapload.converter import check_written
    from mmapload.decide import policy_for
    policy = policy_for(open_checkpoint(folder), LoadOptions(granularity="channel"))
    with pytest.raises(CheckpointError, match="compressed-tensors rejects the quantization_config"):
        check_written(dst, "compressed-tensors", LoadOptions(granularity="channel"), good | {"format": 3}, policy)


def test_helpers_run_beside_a_load_only_where_memory_allows(tmp_path, monkeypatch):
    """In a memory-limited container the helper processes (the model of config.json, the
    validator) would add to the load's peak: they run beside it only when the headroom holds the
    ring, a CPU load's model and CHILD_ROOM (tests/test_capped.py: convert under 700 MiB)."""
    from mmapload import LoadOptions, stream
    from mmapload.checkpoint import open_checkpoint
    folder = archs.build("llama", tmp_path / "src")
    ckpt, opts = open_checkpoint(folder), LoadOptions(ring_bytes=1 << 20)
    need = (1 << 20) + ckpt.total_bytes + stream.CHILD_ROOM
    for room, cpu, cuda in ((need, True, True), (need - 1, False, True), (need - ckpt.total_bytes - 1, False, False)):
        monkeypatch.setattr(stream, "headroom", lambda room=room: room)
        assert stream.room_beside(ckpt, torch.device("cpu"), opts) is cpu
        assert stream.room_beside(ckpt, torch.device("meta"), opts) is cuda   # results not in host RAM


BIG_REPLY = """
import json, sys, time
from mmapload.skeleton import start
root = sys.argv[1]
pending = start(__import__("pathlib").Path(root), json.load(open(root + "/config.json")))
t0 = time.monotonic()
while not pending.ready() and time.monotonic() - t0 < 240:
    time.sleep(0.2)
ready = pending.ready()
skeleton, why = pending.result()
print(json.dumps({"ready": ready, "params": len(skeleton.params) if skeleton else 0, "size": len(skeleton.as_json())}))
"""


@pytest.mark.timeout(600)
def test_a_big_model_description_does_not_block_the_child(tmp_path):
    """T5-base's description is 72 KB, more than a pipe holds: the child must still finish on its
    own (ready() turns True while the load runs), not wait for the parent to read."""
    transformers.T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["T5ForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-c", BIG_REPLY, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["size"] > 65536 and got["params"] > 100 and got["ready"] is True, got
