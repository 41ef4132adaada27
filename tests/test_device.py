"""The copy-stream / event protocol, exercised on the CPU with an emulated DMA engine, and
the real CUDA path where a GPU exists."""

import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import mmapload
from mmapload import QuantizedTensor, stream_quantize
from mmapload import transfer as device_mod

from expect import assert_same_as_whole_tensor_quantizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class _DelayedCopy:
    """An 'async copy' that lands 2 ms later, like DMA; synchronize() waits for it."""

    def __init__(self, src, dst, n):
        self._t = threading.Thread(target=self._run, args=(src, dst, n), name="fake-dma")
        self._t.start()

    @staticmethod
    def _run(src, dst, n):
        time.sleep(0.002)
        dst[:n].copy_(src[:n])

    def synchronize(self):
        self._t.join()


class _EmulatedDmaMover:
    """The CUDA mover's protocol on the CPU: staging buffers, slot released with the copy's
    event, held pieces copied to a separate buffer. If the ring refilled a slot before its
    event completed, the delayed copy would pick up the next batch's bytes."""

    copies = True
    copy_seconds = 0.0

    def __init__(self, device, stage_bytes, hold_bytes=0):
        self.staging = [torch.empty(stage_bytes, dtype=torch.uint8) for _ in range(2)]
        self.held = torch.empty(hold_bytes, dtype=torch.uint8)
        self.k = 0

    def to_device(self, lease):
        buf = self.staging[self.k]
        self.k ^= 1                 # the stream looks one batch ahead: alternate buffers here
        ev = _DelayedCopy(lease.data, buf, lease.item.nbytes)
        lease.on_device(ev)         # the reader must wait on ev before refilling the slot
        ev.synchronize()            # the compute stream waits for the copy
        time.sleep(0.001)           # a slow consumer: the reader races ahead
        return buf

    def hold(self, x, elem_offset):
        dst = self.held.view(x.dtype)[elem_offset:elem_offset + x.numel()].view(x.shape)
        dst.copy_(x)
        return dst

    def done(self, lease):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_event_protocol_with_emulated_dma(tmp_path, monkeypatch, granularity, no_thread_leak):
    g = torch.Generator().manual_seed(3)
    tensors = {f"l{i}.weight": torch.randn(256, 160, generator=g).bfloat16() for i in range(12)}
    tensors["emb.embed.weight"] = torch.randn(700, 64, generator=g).bfloat16()
    save_file(tensors, tmp_path / "m.safetensors")
    monkeypatch.setattr(device_mod, "mover_class", lambda dev: _EmulatedDmaMover)
    model = stream_quantize(tmp_path / "m.safetensors", ring_bytes=4 * (48 << 10), granularity=granularity)
    assert "copy" in model.report.stage_seconds
    assert_same_as_whole_tensor_quantizer(model, tensors, granularity)


def test_nan_found_by_the_deferred_per_batch_check(tmp_path, monkeypatch, no_thread_leak):
    tensors = {f"l{i}.weight": torch.randn(64, 64) for i in range(30)}
    tensors["l17.weight"][5, 5] = float("inf")
    save_file(tensors, tmp_path / "m.safetensors")
    monkeypatch.setattr(device_mod, "mover_class", lambda dev: _EmulatedDmaMover)
    seen = []
    with pytest.raises(mmapload.NonFiniteError, match=r"l17\.weight"):
        for name, _ in mmapload.iter_quantized(tmp_path / "m.safetensors", ring_bytes=4 * (48 << 10)):
            seen.append(name)
    assert "l17.weight" not in seen


@cuda
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_cuda_equals_cpu_bit_for_bit(tmp_path, granularity):
    g = torch.Generator().manual_seed(4)
    tensors = {"a.weight": torch.randn(1000, 700, generator=g).bfloat16(),
               "experts.weight": torch.randn(3, 300, 256, generator=g).bfloat16(),
               "n.norm.weight": torch.randn(700, generator=g)}
    save_file(tensors, tmp_path / "m.safetensors")
    for ring in (64 << 10 if granularity != "block" else 4 * (200 << 10), 64 << 20):
        cpu = stream_quantize(tmp_path / "m.safetensors", "cpu", ring_bytes=ring, granularity=granularity)
        gpu = stream_quantize(tmp_path / "m.safetensors", "cuda", ring_bytes=ring, granularity=granularity)
        assert gpu.report.pinned and gpu.report.stage_seconds["copy"] > 0
        for name, t in cpu.items():
            d = gpu[name]
            if isinstance(t, QuantizedTensor):
                assert d.data.is_cuda
                assert torch.equal(d.data.cpu().view(torch.uint8), t.data.view(torch.uint8)), name
                assert torch.equal(d.scale.cpu(), t.scale), name
            else:
                assert torch.equal(d.cpu(), t), name


@cuda
@pytest.mark.parametrize("granularity", ["tensor", "block"])
def test_cuda_slot_never_overwritten_while_its_copy_is_in_flight(tmp_path, monkeypatch, granularity,
                                                                 no_thread_leak):
    """Every copy is held back ~1 ms on the copy stream (a spin kernel queued before it) and
    every quantization ~1 ms on the compute stream, while the caller is slow too: the reader
    races ahead of both. Refilling a slot before its copy event, or a staging buffer before
    the quantizer's event, would put the next batch's bytes into this batch's tensors."""
    g = torch.Generator().manual_seed(5)
    tensors = {f"l{i}.weight": torch.randn(256, 384, generator=g).bfloat16() for i in range(24)}
    tensors["big.weight"] = torch.randn(1024, 384, generator=g).bfloat16()   # > a slot: chunked
    tensors["emb.embed.weight"] = torch.randn(500, 128, generator=g).bfloat16()
    save_file(tensors, tmp_path / "m.safetensors")
    spin = 2_000_000                     # GPU clock cycles: ~1 ms at 1.5-2 GHz
    mover = device_mod._CudaMover
    to_device, done = mover.to_device, mover.done

    def late_copy(self, lease):
        with torch.cuda.stream(self.copy):
            torch.cuda._sleep(spin)
        return to_device(self, lease)

    def slow_quantize(self, lease):
        torch.cuda._sleep(spin)          # on the compute stream, before the "done" event
        return done(self, lease)

    monkeypatch.setattr(mover, "to_device", late_copy)
    monkeypatch.setattr(mover, "done", slow_quantize)
    ring = 4 * (256 * 384 * 2)
    got = {}
    for name, t in mmapload.iter_quantized(tmp_path / "m.safetensors", "cuda", ring_bytes=ring,
                                           granularity=granularity):
        got[name] = t
        time.sleep(0.002)                # a slow caller as well
    assert_same_as_whole_tensor_quantizer(got, tensors, granularity)


@pytest.fixture(scope="session")
def two_gib_checkpoint(tmp_path_factory):
    from mmapload.synth import make_llama_checkpoint
    return make_llama_checkpoint(tmp_path_factory.mktemp("2gib"), int(2.1 * 2**30), shards=2)


@cuda
def test_cuda_device_peak_contract(two_gib_checkpoint):
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = stream_quantize(two_gib_checkpoint, "cuda", ring_bytes=64 << 20)
    from mmapload.checkpoint import open_checkpoint
    largest = open_checkpoint(two_gib_checkpoint).largest.nbytes
    peak = model.report.device_peak - base
    print(f"device peak {peak / 2**20:.0f} MiB, retained {model.nbytes / 2**20:.0f} MiB, "
          f"ratio {peak / model.nbytes:.3f}")
    assert peak <= model.nbytes + largest + (64 << 20)


@cuda
def test_cuda_early_close_and_errors_release_device_memory(tmp_path, no_thread_leak):
    tensors = {f"l{i}.weight": torch.randn(512, 512) for i in range(20)}
    save_file(tensors, tmp_path / "m.safetensors")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    gen = mmapload.iter_quantized(tmp_path / "m.safetensors", "cuda", ring_bytes=1 << 20)
    next(gen)
    gen.close()
    del gen
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    with pytest.raises(KeyError):
        for name, _ in mmapload.iter_quantized(tmp_path / "m.safetensors", "cuda", ring_bytes=1 << 20):
            if name == "l4.weight":
                raise KeyError(name)
    import gc
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
