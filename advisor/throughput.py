"""Step time and job time of a training plan, from first principles with a few calibrated constants.

Pure arithmetic on the ModelShape (no torch import; ~0.1 ms a call). docs/time-model.md gives every
formula with its source; benchmarks/throughput.py fits the free constants (CALIBRATION) on the
calibration rows of benchmarks/data/throughput_published.csv and reports every other row as validation.

One micro-step of T = micro_batch x seq_len positions per GPU costs, summed:
- matmuls (every linear group, the output head, LoRA's A and B): a roofline per GEMM of m x k x n,
  ``flops / (U x peak) + bytes / (BW_EFF x bandwidth)`` with flops = 2mkn and bytes = 2(mk + kn + mn),
  for the forward, the recompute under checkpointing, the input gradients (always) and the weight
  gradients (trainable weights only). U = U_MAX x the card generation's share (advisor/throughput_cards.py).
  MoE experts see m = T x top_k / experts rows each, so fine-grained experts run small, memory-bound GEMMs.
- attention (FlashAttention-2 / sdpa: the causal half of 4 s^2 d per head forward, 2.5x that backward;
  eager: the full square, 2x backward, and every s^2 score through memory: EAGER_FWD_BYTES forward,
  EAGER_BWD_BYTES backward per score);
- elementwise work (norms, activation, residuals, rope, MoE routing), memory-bound: counted bytes per
  token per layer per pass; the logits and loss over the vocabulary (LOSS_BYTES per logit, the fp32
  upcast and log-softmax and their gradients); peft's LoRA wrapper; QLoRA's fp32 output head;
- QLoRA: dequantizing each 4-bit weight to bf16 before each use;
- a fixed latency per layer and micro-step (kernel launches, Python: LAYER_LATENCY_S; more under
  FSDP / ZeRO-3 hooks: SHARD_LAYER_LATENCY_S);
- communication for several GPUs, exposed only where compute cannot hide it.
Per optimizer step: grad_accum micro-steps plus the optimizer's memory-bound pass over parameters,
gradients and states (counted per implementation from torch's and bitsandbytes' code) and gradient
clipping.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from advisor import throughput_cards as cards
from advisor.gpus import INTERCONNECTS  # one list: the GPU file's parser checks it too
from advisor.problems import Problem, Problems
from advisor.throughput_terms import (  # noqa: F401 - re-exported: the public names of the model
    BW_EFF,
    EAGER_BWD_BYTES,
    EAGER_FWD_BYTES,
    ELEM_H_BYTES,
    ELEM_H_FUSED_BYTES,
    ELEM_I_BYTES,
    ELEM_I_FUSED_BYTES,
    ELEM_I_PLAIN_BYTES,
    FP32_SHARE,
    HOST_LINK_EFF,
    LINK_EFF,
    LORA_IN_BYTES,
    LORA_IN_BYTES_HALF,
    LORA_IN_BYTES_NO_DROPOUT,
    LORA_OUT_BYTES,
    LORA_OUT_BYTES_HALF,
    LOSS_BYTES,
    MOE_ROUTE_BYTES,
    NF4_BYTES_PER_WEIGHT,
    OVERLAP,
    RUNNER,
    STRATEGIES,
    Stack,
    gated,
    loss_kind,
    optimizer_bytes,
)

if TYPE_CHECKING:
    from advisor.gpus import Gpu
    from advisor.model import ModelShape
    from advisor.spec import Plan

# --- free constants, fitted by `python benchmarks/throughput.py --fit` on the calibration rows only -------
# Stage A, LAYER_LATENCY_S: the Qwen README's LoRA runs on one A100 (batch 1, 256-8192 tokens).
# Stage B: fms-acceleration granite (PowerLM-3b full / LoRA / QLoRA on 1-2 A100-80GB under FSDP).
# Stage C, HOPPER_SHARE: llm-foundry's MPT runs with the same settings on A100 and H100.
# Validation rows and errors: docs/accuracy.md "Throughput".
CALIBRATION: dict[str, float] = {
    "U_MAX": 0.7577,  # achievable share of the A100's dense tensor-core peak in a large GEMM / flash attention
    "LAYER_LATENCY_S": 0.002677,  # seconds per decoder layer per micro-step (launches, Python)
    "SHARD_LAYER_LATENCY_S": 0.008254,  # more per layer under FSDP / ZeRO-3 (gather, free, reduce hooks)
    "DEQUANT_PASSES": 1.0,  # passes of the bitsandbytes dequantize kernel per use of a weight (floor: 1)
    "HOPPER_SHARE": 0.8417,  # Hopper's tensor efficiency relative to Ampere's
}
# measured / predicted tokens/s on the calibration rows of the plain stack, p10-p90, widened to at least +-15%
BAND = (0.85, 1.15)
CALIBRATED_ON = ("fitted 2026-12-07: stage A on 18 Qwen README rows, stage B on 12 fms granite rows, stage C on 14 "
                 "llm-foundry rows")
# what the calibration rows span: a plan outside it gets a wider range (time_range)
CALIBRATED_PARAMS = (0.7e9, 15e9)  # parameters of the calibration models (MPT-760M .. Qwen-14B)
CALIBRATED_SEQ = (256, 8192)



@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step per GPU, by part (they add up to ``step_s``)."""

    step_s: float
    parts: dict[str, float]
    tokens_per_step: int  # per GPU: micro_batch x seq_len x grad_accum (every position computed)
    flops_per_step: float  # model FLOPs per GPU per step (matmuls + attention, incl. recompute)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


def _peak_flops(gpu: Gpu, precision: str) -> float:
    half = gpu.bf16_tflops if precision in ("bf16", "amp-bf16", "mixed-bf16") and gpu.bf16_tflops else gpu.fp16_tflops
    half = float(half or gpu.tflops) * 1e12
    return half * FP32_SHARE if precision == "fp32" else half


def _gemm_s(m: float, k: int, n: int, count: float, peak: float, bw: float, u: float) -> float:
    """Roofline time of `count` GEMMs (m x k) @ (k x n) with 2-byte operands at tensor share `u`."""
    if m <= 0 or count <= 0:
        return 0.0
    flops = 2.0 * m * k * n
    byts = 2.0 * (m * k + k * n + m * n)
    return count * (flops / (u * peak) + byts / (BW_EFF * bw))


def _flops(m: float, k: int, n: int, count: float) -> float:
    return 2.0 * m * k * n * count


def strategy_of(plan: Plan) -> str:
    hw = plan.hardware
    return "single" if hw.gpus <= 1 else STRATEGIES[hw.zero]


def link_bandwidth(gpu: Gpu, num_gpus: int) -> float:
    """Bytes/s per GPU per direction of the slowest link a ring over `num_gpus` crosses."""
    if gpu.interconnect not in INTERCONNECTS:
        raise Problems(Problem(f"{gpu.name}: unknown interconnect {gpu.interconnect!r}", "hardware.gpu",
                               f"use one of {', '.join(INTERCONNECTS)} in the GPU file"))
    if num_gpus <= 1:
        return math.inf
    if gpu.interconnect == "none" or not gpu.link_gbs:
        raise Problems(Problem(f"{gpu.name} has no interconnect between GPUs in the GPU table, so "
                               f"{num_gpus} GPUs cannot be timed", "hardware.gpus",
                               "use --gpus 1, or give the card an interconnect and link_gbs"))
    gbs = gpu.link_gbs
    if num_gpus > gpu.gpus_per_node:
        gbs = min(gbs, gpu.internode_gbs)
    return gbs * 1e9


def offload_seconds(plan: Plan, shape: ModelShape, gpu: Gpu) -> float:
    """Offloaded activation checkpoints, per micro-step: every layer's saved input goes to host memory in the forward
    and comes back in the backward, each copy over the host link at HOST_LINK_EFF of its rate. The runner copies on
    the compute stream (advisor.stack.HostOffload, as torch's save_on_cpu and transformers' offload=True), so nothing
    hides them; an implementation with its own copy stream (torchtune's OffloadActivations) overlaps them instead
    (docs/time-model.md). 0 without offloading, and with unified memory (nothing to copy)."""
    from advisor.activations import offloaded_input_bytes
    from advisor.memory import activation_spec, as_run

    hw = plan.hardware
    one = offloaded_input_bytes(shape, activation_spec(as_run(plan.training, hw), hw))  # what the estimate moves
    if not one or not gpu.host_link_gbs:
        return 0.0
    return 2 * shape.num_layers * one / (gpu.host_link_gbs * 1e9 * HOST_LINK_EFF)


def step_time(plan: Plan, shape: ModelShape, gpu: Gpu, c: dict[str, float] | None = None,
              stack: Stack = RUNNER) -> StepTime:
    """Seconds per optimizer step of a training plan on `gpu` (hardware.gpus of them).

    `stack`: the loop around the model (default: the runner). Without autocast peft's fp32 adapters
    run their GEMMs in fp32; under autocast (amp-*, or the Trainer's --bf16) in half precision."""
    c = CALIBRATION if c is None else c
    from advisor.memory import gradients_bytes, trainable_params, weights_bytes

    t, hw = plan.training, plan.hardware
    n_gpu = hw.gpus
    peak = _peak_flops(gpu, t.precision)
    bw = gpu.bandwidth_gbs * 1e9
    if peak <= 0 or bw <= 0:
        raise Problems(Problem(f"{gpu.name} has no TFLOPS or bandwidth in the GPU table, so no time can be "
                               "estimated", "hardware.gpu", "add fp16_tflops and bandwidth_gbs to the GPU file"))
    u = c["U_MAX"] * cards.share(cards.generation(gpu), c)
    T = float(t.micro_batch * t.seq_len)
    s, b = t.seq_len, t.micro_batch
    ckpt = stack.recompute if t.grad_checkpointing else 0.0
    full = t.method == "full"
    lora_targets = set()
    if not full:
        lora_targets = {id(g) for g in shape.lora_groups(t.lora.targets)}
    liger = t.liger  # Liger's kernels: fused RMSNorm and RoPE, SwiGLU, the fused linear cross-entropy (LOSS_BYTES)
    fused = stack.fused_norms or stack.compiled or liger

    mm = attn = flops = lora_elem = 0.0
    # peft keeps adapters in fp32 (autocast_adapter_dtype=True) and casts the input to it: without
    # autocast the adapter GEMMs run in fp32, without tensor cores
    # mixed-bf16: accelerate autocasts the forward (FSDP, DDP); DeepSpeed's bf16 weights compute in bf16 alike
    autocast = t.precision.startswith(("amp", "mixed")) if stack.autocast is None else stack.autocast
    half_adapters = autocast or not stack.peft_wrapper
    apeak = peak * FP32_SHARE if not half_adapters and t.precision != "fp32" else peak
    if half_adapters:  # half-precision wrapper: dropout on the bf16 input, bf16 B output, scale, add
        lora_in, lora_out = (LORA_IN_BYTES_HALF if t.lora.dropout > 0 else 0), LORA_OUT_BYTES_HALF
        if stack.compiled:  # scale and add fused into one pass over the output (read 4, write 2)
            lora_out = 6
    else:
        lora_in = LORA_IN_BYTES if t.lora.dropout > 0 else LORA_IN_BYTES_NO_DROPOUT
        lora_out = LORA_OUT_BYTES
    fwd_passes = 1 + ckpt  # forward, recompute
    for g in shape.linears:
        e = max(g.experts, 1)
        m = T if e == 1 else T * max(shape.experts_per_token, 1) / e
        cnt = g.count * e
        per = _gemm_s(m, g.in_features, g.out_features, cnt, peak, bw, u)
        f = _flops(m, g.in_features, g.out_features, cnt)
        passes = fwd_passes + 1 + (1 if full else 0)  # + input grads + weight grads when trained
        mm += per * passes
        flops += f * passes
        if id(g) in lora_targets:
            r = t.lora.r * g.rank_mult // (e if e > 1 else 1)
            la = _gemm_s(m, g.in_features, r, cnt, apeak, bw, u) + _gemm_s(m, r, g.out_features, cnt, apeak, bw, u)
            mm += la * (fwd_passes + 2)
            flops += (_flops(m, g.in_features, r, cnt) + _flops(m, r, g.out_features, cnt)) * (fwd_passes + 2)
            # the wrapper around the frozen layer: cast x to the adapter dtype, dropout, scale, add
            lora_elem += m * cnt * (lora_in * g.in_features + lora_out * g.out_features) * (fwd_passes + 2)
    # output head: forward, input grads, weight grads when it is trained (full); never recomputed
    # QLoRA: prepare_model_for_kbit_training casts every non-quantized weight (the head too) to fp32
    fp32_head = strategy_of(plan) != "zero3" if stack.kbit_fp32_head is None else stack.kbit_fp32_head
    hpeak = peak * FP32_SHARE if t.method == "qlora" and fp32_head and t.precision != "fp32" else peak
    head = _gemm_s(T, shape.hidden_size, shape.vocab_size, 1, hpeak, bw, u)
    head_passes = 2 + (1 if full else 0)
    mm += head * head_passes
    flops += _flops(T, shape.hidden_size, shape.vocab_size, 1) * head_passes

    # attention: QK^T and PV, 4 s^2 d per head forward; causal kernels skip the upper half
    window = shape.features.get("sliding_window") if isinstance(shape.features, dict) else None
    ctx = min(s, int(window)) if window else s
    fa = 4.0 * b * s * ctx * shape.head_dim * shape.num_heads * shape.num_layers
    if t.attn_impl == "eager":
        a_fwd, a_bwd = fa, 2 * fa
        scores = b * shape.num_heads * s * ctx * shape.num_layers
        attn_mem = scores * (EAGER_FWD_BYTES * fwd_passes + EAGER_BWD_BYTES) / (BW_EFF * bw)
    else:
        a_fwd, a_bwd = fa / 2, 2.5 * fa / 2  # FlashAttention-2: 2 GEMMs forward, 5 backward
        attn_mem = 0.0
    attn_flops = a_fwd * fwd_passes + a_bwd
    attn = attn_flops / (u * peak) + attn_mem
    flops += attn_flops

    act_b = 4 if t.precision == "fp32" else 2
    is_gated = gated(shape)
    i_bytes = (ELEM_I_FUSED_BYTES if stack.compiled or liger else ELEM_I_BYTES) if is_gated else ELEM_I_PLAIN_BYTES
    per_tok = (ELEM_H_FUSED_BYTES if fused else ELEM_H_BYTES) * shape.hidden_size + i_bytes * shape.intermediate_size
    if shape.num_experts and shape.experts_per_token:
        per_tok += MOE_ROUTE_BYTES * shape.hidden_size * shape.experts_per_token
    elem = per_tok * act_b / 2 * T * shape.num_layers * (fwd_passes + 2) / (BW_EFF * bw)
    loss = LOSS_BYTES["liger" if liger else loss_kind(stack, t.transformers)] * T * shape.vocab_size / (BW_EFF * bw)
    per_layer = c["LAYER_LATENCY_S"]
    if strategy_of(plan) == "zero3" or stack.sharded_single:  # FSDP / ZeRO-3 hooks on every layer
        per_layer += c["SHARD_LAYER_LATENCY_S"]
    latency = per_layer * shape.num_layers * (fwd_passes + 2) / 4

    dequant = 0.0
    if t.method == "qlora":
        nq = shape.params_quantized
        dequant = nq * (NF4_BYTES_PER_WEIGHT + 2.0) * c["DEQUANT_PASSES"] * (fwd_passes + 1) / (BW_EFF * bw)

    lora_s = lora_elem / (BW_EFF * bw)
    offload = offload_seconds(plan, shape, gpu)
    micro = mm + attn + elem + loss + latency + dequant + lora_s + offload

    # communication per GPU (ring collectives: all-gather / reduce-scatter move (n-1)/n of the tensor)
    strat = strategy_of(plan)
    comm_micro = comm_step = 0.0
    if n_gpu > 1:
        link = link_bandwidth(gpu, n_gpu) * LINK_EFF
        ring = (n_gpu - 1) / n_gpu
        wbytes: float = weights_bytes(shape, t)
        gbytes: float = gradients_bytes(shape, t)
        if t.precision.startswith(("amp", "mixed")):  # FSDP / ZeRO mixed precision gathers and reduces in half
            wbytes, gbytes = wbytes / 2, gbytes / 2
        if strat == "zero3":  # FSDP full shard: all-gather in forward and backward, reduce-scatter gradients
            comm_micro = ring * (2 * wbytes + gbytes) / link
        elif strat == "ddp":  # all-reduce once per step (no_sync while accumulating)
            comm_step = 2 * ring * gbytes / link
        else:  # ZeRO-1/2: reduce-scatter gradients, all-gather the updated parameters
            comm_step = ring * (gbytes + (trainable_params(shape, t) * (2 if t.precision != "fp32" else 4))) / link
    ov = OVERLAP.get(strat, 0.0)
    exposed_micro = max(0.0, comm_micro - ov * micro)
    backward_share = (1 + (1 if full else 0)) / (fwd_passes + 1 + (1 if full else 0))
    exposed_step = max(0.0, comm_step - ov * micro * backward_share)

    # optimizer step: memory-bound over parameters, gradients and states (sharded from ZeRO-1 on)
    opt_bytes = optimizer_bytes(plan, shape, stack)
    if n_gpu > 1 and strat != "ddp":
        opt_bytes /= n_gpu
    opt = opt_bytes / (BW_EFF * bw)

    ga = t.grad_accum
    parts = {"matmul_s": mm * ga, "attention_s": attn * ga, "elementwise_s": elem * ga, "loss_s": loss * ga,
             "latency_s": latency * ga, "dequant_s": dequant * ga, "lora_wrapper_s": lora_s * ga,
             "comm_exposed_s": exposed_micro * ga + exposed_step, "optimizer_s": opt}
    if offload:
        parts["offload_s"] = offload * ga
    step = sum(parts.values())
    return StepTime(step, parts, int(T) * ga, flops * ga)


# --- what the range knows ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TimeRange:
    """Measured / predicted throughput the plan can expect: (low, high), and why it is wider than BAND."""

    low: float
    high: float
    outside: list[str] = field(default_factory=list)  # each way the plan is outside the calibration


def time_range(plan: Plan, shape: ModelShape, gpu: Gpu, c: dict[str, float] | None = None) -> TimeRange:
    """BAND (the calibration rows' spread) widened for each way the plan leaves the calibration:
    - a card of a generation without calibration rows: by the spread between the calibrated generations'
      shares (1 / HOPPER_SHARE): the card's share may be anywhere between them;
    - a model size, sequence length, precision, strategy or attention kernel the calibration rows do not
      span: each doubles the distance of the band's ends from 1 (an assumption: no measurement sets it)."""
    c = CALIBRATION if c is None else c
    lo, hi = BAND
    outside: list[str] = []
    gen = cards.generation(gpu)
    if not cards.is_calibrated(gen):
        outside.append(f"{gpu.name}: {cards.why_not(gen)}")
        spread = max(1.0 / c["HOPPER_SHARE"], c["HOPPER_SHARE"])
        lo, hi = lo / spread, hi * spread
    t = plan.training
    other = []
    n = shape.params_total
    if not CALIBRATED_PARAMS[0] <= n <= CALIBRATED_PARAMS[1]:
        other.append(f"{n / 1e9:.2g}B parameters (calibrated {CALIBRATED_PARAMS[0] / 1e9:.1f}-"
                     f"{CALIBRATED_PARAMS[1] / 1e9:.0f}B)")
    if not CALIBRATED_SEQ[0] <= t.seq_len <= CALIBRATED_SEQ[1]:
        other.append(f"seq_len {t.seq_len} (calibrated {CALIBRATED_SEQ[0]}-{CALIBRATED_SEQ[1]})")
    if t.precision not in ("bf16", "amp-bf16", "mixed-bf16"):
        other.append(f"{t.precision} (calibrated: bf16)")
    if shape.num_experts:
        other.append("a mixture of experts (no calibration row)")
    if t.attn_impl == "eager":
        other.append("eager attention (calibrated: flash / sdpa)")
    strat = strategy_of(plan)
    if strat in ("ddp", "zero1", "zero2"):
        other.append(f"{strat.upper() if strat == 'ddp' else 'ZeRO-' + strat[-1]} (calibrated: one GPU, FSDP)")
    if plan.hardware.gpus > gpu.gpus_per_node:
        other.append("several nodes (calibrated: one node)")
    for why in other:
        outside.append(why)
        lo, hi = 1 - 2 * (1 - lo), 1 + 2 * (hi - 1)
    return TimeRange(max(lo, 0.05), hi, outside)


# --- the job ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobTime:
    """Time and cost of a whole job (examples x avg_tokens x epochs tokens) for one plan on one GPU type."""

    step_s: float
    tokens_per_s_per_gpu: float
    tokens: int
    steps: int
    hours: float
    hours_low: float
    hours_high: float
    num_gpus: int
    gpu: str
    price_usd_hour: float | None
    cost_usd: float | None
    cost_low: float | None
    cost_high: float | None
    cost_note: str | None
    assumptions: str
    parts: dict[str, float]
    range_x: tuple[float, float] = BAND  # measured / predicted throughput the range allows (low, high)
    outside_calibration: list[str] = field(default_factory=list)  # why the range is wider than BAND
    positions_per_token: float = 1.0  # positions computed per counted token (padding), >= 1

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("step_s", "tokens_per_s_per_gpu", "hours", "hours_low", "hours_high", "positions_per_token"):
            d[k] = round(d[k], 4)
        for k in ("cost_usd", "cost_low", "cost_high"):
            d[k] = None if d[k] is None else round(d[k], 2)
        d["range_x"] = [round(x, 3) for x in self.range_x]
        d["parts"] = {k: round(v, 5) for k, v in self.parts.items()}
        return d


def positions_per_token(plan: Plan, avg_tokens: float) -> float:
    """Sequence positions computed per real token: 1 for packed data (or one sequence per batch padded to
    itself); data.pad_to=seq_len pads every example to seq_len. Padding to the longest of a batch depends
    on the length spread, which the job does not give: taken as 1 (the assumptions line says so)."""
    d, t = plan.data, plan.training
    if d.packing or d.pad_to != "seq_len":
        return 1.0
    return t.seq_len / max(1.0, min(float(avg_tokens), float(t.seq_len)))


def assumptions_line(plan: Plan, gpu: Gpu, rng: TimeRange | None = None, pad: float = 1.0) -> str:
    t = plan.training
    strat = strategy_of(plan)
    where = "1 GPU" if strat == "single" else f"{plan.hardware.gpus} GPUs, {strat} over {gpu.interconnect}"
    lo, hi = (rng.low, rng.high) if rng else BAND
    gen = cards.generation(gpu)
    u = CALIBRATION["U_MAX"] * cards.share(gen, CALIBRATION)
    d = plan.data
    if d.packing:
        padding = "examples packed into seq_len sequences (no padding)"
    elif d.pad_to == "seq_len":
        padding = f"every example padded to seq_len ({pad:.2g} positions per token)"
    elif t.micro_batch > 1:
        padding = "padding to each batch's longest not counted (pack the data to avoid it)"
    else:
        padding = "one sequence per micro-batch (no padding)"
    line = (f"{t.precision} on {gpu.name} ({where}); {u:.0%} of the tensor peak in large GEMMs "
            f"({cards.NAMES.get(gen, gen)}), {BW_EFF:.0%} of memory bandwidth; "
            f"{'checkpointing on' if t.grad_checkpointing else 'no checkpointing'}, {t.attn_impl} attention; "
            f"{padding}; range {lo:.2f}-{hi:.2f}x")
    if rng and rng.outside:
        line += " (wider: outside the calibration: " + "; ".join(rng.outside) + ")"
    else:
        line += " from the calibration residuals"
    return line


def priced(hours: float, rng: TimeRange, gpu: Gpu, n: int) -> tuple:
    """A job's hours on ``n`` of ``gpu``: (hours_low, hours_high, price, cost, cost_low, cost_high, cost_note). The
    time range is the throughput range turned over (time scales inversely); without a price the costs are None and
    the note says why."""
    h_low, h_high = hours / rng.high, hours / rng.low
    price = gpu.price_usd_hour
    if price is None:
        note = f"no hourly price for {gpu.name} in the GPU table ({gpu.price_source or 'none given'}), so no cost"
        return h_low, h_high, None, None, None, None, note
    return h_low, h_high, price, hours * n * price, h_low * n * price, h_high * n * price, None


def job_time(plan: Plan, shape: ModelShape, gpu: Gpu, examples: int, avg_tokens: int, epochs: float) -> JobTime:
    """Time and cost of training on `examples` examples of `avg_tokens` tokens for `epochs` epochs.

    Tokens are real tokens; the positions computed for them follow the plan's data settings
    (positions_per_token). Raises Problems for a job of no examples, non-finite or negative epochs, an
    unknown interconnect, or a plan that is not a training plan. A GPU without a price still gets its
    time; the cost is None and ``cost_note`` says why."""
    from advisor.job import job_problems

    problems = job_problems(examples, avg_tokens, epochs)
    if plan.task != "training":
        problems.append(Problem("time and cost are for training plans", "task", "use --task training"))
    if problems:
        raise Problems(problems)
    st = step_time(plan, shape, gpu)
    rng = time_range(plan, shape, gpu)
    n = plan.hardware.gpus
    pad = positions_per_token(plan, avg_tokens)
    tokens = int(examples * avg_tokens * epochs)
    positions = tokens * pad
    per_step_all = st.tokens_per_step * n
    steps = max(1, math.ceil(positions / per_step_all))
    secs = positions / (st.tokens_per_s * n)
    hours = secs / 3600
    h_low, h_high, price, cost, c_lo, c_hi, note = priced(hours, rng, gpu, n)
    return JobTime(st.step_s, st.tokens_per_s / pad, tokens, steps, hours, h_low, h_high, n, gpu.name, price, cost,
                   c_lo, c_hi, note, assumptions_line(plan, gpu, rng, pad), st.parts, (rng.low, rng.high),
                   list(rng.outside), pad)


def train_hours(shape: ModelShape, plan: Plan, gpu: Gpu, num_gpus: int, zero: int, tokens: float) -> float:
    """Hours to train `tokens` tokens (all GPUs together) with `plan` on `num_gpus` x `gpu` at ZeRO `zero`."""
    if num_gpus != plan.hardware.gpus or (zero if num_gpus > 1 else 0) != plan.hardware.zero:
        hw = plan.hardware.model_copy(update={"gpus": num_gpus, "zero": zero if num_gpus > 1 else 0})
        plan = plan.model_copy(update={"hardware": hw})
    st = step_time(plan, shape, gpu)
    return tokens / (st.tokens_per_s * num_gpus) / 3600
