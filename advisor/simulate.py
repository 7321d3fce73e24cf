"""``--mode simulate``: run the real architecture on fake tensors and count live tensor bytes.

The analytic estimate (:mod:`advisor.memory`) models what autograd keeps; this module does not
model anything it can run instead. It builds the real transformers model from the config (and
real peft LoRA, real gradient checkpointing, the real torch optimizer), all under
``torch._subclasses.fake_tensor.FakeTensorMode`` -- tensors with shapes, dtypes and strides but
no data and no memory -- and runs a steady-state training step (forward with labels, backward,
``optimizer.step``, ``zero_grad(set_to_none=True)``, as :func:`runner.build.train_step` does) or a
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
extrapolated to the real depth, otherwise the full depth is simulated.

Device: tensors are fake CPU tensors. ``plan.hardware.device`` picks the optimizer path as torch
does (CUDA: ``foreach``, a params-sized temporary; CPU: the per-tensor loop) and the GPU overhead
terms; attention kernels and autocast follow the CPU dispatch.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from advisor.memory import Breakdown, gpu_overhead_bytes, nf4_bytes
from advisor.model import ModelShape
from advisor.spec import Plan

Progress = Callable[[float, str], None]

TRAIN_PHASES = ("forward", "backward", "optimizer", "zero_grad")
INFER_PHASES = ("prefill", "decode")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
EXTRAPOLATE_FROM = (2, 3, 4)  # depths simulated to find the per-layer increment
DECODE_STEPS_FULL = 32  # up to this many generated tokens every decode step runs; beyond, see _infer


class SimulateError(ValueError):
    """The architecture or the settings cannot be simulated, with what to use instead."""


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


def _make_tracker():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    local_scalar = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}

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

        # -- bookkeeping --------------------------------------------------------------------
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
            rec.ref = weakref.ref(st, lambda _r, rec=rec, key=key: self._free(rec, key))
            self.recs.append(rec)
            self.live[key] = rec
            self.total += rec.nbytes

        def _bump(self) -> None:
            if self.measuring and self.phase is not None:
                pk = self.peaks.setdefault(self.phase, _PhasePeak())
                if self.total > pk.bytes:
                    pk.bytes, pk.seq = self.total, self.seq

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
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.register(t)
            self._bump()
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
    tensors as ordinary ones and the tracker answers that the mask is all ones."""

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
        return self

    def __exit__(self, *exc):
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


# ------------------------------------------------------------------------------------------
# building the model on fake tensors
# ------------------------------------------------------------------------------------------

def _config_with_layers(config: dict, n: int | None) -> dict:
    cfg = dict(config)
    if n is None:
        return cfg
    for k in _LAYER_KEYS:
        if k in cfg:
            cfg[k] = n
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:n]
    if not any(k in cfg for k in _LAYER_KEYS):
        cfg["num_hidden_layers"] = n
    return cfg


def _num_layers(config: dict, shape: ModelShape) -> int:
    for k in _LAYER_KEYS:
        if isinstance(config.get(k), int):
            return config[k]
    return shape.num_layers


def _hf_config(config: dict):
    import copy

    import transformers

    cfg = copy.deepcopy(config)
    model_type = cfg.pop("model_type")
    for k in ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "quantization_config"):
        cfg.pop(k, None)
    return transformers.AutoConfig.for_model(model_type, **cfg)


def _preimport(hf_cfg, plan: Plan) -> None:
    """Import, outside fake mode, every module the simulation will use: a module imported under
    FakeTensorMode would create its module-level tensors (bitsandbytes' NF4 tables, peft's default
    arguments) as fake tensors for the rest of the process, and count them here."""
    import importlib

    import peft
    import peft.tuners.lora  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import runner.build  # noqa: F401

    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_cfg)]
    except KeyError:
        pass
    for name in ("bitsandbytes", "peft.tuners.lora.bnb", "transformers.optimization", "transformers.masking_utils",
                 "transformers.loss.loss_utils", "transformers.integrations.sdpa_attention",
                 "transformers.cache_utils", "torch.utils.checkpoint"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - optional pieces (bitsandbytes missing)
            continue


def _from_config(hf_cfg, dtype, attn_impl: str):
    """AutoModelForCausalLM.from_config with the runner's attention fallback (see
    runner.build._from_pretrained): an architecture without sdpa runs eager."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=attn_impl), attn_impl
    except ValueError as err:
        if attn_impl != "sdpa" or "scaled_dot_product_attention" not in str(err):
            raise
        return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="eager"), "eager"


def _quantized_modules(model, shape: ModelShape) -> list[tuple[str, Any]]:
    """The modules bitsandbytes 4-bit replaces: linear groups of the shape marked quantized."""
    import torch

    wanted = {g.path for g in shape.linears if g.quantized}
    try:
        from transformers.pytorch_utils import Conv1D
        types: tuple = (torch.nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        types = (torch.nn.Linear,)
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, types) and re.sub(r"\.\d+\.", ".*.", name) in wanted:
            out.append((name, mod))
    return out


def _nf4_function():
    import torch

    class NF4MatMul(torch.autograd.Function):
        """bitsandbytes MatMul4Bit on fake tensors: dequantize (a transient in the compute dtype),
        matmul; saves nothing of the input; dequantizes again for the input gradient."""

        @staticmethod
        def forward(ctx, A, bias, out_f, in_f, blocks, nested):
            if nested:  # nested absmax -> fp32 block scales (+ offset: a second tensor)
                absmax = torch.empty(blocks, dtype=torch.float32, device=A.device)
                absmax = absmax + 0.0
            w = torch.empty(out_f, in_f, dtype=A.dtype, device=A.device)
            out = torch.nn.functional.linear(A, w, bias)
            ctx.dims = (out_f, in_f, blocks, nested)
            return out

        @staticmethod
        def backward(ctx, grad_output):
            out_f, in_f, blocks, nested = ctx.dims
            grad_a = None
            if ctx.needs_input_grad[0]:
                if nested:
                    absmax = torch.empty(blocks, dtype=torch.float32, device=grad_output.device)
                    absmax.add_(0.0)
                w = torch.empty(out_f, in_f, dtype=grad_output.dtype, device=grad_output.device)
                grad_a = torch.matmul(grad_output, w)
            return grad_a, None, None, None, None, None

    return NF4MatMul


def _quantize_nf4(model, shape: ModelShape, compute_dtype, double_quant: bool) -> list:
    """Replace each quantized linear's weight by its NF4 storage and its forward by
    bitsandbytes Linear4bit's (see the module doc). Returns the replaced modules."""
    import types

    import torch

    fn = _nf4_function()
    mods = []
    for _name, mod in _quantized_modules(model, shape):
        w = mod.weight
        if type(mod).__name__ == "Conv1D":
            in_f, out_f = w.shape
        else:
            out_f, in_f = w.shape
        numel = in_f * out_f
        packed = torch.empty(nf4_bytes(numel, double_quant), 1, dtype=torch.uint8, device=w.device)
        mod.weight = torch.nn.Parameter(packed, requires_grad=False)
        del w
        mod._sim_dims = (out_f, in_f, math.ceil(numel / 64), double_quant)
        mod._sim_compute_dtype = compute_dtype

        def forward(self, x):
            inp_dtype = x.dtype
            x = x.to(self._sim_compute_dtype)
            bias = self.bias
            if bias is not None:
                if bias.dtype != x.dtype:
                    bias.data = bias.data.to(x.dtype)
                bias = bias.to(self._sim_compute_dtype)
            return fn.apply(x, bias, *self._sim_dims).to(inp_dtype)

        mod.forward = types.MethodType(forward, mod)
        mod.in_features, mod.out_features = in_f, out_f
        mods.append(mod)
    return mods


def _peft_bnb_forward(model, quantized: list) -> None:
    """peft wraps bitsandbytes layers in its bnb LoRA class; ours are nn.Linear stand-ins, so give
    their LoRA wrappers that class's forward (the same code: the clone, the casts)."""
    import types

    try:
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except ImportError:  # pragma: no cover - bitsandbytes missing: plain LoRA forward
        return
    ids = {id(m) for m in quantized}
    for mod in model.modules():
        base = getattr(mod, "base_layer", None)
        if base is not None and id(base) in ids and hasattr(mod, "lora_A"):
            mod.forward = types.MethodType(PeftLinear4bit.forward, mod)


class _BnbOptimizer:
    """bitsandbytes' 8-bit / paged optimizers' memory on fake tensors: their states, created at
    the first step as bitsandbytes creates them (Optimizer2State.init_state)."""

    def __init__(self, params, name: str, device: str = "cuda"):
        import torch

        self.params = list(params)
        self.name = name
        self.device = device
        self.state: dict = {}
        # name2qmap["dynamic"] and ["udynamic"]: 256-entry fp32 maps, shared by all parameters
        self.qmaps = [] if name == "paged_adamw_32bit" else [torch.empty(256), torch.empty(256)]

    def step(self):
        import torch

        for p in self.params:
            n = p.numel()
            if self.device == "cpu" and self.name != "paged_adamw_32bit" and n >= 4096:
                # bitsandbytes' CPU fallback dequantizes both states and works in fp32 per tensor
                # (measured: 20 bytes per element, 24 for half parameters); the CUDA kernel is in place
                tmp = torch.empty(n * (24 if p.element_size() == 2 else 20), dtype=torch.uint8)
                del tmp
            if p in self.state:
                continue
            if self.name == "paged_adamw_32bit" or n < 4096:
                st = [torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)]
            else:
                blocks = math.ceil(n / 256)
                st = [torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8),
                      torch.empty(blocks, dtype=torch.float32), torch.empty(blocks, dtype=torch.float32)]
            self.state[p] = st

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    def state_tensors(self):
        out = list(self.qmaps)
        for st in self.state.values():
            out += st
        return out


def _optimizer(model, name: str, lr: float, device: str):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if name in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        return _BnbOptimizer(params, name, device)
    from runner.build import make_optimizer

    impl = "foreach" if device == "cuda" else "for-loop"
    if name == "adafactor":
        impl = "default"
    opt = make_optimizer(model, name, lr, impl=impl)
    assert isinstance(opt, torch.optim.Optimizer)
    return opt


def _optimizer_state_tensors(opt) -> list:
    import torch

    if isinstance(opt, _BnbOptimizer):
        return opt.state_tensors()
    out = []
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------

def _build_training(plan: Plan, shape: ModelShape, config: dict):
    """The model as runner.build.load_for_training builds it, on fake tensors."""
    from runner.build import _enable_checkpointing, _lora_config, compute_dtype, param_dtype

    t = plan.training
    if t.attn_impl == "flash_attention_2":
        attn = "sdpa"  # same memory class (no s x s matrix); flash needs a GPU and real data
    else:
        attn = t.attn_impl
    model, attn_used = _from_config(_hf_config(config), param_dtype(t.precision), attn)
    quantized: list = []
    if t.method == "qlora":
        from peft import prepare_model_for_kbit_training

        quantized = _quantize_nf4(model, shape, compute_dtype(t.precision), t.double_quant)
        model.is_loaded_in_4bit = True
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=t.grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        del model.is_loaded_in_4bit
    elif t.grad_checkpointing:
        _enable_checkpointing(model)
    model.config.use_cache = False
    if t.method in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(t))
        if quantized:
            _peft_bnb_forward(model, quantized)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model, attn_used


def _autocast(precision: str):
    import contextlib

    import torch

    if precision.startswith("amp-"):
        dt = torch.bfloat16 if precision == "amp-bf16" else torch.float16
        return torch.autocast(device_type="cpu", dtype=dt)
    return contextlib.nullcontext()


def _train_run(plan: Plan, shape: ModelShape, n_layers: int | None, progress: Progress | None,
               p0: float, p1: float) -> _Result:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = plan.training
    config = _config_with_layers(shape.config, n_layers)
    tracker = _make_tracker()
    vocab = shape.vocab_size
    tokens = t.micro_batch * t.seq_len
    notes: list[str] = []

    def say(frac: float, msg: str) -> None:
        if progress:
            progress(p0 + (p1 - p0) * frac, msg)

    depth = _num_layers(config, shape)
    _preimport(_hf_config(config), plan)
    with _RealMasks(), FakeTensorMode(allow_non_fake_inputs=False), tracker:
        say(0.0, f"building {shape.name} ({depth} layers) on fake tensors")
        model, attn_used = _build_training(plan, shape, config)
        if attn_used != t.attn_impl:
            notes.append(f"{shape.architecture} does not support {t.attn_impl}; simulated with {attn_used}")
        opt = _optimizer(model, t.optimizer, t.learning_rate, plan.hardware.device)
        ids = torch.zeros(t.micro_batch, t.seq_len, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        for p in model.parameters():
            tracker.tag(p, "lora_adapters" if (t.method != "full" and p.requires_grad) else "weights")
        for b in model.buffers():
            tracker.tag(b, "weights")
        for v in batch.values():
            tracker.tag(v, "inputs")
        head = model.get_output_embeddings()
        handles = _hooks(model, tracker, head)
        trainable = [p for p in model.parameters() if p.requires_grad]
        steps = 2  # the first creates the optimizer states; the second is the steady state
        loss = None
        try:
            for step in range(steps):
                tracker.measuring = step == steps - 1
                for _ in range(t.grad_accum):
                    tracker.set_phase("forward")
                    with _autocast(t.precision):
                        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    labels=batch["labels"])
                        loss = out.loss
                        del out  # Trainer.compute_loss returns the loss only: logits die here
                    if t.grad_accum > 1:
                        loss = loss / t.grad_accum
                    tracker.set_phase("backward")
                    loss.backward()
                    loss = loss.detach()
                say((step + 0.5) / steps, f"step {step + 1}/{steps}: backward done")
                for p in trainable:
                    tracker.tag(p.grad, "gradients")
                tracker.set_phase("optimizer")
                opt.step()
                for s in _optimizer_state_tensors(opt):
                    tracker.tag(s, "optimizer_states")
                tracker.set_phase("zero_grad")
                opt.zero_grad(set_to_none=True)
                tracker.set_phase(None)
                say((step + 1) / steps, f"step {step + 1}/{steps} done")
        finally:
            for h in handles:
                h.remove()
        tracker.measuring = False

        def classify(rec: _Rec) -> str:
            if rec.tag:
                return rec.tag
            if rec.head or (rec.phase == "backward" and not rec.in_module and rec.shape
                            and rec.shape[-1] == vocab and math.prod(rec.shape) >= tokens * vocab):
                return "logits_and_loss"
            if rec.phase == "forward" or (rec.phase == "backward" and rec.in_module):
                return "activations"
            return "transient"

        phases = {ph: tracker.peaks[ph].bytes for ph in TRAIN_PHASES if ph in tracker.peaks}
        comps = {ph: tracker.components_at(tracker.peaks[ph].seq, classify) for ph in phases}
        # the optimizer states of the first step are alive throughout: tag-resolved above
        del model, opt, batch, loss, trainable, head
    return _Result(phases, comps, notes)


# ------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------

def _infer_run(plan: Plan, shape: ModelShape, progress: Progress | None) -> _Result:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    s = plan.inference
    if s.kv_cache_dtype != "auto":
        raise SimulateError("an fp8 KV cache cannot be simulated (no quantized cache backend on fake "
                            "tensors); use --mode analytic")
    if s.weight_quant == "int8":
        raise SimulateError("LLM.int8 weights cannot be simulated yet; use --mode analytic")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[s.precision]
    prompt = s.prompt_len or s.seq_len
    new = s.seq_len - prompt
    tracker = _make_tracker()
    notes: list[str] = []
    _preimport(_hf_config(shape.config), plan)

    def say(frac: float, msg: str) -> None:
        if progress:
            progress(frac, msg)

    with _RealMasks(), FakeTensorMode(), tracker:
        say(0.05, f"building {shape.name} on fake tensors")
        model, attn_used = _from_config(_hf_config(shape.config), dtype, "sdpa")
        if s.weight_quant == "nf4":
            _quantize_nf4(model, shape, dtype, True)
        model.eval()
        model.config.use_cache = True
        for p in model.parameters():
            tracker.tag(p, "weights")
        for b in model.buffers():
            tracker.tag(b, "weights")
        head = model.get_output_embeddings()
        handles = _hooks(model, tracker, head)
        from transformers import DynamicCache

        vocab = shape.vocab_size
        try:
            with torch.inference_mode():
                ids = torch.zeros(s.batch, prompt, dtype=torch.long)
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
                for v in batch.values():
                    tracker.tag(v, "inputs")
                tracker.measuring = True
                tracker.set_phase("prefill")
                cache = DynamicCache(config=model.config)
                input_ids, mask = batch["input_ids"], batch["attention_mask"]
                unfinished = torch.ones(s.batch, dtype=torch.long)
                kw: dict = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
                out = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                            **kw)
                _tag_cache(tracker, cache)
                say(0.4, "prefill done")
                produced = 0
                last_forced = False
                while produced < new:
                    if produced > 0:
                        if new > DECODE_STEPS_FULL and produced == 2 and not last_forced:
                            # jump to the last step: the cache and the ids as they are before it
                            # (every decode step holds more than the one before, so the last one
                            # is the decode peak)
                            last_forced = True
                            target = s.seq_len - 2  # tokens cached before the last forward
                            for layer in cache.layers:
                                for attr in ("keys", "values"):
                                    old = getattr(layer, attr)
                                    sh = list(old.shape)
                                    sh[-2] = target
                                    setattr(layer, attr, torch.empty(sh, dtype=old.dtype))
                                    del old
                            _tag_cache(tracker, cache)
                            input_ids = torch.zeros(s.batch, s.seq_len - 1, dtype=torch.long)
                            mask = torch.ones(s.batch, s.seq_len - 1, dtype=torch.long)
                            produced = new - 1
                        step_ids = input_ids[:, -1:]
                        out = model(input_ids=step_ids, attention_mask=mask, past_key_values=cache,
                                    use_cache=True, **kw)
                        _tag_cache(tracker, cache)
                    mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
                    logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
                    # MinNewTokensLengthLogitsProcessor (generate_step forces the full length)
                    vocab_ids = torch.arange(logits.shape[-1])
                    eos_mask = vocab_ids == 0
                    scores = torch.where(eos_mask, -math.inf, logits.clone())
                    del vocab_ids, eos_mask
                    nxt = torch.argmax(scores, dim=-1)
                    input_ids = torch.cat([input_ids, nxt[:, None]], dim=-1)
                    unfinished = unfinished & ~(torch.zeros(s.batch, dtype=torch.bool))
                    del out, logits, scores, nxt
                    produced += 1
                    if produced == 1:
                        tracker.set_phase("decode")
                    if produced % 8 == 0 or produced == new:
                        say(0.4 + 0.55 * produced / max(new, 1), f"decode {produced}/{new}")
                tracker.set_phase(None)
        finally:
            for h in handles:
                h.remove()
        tracker.measuring = False

        def classify(rec: _Rec) -> str:
            if rec.tag:
                return rec.tag
            if rec.phase == "prefill" and not rec.head:
                return "prefill_activations"
            return "logits" if rec.head or (rec.shape and rec.shape[-1] == vocab) else "transient"

        phases = {ph: tracker.peaks[ph].bytes for ph in INFER_PHASES if ph in tracker.peaks}
        comps = {ph: tracker.components_at(tracker.peaks[ph].seq, classify) for ph in phases}
        del model, head, cache, batch, input_ids, mask
    if attn_used != "sdpa":
        notes.append(f"{shape.architecture} does not support sdpa; simulated with {attn_used}")
    return _Result(phases, comps, notes)


def _tag_cache(tracker, cache) -> None:
    """What the KV cache holds now is cache (the tag stays with the storage's record, so the
    prefill's keys/values, created inside attention and later replaced by torch.cat, count too)."""
    for layer in getattr(cache, "layers", ()):
        for attr in ("keys", "values"):
            tracker.tag(getattr(layer, attr, None), "kv_cache")


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


# ------------------------------------------------------------------------------------------
# the estimate
# ------------------------------------------------------------------------------------------

def _breakdown(res: _Result, device: str, notes: list[str]) -> Breakdown:
    phases = dict(res.phases)
    peak = max(phases, key=lambda k: phases[k])
    comps = dict(res.components[peak])
    diff = phases[peak] - sum(comps.values())
    if diff:  # cannot happen with exact accounting; keep the invariant anyway
        comps["transient"] = comps.get("transient", 0) + diff
    comps = {k: int(v) for k, v in comps.items() if v}
    return Breakdown(comps, peak, {k: int(v) for k, v in phases.items()},
                     gpu_overhead_bytes(phases[peak], device), notes + res.notes)


def _extrapolate(results: dict[int, _Result], target: int) -> _Result | None:
    """Per-layer increments from depths a, a+1, a+2; None unless every phase peak and every
    component at it grows by exactly the same amount per layer."""
    (a, ra), (b, rb), (c, rc) = sorted(results.items())
    if not (b == a + 1 and c == b + 1):
        return None
    if set(ra.phases) != set(rb.phases) or set(rb.phases) != set(rc.phases):
        return None
    phases, comps = {}, {}
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
    return _Result(phases, comps, list(rc.notes))


def _check_supported(plan: Plan, shape: ModelShape) -> None:
    if shape.num_experts:
        raise SimulateError(f"{shape.name} is a mixture of experts: its token routing depends on the data, "
                            "which fake tensors do not have; use --mode analytic")
    if not shape.config:
        raise SimulateError(f"{shape.name}: no config.json to build the architecture from")
    if plan.hardware.gpus > 1:
        raise SimulateError("simulate covers one device; use --mode analytic for multi-GPU sharding")


def simulate(plan: Plan, shape: ModelShape, progress: Progress | None = None,
             extrapolate: bool = True) -> Breakdown:
    """The peak live tensor bytes of the plan's step, from running the real architecture on fake
    tensors. ``extrapolate``: for deep models simulate 2, 3 and 4 layers and extrapolate (exact
    when the per-layer increments agree; otherwise the full depth is simulated)."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _check_supported(plan, shape)
    device = plan.hardware.device
    notes = ["simulated: real transformers/peft code on fake tensors (CPU dispatch)"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if plan.task == "inference":
            res = _infer_run(plan, shape, progress)
        else:
            depth = _num_layers(shape.config, shape)
            res = None
            if extrapolate and depth > max(EXTRAPOLATE_FROM):
                runs = {}
                for i, n in enumerate(EXTRAPOLATE_FROM):
                    k = len(EXTRAPOLATE_FROM)
                    runs[n] = _train_run(plan, shape, n, progress, 0.9 * i / k, 0.9 * (i + 1) / k)
                res = _extrapolate(runs, depth)
                if res is not None:
                    notes.append(f"simulated {', '.join(map(str, EXTRAPOLATE_FROM))} layers; the per-layer "
                                 f"increment (identical between them) extrapolated to {depth}")
                else:
                    notes.append("per-layer increments differ between depths: simulated the full depth")
            if res is None:
                res = _train_run(plan, shape, None, progress, 0.0 if not extrapolate or depth <= max(
                    EXTRAPOLATE_FROM) else 0.9, 1.0)
    if progress:
        progress(1.0, "done")
    return _breakdown(res, device, notes)
