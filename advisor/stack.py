"""The stack: how tuneplan builds a model for training or inference with transformers + peft +
bitsandbytes. The runner trains with it and the simulation traces it, so the estimate models exactly
what the runner runs (the runner, calibration and advisor.simulate all import this one module).

Everything here is the real stack (transformers + peft + bitsandbytes), configured exactly as the
runner trains, so that what :mod:`runner.memtrace` measures is what a user's run allocates:

* precision ``fp32`` -> fp32 weights; ``bf16``/``fp16`` -> weights loaded in that dtype and trained
  in it (pure half training: gradients and optimizer states in the parameter dtype, as torch does);
  ``amp-bf16``/``amp-fp16`` -> fp32 weights, forward under ``torch.autocast`` (backward outside,
  as HF Trainer does; amp-fp16 adds a ``GradScaler``).
* ``mixed-bf16`` -> fp32 weights (the masters) and ``torch.autocast`` in the step, as amp-bf16; under FSDP
  the runner's accelerate config says ``mixed_precision: bf16``, so accelerate wraps the model with FSDP's
  ``MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16)`` (:func:`fsdp_mixed_precision`) and
  DeepSpeed ZeRO-1/2 runs its bf16 engine (bf16 weights, fp32 master partitions).
* ``offload_activations``: each checkpointed layer under :class:`HostOffload` (torch's ``save_on_cpu``), its
  saved inputs in pinned host memory until backward (:func:`offload_checkpoints`).
* ``liger``: Liger-Kernel's kernels patched into the loaded model (:func:`apply_liger`: its
  ``_apply_liger_kernel_to_instance`` with the family's defaults), on CUDA only (:func:`liger_problem`).
* ``lora``: ``peft.LoraConfig`` + ``get_peft_model`` with peft's defaults
  (``autocast_adapter_dtype=True`` keeps the adapters in fp32 even on a bf16/fp16 base).
* ``qlora``: ``BitsAndBytesConfig`` NF4, then ``prepare_model_for_kbit_training`` (which casts every
  non-4-bit parameter -- embeddings, norms, lm_head, unquantized layers -- to fp32), then LoRA.
* gradient checkpointing: non-reentrant (``use_reentrant=False``); transformers then also calls
  ``enable_input_require_grads`` for input-ids models.
* the step mirrors ``Trainer.training_step``: ``compute_loss`` returns only the loss, so the model
  output (logits) is dropped *before* backward; what survives into backward is what autograd saved.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")  # see runner.memtrace: keep loading on this thread

import torch

from advisor.spec import OPTIMIZERS, InferSpec, TrainSpec

PHASE_PREFIX = "tuneplan:"  # record_function ranges that runner.memtrace reads back


def phase(name: str):
    """``record_function`` range ``tuneplan:<name>`` (a context manager)."""
    from torch.profiler import record_function

    return record_function(PHASE_PREFIX + name)


__all__ = [
    "param_dtype", "compute_dtype", "load_for_training", "make_optimizer", "make_batch", "train_step",
    "load_for_inference", "generate_step", "eval_loss", "attn_impl_of", "weight_bytes", "param_counts",
    "optimizer_impl", "autocast", "compute_loss", "enable_checkpointing", "lora_config",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_dtype(precision: str) -> torch.dtype:
    """Dtype the (non-quantized) weights are stored in: amp-* keeps fp32 master weights."""
    return _DTYPES.get(precision, torch.float32)


def compute_dtype(precision: str) -> torch.dtype:
    """Dtype the matmuls run in (also the QLoRA ``bnb_4bit_compute_dtype``)."""
    return _DTYPES[precision.removeprefix("amp-").removeprefix("mixed-")]


def autocast(precision: str, device_type: str):
    if precision.startswith(("amp-", "mixed-")):
        return torch.autocast(device_type=device_type, dtype=compute_dtype(precision))
    return contextlib.nullcontext()


def fsdp_mixed_precision(precision: str):
    """FSDP's mixed-precision policy for ``precision``, as accelerate builds it from ``mixed_precision: bf16``
    (accelerate/utils/dataclasses.py @ 1.16.0, ``FullyShardedDataParallelPlugin.set_mixed_precision``: param, reduce
    and buffer dtypes all bf16 for FSDP 1); None for the precisions FSDP runs as they are."""
    if precision != "mixed-bf16":
        return None
    from torch.distributed.fsdp import MixedPrecision

    dt = compute_dtype(precision)
    return MixedPrecision(param_dtype=dt, reduce_dtype=dt, buffer_dtype=dt)


def enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()


OFFLOAD_RANGE = "offload:pack"  # record_function around each copy to host (benchmarks/offload_cpu.py reads it)


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """The tensors autograd saves inside this context go to host memory and come back as a new device tensor
    when backward needs them: ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` of torch 2.13
    (``torch/autograd/graph.py``: an empty pinned host tensor, ``copy_(non_blocking=True)``; back with
    ``to(device, non_blocking=True)``), with one difference that only the CPU sees: the way back always copies
    (``copy=True``), so on the CPU, where ``to("cpu")`` would hand back the host tensor itself, the step
    allocates what a GPU's step allocates and the CPU measures it (benchmarks/offload_cpu.py). Pinned only
    where CUDA is (CPU tensors are already host memory). ``on_pack(packed)``: told of every host tensor."""

    def __init__(self, on_pack=None):
        from torch.profiler import record_function

        def pack(t: torch.Tensor):
            pinned = t.device.type == "cuda" and not t.is_sparse
            with record_function(OFFLOAD_RANGE):
                packed = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pinned)
                packed.copy_(t, non_blocking=pinned)
            if on_pack is not None:
                on_pack(packed)
            return t.device, packed

        def unpack(saved) -> torch.Tensor:
            device, packed = saved
            return packed.to(device, non_blocking=packed.is_pinned(), copy=True)

        super().__init__(pack, unpack)


def offload_checkpoints(model, on_pack=None, hooks=None) -> int:
    """Run every checkpointed layer under :class:`HostOffload`, as transformers 5's
    ``activation_checkpointing_enable(offload=True)`` does (``modeling_utils.py``: ``save_on_cpu`` around
    ``checkpoint``): what the non-reentrant checkpoint saves outside the layer -- its positional inputs, the
    hidden states (``_CheckpointFrame.save_inputs``; keyword arguments such as the mask and the rotary cos/sin
    stay where they are) -- is held in host memory until backward recomputes the layer. The layers' own saved
    tensors are the checkpoint's placeholders, untouched. ``hooks()``: other saved-tensor hooks to use instead
    (advisor.simulate's, which count the host copy without making it). Returns how many layers now offload."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if not isinstance(m, GradientCheckpointingLayer) or fn is None or not m.gradient_checkpointing \
                or getattr(fn, "offloads", False):
            continue

        def offloaded(function, *args, _fn=fn, **kwargs):
            with hooks() if hooks is not None else HostOffload(on_pack):
                return _fn(function, *args, **kwargs)

        offloaded.offloads = True  # type: ignore[attr-defined]
        m._gradient_checkpointing_func = offloaded  # type: ignore[assignment]
        n += 1
    return n


def lora_config(spec: TrainSpec):
    from peft import LoraConfig

    targets = spec.lora.targets
    # peft annotates lora_alpha as int but scales by any number (scaling = alpha / r)
    return LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]
                      lora_dropout=spec.lora.dropout,
                      target_modules=targets if targets == "all-linear" else list(targets),
                      task_type="CAUSAL_LM")


def _from_pretrained(model_dir, **kwargs):
    """``AutoModelForCausalLM.from_pretrained``; an architecture without sdpa support (Gemma2 in
    transformers 5.x: attention soft-capping) falls back to eager with a warning, which is what
    it runs when no implementation is requested. :func:`attn_impl_of` tells what was used."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except ValueError as err:
        if kwargs.get("attn_implementation") != "sdpa" or "scaled_dot_product_attention" not in str(err):
            raise
        warnings.warn(f"{model_dir}: this architecture does not support sdpa; using eager attention", stacklevel=2)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **{**kwargs, "attn_implementation": "eager"})
    if "device_map" not in kwargs:  # loaded on the CPU
        _own_storage(model)
    return model


def _own_storage(model) -> None:
    """Give every CPU parameter and buffer its own allocation (a copy).

    On the CPU, transformers 5 + safetensors can load a checkpoint's tensors as views into one
    allocation holding the whole file. A view that is later replaced (a weight quantized to 4-bit,
    MoE experts fused at load time) then keeps the entire block alive, which a GPU load (each tensor
    copied to the device on its own) never does. Copying once after loading frees the block and
    makes the CPU numbers what a GPU would hold. bitsandbytes' quantized parameters are already
    fresh allocations and are left alone.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for mod in model.modules():
            for p in mod._parameters.values():
                if p is None or id(p) in seen or p.device.type != "cpu":
                    continue
                seen.add(id(p))
                if p.__class__.__name__ not in ("Params4bit", "Int8Params"):
                    p.data = p.data.clone()
            for name, b in list(mod._buffers.items()):
                if b is not None and id(b) not in seen and b.device.type == "cpu":
                    seen.add(id(b))
                    mod._buffers[name] = b.clone()


def attn_impl_of(model) -> str:
    """The attention implementation the loaded model really uses."""
    cfg = model.config
    return getattr(cfg, "_attn_implementation", None) or "eager"


def load_for_training(model_dir: str | Path, spec: TrainSpec, device: str = "cpu", trust_remote_code: bool = False,
                      fsdp: bool = False):
    """Load ``model_dir`` ready to train as the runner trains it (see the module doc).

    Returns the model (a ``PeftModel`` for lora/qlora) in train mode with ``use_cache=False``.
    Custom modelling code runs only when the plan asks for it (model.trust_remote_code).

    ``fsdp`` (the run is sharded by FSDP): the model is loaded on the host, not onto ``device`` --
    with accelerate's ``fsdp_cpu_ram_efficient_loading`` transformers reads the weights on local rank
    0 only (the others build on the meta device) and FSDP moves each rank's shard to its GPU after
    ``sync_module_states``, so no GPU ever holds the whole model. For QLoRA (the usual way to QLoRA a
    70B model on two 80 GB cards) the 4-bit weights are stored in the compute dtype
    (``bnb_4bit_quant_storage``) so that FSDP can flatten and shard them with the other weights, and
    the other weights stay in that dtype too: no ``prepare_model_for_kbit_training`` fp32 casts (FSDP
    flattens one dtype per unit). What advisor.memory (``fsdp_qlora``) and advisor.lifecycle model.
    """
    shard_4bit = fsdp
    why = liger_problem(device) if spec.liger else None  # before anything loads: Triton on CUDA, an optional extra
    if why:
        raise ValueError(why)
    if spec.attn_impl == "flash_attention_2" and device == "cpu":
        raise ValueError("flash_attention_2 needs a CUDA GPU; use sdpa or eager on the CPU")
    kwargs: dict[str, Any] = dict(attn_implementation=spec.attn_impl, trust_remote_code=trust_remote_code)
    if device != "cpu" and not fsdp:
        kwargs["device_map"] = {"": device}
    if spec.method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        storage = {"bnb_4bit_quant_storage": compute_dtype(spec.precision)} if shard_4bit else {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(spec.precision), **storage)
        if shard_4bit:  # every weight in the compute dtype, none cast to fp32 (FSDP flattens one dtype)
            model = _from_pretrained(model_dir, dtype=compute_dtype(spec.precision), **kwargs)
            if spec.grad_checkpointing:
                enable_checkpointing(model)
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        else:
            model = _from_pretrained(model_dir, dtype=param_dtype(spec.precision), **kwargs)
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=spec.grad_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = _from_pretrained(model_dir, dtype=param_dtype(spec.precision), **kwargs)
        if spec.grad_checkpointing:
            enable_checkpointing(model)
    model.config.use_cache = False
    if spec.liger:  # before peft wraps it: Liger patches the transformers model's modules and forward
        apply_liger(model, device)
    if spec.offload_activations and spec.grad_checkpointing:
        offload_checkpoints(model)
    if spec.method in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(spec))  # autocast_adapter_dtype=True (peft default)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model


def liger_problem(device: str) -> str | None:
    """Why Liger's kernels cannot run here (None when they can): they are Triton programs for an NVIDIA GPU, and
    liger-kernel is an optional extra (tuneplan[liger]). Checked before anything is loaded (runner.preflight)."""
    from advisor.liger import INSTALL

    head = "Liger kernels run on an NVIDIA GPU with Triton"
    fix = (f"run on a CUDA machine with liger-kernel installed ({INSTALL}), or train without Liger "
           "(training.liger=false: no --liger, the app's liger box cleared)")
    if not str(device).startswith("cuda"):
        return f"{head}: this plan runs on the CPU (hardware.device={device}); {fix}"
    if not torch.cuda.is_available():
        return f"{head}: no CUDA GPU is visible here; {fix}"
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return f"{head}: liger-kernel is not installed here; {fix}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        have = version("liger-kernel")
    except PackageNotFoundError:
        return None  # a source checkout on the path: trust it
    if tuple(int(x) for x in (have.split(".") + ["0"])[:2] if x.isdigit()) < (0, 7):
        return f"{head}: liger-kernel {have} is older than 0.7, the first release for transformers 5; {fix}"
    return None


def apply_liger(model, device: str) -> None:
    """Patch Liger's kernels into a loaded model (liger_kernel.transformers._apply_liger_kernel_to_instance, the
    family's apply_liger_kernel_to_* with its defaults: RoPE, RMSNorm, SwiGLU / GeGLU, fused linear cross-entropy)."""
    why = liger_problem(device)
    if why:
        raise ValueError(why)

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    from advisor.liger import refusal

    why = refusal(getattr(model.config, "model_type", ""))
    if why:
        raise ValueError(why)
    _apply_liger_kernel_to_instance(model=model)
    model.tuneplan_liger = True  # compute_loss asks the fused loss for evaluation too (skip_logits)


def fsdp_wrap_policy(model):
    """The FSDP auto-wrap policy of a model trained under FSDP, or None when the plan's
    TRANSFORMER_BASED_WRAP stands. For a peft model, peft's own (``peft.utils.other.fsdp_auto_wrap_policy``:
    every decoder layer one unit and every trainable leaf -- each LoRA A and B -- a unit of its own), as
    transformers' Trainer sets it (``transformers.distributed.fsdp.update_fsdp_plugin_peft``): FSDP
    flattens one dtype per unit, and peft keeps the adapters in fp32 on a bf16 base, so a decoder layer
    holding both cannot be flattened ("Must flatten tensors with uniform dtype"). Split so, a layer's
    flat parameter is all frozen and gets no gradient."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    from peft.utils.other import fsdp_auto_wrap_policy

    return fsdp_auto_wrap_policy(model)


def optimizer_impl(optimizer) -> str:
    """Which implementation a torch optimizer will run: fused, foreach or for-loop (or the class)."""
    d = optimizer.defaults if hasattr(optimizer, "defaults") else {}
    if not isinstance(optimizer, (torch.optim.AdamW, torch.optim.SGD, torch.optim.Adam)):
        return type(optimizer).__module__.split(".")[0] + "." + type(optimizer).__name__
    if d.get("fused"):
        return "fused"
    if d.get("foreach") is not None:
        return "foreach" if d["foreach"] else "for-loop"
    from torch.optim.optimizer import _default_to_fused_or_foreach

    params = [p for g in optimizer.param_groups for p in g["params"]]
    _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return "foreach" if foreach else "for-loop"


def make_optimizer(model, name: str, lr: float, impl: str = "default"):
    """The optimizer ``name`` (one of ``advisor.spec.OPTIMIZERS``) over the trainable parameters.

    ``impl`` only matters for the torch optimizers: "default" (torch's own choice: foreach on
    CUDA, the per-tensor for-loop on the CPU), "fused", "foreach" or "for-loop". HF Trainer's
    default ``adamw_torch_fused`` is ``impl="fused"``. The paged bitsandbytes optimizers run on
    the CPU but page nothing there (bitsandbytes warns and falls back to ordinary buffers).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    tkw: dict[str, Any] = {}
    if impl == "fused":
        tkw["fused"] = True
    elif impl == "foreach":
        tkw["foreach"] = True
    elif impl == "for-loop":
        tkw["foreach"] = False
    elif impl != "default":
        raise ValueError(f"unknown optimizer impl {impl!r}")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **tkw)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, **tkw)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, **tkw)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, lr=lr)


def make_batch(vocab_size: int, batch: int, seq: int, seed: int = 0, device: str = "cpu") -> dict:
    """A collated causal-LM batch of random token ids: input_ids, attention_mask, labels (= ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.clone().to(device)}


_scalers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _liger_patched(model) -> bool:
    """Whether apply_liger patched this model, seen through DDP's wrapper (``.module``; FSDP and peft forward
    attribute lookups to the model they wrap)."""
    while model is not None:
        if getattr(model, "tuneplan_liger", False):
            return True
        model = getattr(model, "module", None)
    return False


def compute_loss(model, batch: dict) -> torch.Tensor:
    # Trainer.compute_loss: outputs is a local, so the logits are released when this returns.
    if batch.get("loss_weights") is not None:
        return _weighted_loss(model, batch)
    # Liger's forward makes logits whenever the model is not training (lce_forward: skip_logits defaults to
    # self.training); validation asks for the fused loss too, so evaluation never holds the logits
    extra = {"skip_logits": True} if _liger_patched(model) else {}
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    labels=batch["labels"], **extra)
    return outputs.loss


def _weighted_loss(model, batch: dict) -> torch.Tensor:
    """Causal-LM cross-entropy with a weight per target token (prompt_loss_weight between 0 and 1):
    sum(w_t * CE_t) / sum(w_t) over the shifted targets, as the model's own loss shifts them.
    Only runner batches carry ``loss_weights``; the calibration path never does."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = outputs.logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    weights = batch["loss_weights"][:, 1:].to(logits.dtype) * (labels != -100)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none")
    return (ce * weights.reshape(-1)).sum() / weights.sum().clamp_min(1e-8)


def eval_loss(model, batch: dict, precision: str) -> torch.Tensor:
    """The training loss of ``batch`` without gradients (for validation)."""
    with torch.no_grad(), autocast(precision, batch["input_ids"].device.type):
        return compute_loss(model, batch).detach()


def train_step(model, batch: dict | list[dict], optimizer, spec: TrainSpec, max_grad_norm: float | None = None,
               *, backward=None, clip_grad=None, stats: dict | None = None) -> torch.Tensor:
    """One Trainer-style step; returns the detached loss.

    Ranges (for :mod:`runner.memtrace`): ``tuneplan:step`` around it all, and ``tuneplan:forward``
    (forward + loss, under autocast for amp-*), ``tuneplan:backward``, ``tuneplan:optimizer``
    (gradient clipping when ``max_grad_norm`` is set -- Trainer's default is 1.0 -- and
    ``optimizer.step``), ``tuneplan:zero_grad`` (``zero_grad(set_to_none=True)``).

    As in ``Trainer.training_step``, the model output is dropped before backward (only the loss
    tensor survives; the logits live on only through what autograd saved), and
    ``spec.grad_accum`` micro-batches run forward/backward before one optimizer step. The autograd
    graph is dropped after backward (Trainer returns ``loss.detach()`` to its loop, which then
    steps the optimizer); with non-reentrant checkpointing the graph still holds every
    checkpointed layer's input until then.

    The runner passes ``batch`` as a list of ``grad_accum`` different micro-batches (each loss is
    divided by their number; the mean loss is returned). ``backward(loss)`` and
    ``clip_grad(params, max_norm) -> norm`` replace ``loss.backward()`` and
    ``clip_grad_norm_`` (accelerate's versions, for DeepSpeed/FSDP); ``stats`` receives the
    gradient norm before clipping as ``stats["grad_norm"]`` when clipping runs.
    """
    micro = batch if isinstance(batch, list) else [batch] * spec.grad_accum
    n_micro = len(micro)
    device_type = micro[0]["input_ids"].device.type
    scaler = None
    if spec.precision == "amp-fp16":
        scaler = _scalers.get(optimizer)
        if scaler is None:
            scaler = _scalers[optimizer] = torch.amp.GradScaler(device_type)
    with phase("step"):
        model.train()
        total: torch.Tensor | None = None
        for mb in micro:
            with phase("forward"), autocast(spec.precision, device_type):
                loss = compute_loss(model, mb)
            if n_micro > 1:
                loss = loss / n_micro
            with phase("backward"):
                scaled = scaler.scale(loss) if scaler else loss
                if backward is not None:
                    backward(scaled)
                else:
                    scaled.backward()
            # Trainer.training_step returns loss.detach() before the optimizer runs: dropping the
            # graph frees what backward leaves behind (e.g. checkpointed layers' saved inputs).
            loss = loss.detach()
            total = loss if total is None else total + loss
        if isinstance(batch, list) and total is not None:
            loss = total
        with phase("optimizer"):
            if scaler is not None:
                scaler.unscale_(optimizer)
            if max_grad_norm:
                params = [p for p in model.parameters() if p.requires_grad]
                norm = (clip_grad or torch.nn.utils.clip_grad_norm_)(params, max_grad_norm)
                if stats is not None:
                    stats["grad_norm"] = float(norm) if norm is not None else None
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        with phase("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
    return loss


def load_for_inference(model_dir: str | Path, spec: InferSpec, device: str = "cpu", attn_impl: str = "sdpa"):
    """Load ``model_dir`` for generation: weights in ``spec.precision`` (or int8 / NF4 via bitsandbytes)."""
    from transformers import BitsAndBytesConfig

    if spec.kv_cache_dtype != "auto":
        raise NotImplementedError("fp8 KV cache is not built here (needs a quantized cache backend on GPU)")
    kwargs: dict[str, Any] = dict(attn_implementation=attn_impl, trust_remote_code=False,
                                  dtype=_DTYPES[spec.precision])
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    if spec.weight_quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_DTYPES[spec.precision])
    elif spec.weight_quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = _from_pretrained(model_dir, **kwargs)
    model.eval()
    model.config.use_cache = True
    return model


class _PhaseSwitch:
    """A logits processor that closes ``tuneplan:prefill`` and opens ``tuneplan:decode`` at the
    first generated token (generate calls processors once per token, after each forward)."""

    def __init__(self):
        self.prefill = record = torch.profiler.record_function("tuneplan:prefill")
        record.__enter__()
        self.decode = None

    def __call__(self, input_ids, scores):
        if self.decode is None:
            self.prefill.__exit__(None, None, None)
            self.decode = torch.profiler.record_function("tuneplan:decode")
            self.decode.__enter__()
        return scores

    def close(self):
        if self.decode is None:
            self.prefill.__exit__(None, None, None)
        else:
            self.decode.__exit__(None, None, None)


def generate_step(model, spec: InferSpec, prompt_len: int | None = None, seed: int = 0) -> torch.Tensor:
    """Greedy ``generate`` with the KV cache: ``spec.batch`` random prompts of ``prompt_len`` tokens
    (default: half of ``spec.seq_len``), extended to ``spec.seq_len`` tokens in all.

    Recorded as a ``tuneplan:step`` with phases ``prefill`` (up to the first token's logits) and
    ``decode``. Generation is forced to run its full length (``min_new_tokens``), so random
    weights hitting EOS early cannot shorten it. Returns the generated ids.
    """
    from transformers import LogitsProcessorList

    prompt_len = prompt_len if prompt_len is not None else max(1, spec.seq_len // 2)
    new = spec.seq_len - prompt_len
    if new < 1:
        raise ValueError("seq_len must exceed prompt_len: seq_len is prompt + generated tokens")
    dev = next(model.parameters()).device
    batch = make_batch(model.config.get_text_config().vocab_size, spec.batch, prompt_len, seed, str(dev))
    with phase("step"), torch.inference_mode():
        switch = _PhaseSwitch()
        try:
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                                 logits_processor=LogitsProcessorList([switch]),
                                 pad_token_id=model.config.pad_token_id or 0)
        finally:
            switch.close()
    return out


def _storage_bytes(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def quant_state_storages(qs) -> dict[int, int]:
    """The storages (data pointer -> bytes) of a bitsandbytes 4-bit quant state: absmax and code,
    and those of its nested state (double quantization); {} for None."""
    out: dict[int, int] = {}
    while qs is not None:
        for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
            if isinstance(t, torch.Tensor):
                ptr, n = _storage_bytes(t)
                if ptr:
                    out[ptr] = n
        qs = getattr(qs, "state2", None)
    return out


def weight_bytes(model) -> dict[str, int]:
    """Bytes held by the model's parameters and buffers (distinct storages), by dtype, plus
    bitsandbytes 4-bit quant-state tensors (absmax, nested absmax, code) under "quant_state"."""
    seen: dict[int, tuple[int, str]] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        ptr, n = _storage_bytes(t)
        if ptr and ptr not in seen:
            seen[ptr] = (n, str(t.dtype).removeprefix("torch."))
    qs_seen: dict[int, int] = {}
    for p in model.parameters():
        qs_seen.update((ptr, n) for ptr, n in quant_state_storages(getattr(p, "quant_state", None)).items()
                       if ptr not in seen)
    out: dict[str, int] = {}
    for n, dt in seen.values():
        out[dt] = out.get(dt, 0) + n
    if qs_seen:
        out["quant_state"] = sum(qs_seen.values())
    out["total"] = sum(v for k, v in out.items())
    return out


def param_counts(model) -> dict[str, int]:
    """Trainable and total parameter counts (4-bit parameters counted as their logical size)."""
    total = trainable = quantized = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            qs = getattr(p, "quant_state", None)
            n = int(torch.Size(qs.shape).numel()) if qs is not None else n * 2
            quantized += n
        total += n
        if p.requires_grad:
            trainable += n
    return {"total": total, "trainable": trainable, "quantized_4bit": quantized}
