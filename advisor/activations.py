"""Activations, logits and transients: what a training step keeps for backward, per token.

The per-layer walk follows each family's transformers 5 code tensor by tensor (see
advisor/families.py and docs/memory-model.md); tests/test_activations.py checks it against the
tensors autograd really saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from advisor.breakdown import compute_bytes, param_bytes, residual_bytes
from advisor.families import Family, family_of
from advisor.inference import layer_windows
from advisor.model import ModelShape
from advisor.software import (
    expert_leaves,
    has_fused_experts,
    masks_only_when_padded,
    shifted_logits_copy,
    softcap_refuses_sdpa,
)
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
    amp: bool = False  # forward under torch.autocast (fp32 weights, half matmuls)
    c: int = 0  # bytes of what autocast's matmuls and sdpa produce (AMP: half); == a otherwise
    o: int = 0  # bytes of a linear layer's output (AMP: half, QLoRA's bitsandbytes: the input's fp32)
    qlora: bool = False  # the base linears are 4-bit
    softcap_eager: bool = True  # attention soft-capping turns a request for sdpa into eager (transformers 5)
    kv_full: bool = False  # sdpa keeps k and v repeated to every query head (repeat_kv, see _ctx)
    mask: int = 0  # bytes per token of the additive mask each layer's sdpa keeps (padded batches, see _ctx)


def _linear_input(ctx: _Ctx, width: int, consumers: tuple[str, ...], saved_elsewhere: bool = False,
                  in_bytes: int | None = None, needs_grad: bool = True) -> int:
    """Bytes per token kept for one tensor feeding linear layers.
    A trainable base weight saves the input (grad_W = x^T grad). A peft LoRA layer whose adapter
    is fp32 and input is half first casts the input to fp32 and saves that copy; with fp32 input
    it saves the input itself. Each adapter also keeps its A output (r values, fp32).
    LoRA dropout runs after peft's cast to the adapter dtype (fp32): torch's CPU dropout
    (``input * bernoulli mask``) keeps the fp32 mask only when the input needs a gradient, and the
    dropped fp32 copy for lora_A's weight gradient.
    Under AMP (``in_bytes``: the input's dtype, fp32 from a norm, half from attention or the MLP)
    autocast casts the input to half in every linear call (a non-leaf is never cached, so q, k and v
    each make their own copy of an fp32 input) and the matmul saves that half copy; peft first
    casts a half input to fp32 (a transient) and lora_A's autocast casts it back."""
    lora = [c for c in consumers if c in ctx.lora]
    if ctx.amp:
        inb = ctx.a if in_bytes is None else in_bytes
        total = 0
        if ctx.full and not saved_elsewhere:
            total += ctx.c * width * (1 if inb == ctx.c else len(consumers))
        for _ in lora:
            if ctx.lora_dropout and needs_grad:
                total += 4 * width  # the fp32 dropout mask
            total += ctx.c * width + ctx.c * ctx.r
        return total
    total = 0
    if not saved_elsewhere and (ctx.full or (lora and ctx.a == 4 and not ctx.lora_dropout)):
        total += ctx.a * width
    for _ in lora:
        if ctx.lora_dropout:
            total += 4 * width + (4 * width if needs_grad else 0)  # dropped fp32 input + fp32 mask
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
    if ctx.kv_full:
        kvd = qd
    impl = ctx.attn_impl
    if softcap and impl == "sdpa" and ctx.softcap_eager:
        impl = "eager"
    if impl == "sdpa" and ctx.device == "cpu" and fam.cpu_math_attention:
        return 3 * 4 * qd + (3 if ctx.dropout else 1) * 4 * nh * s
    if impl in ("sdpa", "flash_attention_2"):
        if ctx.amp:
            # sdpa is on autocast's lower-precision list: it saves the half casts of q and k (fp32
            # after rotary embeddings multiply them by the fp32 cos/sin), v and its half output
            return ctx.c * (2 * qd + 2 * kvd) + 4 * nh + fused_qkv_retained_bytes(fam, shape, ctx.o) + ctx.mask
        return a * qd + 2 * a * kvd + a * qd + 4 * nh + fused_qkv_retained_bytes(fam, shape, a) + ctx.mask
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
    total += _linear_input(ctx, h, fam.q_proj, needs_grad=x_needs_grad)
    if fam.qk_norm:
        kvd = shape.num_kv_heads * shape.head_dim
        total += (4 * qd + 4 * kvd + 8 * shape.num_heads + (a * (qd + kvd) if ctx.full else 0))
    total += _attention(ctx, fam, shape, softcap)
    total += _linear_input(ctx, qd, (fam.o_proj,), saved_elsewhere=not fam.attn_out_copy and
                           ctx.attn_impl in ("sdpa", "flash_attention_2") and not softcap, in_bytes=ctx.c)
    if ctx.dropout:
        total += ctx.o * h  # residual dropout mask (on the output projection's output)
    # MLP block
    if fam.norms_per_layer == 4:
        total += _norm(ctx, fam, h) * 2  # post-attention and pre-feedforward norms
    elif fam.shared_norm_input:
        total += _norm(ctx, fam, h, x_needs_grad, input_saved=True)
    elif not fam.single_norm:
        total += _norm(ctx, fam, h)
    # one norm feeding attention and MLP (falcon-7b): the base layers share the saved input, but each LoRA
    # adapter makes its own fp32 copy of it (peft casts per call)
    total += _linear_input(ctx, h, fam.up_proj, saved_elsewhere=fam.single_norm)
    if fam.moe:
        k = max(shape.experts_per_token, 1)
        total += 4 * shape.num_experts + k * expert_bytes_per_token(ctx, shape)
        if not has_fused_experts(shape):
            # 4.x: the router is an nn.Linear, which LoRA on all linear layers adapts like any other
            routers = tuple(g.leaf for g in shape.linears if g.path.endswith((".gate", ".router")))
            total += _linear_input(ctx, h, routers)
    elif fam.gated_mlp:
        total += 3 * ctx.o * i  # gate output (act input), act output, up output
        total += _linear_input(ctx, i, (fam.down_proj,), in_bytes=ctx.o)
    else:
        total += fam.act_saved * ctx.o * i
        total += _linear_input(ctx, i, (fam.down_proj,), in_bytes=ctx.o)
    if ctx.dropout:
        total += ctx.o * h
    if fam.norms_per_layer == 4:
        total += _norm(ctx, fam, h)  # post-feedforward norm
    return total


def expert_bytes_per_token(ctx: _Ctx, shape: ModelShape) -> int:
    """What one routed expert keeps for one token (saved_tensors_hooks on Mixtral, both layouts): the
    gate and up outputs and the activation (3 x i), the expert's output and the fp32 routing weight
    for their product (h + 4 bytes), and each matmul's input where a weight gradient needs it. transformers 5's grouped
    matmuls on fused 3-D tensors save their input only when the weight needs a gradient (full
    fine-tuning, or LoRA on the experts, whose merged weight does); transformers 4.x's per-expert
    nn.Linear layers keep what any linear keeps (_linear_input: LoRA's fp32 input copies)."""
    h, i, a = shape.hidden_size, shape.intermediate_size, ctx.a
    if has_fused_experts(shape):
        up_in = a * h if ctx.full or "gate_up_proj" in ctx.lora else 0
        down_in = a * i if ctx.full or "down_proj" in ctx.lora else 0
    else:
        gate, up, down = expert_leaves(shape.model_type)
        up_in = _linear_input(ctx, h, (gate, up))
        # 4.x's loop adds each expert's weighted output into the layer's output with index_add_, whose
        # backward saves its source (IndexAddBackward0._saved_source, a second h-wide tensor per routed token)
        down_in = _linear_input(ctx, i, (down,)) + a * h
    return up_in + 3 * a * i + down_in + a * h + 4  # + the fp32 routing weight the product saves


def _ctx(shape: ModelShape, t: TrainSpec, seq: int, device: str, padded: bool = False,
         window: int | None = None) -> _Ctx:
    """``window``: the layer's sliding window (None: a full-attention layer; see :func:`masked_layer`)."""
    fam, _ = family_of(shape, t.transformers)
    dropout = any(float(shape.features.get(k) or 0) > 0 for k in fam.dropout_attr)
    lora = frozenset() if t.method == "full" else frozenset(g.leaf for g in shape.lora_groups(t.lora.targets))
    a = residual_bytes(t)
    amp = t.precision.startswith("amp")
    c = compute_bytes(t.precision) if amp else a
    # bitsandbytes' Linear4bit returns its output in the input's dtype (fp32 under QLoRA), and the
    # LoRA sum (fp32 + half) promotes to fp32; a plain linear under autocast returns half
    o = c if amp and t.method != "qlora" else a
    kv_full, mask = _sdpa_mask_terms(shape, fam, t, seq, device, masked_layer(fam, seq, padded, window),
                                     c if amp else a)
    return _Ctx(a=a, full=t.method == "full", lora=lora, r=t.lora.r,
                lora_dropout=t.method != "full" and t.lora.dropout > 0, seq=seq,
                attn_impl=t.attn_impl, device=device, dropout=dropout, amp=amp, c=c, o=o,
                qlora=t.method == "qlora", softcap_eager=softcap_refuses_sdpa(t.transformers),
                kv_full=kv_full, mask=mask)


def masked_layer(fam: Family, kv_len: int, padded: bool, window: int | None) -> bool:
    """Whether transformers 5 hands a layer's sdpa call a mask: a padded batch, a family whose model always builds
    one (Family.always_masked), or a sliding-window layer whose keys reach its window (masking_utils
    ``_ignore_causal_mask_sdpa``: ``kv_length >= local_attention_size`` keeps the mask; otherwise an unpadded
    causal batch runs ``is_causal`` without one)."""
    return padded or fam.always_masked or (window is not None and kv_len >= window)


def masks_built(shape: ModelShape, t: TrainSpec, padded: bool) -> int:
    """How many boolean (batch, 1, seq, seq) masks the model builds for a training batch: one for its
    full-attention layers and one for its sliding-window layers (create_causal_mask and
    create_sliding_window_causal_mask), each only where some layer gets it (:func:`masked_layer`)."""
    if not masks_only_when_padded(t.transformers):
        return int(padded)  # 4.x: one float mask for a padded batch (padding_kept_bytes), as measured on 4.48
    fam, _ = family_of(shape, t.transformers)
    kinds = set(layer_windows(shape))
    return sum(masked_layer(fam, t.seq_len, padded, w) for w in kinds)


def _layer_ctxs(shape: ModelShape, t: TrainSpec, device: str, padded: bool) -> list[_Ctx]:
    """One context per decoder layer (they differ in the mask a sliding-window layer gets)."""
    windows = layer_windows(shape)
    ctxs = {w: _ctx(shape, t, t.seq_len, device, padded, w) for w in set(windows)}
    return [ctxs[w] for w in windows] or [_ctx(shape, t, t.seq_len, device, padded)]


def _runs_sdpa(shape: ModelShape, fam: Family, t: TrainSpec, device: str) -> bool:
    """Whether the layers run transformers' sdpa integration (not eager, flash-attention or the CPU math
    path of the families that pass their own mask)."""
    softcap = bool(fam.attn_softcap_attr and shape.features.get(fam.attn_softcap_attr))
    if t.attn_impl != "sdpa" or (softcap and softcap_refuses_sdpa(t.transformers)):
        return False
    return not (device == "cpu" and fam.cpu_math_attention)


def _sdpa_mask_terms(shape: ModelShape, fam: Family, t: TrainSpec, seq: int, device: str, padded: bool,
                     qb: int) -> tuple[bool, int]:
    """What an attention mask changes in each layer's sdpa call: (k and v kept for every query head,
    bytes per token of the mask the layer keeps).

    transformers 5 passes sdpa no mask for unpadded causal batches (masking_utils skips it) and then asks
    for grouped-query attention (``enable_gqa``); a padded batch gets a boolean (batch, 1, seq, seq) mask,
    and with a mask ``use_gqa_in_sdpa`` says no, so ``repeat_kv`` copies k and v to every query head (a
    view when there is one key/value head: the expand of a size-1 dim reshapes without a copy), and
    ``at::scaled_dot_product_attention`` converts the boolean mask to an additive one in the query's
    dtype on every call (``convert_boolean_attn_mask``), which the kernel's backward keeps: seq x query
    bytes per token per layer. transformers 4.x hands sdpa a float mask built once per forward (kept once,
    :func:`padding_kept_bytes`) and calls ``repeat_kv`` padded or not and makes k and v contiguous (4.48.1's
    sdpa_attention_forward: a copy from one key/value head too), so its layers keep k and v for every query
    head either way. Measured on the CPU
    (benchmarks/padding_cpu.py); the CUDA kernels get the same tensors (the efficient-attention kernel
    keeps its ``attn_bias`` for backward)."""
    if not _runs_sdpa(shape, fam, t, device):
        return False, 0
    if not masks_only_when_padded(t.transformers):
        # 4.x makes the repeated k and v contiguous before sdpa: a copy also from one key/value head
        return shape.num_kv_heads < shape.num_heads, 0
    if not padded:
        return False, 0
    return 1 < shape.num_kv_heads < shape.num_heads, seq * qb


def padding_kept_bytes(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """A padded batch's mask that stays for the whole step, beside what each layer keeps (:func:`_ctx`):
    transformers 5 with checkpointing passes its boolean (batch, 1, seq, seq) mask to every checkpointed
    layer, which keeps it for the recomputation (1 byte per element); transformers 4.x builds one float
    mask in the embeddings' dtype (``min_dtype`` where masked) that every layer's sdpa keeps, with or
    without checkpointing. Call only for padded batches."""
    elems = _mask_elems(shape, t, device)
    if masks_only_when_padded(t.transformers):
        return elems if t.grad_checkpointing else 0
    return elems * residual_bytes(t)


def _mask_elems(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """Elements of a padded batch's (batch, 1, seq, seq) mask where the layers run transformers' sdpa
    integration (:func:`_runs_sdpa`), else 0: the other paths hold their masks in the unpadded count."""
    fam, _ = family_of(shape, t.transformers)
    return t.micro_batch * t.seq_len * t.seq_len if _runs_sdpa(shape, fam, t, device) else 0


def padding_forward_bytes(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """transformers 5 without checkpointing: the padded batch's boolean (batch, 1, seq, seq) mask lives while
    the decoder's layers run (the model builds it before them and drops it when its forward returns, before
    the head), so the moments inside the forward hold it (1 byte per element). With checkpointing it is in
    :func:`padding_kept_bytes`. Call only for padded batches."""
    if t.grad_checkpointing or not masks_only_when_padded(t.transformers):
        return 0
    return _mask_elems(shape, t, device)


def head_activation_bytes_per_token(shape: ModelShape, t: TrainSpec, ctx: _Ctx) -> int:
    """Outside the layers: embedding indices (int64) when the embedding trains, embedding dropout,
    the final norm, and the output head's input when the head trains."""
    fam, _ = family_of(shape, t.transformers)
    total = 8 if ctx.full else 0
    if ctx.dropout:
        total += ctx.a * shape.hidden_size
    total += _norm(ctx, fam, shape.hidden_size)
    if ctx.full:  # the head's input for its weight gradient (under AMP: autocast's half copy)
        total += ctx.c * shape.hidden_size
    return total


def amp_weight_cast_bytes(shape: ModelShape, ctx: _Ctx, first: bool = False, trainable_only: bool = False) -> int:
    """Half copies of one decoder layer's weights that its autograd graph keeps under AMP.
    torch.autocast casts every fp32 weight to half for each linear call (aten/src/ATen/autocast_mode.h
    cached_cast; a trainable leaf's cast is also kept in autocast's cache until the autocast region
    exits), and the matmul saves the half weight for the input's gradient whenever the input needs
    one (and, for a trainable weight, the half input for the weight's gradient). LoRA: the frozen
    base weight's copy and lora_A's are saved unless the input needs no gradient (the first layer's
    input without checkpointing); lora_B's input (lora_A's output) always needs one. A 4-bit base
    weight is dequantized by bitsandbytes, not cast (see qlora_dequant_bytes); fused expert tensors
    are not linear calls. Not counted per token: the bytes of one layer. ``trainable_only``: the
    copies autocast caches (trainable leaves), whatever the graph keeps."""
    if not ctx.amp:
        return 0
    fam, _ = family_of(shape)
    layers = max(shape.num_layers, 1)
    layer_input = set(fam.q_proj) | (set(fam.up_proj) if fam.single_norm or fam.shared_norm_input else set())
    total = 0
    for g in shape.linears:
        if g.experts > 1:
            continue
        needs_grad = ctx.full or not (first and g.leaf in layer_input)
        per = 0
        if ctx.full or (needs_grad and not trainable_only and not (ctx.qlora and g.quantized)):
            per += g.in_features * g.out_features
        if g.leaf in ctx.lora:
            r = ctx.r * g.rank_mult
            per += r * g.out_features + (r * g.in_features if needs_grad or trainable_only else 0)
        total += g.count * per
    return ctx.c * total // layers


def merged_expert_bytes(shape: ModelShape, ctx: _Ctx) -> int:
    """LoRA on fused expert tensors (transformers 5): peft's ParamWrapper parametrizes the 3-D weight
    as W + scaling * B @ A, so each forward materializes the merged weight of every adapted expert
    tensor, and the grouped matmul saves it for the input's gradient: one layer's expert weights in
    the weights' dtype, per layer, and the factors A and B cast from fp32 to that dtype for the
    product (none when the weights are fp32). Measured on the CPU: the saved tensors of a Mixtral layer."""
    layers = max(shape.num_layers, 1)
    total = 0
    for g in shape.linears:
        if g.experts > 1 and g.leaf in ctx.lora:
            total += g.count * g.experts * g.in_features * g.out_features
            if ctx.a != 4:
                total += g.count * ctx.r * g.rank_mult * (g.in_features + g.out_features)
    return total * ctx.a // layers


def layer_weight_bytes(shape: ModelShape, ctx: _Ctx, first: bool = False) -> int:
    """Weight-sized tensors one decoder layer's graph keeps: AMP's half casts and LoRA's merged experts."""
    return amp_weight_cast_bytes(shape, ctx, first=first) + merged_expert_bytes(shape, ctx)


def amp_head_cast_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """Under AMP the output head's fp32 weight is cast to half for its matmul and saved for the
    gradient of the head's input (which always needs one in training): alive from the head's
    forward to its backward. QLoRA's head is fp32 after prepare_model_for_kbit_training: the same."""
    if not t.precision.startswith("amp"):
        return 0
    return compute_bytes(t.precision) * shape.vocab_size * shape.hidden_size


def activations_bytes(shape: ModelShape, t: TrainSpec, device: str, padded: bool = False) -> int:
    """Everything autograd keeps at the end of the forward pass (logits counted separately).
    With gradient checkpointing each layer keeps only its input (the hidden state, a*h per
    token); one layer's full set is rebuilt during its backward (see recompute_bytes)."""
    tokens = t.micro_batch * t.seq_len
    ctxs = _layer_ctxs(shape, t, device, padded)
    ctx = ctxs[0]
    fam, _ = family_of(shape, t.transformers)
    head = head_activation_bytes_per_token(shape, t, ctx)
    if t.grad_checkpointing:
        per_layer = shape.num_layers * ctx.a * shape.hidden_size
        return tokens * (per_layer + head) + rope_bytes(shape, t)
    layers = sum(layer_activation_bytes_per_token(shape, fam, c, first=i == 0) for i, c in enumerate(ctxs))
    casts = layer_weight_bytes(shape, ctx, first=True)
    casts += (shape.num_layers - 1) * layer_weight_bytes(shape, ctx)
    return tokens * (layers + head) + rope_bytes(shape, t) + casts


def rope_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """Rotary cos and sin, shared by all layers (saved by each layer's q*cos, k*sin; passed to every
    checkpointed layer as arguments): (1, seq, head_dim) each in the hidden dtype -- the model
    builds position_ids as arange(seq).unsqueeze(0), one row for the whole batch."""
    if family_of(shape, t.transformers)[0].learned_positions:
        return 0
    return 2 * residual_bytes(t) * shape.head_dim * t.seq_len


def amp_cache_bytes(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """AMP with checkpointing: autocast's cache keeps the half copy of every trainable weight
    (full: all linear weights; LoRA: A and B) from its first use to the end of the autocast region,
    the end of the forward pass, although the checkpointed layers' graphs keep none of them.
    (Without checkpointing the graphs hold the same copies; activations_bytes counts them.)"""
    if not (t.grad_checkpointing and t.precision.startswith("amp")):
        return 0
    ctx = _ctx(shape, t, t.seq_len, device)
    return shape.num_layers * amp_weight_cast_bytes(shape, ctx, trainable_only=True)


def recompute_bytes(shape: ModelShape, t: TrainSpec, device: str, padded: bool = False) -> int:
    """With checkpointing: one layer's activations, rebuilt during its backward."""
    if not t.grad_checkpointing:
        return 0
    fam, _ = family_of(shape, t.transformers)
    ctxs = _layer_ctxs(shape, t, device, padded)
    widest = max(layer_activation_bytes_per_token(shape, fam, c) for c in ctxs)
    return t.micro_batch * t.seq_len * widest + layer_weight_bytes(shape, ctxs[0])


def backward_workspace_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """Gradients of activations in flight inside one layer's backward: one tensor of the MLP
    width and two of the hidden width (fitted to the CPU measurements of GPT-2 and Llama with
    checkpointing, where this moment is the peak; see docs/accuracy.md)."""
    a = residual_bytes(t)
    i = shape.intermediate_size * (max(shape.experts_per_token, 1) if shape.num_experts else 1)
    fused = [g for g in shape.linears if g.experts > 1]  # has_fused_experts, and which ones LoRA adapts
    lora = {g.leaf for g in shape.lora_groups(t.lora.targets)} if t.method != "full" else set()
    if fused and t.method != "full" and not any(g.leaf in lora for g in fused):
        # transformers 5's frozen fused experts: all routed tokens go through one grouped matmul; at the
        # peak, the product's backward, the down projection's input gradient and the gradients of the
        # activation and the up half (3 x i per routed token) are in flight, and the expert output and the
        # combine's saved h-wide tensors are given back (2 x h), as in 4.x's loop below (the live tensors of
        # a measured Mixtral step; the rise first measured on a block was 2.9 x i at i = 8 x hidden). With
        # LoRA on the experts the matmuls' saved inputs, freed by then, make the room: the generic term
        # measures within 1% there.
        i = (3 * shape.intermediate_size - 2 * shape.hidden_size) * max(shape.experts_per_token, 1)
    elif fused and t.method == "full":
        # full fine-tuning of fused experts: the down projection's grouped matmul has given back its saved
        # input by the time the product's backward makes the gradients of the activation and of the up half,
        # beside the down projection's input gradient: 2 x i per routed token in flight beyond the saved
        # tensors at the peak (the live tensors of a measured Mixtral step, i = 8 x hidden), less 2 x h as in
        # 4.x's per-expert backward below (at i = 2 x hidden the generic i measures within 0.2%)
        i = (2 * shape.intermediate_size - 2 * shape.hidden_size) * max(shape.experts_per_token, 1)
    elif shape.num_experts and not fused:
        # transformers 4.x's loop over per-expert nn.Linear layers: autograd runs the experts' backward one
        # at a time, so what is in flight is one expert's share of the tokens (tokens x k / E routed to it),
        # measured on a Mixtral block (4 and 8 experts, i from 512 to 4096, the rise in backward over the
        # saved tensors): 3 x i minus the 2 x h its saved output and index_add_ source give back with frozen
        # experts, 2 x i with LoRA on them; beside it the gradient of the layer's output (h per token)
        tokens = t.micro_batch * t.seq_len
        return _expert_share(shape, tokens) * a * _per_expert_width(shape, t, lora) + tokens * a * shape.hidden_size
    return t.micro_batch * t.seq_len * (a * i + 2 * a * shape.hidden_size)


def recompute_end_transient_bytes(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """LoRA with checkpointing: the widest moment of a layer's recomputation, the LoRA sum of its
    last linear layer (the MLP's down projection). The recomputation runs when the layer's first
    backward node unpacks a saved tensor, so the gradient of the layer's output waits (a*h); the
    down projection's input is held by its caller (the MLP activation, i wide: a transient beside
    the copy peft saves unless the input is saved itself, fp32 without dropout); its base output
    exists (h wide); and peft's ``result + lora_B(lora_A(dropout(x))) * scaling`` (peft
    tuners/lora/layer.py Linear.forward; bnb.py Linear4bit.forward) holds lora_B's output and its
    scaled copy in the adapter dtype (fp32; autocast's half under AMP) when the scaled copy is made.
    0 where the down projection has no adapter (the recomputation then stops earlier: torch's
    non-reentrant checkpoint stops at the last saved tensor) and for full fine-tuning and MoE
    (left to backward_workspace_bytes)."""
    if not t.grad_checkpointing or t.method == "full":
        return 0
    if shape.num_experts:
        return _per_expert_recompute_end_bytes(shape, t, device)
    fam, _ = family_of(shape, t.transformers)
    ctx = _ctx(shape, t, t.seq_len, device)
    h, i = shape.hidden_size, shape.intermediate_size
    adapter = ctx.c if ctx.amp else 4
    # earlier in the recomputation the up projection's LoRA sum (up_sum_per_token), beside the gradient
    # of the layer's output
    up_sum = ctx.a * h + up_sum_per_token(shape, fam, ctx)
    if fam.down_proj not in ctx.lora:
        return t.micro_batch * t.seq_len * up_sum
    saved_itself = not ctx.amp and ctx.o == 4 and not ctx.lora_dropout
    total = ctx.a * h + ctx.o * h + (0 if saved_itself else ctx.o * i)
    if ctx.amp and ctx.o != 4:
        total += 4 * i  # peft's fp32 cast of the half input, before autocast casts it back
    total += 2 * adapter * h
    return t.micro_batch * t.seq_len * max(total, up_sum)


def up_sum_per_token(shape: ModelShape, fam: Family, ctx: _Ctx) -> int:
    """LoRA on a dense gated MLP's gate or up projection: the LoRA sum is i wide -- the base output and, in
    the adapter dtype, lora_B's scaled output, the base output's upcast copy (CPU, _sum_copies) and their
    sum -- and the layer's residual stream (_mlp_stream_per_token), less what the layer saves after it (the
    up output, the down projection's input). The widest moment of a layer's
    forward when the MLP is wider than the rest (the live set at the peak of measured Llama steps with a
    small vocabulary, where the loss no longer dominates; as _per_expert_recompute_end_bytes for 4.x's
    experts). 0 without such an adapter."""
    if not (fam.gated_mlp and not fam.moe and set(fam.up_proj) & ctx.lora):
        return 0
    h, i = shape.hidden_size, shape.intermediate_size
    adapter = ctx.c if ctx.amp else 4
    after = ctx.o * i + _linear_input(ctx, i, (fam.down_proj,))
    return max(ctx.o * i + _sum_copies(ctx) * adapter * i + _mlp_stream_per_token(ctx, h) - after, 0)


def _mlp_stream_per_token(ctx: _Ctx, h: int) -> int:
    """What the decoder layer's forward holds while its MLP runs, beyond what autograd saves: the residual
    (the hidden state after attention, added back after the MLP) and the MLP norm's output, the gate and up
    projections' input, unless LoRA saves that tensor itself (fp32 input to fp32 adapters, no dropout;
    else peft saves its own fp32 copy and the frozen base saves nothing). Seen in simulate's live set at
    the peak of small-vocabulary Llama steps."""
    saved_itself = not ctx.amp and ctx.a == 4 and not ctx.lora_dropout
    return ctx.a * h + (0 if saved_itself else ctx.a * h)


def _sum_copies(ctx: _Ctx) -> int:
    """Adapter-dtype tensors at peft's ``result + lora_B(...) * scaling`` when the result is half: lora_B's
    scaled output and the sum, and on the CPU the half result's upcast copy (TensorIterator promotes a
    CPU operand of another dtype through a temporary; CUDA kernels cast as they load)."""
    return 3 if ctx.device == "cpu" else 2


def forward_up_sum_bytes(shape: ModelShape, t: TrainSpec, device: str, padded: bool = False) -> int:
    """Without checkpointing: the last layer's up-projection LoRA sum in the forward (up_sum_per_token),
    when every layer's activations but the last one's tail exist already."""
    if t.grad_checkpointing or t.method == "full" or shape.num_experts:
        return 0
    fam, _ = family_of(shape, t.transformers)
    return t.micro_batch * t.seq_len * up_sum_per_token(shape, fam, _ctx(shape, t, t.seq_len, device, padded))


def _per_expert_width(shape: ModelShape, t: TrainSpec, lora: set[str]) -> int:
    """What 4.x's per-expert backward holds in flight per routed token at its widest moment, the product's
    backward (the gradients of the product, the activation and the up half), in elements; see
    backward_workspace_bytes."""
    h, i = shape.hidden_size, shape.intermediate_size
    if t.method == "full":  # trainable experts: the down projection's saved input is freed by then
        return 2 * i - 2 * h
    if set(expert_leaves(shape.model_type)) & lora:
        return 2 * i
    return 3 * i - 2 * h


def per_expert_dequant_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """QLoRA on transformers 4.x's per-expert linears: what the dequantized weight adds to the layer's widest
    backward moment. bitsandbytes dequantizes an expert's down projection for its input gradient and frees it
    before the product's backward, the widest moment (backward_workspace_bytes); so the dequantized weight
    is beside only the down projection's input gradient (i wide, the expert's h-wide saved tensors already
    given back), and it decides the peak only where it is wider than the rest of the product's backward:
    max(0, dequantized - share x (width - i)). Measured on a 4.x Mixtral layer (the live tensors at the
    peak: no dequantized weight among them). ``qlora_dequant_bytes`` everywhere else."""
    deq = qlora_dequant_bytes(shape, t)
    if not deq or not shape.num_experts or has_fused_experts(shape):
        return deq
    lora = {g.leaf for g in shape.lora_groups(t.lora.targets)}
    share = _expert_share(shape, t.micro_batch * t.seq_len)
    rest = share * residual_bytes(t) * (_per_expert_width(shape, t, lora) - shape.intermediate_size)
    return max(deq - rest, 0)


def per_expert_full_backward(shape: ModelShape, t: TrainSpec, device: str, padded: bool = False) -> tuple[int, int]:
    """Full fine-tuning on transformers 4.x's per-expert linears: (the layer's gradients, the saved
    activations already given back) at the layer's widest backward moment. The experts' backward runs one
    expert at a time, before the attention's: at expert p (in the order autograd runs them) the experts done
    have made their weight gradients (3 x h x i each) and freed what they saved (share x
    expert_bytes_per_token), so the live set moves linearly with p and is widest at the first expert when
    an expert saves more than its gradients weigh (small hidden sizes, long batches) and at the last one
    otherwise; beside it the running expert's down-projection gradient, made before the product's backward.
    The layer's other gradients (attention, router, norms) come later. Measured on a 4.x Mixtral step (the
    gradients alive at the peak: the head's, the later layers' and one expert's down projection).
    (0, 0) on transformers 5 (fused experts: the generic layer gradient) and for other methods."""
    if t.method != "full" or not shape.num_experts or has_fused_experts(shape):
        return 0, 0
    ctx = _ctx(shape, t, t.seq_len, device, padded)
    e = shape.num_experts
    g_expert = 3 * shape.hidden_size * shape.intermediate_size * param_bytes(t.precision)
    saved = _expert_share(shape, t.micro_batch * t.seq_len) * expert_bytes_per_token(ctx, shape)
    g_down = g_expert // 3
    if g_expert > saved:
        return g_down + (e - 1) * g_expert, (e - 1) * saved
    return g_down, 0


def _expert_share(shape: ModelShape, tokens: int) -> int:
    """One expert's share of the routed tokens (tokens x k / E): what 4.x's per-expert loop holds at once."""
    return tokens * max(shape.experts_per_token, 1) // max(shape.num_experts, 1)


def _per_expert_recompute_end_bytes(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """transformers 4.x's per-expert loop with LoRA on the experts' gate or up projection: the widest moment
    of a layer's recomputation is the last expert's up projection, whose LoRA sum is i wide (measured on a
    Mixtral layer, the live set at the peak): its base output (o x i) and, in the adapter dtype, lora_B's
    scaled output, the base output's upcast copy (CPU only, _sum_copies) and their sum (3 x i), for that
    expert's share of the tokens,
    less what the expert saves after it (the up output for the product, the down projection's input, its
    output and index_add_ source, the routing weight). Beside it the gradient of the layer's output and the
    layer's output accumulator (index_add_'s target), h wide for every token.
    QLoRA: later, at the last expert's down projection, bitsandbytes' dequantized weight (the whole expert
    weight, in the compute dtype) beside the expert's input rows, the product (the projection's input), its
    cast to the compute dtype and the matmul's output, less the expert's output, index_add_ source and
    routing weight, not made yet (read off the live tensors of a Mixtral layer with few tokens per expert,
    where this moment is the step's peak, the dequantized block alive at the profiler's peak); the wider of
    the two moments.
    0 on transformers 5 (fused experts: left to backward_workspace_bytes) and without an adapter on the gate
    or up projection and without 4-bit experts."""
    if has_fused_experts(shape):
        return 0
    ctx = _ctx(shape, t, t.seq_len, device)
    gate, up, down = expert_leaves(shape.model_type)
    h, i, a = shape.hidden_size, shape.intermediate_size, ctx.a
    tokens = t.micro_batch * t.seq_len
    share = _expert_share(shape, tokens)
    deq = qlora_dequant_bytes(shape, t)
    at_down = 0
    if deq:
        cast = ctx.c * i if a != ctx.c else 0
        at_down = deq + share * max(a * h + a * i + cast + ctx.c * h - 2 * a * h - 4, 0)
    if not {gate, up} & ctx.lora:
        return (tokens * 2 * a * h + at_down) if at_down else 0
    adapter = ctx.c if ctx.amp else 4
    after = a * i + _linear_input(ctx, i, (down,)) + 2 * a * h + 4
    return tokens * 2 * a * h + max(share * max(ctx.o * i + _sum_copies(ctx) * adapter * i - after, 0), at_down)


def logits_bytes(shape: ModelShape, t: TrainSpec) -> tuple[int, int]:
    """(forward peak, backward peak) of the output head and the loss.
    transformers' ForCausalLMLoss upcasts the logits to fp32 and cross_entropy keeps the fp32
    log-softmax. Forward peak: logits (head dtype) + fp32 copy + fp32 log-softmax.
    Backward peak: log-softmax + its incoming gradient + its outgoing gradient, all fp32.
    transformers 4.46-4.48 also copy the shifted fp32 logits in the forward.
    Final-logit softcapping (gemma2) adds one logits-sized tensor forward, its head-dtype gradient backward."""
    fam, _ = family_of(shape, t.transformers)
    tokens = t.micro_batch * t.seq_len
    v = shape.vocab_size
    # dtype of the head's output: autocast computes it in half; QLoRA's head is fp32 after preparation
    if t.precision.startswith("amp") or t.precision == "mixed-bf16":  # mixed: the head gathered in bf16
        head = 2
    else:
        head = 4 if t.method == "qlora" else param_bytes(t.precision)
    softcap = bool(fam.logit_softcap_attr and shape.features.get(fam.logit_softcap_attr))
    upcast = 4 if head != 4 else 0
    # transformers 4.46-4.48: the contiguous fp32 copy of the shifted logits (advisor/software.py); with
    # one sequence the shifted slice is contiguous already and .contiguous() copies nothing
    shifted = 4 if shifted_logits_copy(t.transformers) and t.micro_batch > 1 else 0
    # softcapping (logits / cap, tanh, * cap): the saved tanh output and the capped logits, the head's
    # own output freed by the division (measured: the forward peak is one head-sized tensor above
    # the plain loss, on both stacks)
    fwd = head + upcast + shifted + 4 + (head if softcap else 0)
    bwd = 3 * 4 + (head if softcap else 0)
    return tokens * v * fwd, tokens * v * bwd


def offloaded_input_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """One checkpointed layer's saved input, the hidden state (tokens x hidden in the residual dtype), which
    offloading moves to host memory (advisor.stack.offload_checkpoints: torch's non-reentrant checkpoint saves
    the layer's positional inputs through the saved-tensor hooks, ``_CheckpointFrame.save_inputs``; the mask
    and the rotary cos/sin are keyword arguments and stay on the device). 0 without offloading."""
    if not (t.offload_activations and t.grad_checkpointing):
        return 0
    return t.micro_batch * t.seq_len * residual_bytes(t) * shape.hidden_size


def offloaded_host_bytes(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """Host memory the offloaded inputs take: every layer's, from its forward to the end of backward. On a GPU
    they are pinned, and torch's CachingHostAllocator rounds each pinned block up to a power of two
    (``ATen/core/CachingHostAllocator.h`` of torch 2.13, ``PowerOf2Ceil``; kept cached between steps)."""
    one = offloaded_input_bytes(shape, t)
    if device == "cuda" and one:
        one = 1 << (one - 1).bit_length()
    return shape.num_layers * one


def qlora_dequant_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """QLoRA: the largest linear layer dequantized to the compute dtype for its matmul."""
    if t.method != "qlora":
        return 0
    largest = max((g.in_features * g.out_features for g in shape.linears if g.quantized), default=0)
    return largest * compute_bytes(t.precision)

