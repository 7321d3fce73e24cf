"""The counted terms of the step-time model: bytes per element of each memory-bound pass, the optimizer
step's traffic, and how each training loop (Stack) runs the model. Nothing here is fitted; every number
is counted from the code it names (docs/time-model.md). advisor/throughput.py adds them up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from advisor.model import ModelShape
    from advisor.spec import Plan

# --- counted, not fitted (docs/time-model.md) -------------------------------------------------------
# share of the link bandwidth NCCL's ring collectives reach (bus bandwidth / line rate): ~200 of 300 GB/s
# per direction on 8 A100s over NVLink 3 (NVIDIA/nccl-tests#149), ~370 of 450 on H100 (NCCL's ~20% protocol
# overhead, nccl-tests#212). Counted, not fitted: the calibration rows do not constrain it (docs/time-model.md).
LINK_EFF = 0.75
BW_EFF = 0.85  # achievable share of the memory bandwidth in streaming kernels (BabelStream on A100: ~1.7 of 2.0 TB/s)
# share of the host link's line rate a pinned copy reaches: 24.8 GB/s host-to-device and device-to-host per GPU over
# PCIe 4.0 x16 on 8 A100-SXM4-80GB (nvbandwidth, forums.developer.nvidia.com/t/352186), of our table's 32
HOST_LINK_EFF = 0.78
# elementwise bytes per token per layer per pass (bf16): two RMSNorms with fp32 upcast (~24 B per hidden
# value each), two residual adds (12), rope on q and k (~16): 76 B per hidden value; the gated activation
# silu(gate) * up (read 2, write 1 in 2 bytes, plus silu's own read/write): 10 B per intermediate value;
# a plain GELU MLP (MPT, GPT-2): read and write the intermediate once, 4 B
ELEM_H_BYTES = 76
ELEM_H_FUSED_BYTES = 28  # fused RMSNorm (read + write, 4 B) twice, residuals (12), fused rotary (~8)
ELEM_I_BYTES = 10
ELEM_I_PLAIN_BYTES = 4
ELEM_I_FUSED_BYTES = 6  # silu(gate) * up in one kernel (torch.compile, fused SwiGLU): read 4, write 2
GATED_LEAVES = ("gate_proj", "gate_up_proj", "w1", "w3")
# MoE routing per token per layer and chosen expert: gather the token (read + write h), index_add the
# expert output back (read 2h, write h) in 2-byte values
MOE_ROUTE_BYTES = 10
# logits and loss per logit, counted from transformers' ForCausalLMLoss (>= 4.46): the head writes bf16
# logits (2); .float() reads 2, writes 4; log_softmax reads the fp32 row for max and sum-exp and writes it
# (12); backward: nll's gradient (4), log_softmax's backward reads two fp32 tensors and writes one (12),
# the cast back to bf16 (6): 42. Up to 4.45 the model upcast the logits itself and the loss copied the
# shifted logits (.contiguous(): read 4 write 4, and its backward: zeros + copy, 12): 62.
LOSS_BYTES = {"hf": 42, "hf-legacy": 62, "fused": 0, "liger": 4}
# "liger": Liger-Kernel's fused linear cross-entropy (ops/fused_linear_cross_entropy.py @ ead96b6): the head's GEMMs
# stay (logits chunk, input and weight gradients: counted with the head), the logits are never written whole; its
# cross-entropy kernel reads each chunk's bf16 logits once and writes their gradient in place: 4 B per logit.
# Liger's RMSNorm and RoPE are the fused kernels of ELEM_H_FUSED_BYTES, its SwiGLU the one kernel of
# ELEM_I_FUSED_BYTES (swiglu.py: read gate and up, write the product; backward recomputes it in the same kernel)
# eager attention per score element (transformers' eager_attention_forward): forward: QK^T writes bf16 (2),
# scaling (4), mask add (6), fp32 softmax (6), cast to bf16 (6), read by PV (2): 26; backward: grad of the
# probabilities (2), cast back (6), softmax backward (12), scaling (4), read twice by the QK^T gradients (8): 32
EAGER_FWD_BYTES = 26
EAGER_BWD_BYTES = 32
# peft LoRA wrapper per token and pass: x cast to fp32 (read 2, write 4), dropout (read 4, write 4 and a
# 1-byte mask), the A GEMM reads it (4): ~19 B per input feature; B's fp32 output, scaled (read+write 8),
# cast and added to the frozen layer's output (read 4 + 2, write 2): ~16 B per output feature
LORA_IN_BYTES = 19
LORA_IN_BYTES_NO_DROPOUT = 10  # lora_dropout 0: peft's Identity, no mask and no copy
# under autocast (or bf16 adapters) the wrapper works in 2-byte values: dropout reads 2, writes 2 and a
# 1-byte mask; B's bf16 output is scaled (read + write 4) and added (read 4, write 2)
LORA_IN_BYTES_HALF = 5
LORA_OUT_BYTES_HALF = 12
LORA_OUT_BYTES = 16
# optimizer step, accesses per element of (parameter, gradient, both states together), counted from
# torch.optim's _multi_tensor_adamw (weight decay mul_ 2P; lerp_ m; mul_ + addcmul_ v; sqrt, div_, add_
# of a temporary; addcdiv_ into p: 4P + 2G + 7 x both states), the fused kernels (torch fused=True,
# bitsandbytes 8-bit and 32-bit: read p, g, m, v once, write p, m, v: 2P + G + 2 x both states), SGD
# (2P + G; with momentum 2P + 2G + 5 x the buffer) and transformers' Adafactor (2P + 2G + ~40 B of fp32
# temporaries per element)
OPT_ACCESSES = {"foreach": (4, 2, 7), "fused": (2, 1, 2), "sgd": (2, 1, 0), "sgd_momentum": (2, 2, 5),
                "adafactor": (2, 2, 0)}
ADAFACTOR_TEMP_BYTES = 40
CLIP_GRAD_ACCESSES = 3  # clip_grad_norm_: the norms read every gradient, the scaling reads and writes it
FP32_SHARE = 1 / 16  # fp32 without tensor cores: A100 19.5 of 312 TFLOPS (torch does not use TF32 by default)
# share of the communication time that compute can hide, by strategy
OVERLAP = {"ddp": 0.67, "zero1": 0.5, "zero2": 0.5, "zero3": 0.9}
STRATEGIES = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per 64 weights (before double quant)


@dataclass(frozen=True)
class Stack:
    """What the training loop around the model does. The default is tuneplan's runner (transformers +
    peft, advisor/stack.py); benchmarks/throughput.py describes each published harness with one."""

    autocast: bool | None = None  # forward under bf16/fp16 autocast; None: from the precision (amp-* only)
    fused_norms: bool = False  # fused RMSNorm / rotary kernels (flash-attn's) instead of transformers' ops
    compiled: bool = False  # torch.compile: norms, rope, activation and the LoRA wrapper fused (implies fused_norms)
    sharded_single: bool = False  # FSDP / ZeRO-3 wrapping even on one GPU (the fms harness does it)
    # QLoRA: prepare_model_for_kbit_training casts the output head to fp32; None: the runner's rule (it
    # does so unless the model is sharded with FSDP / ZeRO-3, see advisor/stack.py)
    kbit_fp32_head: bool | None = None
    # LOSS_BYTES key: transformers >= 4.49 "hf", older "hf-legacy", a fused linear cross-entropy "fused";
    # "auto": from the plan's training.transformers
    loss: str = "auto"
    optimizer_impl: str = "foreach"  # torch AdamW: "foreach" (torch's default on CUDA) or "fused"
    recompute: float = 1.0  # share of a forward recomputed under checkpointing (selective checkpointing < 1)
    peft_wrapper: bool = True  # LoRA through peft's wrapper (fp32 adapters); False: the harness's own bf16 LoRA


RUNNER = Stack()


def loss_kind(stack: Stack, transformers: str) -> str:
    """The loss code of the stack: transformers before 4.49 copies the shifted logits (PR #35646)."""
    if stack.loss != "auto":
        return stack.loss
    try:
        major, minor = (int(x) for x in (transformers.split(".") + ["0"])[:2])
    except ValueError:
        return "hf"
    return "hf-legacy" if (major, minor) < (4, 49) else "hf"


def gated(shape: ModelShape) -> bool:
    return any(g.leaf in GATED_LEAVES for g in shape.linears)


def optimizer_bytes(plan: Plan, shape: ModelShape, stack: Stack = RUNNER) -> float:
    """Bytes the optimizer step (and gradient clipping) moves per GPU before any sharding."""
    from advisor.memory import gradients_bytes, optimizer_states_bytes, trainable_params

    t = plan.training
    n = trainable_params(shape, t)
    p_b = 2 if (t.method == "full" and t.precision in ("bf16", "fp16")) else 4
    g_tot, s_tot = gradients_bytes(shape, t), optimizer_states_bytes(shape, t)
    opt = t.optimizer
    if opt == "adamw":
        kind = stack.optimizer_impl
    elif opt in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        kind = "fused"  # bitsandbytes' optimizers are one kernel per tensor
    else:
        kind = opt if opt in OPT_ACCESSES else "foreach"
    ap, ag, as_ = OPT_ACCESSES[kind]
    total = ap * n * p_b + ag * g_tot + as_ * s_tot
    if kind == "adafactor":
        total += ADAFACTOR_TEMP_BYTES * n
    if plan.run.max_grad_norm is not None:
        total += CLIP_GRAD_ACCESSES * g_tot
    return float(total)
