"""The real model, peft and optimizer on fake tensors, and what must be accounted from shapes:
bitsandbytes NF4 weights and 8-bit/paged optimizer states."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

from advisor.memory import nf4_bytes
from advisor.model import ModelShape
from advisor.simulate.common import _LAYER_KEYS
from advisor.spec import Plan

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

    import advisor.stack  # noqa: F401

    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_cfg)]
    except KeyError:
        pass
    # bitsandbytes always: peft imports it while it wraps the layers (under fake mode, when it was not imported
    # before), and its NF4 / FP4 tables would then be fake tensors counted in the run that imported it
    for name in ("bitsandbytes", "peft.tuners.lora.bnb", "transformers.optimization", "transformers.masking_utils",
                 "transformers.loss.loss_utils", "transformers.integrations.sdpa_attention",
                 "transformers.cache_utils", "torch.utils.checkpoint"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - optional pieces (bitsandbytes missing)
            continue


@contextlib.contextmanager
def _no_weight_init():
    """Build without initializing the weights, as from_pretrained does for the weights it loads: fake
    tensors hold no values, so the init ops (a normal_ per matrix, trunc_normal_'s loops) only cost
    time -- a third of an 8B model's simulation. The tensors are allocated by the modules' constructors
    all the same, and weight tying (init_weights' last step) still runs."""
    try:
        from transformers import initialization as init
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:  # pragma: no cover - a transformers without the module: initialize as before
        yield
        return
    import sys

    def skip(*_args, **_kwargs):
        return None

    saved = []
    for name in init.TORCH_MODULES_TO_PATCH:
        module = sys.modules.get(name)
        for fn in init.TORCH_INIT_FUNCTIONS if module is not None else ():
            if hasattr(module, fn):
                saved.append((module, fn, getattr(module, fn)))
                setattr(module, fn, skip)
    saved.append((PreTrainedModel, "initialize_weights", PreTrainedModel.initialize_weights))
    PreTrainedModel.initialize_weights = skip
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _from_config(hf_cfg, dtype, attn_impl: str):
    """AutoModelForCausalLM.from_config with the runner's attention fallback (see
    advisor.stack._from_pretrained): an architecture without sdpa runs eager."""
    from transformers import AutoModelForCausalLM

    with _no_weight_init():
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
        if type(mod).__name__ == "Conv1D":
            # transformers loads a Conv1D (GPT-2) into a bitsandbytes Linear4bit, weight transposed; peft then
            # reads in/out features from the layer, not from a Conv1D's (packed) weight shape
            mod.__class__ = torch.nn.Linear
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
    from advisor.stack import make_optimizer

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
