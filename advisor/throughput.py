"""Step time and job time of a training plan, from first principles with a few calibrated constants.

Pure arithmetic on the ModelShape (no torch import; ~0.1 ms a call). docs/time-model.md gives every
formula with its source; benchmarks/throughput.py fits the free constants (CALIBRATION) on published
A100 runs of the plain Hugging Face stack and reports held-out validation rows separately.

One micro-step of T = micro_batch x seq_len tokens per GPU costs, summed:
- matmuls (every linear group, the output head, LoRA's A and B): a roofline per GEMM of m x k x n,
  ``flops / (U_MAX x peak) + bytes / (BW_EFF x bandwidth)`` with flops = 2mkn and bytes =
  2(mk + kn + mn) (bf16 operands), for the forward, the recompute under checkpointing, the input
  gradients (always) and the weight gradients (trainable weights only). MoE experts see
  m = T x top_k / experts rows each, so fine-grained experts run small, memory-bound GEMMs.
- attention scores and values (FlashAttention-2 / sdpa: causal half of 4 s^2 d per head forward,
  2.5x that backward; eager: the full square, 2x backward, plus the s^2 probabilities in memory);
- elementwise work (norms, activation, residuals, rope, MoE routing), memory-bound: counted bytes
  per token per layer per pass; the loss over the vocabulary (LOSS_BYTES per logit); peft's LoRA
  wrapper (cast, dropout, scale, add) and its fp32 adapter GEMMs; QLoRA's fp32 output head;
- QLoRA: dequantizing each 4-bit weight to bf16 before each use (read 0.5 B + absmax, write 2 B
  per weight), in the forward, the recompute and the backward;
- a fixed latency per layer and micro-step (kernel launches, Python: LAYER_LATENCY_S; more under
  FSDP / ZeRO-3 hooks: SHARD_LAYER_LATENCY_S);
- communication for several GPUs, exposed only where compute cannot hide it.
Per optimizer step: grad_accum micro-steps plus the optimizer's memory-bound pass over parameter,
gradient and state bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from advisor.gpus import INTERCONNECTS  # one list: the GPU file's parser checks it too
from advisor.problems import Problem, Problems

if TYPE_CHECKING:
    from advisor.gpus import Gpu
    from advisor.model import ModelShape
    from advisor.spec import Plan

# --- free constants, fitted by `python benchmarks/throughput.py --fit` on the fit rows only ---------
# Stage A, LAYER_LATENCY_S: the Qwen README's LoRA runs on one A100 (batch 1, 256-8192 tokens).
# Stage B, the rest: ../shared/calibration/fms_a100_80gb_granite.csv, the plain-stack rows (PowerLM-3b
# full / LoRA / QLoRA on 1-2 A100-80GB under FSDP). Held-out rows and errors: docs/accuracy.md "Throughput".
CALIBRATION: dict[str, float] = {
    "U_MAX": 0.749,  # achievable share of the dense tensor-core peak in a large GEMM / flash attention
    "LAYER_LATENCY_S": 0.00273,  # seconds per decoder layer per micro-step (launches, Python)
    "SHARD_LAYER_LATENCY_S": 0.008263,  # more per layer under FSDP / ZeRO-3 (gather, free, reduce hooks)
    "DEQUANT_PASSES": 1.0,  # passes of the bitsandbytes dequantize kernel per use of a weight (floor: 1)
    "LINK_EFF": 0.1886,  # share of the interconnect bandwidth the exposed collectives reach (FSDP, 2 GPUs)
}
# measured / predicted tokens/s on the fit rows, p10-p90, widened to at least +-15% (one model, one GPU)
BAND = (0.85, 1.15)
CALIBRATED_ON = "fitted 2026-12-01: stage A on 18 Qwen README rows, stage B on 12 fms granite rows"

# --- counted, not fitted (docs/time-model.md) -------------------------------------------------------
BW_EFF = 0.85  # achievable share of the memory bandwidth in streaming kernels (BabelStream on A100: ~1.7 of 2.0 TB/s)
# elementwise bytes per token per layer per pass (bf16): two RMSNorms with fp32 upcast (~24 B per hidden
# value each), two residual adds (12), rope on q and k (~16), dropout-free: 76 B per hidden value; the
# gated activation silu(gate) * up (read 2, write 1 in 2 bytes, plus silu's own read/write): 10 B per
# intermediate value
ELEM_H_BYTES = 76
ELEM_H_FUSED_BYTES = 28  # fused RMSNorm (read + write, 4 B) twice, residuals (12), fused rotary (~8)
ELEM_I_BYTES = 10
# MoE routing per token per layer and chosen expert: gather the token (read + write h), index_add the
# expert output back (read 2h, write h) in 2-byte values
MOE_ROUTE_BYTES = 10
LOSS_BYTES = 24  # per logit: bf16 logits written/read, fp32 upcast, log-softmax, its gradient, back to bf16
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
OPT_PASSES = 3.0  # torch foreach AdamW reads and writes parameter, gradient and states about 3 times
FP32_SHARE = 1 / 16  # fp32 without tensor cores: A100 19.5 of 312 TFLOPS (torch does not use TF32 by default)
# share of the communication time that compute can hide, by strategy
OVERLAP = {"ddp": 0.67, "zero1": 0.5, "zero2": 0.5, "zero3": 0.9}
STRATEGIES = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per 64 weights (before double quant)


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step per GPU, by part (they add up to ``step_s``)."""

    step_s: float
    parts: dict[str, float]
    tokens_per_step: int  # per GPU: micro_batch x seq_len x grad_accum
    flops_per_step: float  # model FLOPs per GPU per step (matmuls + attention, incl. recompute)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s



def _peak_flops(gpu: Gpu, precision: str) -> float:
    half = gpu.bf16_tflops if precision in ("bf16", "amp-bf16") and gpu.bf16_tflops else gpu.fp16_tflops
    half = float(half or gpu.tflops) * 1e12
    return half * FP32_SHARE if precision == "fp32" else half


def _gemm_s(m: float, k: int, n: int, count: float, peak: float, bw: float, c: dict[str, float]) -> float:
    """Roofline time of `count` GEMMs (m x k) @ (k x n) with 2-byte operands."""
    if m <= 0 or count <= 0:
        return 0.0
    flops = 2.0 * m * k * n
    byts = 2.0 * (m * k + k * n + m * n)
    return count * (flops / (c["U_MAX"] * peak) + byts / (BW_EFF * bw))


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


@dataclass(frozen=True)
class Stack:
    """What the training loop around the model does. The default is tuneplan's runner (transformers +
    peft, advisor/stack.py); the calibration describes the published runs with it."""

    autocast: bool | None = None  # forward under bf16/fp16 autocast; None: from the precision (amp-* only)
    fused_norms: bool = False  # fused RMSNorm / rotary kernels (flash-attn's) instead of transformers' ops
    sharded_single: bool = False  # FSDP / ZeRO-3 wrapping even on one GPU (the fms harness does it)
    # QLoRA: prepare_model_for_kbit_training casts the output head to fp32; None: the runner's rule (it
    # does so unless the model is sharded with FSDP / ZeRO-3, see advisor/stack.py)
    kbit_fp32_head: bool | None = None


RUNNER = Stack()


def step_time(plan: Plan, shape: ModelShape, gpu: Gpu, c: dict[str, float] | None = None,
              stack: Stack = RUNNER) -> StepTime:
    """Seconds per optimizer step of a training plan on `gpu` (hardware.gpus of them).

    `stack`: the loop around the model (default: the runner). Without autocast peft's fp32 adapters
    run their GEMMs in fp32; under autocast (amp-*, or the Trainer's --bf16) in half precision."""
    c = CALIBRATION if c is None else c
    from advisor.memory import gradients_bytes, optimizer_states_bytes, trainable_params, weights_bytes

    t, hw = plan.training, plan.hardware
    n_gpu = hw.gpus
    peak = _peak_flops(gpu, t.precision)
    bw = gpu.bandwidth_gbs * 1e9
    if peak <= 0 or bw <= 0:
        raise Problems(Problem(f"{gpu.name} has no TFLOPS or bandwidth in the GPU table, so no time can be "
                               "estimated", "hardware.gpu", "add fp16_tflops and bandwidth_gbs to the GPU file"))
    T = float(t.micro_batch * t.seq_len)
    s, b = t.seq_len, t.micro_batch
    ckpt = 1 if t.grad_checkpointing else 0
    full = t.method == "full"
    lora_targets = set()
    if not full:
        lora_targets = {id(g) for g in shape.lora_groups(t.lora.targets)}

    mm = attn = flops = lora_elem = 0.0
    # peft keeps adapters in fp32 (autocast_adapter_dtype=True) and casts the input to it: without
    # autocast the adapter GEMMs run in fp32, without tensor cores
    autocast = t.precision.startswith("amp") if stack.autocast is None else stack.autocast
    apeak = peak * FP32_SHARE if not autocast and t.precision != "fp32" else peak
    if autocast:  # half-precision wrapper: dropout on the bf16 input, bf16 B output, scale, add
        lora_in, lora_out = (LORA_IN_BYTES_HALF if t.lora.dropout > 0 else 0), LORA_OUT_BYTES_HALF
    else:
        lora_in = LORA_IN_BYTES if t.lora.dropout > 0 else LORA_IN_BYTES_NO_DROPOUT
        lora_out = LORA_OUT_BYTES
    fwd_passes = 1 + ckpt  # forward, recompute
    for g in shape.linears:
        e = max(g.experts, 1)
        m = T if e == 1 else T * max(shape.experts_per_token, 1) / e
        cnt = g.count * e
        per = _gemm_s(m, g.in_features, g.out_features, cnt, peak, bw, c)
        f = _flops(m, g.in_features, g.out_features, cnt)
        passes = fwd_passes + 1 + (1 if full else 0)  # + input grads + weight grads when trained
        mm += per * passes
        flops += f * passes
        if id(g) in lora_targets:
            r = t.lora.r * g.rank_mult // (e if e > 1 else 1)
            la = _gemm_s(m, g.in_features, r, cnt, apeak, bw, c) + _gemm_s(m, r, g.out_features, cnt, apeak, bw, c)
            mm += la * (fwd_passes + 2)
            flops += (_flops(m, g.in_features, r, cnt) + _flops(m, r, g.out_features, cnt)) * (fwd_passes + 2)
            # peft's wrapper around the frozen layer: cast x to the adapter dtype, dropout, scale, add
            lora_elem += m * cnt * (lora_in * g.in_features + lora_out * g.out_features) * (fwd_passes + 2)
    # output head: forward, input grads, weight grads when it is trained (full); never recomputed
    # QLoRA: prepare_model_for_kbit_training casts every non-quantized weight (the head too) to fp32
    fp32_head = strategy_of(plan) != "zero3" if stack.kbit_fp32_head is None else stack.kbit_fp32_head
    hpeak = peak * FP32_SHARE if t.method == "qlora" and fp32_head and t.precision != "fp32" else peak
    head = _gemm_s(T, shape.hidden_size, shape.vocab_size, 1, hpeak, bw, c)
    head_passes = 2 + (1 if full else 0)
    mm += head * head_passes
    flops += _flops(T, shape.hidden_size, shape.vocab_size, 1) * head_passes

    # attention: QK^T and PV, 4 s^2 d per head forward; causal kernels skip the upper half
    window = shape.features.get("sliding_window") if isinstance(shape.features, dict) else None
    ctx = min(s, int(window)) if window else s
    fa = 4.0 * b * s * ctx * shape.head_dim * shape.num_heads * shape.num_layers
    if t.attn_impl == "eager":
        a_fwd, a_bwd = fa, 2 * fa
        probs = b * shape.num_heads * s * ctx * shape.num_layers * (2 + 4 + 2)  # scores, fp32 softmax, probs
        attn_mem = probs * (fwd_passes + 2) / (BW_EFF * bw)
    else:
        a_fwd, a_bwd = fa / 2, 2.5 * fa / 2  # FlashAttention-2: 2 GEMMs forward, 5 backward
        attn_mem = 0.0
    attn_flops = a_fwd * fwd_passes + a_bwd
    attn = attn_flops / (c["U_MAX"] * peak) + attn_mem
    flops += attn_flops

    act_b = 4 if t.precision == "fp32" else 2
    per_tok = (ELEM_H_FUSED_BYTES if stack.fused_norms else ELEM_H_BYTES) * shape.hidden_size + \
        ELEM_I_BYTES * shape.intermediate_size
    if shape.num_experts and shape.experts_per_token:
        per_tok += MOE_ROUTE_BYTES * shape.hidden_size * shape.experts_per_token
    elem = per_tok * act_b / 2 * T * shape.num_layers * (fwd_passes + 2) / (BW_EFF * bw)
    loss = LOSS_BYTES * T * shape.vocab_size / (BW_EFF * bw)
    per_layer = c["LAYER_LATENCY_S"]
    if strategy_of(plan) == "zero3" or stack.sharded_single:  # FSDP / ZeRO-3 hooks on every layer
        per_layer += c["SHARD_LAYER_LATENCY_S"]
    latency = per_layer * shape.num_layers * (fwd_passes + 2) / 4

    dequant = 0.0
    if t.method == "qlora":
        nq = shape.params_quantized
        dequant = nq * (NF4_BYTES_PER_WEIGHT + 2.0) * c["DEQUANT_PASSES"] * (fwd_passes + 1) / (BW_EFF * bw)

    lora_s = lora_elem / (BW_EFF * bw)
    micro = mm + attn + elem + loss + latency + dequant + lora_s

    # communication per GPU (ring collectives: all-gather / reduce-scatter move (n-1)/n of the tensor)
    strat = strategy_of(plan)
    comm_micro = comm_step = 0.0
    if n_gpu > 1:
        link = link_bandwidth(gpu, n_gpu) * c["LINK_EFF"]
        ring = (n_gpu - 1) / n_gpu
        wbytes = weights_bytes(shape, t)
        gbytes = gradients_bytes(shape, t)
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
    tb = trainable_params(shape, t) * (2 if (full and t.precision in ("bf16", "fp16")) else 4)
    opt_bytes = OPT_PASSES * (2 * tb + gradients_bytes(shape, t) + optimizer_states_bytes(shape, t))
    if n_gpu > 1 and strat != "ddp":
        opt_bytes /= n_gpu
    opt = opt_bytes / (BW_EFF * bw) if t.optimizer != "sgd" else tb * 3 / (BW_EFF * bw)

    ga = t.grad_accum
    parts = {"matmul_s": mm * ga, "attention_s": attn * ga, "elementwise_s": elem * ga, "loss_s": loss * ga,
             "latency_s": latency * ga, "dequant_s": dequant * ga, "lora_wrapper_s": lora_s * ga,
             "comm_exposed_s": exposed_micro * ga + exposed_step, "optimizer_s": opt}
    step = sum(parts.values())
    return StepTime(step, parts, int(T) * ga, flops * ga)


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

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("step_s", "tokens_per_s_per_gpu", "hours", "hours_low", "hours_high"):
            d[k] = round(d[k], 4)
        for k in ("cost_usd", "cost_low", "cost_high"):
            d[k] = None if d[k] is None else round(d[k], 2)
        d["parts"] = {k: round(v, 5) for k, v in self.parts.items()}
        return d


def assumptions_line(plan: Plan, gpu: Gpu) -> str:
    t = plan.training
    strat = strategy_of(plan)
    where = "1 GPU" if strat == "single" else f"{plan.hardware.gpus} GPUs, {strat} over {gpu.interconnect}"
    lo, hi = BAND
    return (f"{t.precision} on {gpu.name} ({where}); {CALIBRATION['U_MAX']:.0%} of the tensor peak in large "
            f"GEMMs, {BW_EFF:.0%} of memory bandwidth; "
            f"{'checkpointing on' if t.grad_checkpointing else 'no checkpointing'}, {t.attn_impl} attention; "
            f"every sequence seq_len tokens (padding computed as tokens); "
            f"range {lo:.2f}-{hi:.2f}x from the calibration residuals")


def job_time(plan: Plan, shape: ModelShape, gpu: Gpu, examples: int, avg_tokens: int, epochs: float) -> JobTime:
    """Time and cost of training on `examples` examples of `avg_tokens` tokens for `epochs` epochs.

    Tokens are taken as packed into full sequences of seq_len (padding is not counted). Raises
    Problems for a job of no examples, non-finite or negative epochs, an unknown interconnect, or a
    plan that is not a training plan. A GPU without a price still gets its time; the cost is None and
    ``cost_note`` says why."""
    from advisor.job import job_problems

    problems = job_problems(examples, avg_tokens, epochs)
    if plan.task != "training":
        problems.append(Problem("time and cost are for training plans", "task", "use --task training"))
    if problems:
        raise Problems(problems)
    st = step_time(plan, shape, gpu)
    n = plan.hardware.gpus
    tokens = int(examples * avg_tokens * epochs)
    per_step_all = st.tokens_per_step * n
    steps = max(1, math.ceil(tokens / per_step_all))
    secs = tokens / (st.tokens_per_s * n)
    hours = secs / 3600
    lo, hi = BAND  # measured / predicted throughput p10, p90: time scales inversely
    h_low, h_high = hours / hi, hours / lo
    price = gpu.price_usd_hour
    if price is None:
        cost = c_lo = c_hi = None
        note = f"no hourly price for {gpu.name} in the GPU table ({gpu.price_source or 'none given'}), so no cost"
    else:
        cost, c_lo, c_hi = hours * n * price, h_low * n * price, h_high * n * price
        note = None
    return JobTime(st.step_s, st.tokens_per_s, tokens, steps, hours, h_low, h_high, n, gpu.name, price, cost,
                   c_lo, c_hi, note, assumptions_line(plan, gpu), st.parts)


def train_hours(shape: ModelShape, plan: Plan, gpu: Gpu, num_gpus: int, zero: int, tokens: float) -> float:
    """Hours to train `tokens` tokens (all GPUs together) with `plan` on `num_gpus` x `gpu` at ZeRO `zero`."""
    if num_gpus != plan.hardware.gpus or (zero if num_gpus > 1 else 0) != plan.hardware.zero:
        hw = plan.hardware.model_copy(update={"gpus": num_gpus, "zero": zero if num_gpus > 1 else 0})
        plan = plan.model_copy(update={"hardware": hw})
    st = step_time(plan, shape, gpu)
    return tokens / (st.tokens_per_s * num_gpus) / 3600
