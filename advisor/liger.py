"""Liger kernels (``training.liger``): which families they patch, and what they change in a training step's memory.

Pure: no torch, no liger-kernel (the runner imports liger-kernel, on CUDA only: advisor.stack.apply_liger).
Every figure is read from Liger-Kernel's source at one commit (:data:`SOURCE`):

* the families: ``src/liger_kernel/transformers/monkey_patch.py`` ``MODEL_TYPE_TO_APPLY_LIGER_FN`` (the
  ``model_type`` of config.json -> its ``apply_liger_kernel_to_*``; tuneplan applies them with their defaults:
  RoPE, RMSNorm, SwiGLU / GeGLU and the fused linear cross-entropy on, the plain cross-entropy off);
* fused linear cross-entropy, ``src/liger_kernel/ops/fused_linear_cross_entropy.py``: the head and the loss are one
  op whose forward computes the gradients too, chunk by chunk over the batch's tokens, so the logits are never
  materialized. It allocates the input's gradient (``zeros_like(_input)``: tokens x hidden in the hidden states'
  dtype), the head weight's gradient when the head trains (``zeros_like(weight)``: vocab x hidden in the weight's
  dtype) and a fp32 loss per token; per chunk, ``chunk_size = next_power_of_2(cdiv(BT, cdiv(V, H)))`` rows of
  logits in the matmul's dtype, which the cross-entropy kernel overwrites in place with their gradient, the
  chunk's input gradient (chunk x hidden), and, when the head trains and its gradient is not fp32 beside half
  logits (torch >= 2.8's ``addmm(out_dtype=float32)`` path), ``torch.mm(grad_logits.t(), input).float()``: a
  vocab x hidden product in the logits' dtype and its fp32 copy. Backward only scales the saved gradients
  (``element_mul_kernel``), so from the end of the forward to the head's backward the loss holds the input
  gradient and the head's gradient, nothing vocab-sized per token;
* RMSNorm, ``src/liger_kernel/ops/rms_norm.py``: saves its input X (the residual stream's tensor itself, no fp32
  copy) and ``RSTD``, one fp32 per row (llama and gemma casting modes), where transformers' RMSNorm keeps a fp32
  copy of x, its rsqrt and (the weight training) the normalized x in the compute dtype (advisor.activations._norm);
* SwiGLU / GeGLU, ``src/liger_kernel/ops/swiglu.py`` / ``geglu.py``: saves the gate and up projections' outputs
  (a, b) and recomputes ``act(a) * b`` in backward, so the activation's output (one intermediate-wide tensor per
  token per layer) is not kept;
* RoPE, ``src/liger_kernel/ops/rope.py``: rotates q and k in place; transformers' ``apply_rotary_pos_emb`` saves only
  the shared cos and sin for backward, so no saved tensor changes (the kernels' time is in the time model).

The published with-Liger runs of the HF Trainer example (liger-kernel 0.2.1, whose fused loss also made a fp32 copy
of each chunk's logits) calibrate and validate this: docs/accuracy.md, benchmarks/liger_memory.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from advisor.breakdown import compute_bytes, param_bytes, residual_bytes

if TYPE_CHECKING:
    from advisor.families import Family
    from advisor.model import ModelShape
    from advisor.problems import Problem
    from advisor.spec import Plan, TrainSpec

SOURCE = "github.com/linkedin/Liger-Kernel @ ead96b618e5c67bddc6a6e9bcb99bfe6b5ab661c"
# src/liger_kernel/transformers/monkey_patch.py MODEL_TYPE_TO_APPLY_LIGER_FN @ ead96b6 (the keys, in its order)
MODEL_TYPES: tuple[str, ...] = (
    "deepseek_v4", "gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4", "glm4", "glm4v", "glm4v_moe",
    "gpt_oss", "internvl", "llama", "llama4_text", "llama4", "llava", "granite", "mllama", "mllama_text_model",
    "ministral", "mistral", "mixtral", "nemotron", "olmo2", "pixtral", "olmo3", "qwen2", "qwen3", "qwen3_moe",
    "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text", "qwen3_next", "qwen3_5", "qwen3_5_text",
    "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl", "qwen3_vl_text", "qwen3_vl_moe", "qwen3_vl_moe_text", "smollm3",
    "phi3", "paligemma", "falcon_h1", "smolvlm", "hunyuan_v1_dense", "hunyuan_v1_moe", "exaone4",
)
INSTALL = "pip install 'tuneplan[liger]'"


def supported(model_type: str) -> bool:
    """Whether Liger-Kernel has an ``apply_liger_kernel_to_*`` for this config.json ``model_type``."""
    return model_type in MODEL_TYPES


def offered(model_type: str, device: str, vendor: str | None = None) -> bool:
    """Whether the savers offer Liger (recommend's nearest plans, the runner's answer to an out-of-memory error):
    a family Liger patches, on a CUDA plan, on an NVIDIA card where the card is known."""
    return supported(model_type) and device == "cuda" and (vendor is None or vendor.lower() == "nvidia")


def refusal(model_type: str) -> str | None:
    """What is wrong with a plan with liger on for this family (None when Liger patches it)."""
    if supported(model_type):
        return None
    return (f"Liger kernels have no patch for model_type {model_type!r} (Liger-Kernel patches {len(MODEL_TYPES)} "
            "model types: llama, mistral, mixtral, gemma, gemma2, gemma3, qwen2, qwen3, phi3, granite, olmo2 and "
            "others, listed in advisor/liger.py)")


def problems(plan: Plan, shape: ModelShape) -> list[Problem]:
    """A training plan with liger on for a model type Liger does not patch (advisor.service.build)."""
    from advisor.problems import Problem

    why = refusal(shape.model_type) if plan.task == "training" and plan.training.liger else None
    return [Problem(why, "training.liger", "train without them (training.liger=false)")] if why else []


def chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Rows of logits per chunk of the fused linear cross-entropy:
    ``next_power_of_2(cdiv(BT, cdiv(V, H)))`` (fused_linear_cross_entropy.py)."""
    inc = -(-vocab // max(hidden, 1))
    rows = -(-tokens // max(inc, 1))
    return 1 << max(rows - 1, 0).bit_length()


def _head_dtypes(t: TrainSpec) -> tuple[int, int, int]:
    """(the logits chunk's bytes, the hidden states' bytes, the head weight's bytes) as the loss sees them:
    autocast computes the chunk in half, FSDP mixed precision gathers the head in bf16, QLoRA's head is fp32
    after prepare_model_for_kbit_training (as advisor.activations.logits_bytes)."""
    if t.precision.startswith("amp") or t.precision == "mixed-bf16":
        chunk = 2
    else:
        chunk = 4 if t.method == "qlora" else param_bytes(t.precision)
    weight = compute_bytes(t.precision) if t.precision == "mixed-bf16" else param_bytes(t.precision)
    return chunk, residual_bytes(t), weight


def loss_bytes(shape: ModelShape, t: TrainSpec) -> tuple[int, int]:
    """(forward peak, backward start) of the fused linear cross-entropy, per GPU. Forward: the input gradient,
    the fp32 loss per token, the head's gradient when it trains, and the widest chunk moment (the chunk's
    logits with its input-gradient product, or with the head-gradient product and its fp32 copy). Backward
    start: the input gradient and the head's gradient, handed to autograd as they are."""
    tokens = t.micro_batch * t.seq_len
    v, h = shape.vocab_size, shape.hidden_size
    chunk_b, hid_b, w_b = _head_dtypes(t)
    rows = min(chunk_rows(tokens, v, h), tokens)
    grad_input = tokens * h * hid_b
    head_trains = t.method == "full"
    grad_weight = v * h * w_b if head_trains else 0
    logits = rows * v * chunk_b
    in_chunk = rows * h * chunk_b
    if not head_trains or (w_b == 4 and chunk_b == 2):  # no product, or addmm accumulating into fp32 in place
        w_tmp = 0
    else:
        w_tmp = v * h * (chunk_b + (4 if chunk_b != 4 else 0))
    fwd = grad_input + tokens * 4 + grad_weight + logits + max(in_chunk, w_tmp)
    return fwd, grad_input + grad_weight


def norms_per_layer(fam: Family) -> int:
    if fam.norms_per_layer == 4:
        return 4
    return 1 if fam.single_norm else 2


def norm_saved(ctx, fam: Family, h: int) -> int:
    """Bytes per token one transformers RMSNorm saves less what Liger's saves (its input, one fp32 rstd)."""
    from advisor.activations import _norm

    if fam.norm not in ("rms", "rms_fp32"):
        return 0  # LayerNorm families: Liger's RMSNorm does not apply
    return max(_norm(ctx, fam, h) - (ctx.a * h + 4), 0)


def layer_saved_delta(shape: ModelShape, fam: Family, ctx) -> int:
    """Bytes per token per decoder layer Liger's kernels do not keep for backward: the gated MLP's activation
    output (recomputed in backward) and each RMSNorm's fp32 copy and normalized output (it keeps its input)."""
    h, i = shape.hidden_size, shape.intermediate_size
    mlp = ctx.o * i if fam.gated_mlp and not fam.moe else 0
    return mlp + norms_per_layer(fam) * norm_saved(ctx, fam, h)


def head_saved_delta(shape: ModelShape, fam: Family, ctx) -> int:
    """Bytes per token outside the layers Liger does not keep: the final norm's (as a layer's), and the head's input
    kept for its weight gradient (the fused loss computed that gradient in the forward)."""
    return norm_saved(ctx, fam, shape.hidden_size) + (ctx.c * shape.hidden_size if ctx.full else 0)


def eval_loss_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """The fused linear cross-entropy in validation (no_grad; advisor.stack.compute_loss passes skip_logits=True):
    fused_linear_cross_entropy_forward still allocates the input gradient (``zeros_like(_input)``, whether or not
    it requires grad), the fp32 loss per token and one chunk's logits; no head gradient, no products."""
    tokens = t.micro_batch * t.seq_len
    v, h = shape.vocab_size, shape.hidden_size
    chunk_b, hid_b, _ = _head_dtypes(t)
    rows = min(chunk_rows(tokens, v, h), tokens)
    return tokens * h * hid_b + tokens * 4 + rows * v * chunk_b
