"""Counting live storages: a TorchDispatchMode that registers each new storage once and
subtracts it when it dies; per-phase peaks; module hooks that tag what is created where."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------------------------------------
# the tracker
# ------------------------------------------------------------------------------------------

@dataclass
class _Rec:
    nbytes: int
    born: int
    died: int | None = None
    phase: str | None = None
    in_module: bool = False
    head: bool = False
    shape: tuple = ()
    tag: str | None = None
    ref: Any = None


@dataclass
class _PhasePeak:
    bytes: int = -1
    seq: int = 0


@dataclass
class _Result:
    phases: dict[str, int]
    components: dict[str, dict[str, int]]  # phase -> component -> bytes at that phase's peak
    notes: list[str] = field(default_factory=list)
    reserved: dict[str, int] = field(default_factory=dict)  # allocator replay: config name -> max reserved
    tokens: list | None = None  # the allocation sequence as events.encode tokens (for events.extrapolate)
    host: int = 0  # peak host bytes of offloaded activations (training.offload_activations)


def alloc_events(recs: list[_Rec], marks: Sequence[tuple[int, str]] = ()) -> list[tuple[str, object, int]]:
    """The allocation/free sequence of the run, in order, for :func:`advisor.allocator.replay`:
    each storage is allocated when it is born and freed when it dies (never, if it lives on)."""
    timed: list[tuple[int, int, tuple[str, object, int]]] = []
    for i, rec in enumerate(recs):
        timed.append((rec.born, 1, ("alloc", i, rec.nbytes)))
        if rec.died is not None:
            timed.append((rec.died, 0, ("free", i, 0)))
    for seq, name in marks:
        timed.append((seq, 2, ("mark", name, 0)))
    timed.sort(key=lambda x: (x[0], x[1]))
    return [e for _, _, e in timed]


def event_tokens(recs: list[_Rec], marks: Sequence[tuple[int, str]] = ()) -> list:
    """The run's allocation sequence as advisor.simulate.events tokens (sizes, tags, ranks)."""
    from advisor.simulate.events import encode

    events = alloc_events(recs, marks)
    # the frees after the last allocation (the model and optimizer let go at the end of the run) cannot change a
    # peak, and their order (module by module) is not per layer: left out
    while events and events[-1][0] == "free":
        events.pop()
    return encode(events, {i: rec.tag for i, rec in enumerate(recs)})


def replay_reserved(recs: list[_Rec], marks: Sequence[tuple[int, str]] = ()) -> dict[str, int]:
    """Max reserved bytes of the whole run (loading included) under the default caching allocator
    and under ``expandable_segments:True`` (see advisor/allocator.py)."""
    return replay_events(alloc_events(recs, marks))


def replay_events(events: list) -> dict[str, int]:
    """:func:`replay_reserved` of an event sequence (alloc_events, or events.decode of extrapolated tokens)."""
    from advisor.allocator import AllocatorConfig, replay

    out = {}
    for name, cfg in (("default", AllocatorConfig()), ("expandable", AllocatorConfig(expandable_segments=True))):
        r = replay(events, cfg)
        out[name] = r.peak_reserved_bytes
        out[name + "_allocated"] = r.peak_allocated_bytes
        for mark, value in r.reserved_at.items():
            out[f"{name}@{mark}"] = value
    return out


def _make_tracker(cpu: bool = False):
    """``cpu``: the plan runs on the CPU, whose elementwise kernels promote an operand of another dtype
    through a temporary (below)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    local_scalar = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    softmax_int = torch.ops.aten.softmax.int
    safe_softmax = torch.ops.aten._safe_softmax.default
    promoting = {torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.mul.Tensor,
                 torch.ops.aten.div.Tensor}

    def _cpu_promoted(func, args):
        # TensorIterator on the CPU promotes an input of another dtype by a temporary copy in the common dtype
        # (compute_types, CPU only: CUDA kernels cast as they load); e.g. peft's half base output + fp32
        # LoRA output. Fake kernels skip it, so the copy is made here, alive while the op runs.
        # Returns (the inputs that get a copy, the common dtype)
        if func not in promoting or len(args) < 2:
            return [], None
        ts = [a for a in args[:2] if isinstance(a, torch.Tensor) and a.dim() > 0]
        if len(ts) != 2 or ts[0].dtype == ts[1].dtype or not all(t.dtype.is_floating_point for t in ts):
            return [], None
        common = torch.promote_types(ts[0].dtype, ts[1].dtype)
        return [t for t in ts if t.dtype != common], common

    def _sdpa_math_path(args, kwargs) -> bool:
        # sdp_utils check_batch_size_and_num_heads_dense: a fused kernel (flash, efficient, the CPU
        # flash kernel) needs as many key/value heads as query heads unless enable_gqa is set
        # (Falcon passes its single multi-query key/value head as is): torch falls back to math
        q, k = args[0], args[1]
        return q.dim() == 4 and q.shape[-3] != k.shape[-3] and not kwargs.get("enable_gqa", False)


    class Tracker(TorchDispatchMode):
        """Counts live storages; answers data-dependent scalars (fake tensors hold no data)."""

        def __init__(self):
            super().__init__()
            self.recs: list[_Rec] = []
            self.live: dict[int, _Rec] = {}
            self.total = 0
            self.seq = 0
            self.phase: str | None = None
            self.measuring = False
            self.peaks: dict[str, _PhasePeak] = {}
            self.module_depth = 0
            self.head = False
            self.scalar_calls = 0
            self.marks: list[tuple[int, str]] = []
            self.math_depth = 0

        # -- bookkeeping --------------------------------------------------------------------
        def _freed(self, rec: _Rec, key: int, _ref: object) -> None:  # weakref's callback: the storage died
            self._free(rec, key)

        def _free(self, rec: _Rec, key: int) -> None:
            if rec.died is not None:
                return
            self.seq += 1
            rec.died = self.seq
            self.total -= rec.nbytes
            if self.live.get(key) is rec:
                del self.live[key]

        def register(self, t) -> None:
            try:
                st = t.untyped_storage()
            except Exception:  # noqa: BLE001 - sparse or storage-less tensors
                return
            key = st._cdata
            rec = self.live.get(key)
            if rec is not None:
                return
            self.seq += 1
            rec = _Rec(st.nbytes(), self.seq, phase=self.phase, in_module=self.module_depth > 0,
                       head=self.head, shape=tuple(t.shape))
            rec.ref = weakref.ref(st, functools.partial(self._freed, rec, key))
            self.recs.append(rec)
            self.live[key] = rec
            self.total += rec.nbytes

        def _bump(self) -> None:
            if self.measuring and self.phase is not None:
                pk = self.peaks.setdefault(self.phase, _PhasePeak())
                if self.total > pk.bytes:
                    pk.bytes, pk.seq = self.total, self.seq

        def mark(self, name: str) -> None:
            self.marks.append((self.seq, name))

        def set_phase(self, name: str | None) -> None:
            self.phase = name
            self.head = False
            self._bump()  # the level on entry counts (as runner.memtrace does)

        def tag(self, t, tag: str) -> None:
            if t is None:
                return
            rec = self.live.get(t.untyped_storage()._cdata)
            if rec is not None:
                rec.tag = tag

        # -- dispatch -----------------------------------------------------------------------
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in local_scalar:
                # a Python value read from a tensor: the step's control flow (an all-ones mask is
                # all true; optimizer step counters, scalars) does not depend on it here
                self.scalar_calls += 1
                dt = args[0].dtype
                return True if dt == torch.bool or func is torch.ops.aten.is_nonzero.default else (
                    1.0 if dt.is_floating_point else 1)
            kwargs = kwargs or {}
            if func is sdpa and _sdpa_math_path(args, kwargs):
                # torch's math attention (aten/src/ATen/native/transformers/attention.cpp): its
                # temporaries (fp32 copies of q, k and v, the scaled q and k, the score matrices,
                # the broadcast k and v that matmul copies out) live below this mode when sdpa
                # runs as one op; run its composite kernel here so that every one is counted
                # sdpa itself first turns a boolean mask into an additive one in the query's dtype (profiled:
                # a where() inside scaled_dot_product_attention, before the math kernel), a tensor of the
                # mask's broadcast shape that the math kernel then adds to its scores
                args, kwargs = list(args), dict(kwargs)
                pos = 3 if len(args) > 3 else None
                mask = args[3] if pos is not None else kwargs.get("attn_mask")
                if mask is not None and mask.dtype == torch.bool:
                    with self:
                        zero = torch.ops.aten.scalar_tensor.default(0.0, dtype=args[0].dtype)
                        ninf = torch.ops.aten.scalar_tensor.default(float("-inf"), dtype=args[0].dtype)
                        mask = torch.ops.aten.where.self(mask, zero, ninf)
                    if pos is not None:
                        args[3] = mask
                    else:
                        kwargs["attn_mask"] = mask
                self.math_depth += 1
                try:
                    with self:
                        return torch.ops.aten._scaled_dot_product_attention_math.default.decompose(
                            *args, **kwargs)[0]
                finally:
                    self.math_depth -= 1
            if func is softmax_int and (args[2] if len(args) > 2 else kwargs.get("dtype")) not in (
                    None, args[0].dtype):
                # F.softmax(x, dtype=float32) of bf16/fp16 scores (eager attention): the composite
                # softmax.int casts its input first (a copy), then runs _softmax beside it
                with self:
                    return func.decompose(*args, **kwargs)
            if func is safe_softmax:
                # the math attention's softmax, as its C++ kernel runs (profiled: softmax, a bool mask of the
                # -inf scores, its all() over each row, and no other allocation: the fully masked rows are
                # zeroed in place); as one op on fake tensors only its output would be counted, and the
                # torch._decomp version makes two more full-size tensors
                x, dim = args[0], args[1]
                dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
                depth, self.math_depth = self.math_depth, 0  # these four run as kernels of their own
                try:
                    with self:
                        out = torch.ops.aten.softmax.int(x, dim, dtype)
                        masked = torch.ops.aten.isneginf.default(x)
                        rows = torch.ops.aten.all.dim(masked, dim, True)
                        torch.ops.aten.masked_fill_.Scalar(out, rows, 0.0)
                        del masked, rows
                finally:
                    self.math_depth = depth
                return out
            if self.math_depth and func not in local_scalar:
                # inside the math kernel, composite ops (matmul, _safe_softmax) run their own
                # kernels op by op too, as they do under the real dispatcher
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            temps = []
            if cpu:
                promoted, common = _cpu_promoted(func, args)
                with self:
                    temps = [torch.ops.aten._to_copy.default(x, dtype=common) for x in promoted]
            out = func(*args, **kwargs)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.register(t)
            self._bump()
            del temps
            return out

        def components_at(self, seq: int, classify) -> dict[str, int]:
            comps: dict[str, int] = {}
            for rec in self.recs:
                if rec.born <= seq and (rec.died is None or rec.died > seq):
                    c = classify(rec)
                    comps[c] = comps.get(c, 0) + rec.nbytes
            return {k: v for k, v in comps.items() if v}

    return Tracker()


class _RealMasks:
    """transformers' masking code refuses to read a fake tensor's values (``is_tracing`` is true
    for fake tensors) and then always materializes the attention mask. The runner's all-ones mask
    lets the real run skip it (sdpa ``is_causal``); so, while simulating, masking_utils sees fake
    tensors as ordinary ones and the tracker answers that the mask is all ones.

    ``padded``: the batch carries padding (spec.padded_batches). The all-ones answer would let sdpa skip
    the mask, so masking_utils' sdpa mask is built as for a padded batch (``allow_is_causal_skip`` off:
    the boolean (batch, 1, seq, seq) mask, made inside the forward as in the real run)."""

    padded = False

    def __enter__(self):
        import torch
        from transformers import masking_utils

        # Module._apply (module.to(dtype)) swaps FakeTensor parameters with swap_tensors, which
        # refuses tensors that have weak references (every fake Parameter has one); for our
        # purpose (the storage changes, the Parameter object stays) `.data =` is the same.
        self.utils = torch.utils
        self.orig_swap = swap = torch.utils.swap_tensors

        def swap_tensors(t1, t2):
            try:
                return swap(t1, t2)
            except RuntimeError:
                t1.data = t2.data

        torch.utils.swap_tensors = swap_tensors
        from transformers.utils import import_utils

        self.mod = masking_utils
        self.orig = masking_utils.is_tracing

        def is_tracing(tensor=None):
            return import_utils.is_tracing(None) or (tensor is not None and import_utils.is_torch_fx_proxy(tensor))

        masking_utils.is_tracing = is_tracing
        self.mapping = masking_utils.AttentionMaskInterface._global_mapping
        self.orig_sdpa = sdpa_mask = self.mapping["sdpa"]

        def padded_sdpa_mask(*args, **kwargs):
            if self.padded:
                kwargs["allow_is_causal_skip"] = False
            return sdpa_mask(*args, **kwargs)

        self.mapping["sdpa"] = padded_sdpa_mask
        return self

    def __exit__(self, *exc):
        self.mapping["sdpa"] = self.orig_sdpa
        self.mod.is_tracing = self.orig
        self.utils.swap_tensors = self.orig_swap
        return False


def _hooks(model, tracker, head_module) -> list:
    """Module forward hooks: allocations inside a module's forward are activations (also when a
    checkpointed layer is recomputed during backward); from the output head on, logits and loss."""
    handles = []

    def pre(_m, _a):
        tracker.module_depth += 1

    def post(_m, _a, _o):
        tracker.module_depth -= 1

    def head_pre(_m, _a):
        if tracker.phase in ("forward", "prefill", "decode"):
            tracker.head = True

    def top_pre(_m, _a):
        tracker.head = False  # a new forward (generation: each decode step) starts before the head

    handles.append(model.register_forward_pre_hook(top_pre))
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    if head_module is not None:
        handles.append(head_module.register_forward_pre_hook(head_pre))
    return handles
