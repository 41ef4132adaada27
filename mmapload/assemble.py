"""Consumer side: pieces on the device become finished tensors, in file order.

A piece whose scale granules are its own is quantized as it lands. Pieces that share one
granule's scale (a *scale group*, plan.py: a per-tensor matrix cut into pieces, a channel
row cut into columns, a block granule cut inside) need the amax of the whole group before
the first of them is cast. Two ways, written per group in the plan (``LoadPlan.held`` /
``LoadPlan.prepass``) and read here, never inferred:
- *hold*: keep its pieces until the last one has landed, merging amaxes, then cast them all.
  On the CPU the pieces stay in their ring slots (the assembler tells the ring ``holds(g)``
  and later ``group_complete(g)``; the plan guarantees the group spans fewer batches than
  the ring has slots). On CUDA they are copied into one device buffer (at most the largest
  group); the slots went back when their bytes reached the device.
- *pre-pass*: the reader computed the amax from the map beforehand (fill.py), for groups
  too big to hold on the CPU; it comes with the group's first piece.
The assembler never gives a slot back itself: ring.py decides from those facts.

Tensor parallelism (``group``, tp_group.py): a rank holds part of a sharded tensor, so where a
scale spans the cut (per-tensor scales of any sharded tensor, per-channel scales of a
row-parallel one) the rank's amax is MAX-reduced over the ranks before it becomes a scale. The
casts of such tensors wait until the end of their batch (``flush``): one collective per batch
reduces every amax the batch completed, then the waiting casts run in order. Scales so equal
the TP=1 scales, bit for bit.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import psutil
import torch

from .checkpoint import TensorSpec
from .dtypes import torch_shape
from .errors import DeviceError, NonFiniteError
from .fp8 import Granularity, Quantizer, dequantize, merge_amax
from .config import LoadOptions
from .plan import LoadPlan, Piece, matrix_dims
from .result import Loaded, OutFor, QuantizedTensor, provided_output, tensor_nbytes
from .ring import Lease
from .tp_group import TPGroup
from .transfer import Mover

__all__ = ["Assembler"]



class _Building:
    """A tensor whose pieces are still arriving."""

    def __init__(self, spec: TensorSpec, quantize: bool, opts: LoadOptions, device: torch.device,
                 out: torch.Tensor | None = None, shape: tuple[int, ...] | None = None, reduce: bool = False):
        self.spec, self.quantize, self.reduce = spec, quantize, reduce
        shape = spec.shape if shape is None else shape   # a TP rank's part, or all of it
        self.err2 = self.ref2 = 0.0
        # the held scale group being assembled: its pieces and their merged amax
        self.held: list[tuple[torch.Tensor, Piece]] = []
        self.held_elems = 0
        self.amax: torch.Tensor | None = None
        if quantize:
            self.out = torch.empty(shape, dtype=opts.fp8_dtype, device=device)
            self.scale = torch.empty(opts.scheme.scale_shape(shape), device=device,
                                     dtype=opts.scale_dtype_of(spec.torch_dtype))
            self.out3 = self.out.view(matrix_dims(shape))
            self.scale3 = self.scale.view(len(self.out3), *self.scale.shape[-2:]) \
                if self.scale.dim() >= 2 else self.scale.view(1, 1, 1)
        else:   # ``out``: the reader already read the tensor into it (in place, CPU)
            self.out = out if out is not None else torch.empty(torch_shape(spec.dtype, shape),
                                                                dtype=spec.torch_dtype, device=device)
            self.bytes = self.out.reshape(-1).view(torch.uint8)


class Assembler:
    """``add(lease, piece, data, amax, output)`` per piece, then ``flush()`` once per batch: the
    ``(name, tensor)`` the batch finished, in order. Consumer thread only.

    ``amax``: the reader's pre-passed amax (float32 scalar) with the first piece of a
    pre-passed group; ``output``: for a piece kept as it is, the output the reader read it into.
    """

    def __init__(self, opts: LoadOptions, device: torch.device, mover: Mover, plan: LoadPlan,
                 group: TPGroup | None = None, out_for: OutFor | None = None):
        self.opts, self.device, self.mover, self.plan, self.group = opts, device, mover, plan, group
        self.out_for = out_for   # the caller's tensors that kept tensors are copied into, where it has them
        self.prepass = plan.prepass
        self._finished: list[tuple[str, Loaded]] = []
        self._later: list[Callable[[], None]] = []     # TP: casts waiting for reduced amaxes
        self._pending: list[tuple[torch.Tensor, Piece]] = []   # TP: amaxes to reduce, in order
        self._hold_busy = False    # a completed held group still reads the copying mover's buffer
        self.quantizer = Quantizer(opts.fp8_dtype, opts.granularity, opts.block_size, device=device,
                                   scale_dtype=opts.scale_dtype)
        self._b: _Building | None = None
        self._last: Piece | None = None   # the last piece added (for an out-of-memory message)
        self._unchecked: list = []     # (device bool "amax finite", piece) not yet looked at
        self.retained_bytes = self.tensors = self.quantized = 0

    def add(self, lease: Lease, piece: Piece, data: torch.Tensor, amax: torch.Tensor | None = None,
            output: torch.Tensor | None = None, view: torch.Tensor | None = None) -> None:
        self._last = piece
        try:                        # per piece: a plain try, no context manager on the hot path
            self._add(lease, piece, data, amax, output, view)
        except RuntimeError as e:
            raise self._as_device_error(e, piece)

    def flush(self) -> list[tuple[str, Loaded]]:
        """End of a batch: reduce the amaxes it completed over the TP group (one collective),
        run the casts that waited for them; the tensors finished, in file order."""
        try:
            self._reduce()
        except RuntimeError as e:
            raise self._as_device_error(e, self._last)
        done, self._finished = self._finished, []
        return done

    def _as_device_error(self, e: RuntimeError, piece: Piece | None) -> Exception:
        """torch.OutOfMemoryError (CUDA) or the CPU allocator's -> DeviceError; else ``e`` itself."""
        if piece is not None and (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
            self._b, self._later = None, []
            err = self._oom(piece)
            err.__cause__ = e
            return err
        return e

    def _reduce(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            local = [a.reshape(-1).float() for a, _ in pending]
            # per amax, rank + 1 where it is NaN / Inf: after the MAX every rank knows which and where
            bad = torch.stack([~torch.isfinite(a).all() for a in local]).float() * (self.group.rank + 1)
            flat = self.group.max_(torch.cat([*local, bad]),
                                   f"the amax all-reduce of tensor {pending[0][1].spec.name!r}")
            flags = flat[-len(pending):]
            if bool((flags > 0).any()):
                i = int(torch.nonzero(flags > 0)[0])
                self._later = []
                self.group.open = False   # every rank raises after this same collective: still in step
                raise self._nonfinite(pending[i][1].spec, f" (in rank {int(flags[i]) - 1}'s part of it)")
            at = 0
            for a, _ in pending:
                a.copy_(flat[at:at + a.numel()].view_as(a))
                at += a.numel()
        later, self._later = self._later, []
        for op in later:
            op()
        self._hold_busy = False

    def _oom(self, piece: Piece) -> DeviceError:
        spec, dev = piece.spec, self.device
        need = spec.numel * self.opts.fp8_dtype.itemsize if piece.quantize else spec.nbytes
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(dev)[0]
        else:
            free = psutil.virtual_memory().available
        return DeviceError(
            f"out of memory on {dev} while loading tensor {spec.name!r} from {spec.shard} (bytes "
            f"{spec.start}..{spec.end}): it needs {need:,} bytes, {free:,} are free after "
            f"{self.retained_bytes:,} bytes retained so far; use a bigger device, or skip= it")

    def _reduces(self, spec: TensorSpec) -> bool:
        """Its scales span this rank's cut: per-tensor scales of a sharded tensor, per-channel
        scales of a row-parallel one. (Block grids are cut on their boundaries: tp.shard_of.)"""
        sl = self.plan.slices.get(spec.name)
        if self.group is None or sl is None:
            return False
        g = self.opts.granularity
        return g is Granularity.TENSOR or (g is Granularity.CHANNEL and sl.dim == len(spec.shape) - 1)

    def _add(self, lease: Lease, piece: Piece, data: torch.Tensor, amax: torch.Tensor | None,
             output: torch.Tensor | None, view: torch.Tensor | None = None) -> None:
        if piece.first:
            spec, shape = piece.spec, self.plan.shape_of(piece.spec)
            out = output
            if out is None and not piece.quantize:   # copied off the slot: into the caller's tensor if it has one
                out = provided_output(self.out_for, spec.name, torch_shape(spec.dtype, shape), spec.torch_dtype,
                                      self.device)
            self._b = _Building(spec, piece.quantize, self.opts, self.device, out, shape,
                                piece.quantize and self._reduces(spec))
        b = self._b
        raw = data[piece.offset:piece.offset + piece.nbytes] if view is None else view   # io="view": the map
        if not piece.quantize:
            if output is None:   # else already read into b.out
                b.bytes[piece.at:piece.at + piece.nbytes].copy_(raw)
        else:
            x = raw.view(piece.spec.torch_dtype).view(piece.row1 - piece.row0, piece.col1 - piece.col0)
            if piece.group >= 0:
                self._grouped(lease, b, piece, x, amax)
            elif b.reduce:         # cast at the batch's end, once the amax is reduced
                a = self.quantizer.amax_2d(x)
                self._pending.append((a, piece))
                self._later.append(partial(self._quantize, b, piece, x, a))
            else:
                self._quantize(b, piece, x, self.quantizer.amax_2d(x))
        if piece.last:
            self._b = None
            if self.group is None:
                self._done(b)
            else:                  # after the casts that wait for the batch's collective: in order
                self._later.append(partial(self._done, b))

    def _done(self, b: _Building) -> None:
        self._finished.append((b.spec.name, self._finish(b)))

    # -- per piece -------------------------------------------------------------------
    def _scale_view(self, b: _Building, piece: Piece) -> torch.Tensor:
        """The scales of the granules ``piece`` covers (of its group's one granule, if shared)."""
        g = self.opts.granularity
        if g is Granularity.TENSOR:
            return b.scale3[piece.expert, 0, 0]
        if g is Granularity.CHANNEL:
            return b.scale3[piece.expert, piece.row0:piece.row1]
        br, bc = self.opts.block_size
        return b.scale3[piece.expert, piece.row0 // br:-(-piece.row1 // br),
                        piece.col0 // bc:-(-piece.col1 // bc)]

    def _set_scale(self, b: _Building, piece: Piece, amax: torch.Tensor) -> None:
        finite = torch.isfinite(amax).all()
        self._unchecked.append((finite, piece))
        if not self.mover.copies:
            self.check()        # free in place; an async (CUDA) mover checks once per batch

        self._scale_view(b, piece).copy_(self.quantizer.scale(amax, piece.spec.torch_dtype))

    def check(self) -> None:
        """Raise ``NonFiniteError`` if a piece since the last check held NaN or Inf."""
        if not self._unchecked:
            return
        pending, self._unchecked = self._unchecked, []
        if bool(torch.stack([f for f, _ in pending]).all()):
            return
        raise self._nonfinite(next(p for f, p in pending if not bool(f)).spec)

    def _nonfinite(self, spec: TensorSpec, where: str = "") -> NonFiniteError:
        self._b = None
        return NonFiniteError(
            f"{spec.shard}: tensor {spec.name!r} (bytes {spec.start}..{spec.end}) contains NaN or "
            f"Inf{where}; the checkpoint is corrupt, or pass skip=[{spec.name!r}] to load it unquantized")

    def _quantize(self, b: _Building, piece: Piece, x: torch.Tensor, amax) -> None:
        """Cast one piece; ``amax`` None means its scale is already set."""
        if amax is not None:
            self._set_scale(b, piece, amax)
        scale = self._scale_view(b, piece)
        out = b.out3[piece.expert, piece.row0:piece.row1, piece.col0:piece.col1]
        self.quantizer.quantize_2d_into(x, scale, out)
        if self.opts.error_stats:
            deq = dequantize(out, scale, self.opts.granularity, self.opts.block_size, dtype=torch.float32)
            xf = x.float()
            b.err2 += float((xf - deq).pow_(2).sum())
            b.ref2 += float(xf.pow(2).sum())

    def _grouped(self, lease: Lease, b: _Building, piece: Piece, x: torch.Tensor,
                 amax: torch.Tensor | None) -> None:
        """A piece of a shared scale group: quantize it now if the plan has the reader
        pre-pass the group (``amax`` comes with its first piece), else hold it until the last."""
        if piece.group in self.prepass:
            a = amax.to(self.device) if piece.group_first else None
            if not b.reduce:
                self._quantize(b, piece, x, a)
                return
            if a is not None:
                self._pending.append((a, piece))
            self._later.append(partial(self._quantize, b, piece, x, a))
            return
        if self._hold_busy:      # a held group waiting for the collective still reads the hold buffer
            self._reduce()
        kept = self.mover.hold(x, b.held_elems)
        b.held_elems += x.numel()
        if not self.mover.copies:
            lease.holds(piece.group)     # the piece is read from its slot until the group is cast
        part = self.quantizer.amax_2d(x)
        b.amax = part if b.amax is None else merge_amax(b.amax, part)
        b.held.append((kept, piece))
        if piece.group_last:               # the group is complete: its scale is known
            held, a = b.held, b.amax
            b.held, b.held_elems, b.amax = [], 0, None
            if not b.reduce:
                self._cast_held(lease, b, piece, held, a)
                return
            self._pending.append((a, piece))
            self._later.append(partial(self._cast_held, lease, b, piece, held, a))
            self._hold_busy = self.mover.copies

    def _cast_held(self, lease: Lease, b: _Building, piece: Piece, held: list, amax: torch.Tensor) -> None:
        """A complete held group: its scale from ``amax``, every held piece cast with it."""
        self._set_scale(b, piece, amax)
        for kx, kp in held:
            self._quantize(b, kp, kx, None)
        if not self.mover.copies:
            lease.group_complete(piece.group)

    def _finish(self, b: _Building) -> Loaded:
        self.tensors += 1
        if not b.quantize:
            self.retained_bytes += tensor_nbytes(b.out)
            return b.out
        self.quantized += 1
        rel = (b.err2 ** 0.5 / b.ref2 ** 0.5 if b.ref2 > 0 else 0.0) if self.opts.error_stats else None
        qt = QuantizedTensor(b.out, b.scale, b.spec.torch_dtype, self.opts.granularity,
                             self.opts.block_size, rel)
        self.retained_bytes += qt.nbytes
        return qt
