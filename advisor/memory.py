"""The analytic memory estimate: one pure function per component, integer bytes.

Peak memory is not the sum of everything: activations are freed during backward, gradients
appear during backward and vanish at ``zero_grad(set_to_none=True)``, optimizer states exist from
the first step on. ``estimate`` evaluates the live bytes at each candidate moment of a
steady-state step (end of forward, start of backward, last layer's backward, end of backward,
optimizer step) and reports the largest, with the components alive at that moment.
docs/memory-model.md explains every term and its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from advisor.families import Family, family_of
from advisor.model import ModelShape
from advisor.spec import Hardware, InferSpec, Plan, TrainSpec

GIB = 1024**3
MIB = 1024**2

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}

# GPU-only terms (see docs/memory-model.md "GPU overhead"): the CUDA context that nvidia-smi shows
# but torch does not count, cuBLAS workspaces, and the caching allocator's rounding/fragmentation.
CUDA_CONTEXT_BYTES = 500 * MIB
CUBLAS_WORKSPACE_BYTES = 32 * MIB
ALLOCATOR_SLACK = 0.06  # reserved - allocated, as a share of the allocated peak
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (QLoRA paper: 64)
NF4_NESTED_BLOCK = 256  # double quantization: absmax constants quantized in blocks of 256
ADAM8_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizer states
ADAM8_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this


class EstimateError(ValueError):
    """Settings the estimator cannot honour, with the fix."""


# ------------------------------------------------------------------------------------------
# dtypes of the plan
# ------------------------------------------------------------------------------------------

def param_bytes(precision: str) -> int:
    """Bytes per stored (trainable or frozen, unquantized) weight: fp32 for fp32 and AMP."""
    return 2 if precision in ("bf16", "fp16") else 4


def compute_bytes(precision: str) -> int:
    """Bytes per activation element: half for bf16/fp16 and AMP, 4 for fp32."""
    return 4 if precision == "fp32" else 2


def residual_bytes(t: TrainSpec) -> int:
    """Dtype of the hidden states between layers. QLoRA: prepare_model_for_kbit_training casts
    norms and embeddings to fp32 and bitsandbytes returns its matmul output in the input's dtype,
    so the residual stream is fp32 whatever the compute dtype. AMP: fp32 residual adds."""
    if t.method == "qlora" or t.precision.startswith("amp"):
        return 4
    return compute_bytes(t.precision)


# ------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------

def nf4_bytes(numel: int, double_quant: bool) -> int:
    """4-bit NF4 storage of one weight matrix (Dettmers et al. 2023, QLoRA, sec. 3):
    packed 4-bit values (numel/2 bytes) + one absmax per 64-weight block: fp32 (4 B) without
    double quantization; with it, 8-bit absmax (1 B) + fp32 second-level constants per 256 blocks
    + the 256-entry fp32 code book of the second level and its offset."""
    packed = (numel + 1) // 2
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return packed + 4 * blocks + 16 * 4
    return packed + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 256 * 4 + 16 * 4 + 4


def weights_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """Base model weights as the runner holds them.
    full/lora: every parameter in the parameter dtype (tied embeddings once).
    qlora: linear layers (not the output head) in NF4; their biases, norms, embeddings and the
    head cast to fp32 by peft's prepare_model_for_kbit_training."""
    if t.method != "qlora":
        return shape.params_total * param_bytes(t.precision)
    quant = sum(g.count * nf4_bytes(g.in_features * g.out_features, t.double_quant)
                for g in shape.linears if g.quantized)
    return quant + 4 * (shape.params_total - shape.params_quantized)


def lora_adapter_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """LoRA A and B matrices: r*(in+out) per wrapped module, kept in fp32 (peft's default
    autocast_adapter_dtype=True upcasts bf16/fp16 adapters)."""
    if t.method == "full":
        return 0
    return 4 * shape.lora_params(t.lora.targets, t.lora.r)


def trainable_params(shape: ModelShape, t: TrainSpec) -> int:
    if t.method == "full":
        return shape.params_total
    return shape.lora_params(t.lora.targets, t.lora.r)


def trainable_bytes_per_param(t: TrainSpec) -> int:
    return param_bytes(t.precision) if t.method == "full" else 4


def gradients_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """One gradient per trainable parameter in the parameter's dtype."""
    return trainable_params(shape, t) * trainable_bytes_per_param(t)


def _trainable_tensors(shape: ModelShape, t: TrainSpec) -> list[tuple[int, int, int]]:
    """(rows, cols, count) of every trainable tensor; cols == 1 for vectors."""
    if t.method != "full":
        r = t.lora.r
        out = []
        for g in shape.lora_groups(t.lora.targets):
            out.append((r * g.rank_mult, g.in_features, g.count))  # lora_A.weight
            out.append((g.out_features, r * g.rank_mult, g.count))  # lora_B.weight
        return out
    out = [(g.out_features, g.in_features, g.count * g.experts) for g in shape.linears]
    out += [(g.out_features, 1, g.count) for g in shape.linears if g.bias]
    if shape.params_embedding:
        out.append((shape.vocab_size, shape.params_embedding // shape.vocab_size, 1))
    if shape.params_lm_head:
        out.append((shape.vocab_size, shape.params_lm_head // shape.vocab_size, 1))
    listed = sum(r * c * n for r, c, n in out)
    rest = shape.params_total - listed
    if rest > 0:  # norms, routers, fused experts: vectors of width h (close enough for states)
        out.append((rest, 1, 1))
    return out


def optimizer_states_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """Optimizer state per trainable parameter (torch keeps states in the parameter dtype).
    adamw / paged_adamw_32bit: exp_avg + exp_avg_sq (Loshchilov & Hutter 2019).
    adamw_8bit / paged_adamw_8bit: two uint8 states + an fp32 absmax per 256 values; tensors under
    4096 elements keep 32-bit states (bitsandbytes min_8bit_size; Dettmers et al. 2022).
    paged_adamw_32bit: two fp32 states (bitsandbytes keeps 32-bit states in fp32 for any dtype).
    sgd: none; sgd_momentum: one buffer. adafactor (Shazeer & Stern 2018): row and column
    second-moment factors for matrices, a full one for vectors, no first moment (beta1=None)."""
    b = trainable_bytes_per_param(t)
    opt = t.optimizer
    total = 0
    for rows, cols, n in _trainable_tensors(shape, t):
        numel = rows * cols
        if opt == "adamw":
            total += n * 2 * numel * b
        elif opt == "paged_adamw_32bit":  # bitsandbytes' 32-bit states are fp32 whatever the parameter dtype
            total += n * 2 * numel * 4
        elif opt in ("adamw_8bit", "paged_adamw_8bit"):
            if numel < ADAM8_MIN_SIZE:
                total += n * 2 * numel * 4
            else:
                total += n * 2 * (numel + 4 * math.ceil(numel / ADAM8_BLOCK))
        elif opt == "sgd_momentum":
            total += n * numel * b
        elif opt == "adafactor":
            total += n * ((rows + cols) if cols > 1 else rows) * b
    return total


def optimizer_step_transient_bytes(shape: ModelShape, t: TrainSpec, device: str) -> int:
    """Temporaries of optimizer.step(). torch AdamW on CUDA uses the foreach path: one
    temporary list as large as all trainable parameters (the sqrt of exp_avg_sq). On CPU it runs
    tensor by tensor: two temporaries the size of the largest tensor. Adafactor builds about three
    fp32 temporaries of the largest tensor; 8-bit and SGD update in place."""
    b = trainable_bytes_per_param(t)
    largest = max((r * c for r, c, _ in _trainable_tensors(shape, t)), default=0)
    if t.optimizer == "adamw":
        if device == "cuda":
            return trainable_params(shape, t) * b
        return 2 * largest * b
    if t.optimizer == "adafactor":
        return 3 * largest * 4
    if t.optimizer in ("adamw_8bit", "paged_adamw_8bit") and device == "cpu":
        # bitsandbytes' CPU fallback dequantizes both states to fp32 and works in fp32, tensor by
        # tensor (measured: 20 bytes per element of the largest tensor, 24 for half parameters)
        return largest * (20 + (4 if b == 2 else 0))
    return 0


# ------------------------------------------------------------------------------------------
# activations
# ------------------------------------------------------------------------------------------

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
        return a * qd + 2 * a * kvd + a * qd + 4 * nh
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
    head = 4 if t.method == "qlora" else (4 if t.precision.startswith("amp") else param_bytes(t.precision))
    if t.precision.startswith("amp"):
        head = 2
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


# ------------------------------------------------------------------------------------------
# the estimate
# ------------------------------------------------------------------------------------------

@dataclass
class Breakdown:
    """Bytes alive at the peak moment, by component; the parts add up to the peak."""

    components: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    overhead: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.phases[self.peak_phase] == sum(self.components.values()), "breakdown does not add up"
        assert self.phases[self.peak_phase] == max(self.phases.values())

    @property
    def peak_allocated_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def peak_reserved_bytes(self) -> int:
        return self.peak_allocated_bytes + sum(self.overhead.values())


def gpu_overhead_bytes(peak_allocated: int, device: str) -> dict[str, int]:
    """What nvidia-smi shows beyond live tensors. CPU estimates have none."""
    if device != "cuda":
        return {}
    return {
        "cuda_context": CUDA_CONTEXT_BYTES,
        "cublas_workspace": CUBLAS_WORKSPACE_BYTES,
        "allocator_slack": int(ALLOCATOR_SLACK * peak_allocated),
    }


def _shard(x: int, n: int) -> int:
    return -(-x // n)


def training_phases(shape: ModelShape, t: TrainSpec, hw: Hardware) -> dict[str, dict[str, int]]:
    """Live components at each candidate moment of a steady-state step, per GPU."""
    dev = hw.device
    n = hw.gpus if hw.gpus > 1 else 1
    z = hw.zero if n > 1 else 0
    w = weights_bytes(shape, t)
    lora = lora_adapter_bytes(shape, t)
    g = gradients_bytes(shape, t)
    o = optimizer_states_bytes(shape, t)
    if z >= 1:
        o = _shard(o, n)
    if z >= 2:
        g_kept = _shard(g, n)
    else:
        g_kept = g
    zero3_gather = 0
    if z >= 3:
        w = _shard(w, n)
        # parameters of the layer being computed (and the next, prefetched) are gathered
        per_layer = (shape.params_linear // max(shape.num_layers, 1)) * (param_bytes(t.precision)
                                                                       if t.method != "qlora" else 1)
        zero3_gather = 2 * per_layer
    ddp_buckets = 2 * 25 * MIB if n > 1 and z == 0 and t.method == "full" else 0
    acts = activations_bytes(shape, t, dev)
    recompute = recompute_bytes(shape, t, dev)
    l_fwd, l_bwd = logits_bytes(shape, t)
    ws = backward_workspace_bytes(shape, t)
    deq = qlora_dequant_bytes(shape, t)
    opt_tmp = optimizer_step_transient_bytes(shape, t, dev)
    if z >= 1:
        opt_tmp = _shard(opt_tmp, n)
    accum = g_kept if t.grad_accum > 1 else 0  # grads from earlier micro-batches stay until the step
    head_grad = layer_grad = emb_grad = 0
    fam, _ = family_of(shape.model_type)
    ctx = _ctx(shape, t, t.seq_len, dev)
    tokens = t.micro_batch * t.seq_len
    first_layer_acts = tokens * (layer_activation_bytes_per_token(shape, fam, ctx, first=True)
                                 + (8 if ctx.full else 0))
    # non-reentrant checkpointing: the graph holds every layer's saved input until it is dropped
    gc_inputs = tokens * shape.num_layers * ctx.a * shape.hidden_size if t.grad_checkpointing else 0
    if t.method == "full":
        b = param_bytes(t.precision)
        head_grad = (shape.params_lm_head or shape.params_embedding) * b
        per_layer = shape.params_total - shape.params_embedding - shape.params_lm_head
        layer_grad = (per_layer // max(shape.num_layers, 1)) * b  # incl. fused MoE experts
        emb_grad = shape.params_embedding * b if shape.params_lm_head else 0
        if z >= 2:
            head_grad, layer_grad, emb_grad = (_shard(x, n) for x in (head_grad, layer_grad, emb_grad))
    if t.grad_accum > 1:
        head_grad = layer_grad = 0  # already in `accum`
    base = {"weights": w, "lora_adapters": lora, "optimizer_states": o}
    if accum:
        base["gradients"] = accum
    if zero3_gather:
        base["zero3_gathered_params"] = zero3_gather
    if ddp_buckets:
        base["ddp_buckets"] = ddp_buckets
    phases = {
        "forward_end": {**base, "activations": acts, "logits_and_loss": l_fwd, "transient": deq},
        "backward_start": {**base, "activations": acts, "logits_and_loss": l_bwd},
        "backward_last_layer": {**base, "activations": acts + recompute,
                                "gradients": base.get("gradients", 0) + head_grad + layer_grad,
                                "transient": ws + deq},
        "backward_first_layer": {**base, "activations": first_layer_acts + gc_inputs,
                                 "gradients": g_kept if accum else max(g_kept - layer_grad - emb_grad, 0),
                                 "transient": ws + deq},
        "backward_end": {**base, "activations": gc_inputs, "gradients": g_kept},
        "optimizer_step": {**base, "gradients": g_kept, "transient": opt_tmp},
    }
    return {k: {c: int(v) for c, v in comps.items() if v} for k, comps in phases.items()}


def estimate_training(shape: ModelShape, t: TrainSpec, hw: Hardware) -> Breakdown:
    phases = training_phases(shape, t, hw)
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    comps = phases[peak]
    notes = []
    fam, known = family_of(shape.model_type)
    if not known:
        notes.append(f"model_type {shape.model_type!r} has no activation profile; estimated as llama-style")
    if fam.attn_softcap_attr and shape.features.get(fam.attn_softcap_attr) and t.attn_impl == "sdpa":
        notes.append("attention softcapping needs eager or flash attention (sdpa cannot); estimated as eager")
    return Breakdown(comps, peak, totals, gpu_overhead_bytes(totals[peak], hw.device), notes)


# --- inference ------------------------------------------------------------------------------

def inference_weights_bytes(shape: ModelShape, s: InferSpec) -> int:
    """Serving weights: the precision's bytes, or LLM.int8 (int8 + an fp32 scale per output row),
    or NF4 with double quantization; embeddings, norms and the head stay in the precision."""
    b = DTYPE_BYTES[s.precision]
    if s.weight_quant == "none":
        return shape.params_total * b
    quant = 0
    for g in shape.linears:
        if not g.quantized:
            continue
        n = g.in_features * g.out_features
        quant += g.count * (n + 4 * g.out_features if s.weight_quant == "int8" else nf4_bytes(n, True))
    return quant + (shape.params_total - shape.params_quantized) * b


def kv_cache_bytes(shape: ModelShape, s: InferSpec) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x tokens x batch x bytes."""
    kb = 1 if s.kv_cache_dtype == "fp8" else DTYPE_BYTES[s.precision]
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * s.seq_len * s.batch * kb


def prefill_activation_bytes(shape: ModelShape, s: InferSpec, attn_impl: str = "sdpa", device: str = "cuda") -> int:
    """No autograd: only one layer's temporaries are alive at once, the widest of
    - the MLP: act output, up output and their product (3 x i; plain MLPs: fc output + activation
      temporaries), and
    - the attention: q, k, v and output; eager attention adds the nh x s scores, their fp32 softmax
      and its cast (+ the tanh chain under softcapping); CPU math-path SDPA (masks, GPT-2, Falcon)
      upcasts q, k, v to fp32 and holds two fp32 nh x s matrices,
    beside the hidden state and the residual (2 x h). generate() computes logits for the last
    position only (+ an fp32 copy)."""
    fam, _ = family_of(shape.model_type)
    a = DTYPE_BYTES[s.precision]
    prompt = s.prompt_len or s.seq_len
    tokens = s.batch * prompt
    h, nh = shape.hidden_size, shape.num_heads
    qd, kvd = nh * shape.head_dim, shape.num_kv_heads * shape.head_dim
    i = shape.intermediate_size * (shape.experts_per_token if shape.num_experts else 1)
    if fam.moe:  # per routed expert: gathered input, gate_up output, act output, product; + accumulator
        k = max(shape.experts_per_token, 1)
        mlp = k * a * (h + 4 * shape.intermediate_size) + a * h
    elif fam.gated_mlp:
        mlp = 3 * a * i
    else:
        mlp = fam.act_saved * a * i + a * i
    softcap = bool(fam.attn_softcap_attr and shape.features.get(fam.attn_softcap_attr))
    if softcap and attn_impl == "sdpa":
        attn_impl = "eager"
    if attn_impl == "eager":
        attn = 3 * a * qd + nh * prompt * (4 + a + (2 * a if softcap else 0))
    elif device == "cpu" and fam.cpu_math_attention:
        attn = 3 * 4 * qd + 2 * 4 * nh * prompt
    else:
        attn = a * (2 * qd + 2 * kvd) + 4 * nh
    norm = 4 * h + a * h if fam.norm != "layernorm" else a * h
    per_token = max(mlp, attn, norm) + 2 * a * h
    return tokens * per_token + s.batch * shape.vocab_size * (a + 4)


def estimate_inference(shape: ModelShape, s: InferSpec, hw: Hardware, attn_impl: str = "sdpa") -> Breakdown:
    """Two moments: the prefill (cache holds the prompt, one layer's temporaries) and the last
    decode step (cache holds seq_len tokens; DynamicCache's torch.cat briefly holds one layer's
    old and new cache; logits of one position per sequence)."""
    w = inference_weights_bytes(shape, s)
    kv = kv_cache_bytes(shape, s)
    prompt = s.prompt_len or s.seq_len
    kv_prompt = kv * prompt // s.seq_len
    pre = prefill_activation_bytes(shape, s, attn_impl, hw.device)
    grow = kv // max(shape.num_layers, 1)
    step_logits = s.batch * shape.vocab_size * (DTYPE_BYTES[s.precision] + 4)
    parts = {"weights": w, "kv_cache": kv, "kv_prompt": kv_prompt, "pre": pre, "grow": grow, "logits": step_logits}
    if hw.gpus > 1:  # tensor parallel: weights, KV heads and activations split
        parts = {k: _shard(v, hw.gpus) for k, v in parts.items()}
    phases = {
        "prefill": {"weights": parts["weights"], "kv_cache": parts["kv_prompt"], "prefill_activations": parts["pre"]},
        "decode": {"weights": parts["weights"], "kv_cache": parts["kv_cache"],
                   "transient": parts["grow"] + parts["logits"]},
    }
    phases = {k: {c: v for c, v in comps.items() if v} for k, comps in phases.items()}
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    return Breakdown(phases[peak], peak, totals, gpu_overhead_bytes(totals[peak], hw.device))


def estimate(plan: Plan, shape: ModelShape) -> Breakdown:
    """The analytic estimate for a validated plan."""
    if plan.task == "inference":
        return estimate_inference(shape, plan.inference, plan.hardware, plan.training.attn_impl)
    return estimate_training(shape, plan.training, plan.hardware)
