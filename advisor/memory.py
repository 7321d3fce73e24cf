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
import re

from advisor import liger
from advisor.activations import (  # noqa: F401  (re-exported: the estimate's parts)
    _ctx,
    activations_bytes,
    amp_cache_bytes,
    amp_head_cast_bytes,
    amp_weight_cast_bytes,
    backward_workspace_bytes,
    forward_up_sum_bytes,
    layer_activation_bytes_per_token,
    layer_weight_bytes,
    logits_bytes,
    masks_built,
    merged_expert_bytes,
    offloaded_host_bytes,
    offloaded_input_bytes,
    padding_forward_bytes,
    padding_kept_bytes,
    per_expert_dequant_bytes,
    per_expert_full_backward,
    qlora_dequant_bytes,
    recompute_bytes,
    recompute_end_transient_bytes,
    rope_bytes,
)
from advisor.breakdown import (  # noqa: F401
    ADAM8_BLOCK,
    ADAM8_MIN_SIZE,
    DTYPE_BYTES,
    PERSISTENT,
    Breakdown,
    compute_bytes,
    gpu_terms,
    nf4_bytes,
    param_bytes,
    residual_bytes,
    shard,
)
from advisor.families import analytic_coverage, family_of
from advisor.gpu_memory import attention_workspace_bytes
from advisor.inference import estimate_inference, kv_cache_bytes, layer_windows  # noqa: F401
from advisor.model import ModelShape
from advisor.software import layout, release_note, same_rules
from advisor.spec import Hardware, Plan, TrainSpec, padded_batches
from advisor.units import GIB, MIB


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
    return layout(shape, t.transformers).lora_params(t.lora.targets, t.lora.r)


def trainable_bytes_per_param(t: TrainSpec) -> int:
    return param_bytes(t.precision) if t.method == "full" else 4


# the towers of a multimodal wrapper (Gemma 3 4B-27B's SigLIP), as model._language_params names them: a text-only
# batch never runs them, so their parameters (and LoRA adapters) get no gradient, and torch's optimizers make
# no state for a parameter without one
_TOWER = re.compile(r"(^|\.)(vision_tower|audio_tower|vision_model|multi_modal_projector|embed_vision|embed_audio)"
                    r"(\.|$)")


def _in_language_model(path: str) -> bool:
    return not _TOWER.search(path)


def trained_params(shape: ModelShape, t: TrainSpec) -> int:
    """The trainable parameters a text-only training step gives a gradient: :func:`trainable_params` less a
    multimodal wrapper's vision or audio tower (measured: tiny Gemma 3 with a SigLIP tower, full and LoRA,
    against simulate; benchmarks/registry.py)."""
    if t.method == "full":
        return shape.params_language or shape.params_total
    shape = layout(shape, t.transformers)
    return sum(g.count * t.lora.r * g.rank_mult * (g.in_features + g.out_features)
               for g in shape.lora_groups(t.lora.targets) if _in_language_model(g.path))


def gradients_bytes(shape: ModelShape, t: TrainSpec) -> int:
    """One gradient per trained parameter in the parameter's dtype."""
    return trained_params(shape, t) * trainable_bytes_per_param(t)


def _trainable_tensors(shape: ModelShape, t: TrainSpec) -> list[tuple[int, int, int]]:
    """(rows, cols, count) of every trainable tensor that gets a gradient; cols == 1 for vectors."""
    if t.method != "full":
        r = t.lora.r
        out = []
        for g in shape.lora_groups(t.lora.targets):
            if not _in_language_model(g.path):
                continue
            out.append((r * g.rank_mult, g.in_features, g.count))  # lora_A.weight
            out.append((g.out_features, r * g.rank_mult, g.count))  # lora_B.weight
        return out
    linears = [g for g in shape.linears if _in_language_model(g.path)]
    out = [(g.out_features, g.in_features, g.count * g.experts) for g in linears]
    out += [(g.out_features, 1, g.count) for g in linears if g.bias]
    if shape.params_embedding:
        out.append((shape.vocab_size, shape.params_embedding // shape.vocab_size, 1))
    if shape.params_lm_head:
        out.append((shape.vocab_size, shape.params_lm_head // shape.vocab_size, 1))
    listed = sum(r * c * n for r, c, n in out)
    rest = (shape.params_language or shape.params_total) - listed
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
            return trained_params(shape, t) * b
        return 2 * largest * b
    if t.optimizer == "adafactor":
        return 3 * largest * 4
    if t.optimizer in ("adamw_8bit", "paged_adamw_8bit") and device == "cpu":
        # bitsandbytes' CPU fallback dequantizes both states to fp32 and works in fp32, tensor by
        # tensor (measured: 20 bytes per element of the largest tensor, 24 for half parameters)
        return largest * (20 + (4 if b == 2 else 0))
    return 0



DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed zero_optimization.reduce_bucket_size default (elements)


def moe_qlora_note(shape: ModelShape, t: TrainSpec, hw: Hardware) -> str | None:
    """Plain words for QLoRA on a mixture of experts with transformers 5: the fused 3-D expert
    tensors are not nn.Linear, so bitsandbytes leaves them unquantized (bitsandbytes issue #1849)
    and prepare_model_for_kbit_training casts them to fp32 with the other non-4-bit parameters."""
    if t.method != "qlora" or not shape.num_experts:
        return None
    mats = [(g.count * g.experts, g.in_features * g.out_features) for g in shape.linears
            if g.experts > 1 and not g.quantized]
    expert = sum(n * numel for n, numel in mats)
    if not expert:
        return None
    n = hw.gpus if hw.gpus > 1 and hw.zero >= 3 else 1
    sharded = fsdp_qlora(t, hw)  # FSDP: no fp32 casts, the experts stay in the compute dtype
    kept = (2 if sharded else 4) * expert // n
    cast = ("stay in the compute dtype (QLoRA under FSDP makes no fp32 casts)" if sharded else
            "are cast to fp32 by prepare_model_for_kbit_training")
    nf4 = sum(k * nf4_bytes(numel, t.double_quant) for k, numel in mats) // n
    bf16 = 2 * shape.params_total // max(hw.gpus, 1)
    per = " per GPU" if n > 1 else ""
    return (f"mixture of experts under QLoRA: transformers 5 fuses the experts into 3-D tensors, which "
            f"bitsandbytes does not quantize (bitsandbytes issue #1849), and they {cast}: "
            f"{kept / GIB:.1f} GiB of expert weights{per}, where 4-bit experts would take "
            f"{nf4 / GIB:.1f} GiB. What fits instead: LoRA in bf16 (all weights {bf16 / GIB:.1f} GiB per GPU "
            f"over {max(hw.gpus, 1)} GPU{'s' if hw.gpus > 1 else ''}; add GPUs with --zero 3 to shard them), or "
            "QLoRA on a stack that quantizes experts (transformers 4.x keeps one nn.Linear per expert: "
            "estimate that with --transformers 4.57)")


def moe_lora_note(shape: ModelShape, t: TrainSpec, hw: Hardware) -> str | None:
    """Plain words for LoRA on fused expert tensors (transformers 5): each layer's merged expert
    weights are materialized and kept for backward (activations.merged_expert_bytes)."""
    if t.method == "full":
        return None
    per_layer = merged_expert_bytes(shape, _ctx(shape, t, t.seq_len, hw.device))
    if not per_layer:
        return None
    kept = (f"{per_layer / GIB:.1f} GiB for the layer in backward (checkpointing on)" if t.grad_checkpointing else
            f"{per_layer * shape.num_layers / GIB:.1f} GiB for all {shape.num_layers} layers (checkpointing off)")
    return (f"LoRA on the fused expert tensors: peft adds B @ A to each layer's expert weights in every forward and "
            f"the merged weights stay for backward: {kept}; LoRA targets without the experts "
            "(e.g. --lora-targets q_proj,k_proj,v_proj,o_proj) avoid it")


def as_run(t: TrainSpec, hw: Hardware) -> TrainSpec:
    """The training settings as the run has them. ``mixed-bf16`` where nothing is sharded (one GPU, DDP) is what
    accelerate's ``mixed_precision: bf16`` runs there: ``torch.autocast`` over fp32 weights, amp-bf16
    (accelerate/accelerator.py @ 1.16.0: ``native_amp`` wraps the model's forward in autocast; no FSDP
    MixedPrecision, no DeepSpeed bf16 engine)."""
    if t.precision == "mixed-bf16" and not mixed_sharded(t, hw):
        return t.model_copy(update={"precision": "amp-bf16"})
    return t


def mixed_sharded(t: TrainSpec, hw: Hardware) -> str | None:
    """Which framework's mixed precision a ``mixed-bf16`` plan runs: "fsdp" (zero 3: FSDP's MixedPrecision,
    fp32 flat-parameter shards, bf16 gathered units) or "deepspeed" (zero 1-2: bf16 weights beside fp32 master
    partitions), None without sharding (then it is amp-bf16, :func:`as_run`)."""
    if t.precision != "mixed-bf16" or hw.gpus <= 1 or hw.zero == 0:
        return None
    return "fsdp" if hw.zero >= 3 else "deepspeed"


def mixed_note(mixed: str | None, asked: str, hw: Hardware) -> str | None:
    """What a ``mixed-bf16`` plan was estimated as, in words."""
    if mixed == "fsdp":
        return (f"mixed-bf16 under FSDP (accelerate's mixed_precision: bf16 = MixedPrecision with bf16 param, reduce "
                f"and buffer dtypes): fp32 weight, gradient and optimizer-state shards (1/{hw.gpus} each per GPU), "
                "each layer gathered in bf16 for its forward and backward, gradients computed and reduced in bf16")
    if mixed == "deepspeed":
        return (f"mixed-bf16 under DeepSpeed ZeRO-{hw.zero} (bf16 enabled): bf16 weights on every GPU, fp32 master "
                f"weights and optimizer states in 1/{hw.gpus} partitions, bf16 gradients"
                + (" partitioned" if hw.zero == 2 else "") + ", this partition's in fp32 at the optimizer step")
    if asked == "mixed-bf16":
        return ("mixed-bf16 without sharding (one GPU, or DDP with --zero 0) is accelerate's autocast over fp32 "
                "weights: estimated as amp-bf16; its fp32 masters are sharded with --gpus N --zero 3 (FSDP) or "
                "--zero 1/2 (DeepSpeed)")
    return None


def offload_note(shape: ModelShape, t: TrainSpec, hw: Hardware, host: int) -> str:
    """What offloading moves, in words."""
    one = offloaded_input_bytes(shape, t)
    where = ("pinned host memory (each block rounded up to a power of two by torch's pinned-memory cache)"
             if hw.device == "cuda" else "host memory, on the CPU the same RAM (component 'offloaded activations': "
             "nothing is saved there)")
    return (f"offloaded checkpoints: the {shape.num_layers} layers' saved inputs ({one / MIB:,.1f} MiB each) wait in "
            f"{where}, {host / GIB:.2f} GiB per {'GPU process' if hw.device == 'cuda' else 'process'}; backward "
            "copies one back at a time")


def liger_note(shape: ModelShape, t: TrainSpec, hw: Hardware) -> str:
    """What Liger's kernels change, in words, with what the figures rest on."""
    t = as_run(t, hw)
    plain = logits_bytes(shape, t)[0]
    fused = liger.loss_bytes(shape, t)[0]
    rows = min(liger.chunk_rows(t.micro_batch * t.seq_len, shape.vocab_size, shape.hidden_size),
               t.micro_batch * t.seq_len)
    where = "" if hw.device == "cuda" else "; Liger's kernels run on CUDA only, so tuneplan run refuses this plan here"
    return (f"Liger kernels: the fused linear cross-entropy never materializes the logits (the loss's forward peak "
            f"{fused / GIB:.2f} GiB instead of {plain / GIB:.2f} GiB: the hidden states' gradient, the head's when it "
            f"trains, {rows:,}-token chunks of logits); RMSNorm keeps its input only, SwiGLU recomputes its product "
            f"in backward. Read from Liger-Kernel's source ({liger.SOURCE}); the peak with Liger is checked against "
            f"its published HF Trainer runs (docs/accuracy.md){where}")


def fsdp_qlora(t: TrainSpec, hw: Hardware) -> bool:
    """QLoRA sharded by FSDP / ZeRO-3 over several GPUs (bnb_4bit_quant_storage in the compute dtype)."""
    return t.method == "qlora" and hw.gpus > 1 and hw.zero >= 3


def activation_spec(t: TrainSpec, hw: Hardware) -> TrainSpec:
    """The settings the activations follow (``t`` as :func:`as_run` gives it): QLoRA under FSDP keeps no
    prepare_model_for_kbit_training, so its other parameters and residual stream stay in the compute dtype --
    activations as LoRA's."""
    return t.model_copy(update={"method": "lora"}) if fsdp_qlora(t, hw) else t


def fsdp_qlora_weights(shape: ModelShape, t: TrainSpec) -> tuple[int, int]:
    """QLoRA under FSDP / ZeRO-3: (bytes in the flat parameters, bytes every rank holds whole).
    The flat parameters are the packed 4-bit values (stored in the compute dtype) and every other
    parameter in the compute dtype; they are sharded. The 4-bit quant state (absmax, the nested
    absmax and code book of double quantization) is an attribute of bitsandbytes' ``Params4bit``,
    not a parameter or buffer: FSDP flattens and shards only parameters, and each rank dequantizes
    the gathered weight of a whole layer with that layer's whole quant state, so every rank keeps
    all of it (measured on the CPU with real FSDP: tests/test_fsdp.py; the memory the published
    fms-acceleration 2-GPU QLoRA rows hold after training agrees with it: docs/accuracy.md)."""
    mats = [(g.count, g.in_features * g.out_features) for g in shape.linears if g.quantized]
    packed = sum(k * ((numel + 1) // 2) for k, numel in mats)
    state = sum(k * nf4_bytes(numel, t.double_quant) for k, numel in mats) - packed
    return packed + compute_bytes(t.precision) * (shape.params_total - shape.params_quantized), state


def training_phases(shape: ModelShape, t: TrainSpec, hw: Hardware, padded: bool = False) -> dict[str, dict[str, int]]:
    """Live components at each candidate moment of a steady-state step, per GPU. ``padded``: the batches
    carry padding (spec.padded_batches), so sdpa attention gets a mask (as it does in every batch of a family
    whose model always builds one: Family.always_masked)."""
    shape = layout(shape, t.transformers)
    t = as_run(t, hw)
    dev = hw.device
    n = hw.gpus if hw.gpus > 1 else 1
    z = hw.zero if n > 1 else 0
    w = weights_bytes(shape, t)
    mixed = mixed_sharded(t, hw)
    fsdp_q = fsdp_qlora(t, hw)
    ta = activation_spec(t, hw)
    replicated = 0
    if fsdp_q:
        # QLoRA under FSDP: the 4-bit weights are stored in the compute dtype (bnb_4bit_quant_storage)
        # so FSDP can flatten and shard them
        w, replicated = fsdp_qlora_weights(shape, t)
    lora = lora_adapter_bytes(shape, t)
    g = gradients_bytes(shape, t)
    o = optimizer_states_bytes(shape, t)
    master = step_grads = 0
    if mixed == "deepspeed":
        # DeepSpeed bf16 with ZeRO-1/2 (engine._cast_module_mixed_precision, zero/stage_1_and_2.py): the module's
        # weights are bf16 on every GPU, the fp32 master partition (single_partition_of_fp32_groups) is 1/n of
        # them; backward makes bf16 gradients; step() flattens this rank's partition of them into fp32 (its .grad)
        # and frees the bf16 ones, steps, and copies the partition back into the bf16 weights
        master = shard(w, n)
        w = w // 2
        step_grads = shard(g, n)
        g = g // 2
    if z >= 1:
        o = shard(o, n)
    if z >= 2:
        g_kept = shard(g, n)
    else:
        g_kept = g
    unit = root = 0
    if z >= 3:
        # FSDP full shard (each decoder layer a unit, the root holding the embeddings, the head and the
        # final norm; use_orig_params puts the frozen base weights in the same flat parameters). An
        # unsharded unit is a buffer of its own beside the rank's shard: a layer's while it computes,
        # and the next one's with BACKWARD_PRE prefetch in backward; the root's from the start of
        # forward to the end of backward (FSDP does not reshard the root after forward, it is needed
        # again first in backward). Measured on the CPU: benchmarks/fsdp_cpu.py.
        # (FSDP mixed precision: the units are gathered in its param_dtype, bf16, from fp32 shards)
        pb = compute_bytes(t.precision) if fsdp_q or mixed else param_bytes(t.precision)
        root = (shape.params_embedding + shape.params_lm_head) * pb
        if fsdp_q:  # the 4-bit layers, stored in the compute dtype, with their norms
            unit = (w - root) // max(shape.num_layers, 1)
        else:  # a decoder layer's parameters: its linears, norms and (MoE) fused expert tensors
            unit = ((shape.params_total - root // pb) // max(shape.num_layers, 1)) * pb
        unit = max(unit, 0)
        w = shard(w, n) + replicated
    ddp_buckets = 2 * 25 * MIB if n > 1 and z == 0 and t.method == "full" else 0
    # DeepSpeed ZeRO-1/2 (contiguous_gradients, its default): backward() allocates an IPG buffer of
    # reduce_bucket_size (5e8) elements in the model dtype (two with overlap_comm, off by default)
    zero_bucket = DS_REDUCE_BUCKET * (compute_bytes(t.precision) if mixed else param_bytes(t.precision)) \
        if n > 1 and z in (1, 2) else 0
    # a padded batch's mask, kept from the forward to the first layer's backward (checkpointing: to the end)
    # (and the masks an unpadded batch gets: Family.always_masked, sliding windows; activations.masks_built)
    built = masks_built(shape, ta, padded)
    mask = built * padding_kept_bytes(shape, ta, dev)
    acts = activations_bytes(shape, ta, dev, padded) + mask
    recompute = recompute_bytes(shape, ta, dev, padded)
    l_fwd, l_bwd = logits_bytes(shape, ta)
    if t.liger:  # the fused linear cross-entropy: no logits, the gradients made in the forward (advisor/liger.py)
        l_fwd, l_bwd = liger.loss_bytes(shape, ta)
    head_cast = amp_head_cast_bytes(shape, ta)  # the head's half weight, saved until its backward
    l_fwd, l_bwd = l_fwd + head_cast, l_bwd + head_cast
    amp_cache = amp_cache_bytes(shape, ta, dev)
    ws = backward_workspace_bytes(shape, ta)
    deq = qlora_dequant_bytes(shape, t)
    deq_bwd = per_expert_dequant_bytes(shape, t)  # 4.x's per-expert backward: freed before its widest moment
    opt_tmp = optimizer_step_transient_bytes(shape, t, dev)
    if z >= 1:
        opt_tmp = shard(opt_tmp, n)
    if mixed == "deepspeed":  # the fp32 partition the optimizer steps (its temporaries as torch's foreach AdamW)
        opt_tmp = shard(optimizer_step_transient_bytes(shape, t, dev), n)
    accum = g_kept if t.grad_accum > 1 else 0  # grads from earlier micro-batches stay until the step
    head_grad = layer_grad = emb_grad = root_grad = 0
    fam, _ = family_of(shape, t.transformers)
    ctx = _ctx(shape, ta, t.seq_len, dev, padded, layer_windows(shape)[0] if shape.num_layers else None)
    tokens = t.micro_batch * t.seq_len
    # with checkpointing transformers calls enable_input_require_grads: the first layer's input
    # needs a gradient as every other layer's does
    first = not t.grad_checkpointing
    first_layer_acts = (tokens * (layer_activation_bytes_per_token(shape, fam, ctx, first=first)
                                  + (8 if ctx.full else 0))
                        + layer_weight_bytes(shape, ctx, first=first))
    # non-reentrant checkpointing: the graph holds every layer's saved input (and the rotary
    # cos/sin every layer receives) until it is dropped
    gc_inputs = (tokens * shape.num_layers * ctx.a * shape.hidden_size + rope_bytes(shape, ta)
                 if t.grad_checkpointing else 0)
    first_layer_acts += mask if not t.grad_checkpointing else 0  # (with checkpointing: in gc_inputs)
    if t.liger:
        # Liger's RMSNorm keeps its input and one fp32 rstd, its SwiGLU recomputes act(gate) * up in backward, and
        # the fused loss needs no saved head input (advisor/liger.py): less kept in every layer that keeps its set
        # (all of them without checkpointing, the recomputed one with it) and outside the layers
        lay = tokens * liger.layer_saved_delta(shape, fam, ctx)
        first_layer_acts -= lay
        acts -= tokens * liger.head_saved_delta(shape, fam, ctx) + (0 if t.grad_checkpointing
                                                                     else shape.num_layers * lay)
        recompute -= lay if t.grad_checkpointing else 0
    gc_inputs += mask if t.grad_checkpointing else 0
    # offloaded checkpoints: every layer's saved input is in host memory from its forward until backward copies it
    # back for that layer's recomputation (benchmarks/offload_cpu.py). With frozen embeddings the first layer's
    # input stays on the device all the same: enable_input_require_grads makes the embedding output a leaf that
    # requires grad, and the graph's AccumulateGrad node holds it to the end of backward
    off_one = offloaded_input_bytes(shape, ta)
    off_kept = off_one if t.method != "full" else 0
    acts -= shape.num_layers * off_one - off_kept
    gc_inputs -= shape.num_layers * off_one - off_kept
    if t.method == "full":
        # mixed precision: a unit's gradient is computed in the bf16 of its gathered weights (FSDP reduce_dtype bf16,
        # then cast to the fp32 shard; DeepSpeed's bf16 .grad)
        b = compute_bytes(t.precision) if mixed else param_bytes(t.precision)
        # tied embeddings: the head's gradient is the token embedding's (vocab x hidden); learned
        # position embeddings (GPT-2's wpe) get theirs only in the embedding's backward, the last
        # op of backward, like an untied input embedding
        tied_head = 0 if shape.params_lm_head else min(shape.vocab_size * shape.hidden_size,
                                                        shape.params_embedding)
        head_grad = (shape.params_lm_head or tied_head) * b
        per_layer = (shape.params_language or shape.params_total) - shape.params_embedding - shape.params_lm_head
        layer_grad = (per_layer // max(shape.num_layers, 1)) * b  # incl. fused MoE experts
        emb_grad = (shape.params_embedding - tied_head) * b
        if z >= 3:
            # FSDP reduce-scatters each unit's gradient from its unsharded buffer: a layer's as it
            # finishes, the root's (head and embeddings, one flat parameter) at the end of backward
            head_grad, emb_grad = head_grad + emb_grad, 0
            root_grad = head_grad
        elif z >= 2:
            head_grad, emb_grad, layer_grad = shard(head_grad, n), shard(emb_grad, n), shard(layer_grad, n)
    # 4.x's per-expert linears: the layer's gradients and given-back experts' activations at its widest
    # backward moment (per_expert_full_backward); whole gradients only (sharded ones: the generic term)
    expert_grad, expert_freed = per_expert_full_backward(shape, ta, dev, padded) if z < 2 else (0, 0)
    if t.grad_accum > 1:
        head_grad = layer_grad = 0  # already in `accum`
        expert_grad = expert_freed = 0  # every gradient exists already: the first expert is the widest
    recompute_end = recompute_end_transient_bytes(shape, ta, dev)
    last_layer_grad = expert_grad or layer_grad
    if accum:
        first_grads = g_kept
    elif t.method == "full" and z >= 3:
        # under FSDP the layers' gradients are shards as they finish; the root's stays whole until
        # backward ends, beside the unit in backward, and neither has its shard yet (measured: the shards of
        # the first layer and the root counted too were +6% on a short full fine-tune, fsdp_mixed_cpu)
        b = compute_bytes(t.precision) if mixed else param_bytes(t.precision)
        not_yet = shard((head_grad + layer_grad) // b * trainable_bytes_per_param(t), n)
        first_grads = max(g_kept - not_yet, 0) + head_grad + layer_grad
    elif t.method == "full":
        first_grads = max(g_kept - layer_grad - emb_grad, 0) + expert_grad
    else:
        first_grads = g_kept - g_kept // max(shape.num_layers, 1)
    # the embedding dropout's mask, saved when the embedding output needs a gradient (checkpointing:
    # enable_input_require_grads; full: the embedding trains)
    emb_dropout = tokens * ctx.a * shape.hidden_size if ctx.dropout and t.grad_checkpointing else 0
    base = {"weights": w, "master_weights": master, "lora_adapters": lora, "optimizer_states": o}
    if accum:
        base["gradients"] = accum
    if ddp_buckets:
        base["ddp_buckets"] = ddp_buckets
    bwd = {**base, "zero_buckets": zero_bucket} if zero_bucket else base

    def gathered(layers: int) -> dict[str, int]:  # FSDP's unsharded units at a moment (see above)
        return {"zero3_gathered_params": root + layers * unit} if z >= 3 else {}

    up_sum = forward_up_sum_bytes(shape, ta, dev, padded)
    if up_sum:
        up_sum += built * padding_forward_bytes(shape, ta, dev)  # the boolean mask, alive while the layers run
    phases = {
        # no checkpointing: the last layer's up-projection LoRA sum (see forward_up_sum_bytes)
        "forward_last_layer": {**base, **gathered(1), "activations": acts, "transient": up_sum},
        "forward_end": {**base, **gathered(0), "activations": acts + amp_cache, "logits_and_loss": l_fwd,
                        "transient": deq},
        "backward_start": {**bwd, **gathered(1), "activations": acts, "logits_and_loss": l_bwd},
        "backward_last_layer": {**bwd, **gathered(2), "activations": acts + off_one + recompute - expert_freed,
                                "gradients": base.get("gradients", 0) + head_grad + last_layer_grad,
                                "transient": ws + deq_bwd},
        # checkpointing: the last layer (the first in backward) recomputed up to its widest moment, every
        # other layer's checkpoint still held (see recompute_end_transient_bytes)
        "backward_last_recompute": {**bwd, **gathered(1), "activations": acts + off_one + recompute,
                                    "gradients": base.get("gradients", 0), "transient": recompute_end},
        "backward_first_layer": {**bwd, **gathered(1), "activations": first_layer_acts + gc_inputs + off_one
                                 - expert_freed,
                                 "gradients": first_grads, "transient": ws + deq_bwd},
        "backward_end": {**bwd, "activations": gc_inputs, "gradients": g_kept},
        # FSDP: the root's gradient reduce-scattered last, from its unsharded buffer, while its parameters are still
        # gathered, beside every shard made (its own in the master dtype: measured to the byte, fsdp_mixed_cpu)
        "backward_root_reduce": {**bwd, **gathered(0), "activations": gc_inputs, "gradients": g_kept + root_grad},
        # checkpointing: the first layer recomputed up to its down projection (see
        # recompute_end_transient_bytes); its own gradients do not exist yet (LoRA: one layer's
        # adapters, every adapter lives in a layer)
        "backward_recompute": {**bwd, **gathered(1), "activations": first_layer_acts + gc_inputs + off_one
                               + emb_dropout,
                               "gradients": first_grads, "transient": recompute_end},
        "optimizer_step": {**base, "gradients": step_grads or g_kept, "transient": opt_tmp},
    }
    if not recompute_end:
        del phases["backward_recompute"], phases["backward_last_recompute"]
    if not up_sum:
        del phases["forward_last_layer"]
    if not root_grad:
        del phases["backward_root_reduce"]
    if off_one and dev == "cpu":
        # on the CPU the host copies are in the same RAM: counted at each moment they live (every layer's from the
        # forward on; backward frees each as it copies it back: measured, benchmarks/offload_cpu.py)
        L = shape.num_layers
        for name, held in (("forward_end", L), ("backward_start", L), ("backward_last_layer", L - 1),
                           ("backward_last_recompute", L - 1)):
            if name in phases:
                phases[name]["offloaded_activations"] = held * off_one
    return {k: {c: int(v) for c, v in comps.items() if v} for k, comps in phases.items()}


def estimate_training(shape: ModelShape, t: TrainSpec, hw: Hardware, padded: bool = False) -> Breakdown:
    shape = layout(shape, t.transformers)  # per-expert linears on transformers 4.x (advisor/software.py)
    phases = training_phases(shape, t, hw, padded)
    mixed, asked = mixed_sharded(t, hw), t.precision
    t = as_run(t, hw)
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    comps = phases[peak]
    notes = []
    fam, _ = family_of(shape, t.transformers)
    routed = analytic_coverage(shape)
    if routed:
        notes.append(routed + "; estimated as llama-style meanwhile")
    moe = moe_qlora_note(shape, t, hw)
    if moe:
        notes.append(moe)
    words = mixed_note(mixed, asked, hw)
    if words:
        notes.append(words)
    merged = moe_lora_note(shape, t, hw)
    if merged:
        notes.append(merged)
    if fsdp_qlora(t, hw):
        state = fsdp_qlora_weights(layout(shape, t.transformers), t)[1]
        notes.append("QLoRA sharded over GPUs (FSDP / ZeRO-3): the 4-bit weights are stored in the compute dtype "
                     "(bnb_4bit_quant_storage) and sharded, but their quant state (absmax constants, "
                     f"{state / GIB:.2f} GiB) is not a parameter and stays whole on every GPU; embeddings, "
                     "norms and the residual stream stay in the compute dtype (no prepare_model_for_kbit_training "
                     "fp32 casts)")
    pad = padding_note(shape, t, hw, padded, totals[peak])
    if pad:
        notes.append(pad)
    if fam.attn_softcap_attr and shape.features.get(fam.attn_softcap_attr) and t.attn_impl == "sdpa":
        notes.append("attention softcapping needs eager or flash attention (sdpa cannot); estimated as eager")
    persist = sum(comps.get(k, 0) for k in PERSISTENT)
    step = totals["optimizer_step"] - persist
    attn = attention_workspace_bytes(t.micro_batch, t.seq_len, shape.num_heads, shape.head_dim, t.attn_impl)
    ts = activation_spec(t, hw)
    host = offloaded_host_bytes(shape, ts, hw.device)
    if host:
        notes.append(offload_note(shape, ts, hw, host))
    if hw.device == "cpu":  # the host copies are in the phases' components (the same RAM)
        host = 0
    if t.liger:
        notes.append(liger_note(shape, t, hw))
    return Breakdown(comps, peak, totals, notes=notes, host={"offloaded_activations": host} if host else {},
                     **gpu_terms(totals[peak], comps, hw, training=True, step=step, attention=attn,
                                 harness=t.harness))



def estimate(plan: Plan, shape: ModelShape) -> Breakdown:
    """The analytic estimate for a validated plan. Its notes say when the architecture is not covered by the
    checked rules (families.analytic_coverage) and when the installed transformers is newer than the releases
    the rules were checked on (software.release_note)."""
    if plan.task == "inference":
        b = estimate_inference(shape, plan.inference, plan.hardware, plan.training.attn_impl)
        routed = analytic_coverage(shape)
        if routed:
            b.notes.append(routed)
    else:
        b = estimate_training(shape, plan.training, plan.hardware, padded_batches(plan))
    if plan.task == "inference" or same_rules(plan.training.transformers, "5"):
        newer = release_note("analytic")
        if newer:
            b.notes.append(newer)
    return b


def padding_note(shape: ModelShape, t: TrainSpec, hw: Hardware, padded: bool, peak: int) -> str | None:
    """What padding costs at the peak, in words, for a padded plan whose attention pays for it."""
    if not padded:
        return None
    if t.attn_impl == "flash_attention_2":
        return ("batches are padded (micro_batch > 1 or data.pad_to=seq_len): flash-attention's unpadding "
                "(varlen) path is not modelled; estimated as unpadded (data.padded=false, --no-padded, "
                "for data packed to exactly seq_len tokens)")
    unpadded = max(sum(v.values()) for v in training_phases(layout(shape, t.transformers), t, hw).values())
    extra = peak - unpadded
    if extra <= 0:
        return None
    return (f"batches are padded (micro_batch > 1 or data.pad_to=seq_len), so sdpa attention gets a mask: "
            f"+{extra / 2**20:,.0f} MiB at the peak (for data packed to exactly seq_len tokens: "
            f"data.padded=false, --no-padded)")

