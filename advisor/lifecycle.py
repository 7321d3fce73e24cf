"""Peaks outside the training step: the moments of a run before, between and after the steps.

``nvidia-smi``'s peak is the maximum over the whole run, so the steady-state step of
:mod:`advisor.memory` is not the only candidate. Each function here returns one :class:`Moment`
(per GPU: the device bytes; the host RAM bytes) from ``(plan, shape)``. Pure and fast (no torch).

Moments (docs/memory-model.md "Moments outside the training step"; measured in
benchmarks/lifecycle.py, table in docs/accuracy.md):

* ``loading`` -- weights arrive in the load dtype (``advisor.stack.param_dtype``). QLoRA:
  bitsandbytes quantizes each linear weight as it is moved to the device (``Params4bit._quantize``:
  the weight in the load dtype is on the device while its 4-bit copy is made), then peft's
  ``prepare_model_for_kbit_training`` casts every non-4-bit parameter to fp32 in
  ``named_parameters`` order, ``param.data = param.data.to(float32)``: the live bytes grow
  monotonically, so the peak is the fp32 end state plus the largest cast tensor (the head or the
  embedding, cast at the end) in its old dtype.
  FSDP / ZeRO-3 (the runner's FSDP with ``cpu_ram_efficient_loading``): rank 0 loads the whole model
  onto its GPU before ``accelerator.prepare`` shards it, so loading is unsharded there.
* ``first_step`` -- the optimizer states appear; :func:`advisor.memory.training_phases` already
  holds them in every phase (and ``advisor.gpu_memory`` prices the first step's allocator cache),
  so this moment is the step estimate itself, not a new peak.
* ``evaluation`` -- ``advisor.stack.eval_loss`` at the plan's micro-batch: the forward without
  grad (one layer's working set at a time) and the fp32 logits of the loss; the optimizer states
  stay alive, the gradients are gone (``zero_grad(set_to_none=True)``).
* ``checkpoint`` -- ``runner.checkpoint.write_checkpoint``: ``save_pretrained`` + ``torch.save``
  of the optimizer state, copied to the host; under FSDP / ZeRO-3 ``accelerator.get_state_dict``
  gathers the FULL_STATE_DICT of the whole model on rank 0's host.
* ``merge_export`` -- ``runner.saving.merge_export``: ``from_pretrained`` with no device map, i.e.
  **on the CPU**: the base in the compute dtype in host RAM, the adapters (fp32), one layer's
  delta weight and its temporaries; the GPU keeps only what the optimizer holds.

Host RAM (measured, benchmarks/lifecycle.py): transformers 5 maps the safetensors file; a tensor
loaded in the file's dtype is a view of the mapping, resident only once touched. Loading for
training on the CPU copies every tensor (advisor.stack._own_storage: anonymous memory = the
tensors); a GPU load touches each tensor once on its way to the device (the checkpoint's bytes
pass through the page cache: reclaimable, but read). The merge keeps the base mapped: the in-place
merge turns the LoRA targets' pages into anonymous copies, save_pretrained reads the rest, so the
whole base is resident by the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from advisor.breakdown import compute_bytes, param_bytes, shard
from advisor.memory import (
    fsdp_qlora,
    fsdp_qlora_weights,
    logits_bytes,
    lora_adapter_bytes,
    optimizer_states_bytes,
    weights_bytes,
)
from advisor.model import ModelShape
from advisor.spec import Plan, TrainSpec

LAYER_WORKSPACE_FACTOR = 3  # no-grad MLP: gate, up and act outputs of one layer alive at once


@dataclass(frozen=True)
class Moment:
    """One moment of a run. ``gpu_bytes``: what nvidia-smi shows on the busiest GPU (tensors +
    the GPU overhead terms where the moment runs on the GPU); on a CPU plan, the CPU tensor bytes.
    ``tensor_bytes``: the live tensors alone on the device. ``host_bytes``: host RAM the moment needs."""

    gpu_bytes: int
    host_bytes: int
    what: str
    tensor_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu(plan: Plan) -> bool:
    return plan.hardware.device == "cpu"


def _n(plan: Plan) -> int:
    return plan.hardware.gpus if plan.hardware.gpus > 1 else 1


def _sharded(plan: Plan) -> bool:
    return _n(plan) > 1 and plan.hardware.zero >= 3


def _overhead(plan: Plan, tensors: int, persistent: int, *, matmuls: bool) -> int:
    """GPU terms of a moment outside the step (advisor.gpu_memory): the CUDA context, one cuBLAS
    workspace where matmuls run, NCCL with several GPUs, the allocator's cache on the transient."""
    if _cpu(plan):
        return 0
    from advisor.gpu_memory import K_FRAG, arch_of, cublas_workspace_bytes, cuda_context_bytes, nccl_bytes

    arch = arch_of(plan.hardware.gpu)
    over = cuda_context_bytes(arch) + nccl_bytes(plan.hardware.gpus)
    if matmuls:
        over += cublas_workspace_bytes(arch, training=False)
    return over + int(K_FRAG * max(tensors - persistent, 0))


def _moment(plan: Plan, tensors: int, persistent: int, host: int, what: str, *, matmuls: bool = False) -> Moment:
    return Moment(int(tensors + _overhead(plan, tensors, persistent, matmuls=matmuls)), int(host), what, int(tensors))


def _rest(shape: ModelShape) -> int:
    """Parameters that stay unquantized under QLoRA (embeddings, head, norms, biases, others)."""
    return shape.params_total - shape.params_quantized


def _quantized_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """NF4 storage of the quantized linears (weights_bytes' QLoRA part, without the fp32 rest)."""
    return weights_bytes(shape, t) - 4 * _rest(shape)


def _largest_quantized(shape: ModelShape) -> int:
    return max((g.in_features * g.out_features for g in shape.linears if g.quantized), default=0)


def _largest_unquantized(shape: ModelShape) -> int:
    """The largest non-4-bit parameter: the output head or the token embedding (measured: with tied
    embeddings the embedding's old copy is alive at prepare's peak, untied the head's, cast last)."""
    return max(shape.params_lm_head, shape.params_embedding, shape.hidden_size)


def checkpoint_file_bytes(plan: Plan, shape: ModelShape) -> int:
    """Bytes of the checkpoint read at load, assumed stored in the load dtype (hub checkpoints
    ship in bf16/fp16; tie once). An fp32 file loaded in bf16 is converted on the host."""
    return shape.params_total * param_bytes(plan.training.precision)


def load_parts(plan: Plan, shape: ModelShape) -> dict[str, int]:
    """Tensor bytes of the sub-moments of loading, unsharded: ``quantize`` (QLoRA: from_pretrained's
    peak), ``prepare`` (QLoRA: prepare_model_for_kbit_training's peak), ``from_pretrained`` (other
    methods), ``end`` (the loaded weights, before the adapters)."""
    t = plan.training
    ld = param_bytes(t.precision)
    cpu = _cpu(plan)
    if t.method != "qlora":
        w = weights_bytes(shape, t)
        # CPU (measured): the tensors are views of one block per file, then advisor.stack._own_storage
        # copies each while the block lives; a GPU load copies tensor by tensor to the device
        return {"from_pretrained": 2 * w if cpu else w, "end": w}
    if fsdp_qlora(t, plan.hardware):
        end = sum(fsdp_qlora_weights(shape, t))  # the flat parameters and the quant state
        return {"quantize": end + compute_bytes(t.precision) * _largest_quantized(shape), "end": end}
    quant = _quantized_bytes(shape, t)
    rest_ld = ld * _rest(shape)
    if cpu:
        # CPU (measured): the whole file is one block; its unquantized views are copied while it lives
        quantize = ld * shape.params_total + quant + rest_ld
    else:
        quantize = quant + rest_ld + ld * _largest_quantized(shape)
    end = quant + 4 * _rest(shape)
    prepare = end + (ld * _largest_unquantized(shape) if ld < 4 else 0)
    return {"quantize": quantize, "prepare": prepare, "end": end}


def loading(plan: Plan, shape: ModelShape) -> Moment:
    t = plan.training
    parts = load_parts(plan, shape)
    end = parts["end"]
    peak = max(v for k, v in parts.items() if k != "end")
    if t.method != "qlora":
        what = "weights arrive in the load dtype" + (" (CPU: + the stack's copy of each)" if _cpu(plan) else "")
    else:
        what = ("bitsandbytes quantizes each linear at load (one weight in the load dtype beside its 4-bit "
                "copy); prepare_model_for_kbit_training casts the rest to fp32 (the largest one in both dtypes)")
    lora = lora_adapter_bytes(shape, t)
    tensors = max(peak, end + lora)
    if _sharded(plan) and not _cpu(plan):
        # advisor.stack.load_for_training(fsdp=True): local rank 0 loads on the host (the others on the
        # meta device, accelerate's cpu_ram_efficient_loading); each GPU then receives its shard only
        n = _n(plan)
        host = max(tensors, checkpoint_file_bytes(plan, shape))  # the read itself goes through the page cache
        replicated = fsdp_qlora_weights(shape, t)[1] if fsdp_qlora(t, plan.hardware) else 0
        gpu = shard(end - replicated + lora, n) + replicated  # the 4-bit quant state: whole on every rank
        return _moment(plan, gpu, gpu, host, what + "; under FSDP rank 0 loads on the host and each GPU "
                       "receives its shard (host: the model on rank 0, or the checkpoint read if larger)")
    # host (measured on the CPU): the tensors themselves (the stack's copies; the file mapping is dropped
    # after); on a GPU every tensor of the mapped checkpoint is read once on its way to the device
    host = tensors if _cpu(plan) else checkpoint_file_bytes(plan, shape)
    return _moment(plan, tensors, end + lora, host, what + ("" if _cpu(plan) else "; host: the checkpoint read"))


def first_step(plan: Plan, shape: ModelShape, step_peak_bytes: int | None = None) -> Moment:
    """The optimizer states appear at the first step: already inside every phase of the step estimate."""
    if step_peak_bytes is None:
        from advisor.memory import estimate

        step_peak_bytes = estimate(plan, shape).peak_reserved_bytes
    return Moment(int(step_peak_bytes), 0, "optimizer states created: the step estimate already holds them "
                  "(and the first step's allocator cache)", int(step_peak_bytes))


def _persistent(plan: Plan, shape: ModelShape) -> int:
    """Weights (as trained), adapters and optimizer states per GPU between steps."""
    t, n = plan.training, _n(plan)
    w = weights_bytes(shape, t)
    replicated = 0
    if fsdp_qlora(t, plan.hardware):
        w, replicated = fsdp_qlora_weights(shape, t)
    o = optimizer_states_bytes(shape, t)
    if n > 1 and plan.hardware.zero >= 1:
        o = shard(o, n)
    if _sharded(plan):
        w = shard(w, n) + replicated
    return w + lora_adapter_bytes(shape, t) + o


def evaluation(plan: Plan, shape: ModelShape) -> Moment:
    t = plan.training
    tokens = t.micro_batch * t.seq_len
    cb = compute_bytes(t.precision)
    logits, _ = logits_bytes(shape, t)
    what = "forward without grad at the micro-batch; fp32 logits for the loss"
    if t.liger and not 0 < plan.data.prompt_loss_weight < 1:  # the fused loss in validation too (skip_logits)
        from advisor.liger import eval_loss_bytes

        logits = eval_loss_bytes(shape, t)
        what = "forward without grad at the micro-batch; Liger's fused loss (no logits)"
    hidden = 2 * tokens * shape.hidden_size * (4 if t.method == "qlora" else cb)  # residual + normed input
    layer = LAYER_WORKSPACE_FACTOR * tokens * max(shape.intermediate_size, shape.hidden_size) * cb
    persist = _persistent(plan, shape)
    gathered = 0
    if _sharded(plan):  # FSDP gathers the unit being computed (and prefetches the next)
        gathered = 2 * (weights_bytes(shape, t) // max(shape.num_layers, 1))
    tensors = persist + gathered + hidden + max(layer, logits)
    return _moment(plan, tensors, persist, tensors if _cpu(plan) else 0, what, matmuls=True)


def checkpoint(plan: Plan, shape: ModelShape) -> Moment:
    t = plan.training
    persist = _persistent(plan, shape)
    states = optimizer_states_bytes(shape, t)
    if _n(plan) > 1 and plan.hardware.zero >= 1:
        states = shard(states, _n(plan))
    if t.method == "full":
        saved = weights_bytes(shape, t)
    else:
        saved = lora_adapter_bytes(shape, t)
    if _sharded(plan):
        # FULL_STATE_DICT of the whole model (base included) gathered to rank 0's host
        full = shape.params_total * param_bytes(t.precision) if t.method != "qlora" else weights_bytes(shape, t)
        host = full + lora_adapter_bytes(shape, t)
        gathered = 2 * (weights_bytes(shape, t) // max(shape.num_layers, 1))
        what = "FSDP gathers the full state dict (offloaded to rank 0's host RAM) unit by unit"
    else:
        host = saved + states  # bound: the saved tensors and the optimizer state copied to the host
        gathered = 0
        what = "save_pretrained + torch.save(optimizer): host copies of the saved tensors"
    tensors = persist + gathered
    return _moment(plan, tensors, persist, host + (persist if _cpu(plan) else 0), what)


def merge_parts(plan: Plan, shape: ModelShape) -> dict[str, int]:
    """Host bytes of runner.saving.merge_export: ``base`` (compute dtype), ``adapters`` (fp32, peft's
    autocast_adapter_dtype), ``delta`` (one layer's B @ A and its temporaries; peft computes it in
    fp32 on the CPU for half weights). save_pretrained adds no host copy (measured: with glibc's mmap
    threshold fixed, the peak RSS growth is these tensors)."""
    t = plan.training
    base = compute_bytes(t.precision) * shape.params_total
    # measured: B @ A (fp32), its scaled copy (fp32) and the fp32 temporary of the in-place mixed-dtype
    # add into a half weight: 12 bytes per element of the largest target; 8 for an fp32 base
    per = 12 if compute_bytes(t.precision) == 2 else 8
    delta = per * max((g.in_features * g.out_features for g in shape.lora_groups(t.lora.targets)), default=0)
    return {"base": base, "adapters": lora_adapter_bytes(shape, t), "delta": delta}


def merge_export(plan: Plan, shape: ModelShape) -> Moment | None:
    """runner.saving.merge_export runs on the CPU (from_pretrained without a device map); None when
    the plan does not merge. The GPU keeps the optimizer's tensors (the model is deleted, the
    optimizer still referenced) -- below every earlier moment."""
    t = plan.training
    if t.method == "full" or not plan.run.merge_export:
        return None
    host = sum(merge_parts(plan, shape).values())
    what = "the base reloaded on the CPU in the compute dtype, adapters merged, merged/ written"
    if _cpu(plan):
        return Moment(host, host, what, host)
    o = optimizer_states_bytes(shape, t)
    if _n(plan) > 1 and plan.hardware.zero >= 1:
        o = shard(o, _n(plan))
    dev = lora_adapter_bytes(shape, t) + o
    return _moment(plan, dev, dev, host, what)


def run_moments(plan: Plan, shape: ModelShape) -> dict[str, Moment]:
    """Every moment of a training run (merge_export only when the plan merges)."""
    if plan.task != "training":
        return {}
    out = {"loading": loading(plan, shape), "evaluation": evaluation(plan, shape),
           "checkpoint": checkpoint(plan, shape)}
    m = merge_export(plan, shape)
    if m is not None:
        out["merge_export"] = m
    return out


def run_peak(plan: Plan, shape: ModelShape, step_peak_bytes: int) -> tuple[str, int]:
    """(moment, bytes) of the run's device peak: the training step's ``peak_reserved_bytes`` against
    every moment's ``gpu_bytes`` (both tensors + the GPU terms). 'step' when the step wins or ties."""
    best, name = int(step_peak_bytes), "step"
    for k, m in run_moments(plan, shape).items():
        if m.gpu_bytes > best:
            best, name = m.gpu_bytes, k
    return name, best


def host_ram_bytes(plan: Plan, shape: ModelShape, step_host_bytes: int = 0) -> int:
    """The largest host RAM need over the run's moments (the step's own host need added if given)."""
    return max([step_host_bytes, *(m.host_bytes for m in run_moments(plan, shape).values())])
