import gc
import threading
import json

import pytest
import torch
from safetensors.torch import save_file

import mmapload
from mmapload import QuantizedTensor, iter_quantized, stream_quantize

E4M3_MAX = 448.0


def ref_quantize_tensor(w: torch.Tensor):
    """Independent reference: per-tensor scale = amax / 448, q = saturate(w / scale)."""
    amax = w.float().abs().max()
    scale = amax / E4M3_MAX if amax > 0 else torch.tensor(1.0)
    q = (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _workers():
    """mmapload's reader and copy threads still alive."""
    return [t for t in threading.enumerate() if t.name in ("mmapload-reader", "mmapload-copier")]


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "model.embed_tokens.weight": r(64, 32).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": r(32, 32).bfloat16(),
        "model.layers.0.self_attn.q_proj.bias": r(32).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": (r(96, 32) * 5).to(torch.float16),
        "model.layers.0.input_layernorm.weight": r(32),
        "model.layers.0.mlp.down_proj.weight": r(32, 96),
        "model.layers.0.zeros.weight": torch.zeros(16, 16, dtype=torch.bfloat16),
        "model.layers.0.count": torch.arange(7, dtype=torch.int64),
        "model.layers.0.mask": torch.tensor([True, False, True]),
        "model.layers.0.already_fp8.weight": r(8, 8).to(torch.float8_e4m3fn),
        "lm_head.weight": r(64, 32).bfloat16(),
        "scalar": torch.tensor(3.5),
    }


def _should_quantize(name, t):
    return (t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) and t.dim() >= 2
            and name.endswith("weight") and not any(s in name for s in ("embed", "lm_head", "norm")))


def _check(model_items, tensors):
    assert set(model_items) == set(tensors)
    for name, t in tensors.items():
        got = model_items[name]
        if _should_quantize(name, t):
            assert isinstance(got, QuantizedTensor), name
            q, scale = ref_quantize_tensor(t)
            assert got.data.dtype == torch.float8_e4m3fn and got.data.shape == t.shape
            assert got.scale.dtype == torch.float32 and got.scale.dim() == 0
            assert torch.equal(got.scale, scale.float()), name
            assert torch.equal(got.data.view(torch.uint8), q.view(torch.uint8)), name
            assert got.orig_dtype == t.dtype
        else:
            assert isinstance(got, torch.Tensor) and got.dtype == t.dtype and got.shape == t.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_single_file(tmp_path, no_thread_leak):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    model = stream_quantize(tmp_path / "model.safetensors", "cpu")
    _check(dict(model), tensors)
    assert model.report.tensors == len(tensors)
    assert model.report.quantized == sum(_should_quantize(n, t) for n, t in tensors.items())
    assert model.nbytes == model.report.retained_bytes > 0


def _shard(tensors, k):
    names = sorted(tensors)
    return [{n: tensors[n] for n in names[i::k]} for i in range(k)]


def test_folder_with_index(tmp_path, no_thread_leak):
    tensors = _tensors(1)
    weight_map = {}
    for i, part in enumerate(_shard(tensors, 3)):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file(part, tmp_path / fname)
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _check(dict(stream_quantize(tmp_path)), tensors)


def test_folder_without_index(tmp_path, no_thread_leak):
    tensors = _tensors(2)
    for i, part in enumerate(_shard(tensors, 2)):
        save_file(part, tmp_path / f"part{i}.safetensors")
    _check(dict(stream_quantize(tmp_path)), tensors)


def test_iter_quantized_yields_in_file_order(tmp_path, no_thread_leak):
    tensors = _tensors(3)
    save_file(tensors, tmp_path / "m.safetensors")
    from mmapload.checkpoint import open_checkpoint
    order = [s.name for s in open_checkpoint(tmp_path / "m.safetensors").tensors]
    items = list(iter_quantized(tmp_path / "m.safetensors"))
    assert [n for n, _ in items] == order
    _check(dict(items), tensors)


@pytest.mark.parametrize("quantized", [True, False])
def test_tensor_4x_larger_than_ring(tmp_path, quantized, no_thread_leak):
    ring = 64 << 10                                        # 4 slots of 16 KiB
    g = torch.Generator().manual_seed(7)
    big = torch.randn(512, 256, generator=g).bfloat16()    # 256 KiB = 4x the ring
    big[300, 7] = 40.0                                     # amax lives in a late chunk
    name = "layers.0.big.weight" if quantized else "model.embed_tokens.weight"
    tensors = {name: big, "small.weight": torch.randn(8, 8, generator=g).bfloat16()}
    save_file(tensors, tmp_path / "m.safetensors")
    model = stream_quantize(tmp_path / "m.safetensors", ring_bytes=ring)
    _check(dict(model), tensors)
    assert model.report.ring_bytes == ring and model.report.slot_bytes * 4 <= ring
    # a ring far bigger than the checkpoint: the report says what was allocated, not what was asked
    model = stream_quantize(tmp_path / "m.safetensors", ring_bytes=1 << 40)
    assert model.report.ring_bytes < 64 << 20 and model.report.ring_bytes % model.report.slot_bytes == 0


def test_skip_patterns_keep_tensors(tmp_path):
    tensors = _tensors(4)
    save_file(tensors, tmp_path / "m.safetensors")
    model = stream_quantize(tmp_path / "m.safetensors", skip=["*.mlp.*", "q_proj"])
    assert not isinstance(model["model.layers.0.mlp.up_proj.weight"], QuantizedTensor)
    assert not isinstance(model["model.layers.0.self_attn.q_proj.weight"], QuantizedTensor)
    assert isinstance(model["model.layers.0.zeros.weight"], QuantizedTensor)


def test_zero_tensor_gets_finite_positive_scale(tmp_path):
    save_file({"a.weight": torch.zeros(4, 4)}, tmp_path / "m.safetensors")
    qt = stream_quantize(tmp_path / "m.safetensors")["a.weight"]
    assert float(qt.scale) > 0 and torch.isfinite(qt.scale)
    assert not qt.data.float().any()


def test_state_dict_names_scales(tmp_path):
    tensors = _tensors(5)
    save_file(tensors, tmp_path / "m.safetensors")
    sd = stream_quantize(tmp_path / "m.safetensors").state_dict()
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert sd["model.layers.0.self_attn.q_proj.weight_scale"].dim() == 0
    assert "model.embed_tokens.weight_scale" not in sd
    deq = stream_quantize(tmp_path / "m.safetensors")["model.layers.0.mlp.down_proj.weight"].dequantize()
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    assert deq.dtype == w.dtype and (deq - w).norm() / w.norm() < 0.05


def test_early_close_stops_reader(tmp_path, no_thread_leak):
    tensors = {f"l{i}.weight": torch.randn(64, 64) for i in range(40)}
    save_file(tensors, tmp_path / "m.safetensors")
    gen = iter_quantized(tmp_path / "m.safetensors", ring_bytes=64 << 10)
    assert [next(gen)[0], next(gen)[0]] == ["l0.weight", "l1.weight"]
    assert [t.name for t in threading.enumerate() if t.name == "mmapload-reader"] != []
    gen.close()   # joins the reader now, without waiting for garbage collection
    assert [t for t in threading.enumerate() if t.name.startswith("mmapload-")] == []
    with pytest.raises(StopIteration):
        next(gen)
    gc.collect()


def test_exception_mid_stream_stops_reader(tmp_path, no_thread_leak):
    tensors = {f"l{i}.weight": torch.randn(64, 64) for i in range(40)}
    save_file(tensors, tmp_path / "m.safetensors")
    with pytest.raises(KeyError):
        for name, _ in iter_quantized(tmp_path / "m.safetensors", ring_bytes=64 << 10):
            if name == "l5.weight":
                raise KeyError(name)
    assert _workers() == []     # joined when the exception left the loop, not at collection


def test_nan_raises_naming_tensor_and_leaves_no_thread(tmp_path, no_thread_leak):
    w = torch.randn(8, 8)
    w[3, 3] = float("nan")
    save_file({"ok.weight": torch.randn(4, 4), "bad.weight": w}, tmp_path / "m.safetensors")
    with pytest.raises(mmapload.NonFiniteError, match="bad.weight"):
        stream_quantize(tmp_path / "m.safetensors")
    assert _workers() == []


def test_cuda_on_cpu_only_machine_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    save_file({"a.weight": torch.randn(4, 4)}, tmp_path / "m.safetensors")
    with pytest.raises(mmapload.DeviceError, match="CUDA is not available"):
        stream_quantize(tmp_path / "m.safetensors", "cuda:0")


def test_ring_smaller_than_a_row_still_loads(tmp_path, no_thread_leak):
    w = torch.randn(2, 8192)   # 32 KiB rows, 16 KiB slots: once an up-front error (tests/test_wide_rows.py)
    save_file({"wide.weight": w}, tmp_path / "m.safetensors")
    got = stream_quantize(tmp_path / "m.safetensors", ring_bytes=64 << 10)["wide.weight"]
    q, scale = ref_quantize_tensor(w)
    assert torch.equal(got.scale, scale) and torch.equal(got.data.view(torch.uint8), q.view(torch.uint8))


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        stream_quantize(tmp_path / "nope")


def test_keyboard_interrupt_mid_stream_stops_reader(tmp_path, no_thread_leak):
    tensors = {f"l{i}.weight": torch.randn(64, 64) for i in range(40)}
    save_file(tensors, tmp_path / "m.safetensors")
    with pytest.raises(KeyboardInterrupt):
        for name, _ in iter_quantized(tmp_path / "m.safetensors", ring_bytes=64 << 10):
            if name == "l3.weight":
                raise KeyboardInterrupt
    assert _workers() == []


def _sparse_huge_checkpoint(path):
    """A real, valid file whose second tensor (256 GiB bf16, a sparse hole) cannot fit in RAM."""
    import struct
    small = 4 * 4 * 4
    huge = (1 << 19) * (1 << 18) * 2
    header = json.dumps({"small.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, small]},
                         "huge.weight": {"dtype": "BF16", "shape": [1 << 19, 1 << 18],
                                         "data_offsets": [small, small + huge]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + torch.ones(4, 4).numpy().tobytes())
        f.truncate(8 + len(header) + small + huge)


def _overcommit_always():
    try:
        return open("/proc/sys/vm/overcommit_memory").read().strip() == "1"
    except OSError:
        return True


@pytest.mark.skipif(_overcommit_always(), reason="needs heuristic overcommit (allocations beyond RAM fail)")
@pytest.mark.parametrize("keep_partial", [False, True])
def test_out_of_memory_is_a_clear_error_naming_the_tensor(tmp_path, keep_partial, no_thread_leak):
    path = tmp_path / "huge.safetensors"
    _sparse_huge_checkpoint(path)
    with pytest.raises(mmapload.DeviceError, match=r"out of memory.*huge\.weight.*needs 137,438,953,472 bytes") as ei:
        stream_quantize(path, granularity="channel", ring_bytes=64 << 20, keep_partial=keep_partial)
    if keep_partial:
        assert list(ei.value.partial) == ["small.weight"]
        assert isinstance(ei.value.partial["small.weight"], QuantizedTensor)
    else:
        assert ei.value.partial is None


@pytest.mark.skipif(_overcommit_always(), reason="needs heuristic overcommit (allocations beyond RAM fail)")
def test_out_of_memory_for_a_tensor_kept_as_it_is_is_the_same_clear_error(tmp_path, no_thread_leak):
    # on the CPU the reader allocates such a tensor's output (to read straight into it); its
    # failure must still come out as the consumer's DeviceError, after the tensors before it
    path = tmp_path / "huge.safetensors"
    _sparse_huge_checkpoint(path)
    with pytest.raises(mmapload.DeviceError, match=r"out of memory.*huge\.weight.*needs 274,877,906,944 bytes") as ei:
        stream_quantize(path, skip=["huge.weight"], ring_bytes=64 << 20, keep_partial=True)
    assert list(ei.value.partial) == ["small.weight"]


def test_a_ring_far_bigger_than_the_checkpoint_allocates_what_the_load_uses(tmp_path, no_thread_leak):
    """ring_bytes=1 PiB on a 32 KiB checkpoint: the plan caps the slots at the batches + 1 (a
    raw torch allocation error before), the load and the estimate agree on the ring, and the
    values are the same as with the default ring."""
    from mmapload.estimate import estimate
    tensors = {f"l{i}.weight": torch.randn(32, 64) for i in range(4)}
    save_file(tensors, tmp_path / "m.safetensors")
    big = stream_quantize(tmp_path / "m.safetensors", ring_bytes=1 << 50)
    ref = stream_quantize(tmp_path / "m.safetensors")
    for name in tensors:
        assert torch.equal(big[name].data.view(torch.uint8), ref[name].data.view(torch.uint8))
        assert torch.equal(big[name].scale, ref[name].scale)
    est = estimate(tmp_path / "m.safetensors", "cpu", ring_bytes=1 << 50)
    assert est.ring_bytes <= 2 * (16 << 20) < (1 << 50)
