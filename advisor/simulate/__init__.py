"""``--mode simulate``: run the real architecture on fake tensors and count live tensor bytes.

The analytic estimate (:mod:`advisor.memory`) models what autograd keeps; this module does not
model anything it can run instead. It builds the real transformers model from the config (and
real peft LoRA, real gradient checkpointing, the real torch optimizer), all under
``torch._subclasses.fake_tensor.FakeTensorMode`` -- tensors with shapes, dtypes and strides but
no data and no memory -- and runs a steady-state training step (forward with labels, backward,
``optimizer.step``, ``zero_grad(set_to_none=True)``, as :func:`advisor.stack.train_step` does) or a
greedy generation. A ``TorchDispatchMode`` of our own sees the outputs of every aten op, registers
each new storage once with its ``nbytes`` and a weak reference whose callback subtracts it when
the storage dies: the running sum is the number of live tensor bytes at every moment, exactly
what the CPU allocator (and :mod:`runner.memtrace`) sees, and its maximum is the peak.

What cannot run on fake tensors is accounted from shapes, exactly:

* QLoRA's NF4 weights (bitsandbytes kernels need data): each quantized linear keeps one uint8
  storage of :func:`advisor.memory.nf4_bytes`; its forward is an autograd function that does what
  bitsandbytes' ``Linear4bit`` + ``MatMul4Bit`` do (cast the input to the compute dtype, dequantize
  the weight into a transient of the compute dtype, matmul, cast back to the input dtype, save no
  activation; dequantize again in backward), and peft's bnb LoRA forward (with its defensive clone).
* bitsandbytes' 8-bit / paged optimizers: their states (two uint8 tensors + an fp32 absmax per
  256 values; 32-bit states under 4096 elements; two 256-entry fp32 maps) are allocated as fake
  tensors at the first step.

Speed: for deep models the step is simulated with 2, 3 and 4 layers; when every phase's peak and
every component at it grows by the same amount per layer (checked, not assumed) the result is
extrapolated to the real depth, otherwise the full depth is simulated. On the GPU the allocator replay
needs the whole allocation sequence; it is built from the three shallow ones when they repeat layer by
layer (:mod:`advisor.simulate.events`, checked token for token). Weights are not initialized (fake
tensors hold no values). Results are kept per plan and config in the process (:func:`simulate`).

Device: tensors are fake CPU tensors. ``plan.hardware.device`` picks the optimizer path as torch
does (CUDA: ``foreach``, a params-sized temporary; CPU: the per-tensor loop) and the GPU overhead
terms; attention kernels and autocast follow the CPU dispatch.
"""

from __future__ import annotations

from advisor.memory import Breakdown, gpu_terms
from advisor.model import ModelShape
from advisor.simulate.common import (  # noqa: F401
    DECODE_STEPS_FULL,
    EXTRAPOLATE_FROM,
    INFER_PHASES,
    TRAIN_PHASES,
    Progress,
    SimulateError,
)
from advisor.simulate.fakes import _num_layers
from advisor.simulate.runs import _infer_run, _train_run
from advisor.simulate.tracker import _Result
from advisor.spec import Plan

# ------------------------------------------------------------------------------------------
# the estimate
# ------------------------------------------------------------------------------------------

def _breakdown(res: _Result, plan: Plan, shape: ModelShape, notes: list[str]) -> Breakdown:
    from advisor.gpu_memory import attention_workspace_bytes

    phases = dict(res.phases)
    peak = max(phases, key=lambda k: phases[k])
    comps = dict(res.components[peak])
    diff = phases[peak] - sum(comps.values())
    if diff:  # cannot happen with exact accounting; keep the invariant anyway
        comps["transient"] = comps.get("transient", 0) + diff
    comps = {k: int(v) for k, v in comps.items() if v}
    training = plan.task == "training"
    t = plan.training
    attn = attention_workspace_bytes(t.micro_batch, t.seq_len, shape.num_heads, shape.head_dim,
                                     t.attn_impl) if training else 0
    replayed = res.reserved.get("default")
    extra = list(res.notes)
    if plan.hardware.device == "cuda" and replayed is not None:
        exp = res.reserved.get("expandable")
        loaded = res.reserved.get("default@loaded")
        extra.append(f"allocator replay: max reserved {replayed / 2**30:.2f} GiB of tensors (loading alone "
                     f"{(loaded or 0) / 2**30:.2f} GiB); with expandable_segments:True {(exp or 0) / 2**30:.2f} GiB")
    return Breakdown(comps, peak, {k: int(v) for k, v in phases.items()}, notes=notes + extra,
                     host={"offloaded_activations": res.host} if res.host else {},
                     **gpu_terms(phases[peak], comps, plan.hardware, training=training, attention=attn,
                                 replayed_reserved=replayed, harness=t.harness if training else "tuneplan"))


def _extrapolate(results: dict[int, _Result], target: int) -> _Result | None:
    """Per-layer increments from depths a, a+1, a+2; None unless every phase peak and every
    component at it grows by exactly the same amount per layer."""
    (a, ra), (b, rb), (c, rc) = sorted(results.items())
    if not (b == a + 1 and c == b + 1):
        return None
    if set(ra.phases) != set(rb.phases) or set(rb.phases) != set(rc.phases):
        return None
    phases: dict[str, int] = {}
    comps: dict[str, dict[str, int]] = {}
    for ph in rc.phases:
        d1, d2 = rb.phases[ph] - ra.phases[ph], rc.phases[ph] - rb.phases[ph]
        if d1 != d2:
            return None
        phases[ph] = rc.phases[ph] + (target - c) * d2
        keys = set(ra.components[ph]) | set(rb.components[ph]) | set(rc.components[ph])
        comps[ph] = {}
        for k in keys:
            xa, xb, xc = (r.components[ph].get(k, 0) for r in (ra, rb, rc))
            if xb - xa != xc - xb:
                return None
            comps[ph][k] = xc + (target - c) * (xc - xb)
    if rb.host - ra.host != rc.host - rb.host:
        return None
    host = rc.host + (target - c) * (rc.host - rb.host)  # offloaded inputs: one per layer
    return _Result(phases, comps, list(rc.notes), host=host)  # no allocator replay: it needs the whole sequence


def _with_replay(res: _Result, runs: dict[int, _Result], target: int) -> _Result | None:
    """``res`` with the allocator replay of the ``target``-layer allocation sequence, built from the runs' tokens
    (None when the sequences do not repeat layer by layer: the caller simulates every layer)."""
    from advisor.simulate.events import decode, extrapolate
    from advisor.simulate.tracker import replay_events

    if any(r.tokens is None for r in runs.values()):
        return None
    built = extrapolate({n: r.tokens or [] for n, r in runs.items()}, target)
    if built is None:
        return None
    return _Result(res.phases, res.components, res.notes, replay_events(decode(*built)), host=res.host)


def _check_supported(plan: Plan, shape: ModelShape) -> None:
    if shape.num_experts:
        from advisor.simulate.experts import routing_independent

        if not routing_independent():
            raise SimulateError(f"{shape.name} is a mixture of experts and this transformers loops over the "
                                "experts the router picked, which depends on the data fake tensors do not "
                                "have; use --mode analytic")
    if not shape.config:
        raise SimulateError(f"{shape.name}: no config.json to build the architecture from")
    if plan.hardware.gpus > 1:
        raise SimulateError("simulate covers one device; use --mode analytic for multi-GPU sharding")
    if plan.task == "training" and plan.training.liger:
        raise SimulateError("Liger's kernels are Triton programs, which fake tensors cannot run: use --mode analytic "
                            "(it models them tensor by tensor from Liger-Kernel's source)")
    if plan.task == "training":
        from advisor.software import mismatch

        why = mismatch(plan.training.transformers, "simulate")
        if why:
            raise SimulateError(f"{why}; use --mode analytic, which models {plan.training.transformers}")


def _as_run(plan: Plan) -> Plan:
    """The plan as one device runs it (advisor.memory.as_run): mixed-bf16 is accelerate's autocast, amp-bf16."""
    if plan.task != "training":
        return plan
    from advisor.memory import as_run

    return plan.model_copy(update={"training": as_run(plan.training, plan.hardware)})


_MEMO: dict[tuple, Breakdown] = {}


def _memo_key(plan: Plan, shape: ModelShape, extrapolate: bool) -> tuple:
    """What the simulation depends on: the config, the task's spec, the hardware, the batches' padding."""
    from advisor.spec import padded_batches

    spec = plan.training if plan.task == "training" else plan.inference
    return (shape.config_sha256, shape.name, plan.task, spec.model_dump_json(), plan.hardware.model_dump_json(),
            padded_batches(plan) if plan.task == "training" else False, extrapolate)


def simulate(plan: Plan, shape: ModelShape, progress: Progress | None = None,
             extrapolate: bool = True) -> Breakdown:
    """The peak live tensor bytes of the plan's step, from running the real architecture on fake
    tensors. ``extrapolate``: for deep models simulate 2, 3 and 4 layers and extrapolate (exact
    when the per-layer increments agree; otherwise the full depth is simulated). The same plan for the
    same config is answered from memory the second time (a copy)."""
    import copy

    _check_supported(plan, shape)
    plan = _as_run(plan)
    key = _memo_key(plan, shape, extrapolate)
    if key in _MEMO:
        if progress:
            progress(1.0, "done (simulated before)")
        return copy.deepcopy(_MEMO[key])
    b = _simulate(plan, shape, progress, extrapolate)
    if len(_MEMO) >= 32:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = copy.deepcopy(b)
    return b


def _simulate(plan: Plan, shape: ModelShape, progress: Progress | None, extrapolate: bool) -> Breakdown:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _check_supported(plan, shape)
    from advisor.software import release_note

    notes = ["simulated: real transformers/peft code on fake tensors (CPU dispatch)"]
    newer = release_note("simulate")
    if newer:
        notes.append(newer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if plan.task == "inference":
            res = _infer_run(plan, shape, progress)
        else:
            depth = _num_layers(shape.config, shape)
            res = None
            # the allocator replay (cuda) needs the whole allocation sequence: its reserve is not linear in
            # depth, so the sequence itself is extrapolated (events.extrapolate: checked token for token)
            replay = plan.hardware.device == "cuda"
            if extrapolate and depth > max(EXTRAPOLATE_FROM):
                runs = {}
                for i, n in enumerate(EXTRAPOLATE_FROM):
                    k = len(EXTRAPOLATE_FROM)
                    runs[n] = _train_run(plan, shape, n, progress, 0.9 * i / k, 0.9 * (i + 1) / k, as_tokens=replay)
                res = _extrapolate(runs, depth)
                if res is not None and replay:
                    res = _with_replay(res, runs, depth)
                if res is not None:
                    notes.append(f"simulated {', '.join(map(str, EXTRAPOLATE_FROM))} layers; the per-layer "
                                 f"increment (identical between them) extrapolated to {depth}")
                    if replay:
                        notes.append(f"the allocation sequence of all {depth} layers built from theirs (each "
                                     "layer's events repeated; checked) for the allocator replay")
                else:
                    notes.append("per-layer increments differ between depths: simulated the full depth")
            if res is None:
                res = _train_run(plan, shape, None, progress, 0.0 if not extrapolate or depth <= max(
                    EXTRAPOLATE_FROM) else 0.9, 1.0)
    if progress:
        progress(1.0, "done")
    assert res is not None  # the full depth is simulated where extrapolation did not hold
    return _breakdown(res, plan, shape, notes)
