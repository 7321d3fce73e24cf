"""Activations, logits and transients: what a training step keeps for backward, per token.

The per-layer walk follows each family's transformers 5 code tensor by tensor (see
advisor/families.py and docs/memory-model.md); tests/test_activations.py checks it against the
tensors autograd really saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from advisor.breakdown import compute_bytes, param_bytes, residual_bytes
from advisor.families import Family, family_of
from advisor.model import ModelShape
from advisor.spec import TrainSpec


@dataclass(frozen=True)
class _Ctx:
    """What decides which tensors autograd keeps in one layer."""

    a: int  # bytes of the hidden states / linear outputs
    full: bool  # base weights trainable
    lora: frozenset[str]  # leaf names of wrapped linears
    r: int
    lora_dropout: bool
    seq: int
    attn_impl: str
    device: str
    dropout: bool  # the family trains with dropout > 0


def _linear_input(ctx: _Ctx, width: int, consumers: tuple[str, ...], saved_elsewhere: bool = False) -> int:
    """Bytes per token kept for one tensor feeding linear layers.
    A trainable base weight saves the input (grad_W = x^T grad). A peft LoRA layer whose adapter
    is fp32 and input is half first casts the input to fp32 and saves that copy; with fp32 input
    it saves the input itself. Each adapter also keeps its A output (r values, fp32)."""
    lora = [c for c in consumers if c in ctx.lora]
    total = 0
    if not saved_elsewhere and (ctx.full or (lora and ctx.a == 4 and not ctx.lora_dropout)):
        total += ctx.a * width
    for _ in lora:
        if ctx.lora_dropout:
            total += ctx.a * width + 4 * width  # dropout mask (input dtype on CPU) + dropped fp32 input
        elif ctx.a != 4:
            total += 4 * width
        total += 4 * ctx.r
    return total


def _norm(ctx: _Ctx, fam: Family, h: int, input_needs_grad: bool = True, input_saved: bool = False) -> int:
    """A norm layer. llama RMSNorm: fp32 copy of x (4h), rsqrt (4), and x.to(dtype) for the weight's
    grad when the weight trains. gemma RMSNorm: fp32 x, two fp32 scalars, fp32 normalized x when the
    weight trains. LayerNorm: its input plus mean and rstd."""
    if not input_needs_grad:
        return 0
    if fam.norm == "rms":
        return 4 * h + 4 + (ctx.a * h if ctx.full else 0)
    if fam.norm == "rms_fp32":
        return 4 * h + 8 + (4 * h if ctx.full else 0)
    return (0 if input_saved else ctx.a * h) + 2 * (4 if ctx.device == "cuda" else ctx.a)


def fused_qkv_retained_bytes(fam: Family, shape: ModelShape, a: int) -> int:
    """A fused qkv projection (phi3, gpt_neox) keeps its whole output alive until backward, beside
    the q, k, v the kernel saves: +(q + k) widths per token. Measured (runner.memtrace, the CPU
    profiler) and simulated (advisor.simulate sees the storage live at the start of backward);
    no saved tensor of the layer points at it (saved_tensors_hooks see contiguous q, k, v), so the
    holder is inside the kernel's autograd node. Phi-3 fp32 SGD without checkpointing was -4.6%
    without this term."""
    if len(fam.q_proj) != 1 or fam.cpu_math_attention:
        return 0
    return a * (shape.num_heads + shape.num_kv_heads) * shape.head_dim


def _attention(ctx: _Ctx, fam: Family, shape: ModelShape, softcap: bool) -> int:
    """Tensors the attention kernel keeps, per token.
    sdpa/flash (Dao et al. 2022): q, k, v, output and the fp32 log-sum-exp per head; no s x s matrix.
    eager: q, k and v repeated to all heads, the fp32 softmax output and its cast (both nh x s),
    the tanh output under softcapping, dropout masks.
    CPU math path (explicit mask or dropout, e.g. gpt2, falcon): fp32 q, k, v for all heads and the
    fp32 nh x s probabilities (x3 with dropout: probabilities, mask, dropped probabilities)."""
    a, s, nh = ctx.a, ctx.seq, shape.num_heads
    qd, kvd = nh * shape.head_dim, shape.num_kv_heads * shape.head_dim
    impl = ctx.attn_impl
    if softcap and impl == "sdpa":
        impl = "eager"
    if impl == "sdpa" and ctx.device == "cpu" and fam.cpu_math_attention:
        return 3 * 4 * qd + (3 if ctx.dropout else 1) * 4 * nh * s
    if impl in ("sdpa", "flash_attention_2"):
        return a * qd + 2 * a * kvd + a * qd + 4 * nh + fused_qkv_retained_bytes(fam, shape, a)
    # eager: softmax output (fp32 in most families) and its cast back to the input dtype
    sm = 4 if fam.eager_softmax_fp32 else a
    total = 3 * a * qd + sm * nh * s + (a * nh * s if a != sm else 0)
    if softcap:
        total += a * nh * s
    if ctx.dropout:
        total += 2 * a * nh * s
    return total


def layer_activation_bytes_per_token(shape: ModelShape, fam: Family, ctx: _Ctx, first: bool = False) -> int:
    """Bytes per token one decoder layer keeps for backward (no checkpointing).
    The tensor-by-tensor walk follows Korthikanti et al. 2022 (sec. 4.1), applied to the
    transformers 5 implementation of each family rather than Megatron's."""
    h, i = shape.hidden_size, shape.intermediate_size
    qd = shape.num_heads * shape.head_dim
    a = ctx.a
    x_needs_grad = not first or ctx.full
    softcap = bool(fam.attn_softcap_attr and shape.features.get(fam.attn_softcap_attr))
    total = 0
    # attention block
    total += _norm(ctx, fam, h, x_needs_grad)
    total += _linear_input(ctx, h, fam.q_proj)
    if fam.qk_norm:
        kvd = shape.num_kv_heads * shape.head_dim
        total += (4 * qd + 4 * kvd + 8 * shape.num_heads + (a * (qd + kvd) if ctx.full else 0))
    total += _attention(ctx, fam, shape, softcap)
    total += _linear_input(ctx, qd, (fam.o_proj,), saved_elsewhere=not fam.attn_out_copy and
                           ctx.attn_impl in ("sdpa", "flash_attention_2") and not softcap)
    if ctx.dropout:
        total += a * h  # residual dropout mask
    # MLP block
    if fam.norms_per_layer == 4:
        total += _norm(ctx, fam, h) * 2  # post-attention and pre-feedforward norms
    elif fam.shared_norm_input:
        total += _norm(ctx, fam, h, x_needs_grad, input_saved=True)
    elif not fam.single_norm:
        total += _norm(ctx, fam, h)
    if not fam.single_norm:
        total += _linear_input(ctx, h, fam.up_proj)
    if fam.moe:
        k = max(shape.experts_per_token, 1)
        total += 4 * shape.num_experts + k * (2 * a * h + 4 * a * i)
    elif fam.gated_mlp:
        total += 3 * a * i  # gate output (act input), act output, up output
        total += _linear_input(ctx, i, (fam.down_proj,))
    else:
        total += fam.act_saved * a * i
        total += _linear_input(ctx, i, (fam.down_proj,))
    if ctx.dropout:
        total += a * h
    if fam.norms_per_layer == 4:
        total += _norm(ctx, fam, h)  # post-feedforward norm
    return total


def _ctx(shape: ModelShape, t: TrainSpec, seq: int, device: str) -> _Ctx:
    fam, _ = family_of(shape.model_type)
    dropout = any(float(shape.features.get(k) or 0) > 0 for k in fam.dropout_attr)
    lora = frozenset() if t.method == "full" else frozenset(g.leaf for g in shape.lora_groups(t.lora.targets))
    return _Ctx(a=residual_bytes(t), full=t.method == "full", lora=lora, r=t.lora.r,
                lora_dropout=t.method != "full" and t.lora.dropout > 0, seq=seq,
                attn_impl=t.attn_impl, device=device, dropout=dropout)


def head_activation_bytes_per_token(shape: ModelShape, t: TrainSpec, ctx: _Ctx) -> int:
    """Outside the layers: embedding indices (int64) when the embedding trains, embedding dropout,
    the final norm, and the output head's input when the head trains."""
    fam, _ = family_of(shape.model_type)
    total = 8 if ctx.full else 0
    if ctx.dropout:
        total += ctx.a * shape.hidden_size
    total += _norm(ctx, fam, shape.hidden_size)
    if ctx.full:
        total += ctx.a * shape.hidden_size
    return total


def activations_bytes(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """Everything autograd keeps at the end of the forward pass (logits counted separately).
    With gradient checkpointing each layer keeps only its input (the hidden state, a*h per
    token); one layer's full set is rebuilt during its backward (see recompute_bytes)."""
    tokens = t.micro_batch * t.seq_len
    ctx = _ctx(shape, t, t.seq_len, device)
    fam, _ = family_of(shape.model_type)
    head = head_activation_bytes_per_token(shape, t, ctx)
    if t.grad_checkpointing:
        per_layer = shape.num_layers * ctx.a * shape.hidden_size
        return tokens * (per_layer + head)
    layers = layer_activation_bytes_per_token(shape, fam, ctx, first=True)
    layers += (shape.num_layers - 1) * layer_activation_bytes_per_token(shape, fam, ctx)
    rope = 2 * ctx.a * shape.head_dim if shape.model_type != "gpt2" else 0  # cos/sin, shared by layers
    return tokens * (layers + head + rope)


def recompute_bytes(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """With checkpointing: one layer's activations, rebuilt during its backward."""
    if not t.grad_checkpointing:
        return 0
    fam, _ = family_of(shape.model_type)
    ctx = _ctx(shape, t, t.seq_len, device)
    return t.micro_batch * t.seq_len * layer_activation_bytes_per_token(shape, fam, ctx)


def backward_workspace_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """Gradients of activations in flight inside one layer's backward: one tensor of the MLP
    width and two of the hidden width (fitted to the CPU measurements of GPT-2 and Llama with
    checkpointing, where this moment is the peak; see docs/accuracy.md)."""
    a = residual_bytes(t)
    i = shape.intermediate_size * (max(shape.experts_per_token, 1) if shape.num_experts else 1)
    return t.micro_batch * t.seq_len * (a * i + 2 * a * shape.hidden_size)


def logits_bytes(shape: ModelShape, t: TrainSpec) -> tuple[int, int]:
    """(forward peak, backward peak) of the output head and the loss.
    transformers' ForCausalLMLoss upcasts the logits to fp32 and cross_entropy keeps the fp32
    log-softmax. Forward peak: logits (head dtype) + fp32 copy + fp32 log-softmax.
    Backward peak: log-softmax + its incoming gradient + its outgoing gradient, all fp32.
    Final-logit softcapping (gemma2) adds the saved tanh output and two temporaries."""
    fam, _ = family_of(shape.model_type)
    tokens = t.micro_batch * t.seq_len
    v = shape.vocab_size
    # dtype of the head's output: autocast computes it in half; QLoRA's head is fp32 after preparation
    if t.precision.startswith("amp"):
        head = 2
    else:
        head = 4 if t.method == "qlora" else param_bytes(t.precision)
    softcap = bool(fam.logit_softcap_attr and shape.features.get(fam.logit_softcap_attr))
    upcast = 4 if head != 4 else 0
    fwd = head + upcast + 4 + (2 * head if softcap else 0)
    bwd = 3 * 4 + (head if softcap else 0)
    return tokens * v * fwd, tokens * v * bwd


def qlora_dequant_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """QLoRA: the largest linear layer dequantized to the compute dtype for its matmul."""
    if t.method != "qlora":
        return 0
    largest = max((g.in_features * g.out_features for g in shape.linears if g.quantized), default=0)
    return largest * compute_bytes(t.precision)

