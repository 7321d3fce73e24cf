"""Advice: which method, GPU, GPU count, micro-batch, and what the run will take in hours and dollars.

Pure arithmetic on top of :func:`advisor.memory.estimate` (about 50 microseconds a call), so a
whole search over methods x checkpointing x micro-batches x GPU counts x ZeRO stages x the GPU table
takes a fraction of a second. No torch import. docs/advice.md explains every rule and its source.

The search, for each GPU and each method (full / lora / qlora):
1. one GPU; checkpointing off and on; for each, the largest micro-batch (powers of two up to the
   target effective batch) whose peak fits, with gradient accumulation reaching the target;
2. only when one GPU cannot hold the job (and the user did not fix the count): 2, 4, 8, ... 64
   GPUs, each with DDP (ZeRO-0) and ZeRO-1/2/3, stopping at the smallest count that fits.
"Fits" is the one policy, advisor.policy.fit_verdict on the estimate's per-GPU peak and its high end,
made strict at the edge (:func:`advice_fit`): the advice never proposes a plan whose expected peak, with
the known error of plans of its kind added (advisor.gpu_memory.known_error), is over the card, even where
the verdict would call it "tight" because only the allocator's cache is over. "fits" is preferred over
"tight". More GPUs are tried only while sharding can lower what overflows (weights, gradients and
optimizer states shard; activations and logits do not). When nothing fits, :func:`nearest_plans` lists
the nearest plans that do. Time and cost come from advisor.throughput, the same model the estimate and
the GPU table use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from advisor import throughput
from advisor.gpus import Gpu, gpu_table
from advisor.guide import FULL_FINETUNE_EXAMPLES
from advisor.liger import offered as liger_offered
from advisor.limits import largest as _largest
from advisor.memory import estimate
from advisor.model import ModelShape
from advisor.policy import TIGHT_SHARE, Verdict, breakdown_verdict
from advisor.policy import precision_for as precision_for  # noqa: PLC0414
from advisor.spec import METHODS, Plan
from advisor.units import duration as duration  # noqa: PLC0414  (re-exported for the front ends)
from advisor.units import gib_str

# --- assumptions, in one place (docs/advice.md) -------------------------------------------------
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
SMALL_MODEL_PARAMS = 3.2e9  # "<= ~3B": Llama-3.2-3B (3.21B) and Qwen2.5-3B (3.09B) count as small
STRATEGY = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3/fsdp"}
METHOD_WORDS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


class AdviceError(ValueError):
    """Inputs the advisor cannot work with, with the fix."""


def gib(b: float) -> str:
    """Bytes with the unit, one decimal ('12.3 GiB'), for the reasons."""
    return gib_str(b, 1)


@dataclass
class Option:
    """One way to run the job: a method on a number of GPUs of one kind, and whether it fits."""

    method: str
    gpu: str
    num_gpus: int
    zero: int
    strategy: str
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    peak_reserved_bytes: int
    capacity_bytes: int
    fits: bool
    hours: float | None
    cost_usd: float | None
    reasons: list[str] = field(default_factory=list)
    precision: str = "bf16"
    within_budget: bool | None = None
    gpu_id: str = ""
    status: str = ""  # the fit verdict at the chosen micro-batch: fits / tight / oom
    tokens_per_s_per_gpu: float | None = None

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.num_gpus

    def changes(self) -> dict[str, Any]:
        """The option as plan changes (plan field -> value): what `recommend --save` writes and the app applies."""
        return {"training.method": self.method, "training.precision": self.precision,
                "training.micro_batch": self.micro_batch, "training.grad_accum": self.grad_accum,
                "training.grad_checkpointing": self.gradient_checkpointing, "hardware.gpu": self.gpu_id or self.gpu,
                "hardware.gpus": self.num_gpus, "hardware.zero": self.zero}

    def to_json(self) -> dict:
        d = asdict(self)
        d["hours"] = None if self.hours is None else round(self.hours, 3)
        d["cost_usd"] = None if self.cost_usd is None else round(self.cost_usd, 2)
        d["effective_batch"] = self.effective_batch
        return d


@dataclass
class Advice:
    choice: Option | None
    options: list[Option]
    job: dict = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nearest: list[Nearest] = field(default_factory=list)  # when nothing fits: the nearest plans that do

    def to_json(self) -> dict:
        return {"choice": self.choice.to_json() if self.choice else None,
                "options": [o.to_json() for o in self.options], "nearest": [n.to_json() for n in self.nearest],
                "job": self.job, "assumptions": self.assumptions, "notes": self.notes}


# --- the practitioner's preference --------------------------------------------------------------

def method_rank(method: str, shape: ModelShape, examples: int) -> tuple[int, str]:
    """Order among methods that fit (lower is preferred), with the reason in words.

    - Full fine-tuning first, but only for a small model (<= ~3B parameters: cheap, and LoRA's
      savings matter little) or with many examples (>= 10,000: enough data to move all weights
      without overfitting). Otherwise it costs several times LoRA's memory for little gain, and
      it is ranked last.
    - LoRA in bf16 next: it matches full fine-tuning on most instruction tasks (Hu et al. 2021)
      and is faster and more exact than QLoRA (no dequantization, no 4-bit rounding).
    - QLoRA last among the adapter methods: the fallback when bf16 weights do not fit
      (Dettmers et al. 2023: same quality as 16-bit LoRA, slower).
    Fewer GPUs beat a preferred method (see :func:`_choice_key`), and within one method no
    checkpointing beats checkpointing, because it is about a quarter faster.
    """
    if method == "full":
        small = shape.params_total <= SMALL_MODEL_PARAMS
        many = examples >= FULL_FINETUNE_EXAMPLES
        if small or many:
            why = (f"the model is small ({shape.params_total / 1e9:.1f}B parameters, <= 3B)" if small else
                   f"{examples:,} examples (>= {FULL_FINETUNE_EXAMPLES:,}) justify training every weight")
            return 0, f"full fine-tuning is preferred: {why}"
        return 3, (f"full fine-tuning is ranked last: a {shape.params_total / 1e9:.1f}B model with {examples:,} "
                   f"examples (< {FULL_FINETUNE_EXAMPLES:,}) gains little from it over LoRA")
    if method == "lora":
        return 1, "LoRA (bf16 weights) is preferred over QLoRA: faster, and no 4-bit rounding of the frozen weights"
    return 2, "QLoRA (4-bit frozen weights) comes after LoRA: the fallback when bf16 weights do not fit"


# --- time and cost ------------------------------------------------------------------------------

def matmul_params(shape: ModelShape) -> int:
    """Parameters a token passes through in matmuls: every linear layer plus the output head
    (the input embedding is a lookup). MoE: only the routed experts' share of the expert weights."""
    n = shape.params_total - shape.params_embedding + shape.vocab_size * shape.hidden_size * \
        (1 if shape.tie_word_embeddings else 0)
    if shape.num_experts and shape.experts_per_token:
        experts = shape.num_layers * shape.num_experts * 3 * shape.hidden_size * shape.intermediate_size
        experts = min(experts, n)
        n -= experts - experts * shape.experts_per_token // shape.num_experts
    return n


def flops_per_token(shape: ModelShape, plan: Plan) -> float:
    """Training FLOPs per token (Kaplan et al. 2020; Hoffmann et al. 2022: C = 6N per token).
    full: forward 2N + backward 4N (input and weight gradients) = 6N.
    lora/qlora: forward 2N + backward input-gradients 2N (frozen weights need no weight gradient)
    = 4N, plus 6 N_lora for the adapters. Gradient checkpointing adds one more forward (2N).
    A summary for the reasons; the time itself is advisor.throughput.step_time (per GEMM, attention,
    memory-bound work, QLoRA dequantization, communication)."""
    from advisor.memory import trainable_params

    t = plan.training
    n = matmul_params(shape)
    f = 6 * n if t.method == "full" else 4 * n + 6 * trainable_params(shape, t)
    if t.grad_checkpointing:
        f += 2 * n
    return float(f)


def train_hours(shape: ModelShape, plan: Plan, gpu: Gpu, num_gpus: int, zero: int, tokens: float) -> float:
    """Hours for `tokens` tokens (all GPUs together): advisor.throughput's step-time model."""
    return throughput.train_hours(shape, plan, gpu, num_gpus, zero, tokens)


# --- the search ---------------------------------------------------------------------------------

def _plan(base: Plan, method: str, precision: str, gc: bool, mb: int, accum: int, n: int, z: int) -> Plan:
    t = base.training.model_copy(update={"method": method, "precision": precision, "grad_checkpointing": gc,
                                         "micro_batch": mb, "grad_accum": accum})
    hw = base.hardware.model_copy(update={"gpus": n, "zero": z if n > 1 else 0, "device": "cuda"})
    return base.model_copy(update={"task": "training", "training": t, "hardware": hw})


def micro_batches(target: int) -> list[int]:
    out, mb = [], 1
    while mb <= target:
        out.append(mb)
        mb *= 2
    return out


def accum_for(target: int, mb: int, n: int) -> int:
    return max(1, math.ceil(target / (mb * n)))


@dataclass
class _Fit:
    mb: int
    accum: int
    peak: int
    next_peak: int | None  # the next micro-batch up, which did not fit or was only tight (None: target reached)
    status: str = "fits"
    next_status: str = ""  # that micro-batch's verdict; "cache": tight because only the allocator's cache is over


def verdict(plan: Plan, shape: ModelShape, gpu: Gpu) -> Verdict:
    """The one fit verdict of a plan on a card (advisor.policy.fit_verdict on the analytic estimate)."""
    return breakdown_verdict(estimate(plan, shape), gpu.memory_bytes)


@dataclass(frozen=True)
class AdviceFit:
    """A plan on a card as the advice judges it: the one verdict, and the need with the known error of
    plans of its kind added."""

    verdict: Verdict
    need_bytes: int  # expected nvidia-smi peak per GPU, with the known error added
    status: str  # fits / tight / oom ("oom" also when only the cache, or the known error, is over the card)
    margin: str | None = None  # the known error added, in words

    @property
    def fits(self) -> bool:
        return self.status != "oom"


def advice_fit(plan: Plan, shape: ModelShape, gpu: Gpu) -> AdviceFit:
    """Strict at the edge: the expected peak (not the floor the allocator falls back to) must be on the
    card, after adding the most the estimate was short on held-out runs of this kind, and so must every moment of
    the run outside the step (evaluation, loading, saving: advisor.lifecycle)."""
    from advisor.gpu_memory import known_error

    bd = estimate(plan, shape)
    cap = gpu.memory_bytes
    v = breakdown_verdict(bd, cap)
    need, margin = bd.peak_reserved_bytes, None
    hw = plan.hardware
    err = known_error(plan.training.method, bool(shape.num_experts), hw.gpus, hw.zero, hw.device)
    if err is not None:
        what, share = err
        extra = share * (bd.peak_allocated_bytes if what == "allocated" else bd.peak_reserved_bytes)
        need = int(need + extra)
        margin = (f"+{gib(extra)} for the known error of sharded LoRA / QLoRA ({what} up to {share:.0%} above "
                  "the estimate on published runs)")
    if hw.device == "cuda":  # a moment outside the step (evaluation, loading, saving) above it counts too
        from advisor.lifecycle import run_peak

        moment, peak = run_peak(plan, shape, bd.peak_reserved_bytes)
        if moment != "step" and peak > need:
            need = peak
            margin = f"the run's peak is {moment.replace('_', ' ')}, not the training step"
    if v.status == "oom" or need > cap:
        status = "oom"
    elif v.status == "tight" or need > TIGHT_SHARE * cap:
        status = "tight"
    else:
        status = "fits"
    return AdviceFit(v, need, status, margin)


def _largest_fit(shape, base, method, precision, gc, n, z, target, gpu) -> tuple[_Fit | None, int]:
    """Largest power-of-two micro-batch whose verdict is "fits" (else the largest "tight" one);
    (None, peak at micro-batch 1) when none is launchable."""
    best: _Fit | None = None  # largest micro-batch that "fits"
    tight: _Fit | None = None  # largest that is only "tight"
    first_peak = 0
    for mb in micro_batches(max(1, target // n)):  # mb x n GPUs never overshoots the target batch
        accum = accum_for(target, mb, n)
        af = advice_fit(_plan(base, method, precision, gc, mb, accum, n, z), shape, gpu)
        if mb == 1:
            first_peak = af.need_bytes
        for f in (best, tight):  # the next micro-batch up, whatever its verdict
            if f is not None and f.mb * 2 == mb:
                f.next_peak, f.next_status = af.need_bytes, af.status
                if af.verdict.cache_limited:
                    f.next_status = "cache"
        if af.status == "oom":
            break
        if af.status == "fits":
            best = _Fit(mb, accum, af.need_bytes, None, "fits")
        else:
            tight = _Fit(mb, accum, af.need_bytes, None, "tight")
    return (best or tight), first_peak


SHARDED = ("weights", "lora_adapters", "gradients", "optimizer_states")


def _unshardable(shape: ModelShape, base: Plan, method: str, precision: str, gpu: Gpu) -> tuple[int, str]:
    """What every GPU keeps however many share the model with ZeRO-3 (at micro-batch 1, checkpointing on):
    the per-GPU need of sharding over 4,096 GPUs, and its largest parts in words."""
    plan = _plan(base, method, precision, True, 1, 1, 4096, 3)
    bd = estimate(plan, shape)
    kept = {k: v for k, v in {**bd.components, **bd.overhead}.items() if k not in SHARDED and v > 0}
    top = sorted(kept.items(), key=lambda kv: -kv[1])[:3]
    from advisor.breakdown import label

    return bd.peak_reserved_bytes, ", ".join(f"{label(k)} {gib(v)}" for k, v in top)


def _where(gpu: Gpu, n: int, z: int) -> str:
    if n == 1:
        return f"one {gpu.name}"
    how = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3 (FSDP full shard, estimated as ZeRO-3)"}[z]
    return f"{n} x {gpu.name} with {how}"


def _option_for(shape: ModelShape, base: Plan, gpu: Gpu, method: str, counts: Iterable[int], target: int,
                tokens: float) -> Option:
    """The best way to run `method` on `gpu`, or the rejected option with the number that did not fit."""
    cap = gpu.memory_bytes
    precision = precision_for(method, gpu, base.training.precision)
    word = METHOD_WORDS[method] + (f" ({precision})" if method != "qlora" else "")
    if method == "qlora" and gpu.vendor == "apple":
        return Option(method, gpu.name, 1, 0, "single", 1, accum_for(target, 1, 1), True, 0, cap, False, None,
                      None, ["QLoRA needs bitsandbytes' 4-bit kernels, which have no Apple-silicon backend"],
                      precision, gpu_id=gpu.id)
    if gpu.interconnect == "none":  # one GPU per machine (Apple silicon): several cannot be joined
        counts = [n for n in counts if n == 1]
        if not counts:
            return Option(method, gpu.name, 1, 0, "single", 1, accum_for(target, 1, 1), True, 0, cap, False, None,
                          None, [f"{gpu.name} is one GPU per machine (no interconnect between GPUs in the GPU "
                                 "table); use --gpus 1"], precision, gpu_id=gpu.id, status="oom")
    tried: list[tuple[int, int, bool, int]] = []  # (n, z, gc, peak at micro-batch 1)
    unsharded = _unshardable(shape, base, method, precision, gpu)
    for n in counts:
        if n > 1 and unsharded[0] > cap:
            break  # more GPUs cannot lower what overflows: it is what every GPU keeps whatever the sharding
        # (tight?, hours, -micro-batch, zero) orders them; then the fit, tokens/s per GPU and the plan
        found: list[tuple[tuple[bool, float, int, int], bool, _Fit, float, Plan]] = []
        for gc in (False, True):
            for z in ((0,) if n == 1 else (0, 1, 2, 3)):
                got, peak1 = _largest_fit(shape, base, method, precision, gc, n, z, target, gpu)
                tried.append((n, z, gc, peak1))
                if got is None:
                    continue
                p = _plan(base, method, precision, gc, got.mb, got.accum, n, z)
                st = throughput.step_time(p, shape, gpu)
                hrs = tokens / (st.tokens_per_s * n) / 3600
                found.append(((got.status != "fits", hrs, -got.mb, z), gc, got, st.tokens_per_s, p))
        if not found:
            continue
        (_, hours, _, z), gc, fit, tps, chosen = min(found, key=lambda f: f[0])
        cost = hours * n * gpu.price_usd_hour if gpu.price_usd_hour is not None else None
        state = ("fits" if fit.status == "fits" else
                 f"tight: over the {TIGHT_SHARE:.0%} line or its high end over the card")
        reasons = [(f"{word} needs {gib(fit.peak)} per GPU on {_where(gpu, n, z)} ({gib(cap)}; "
                   f"{100 * fit.peak / cap:.0f}% used, {state})")]
        ones = [p for (k, _, _, p) in tried if k == 1]
        if n > 1 and ones:
            one = min(ones)
            reasons.append(f"one {gpu.name} is not enough: even at micro-batch 1 it needs "
                           f"{gib(one)} of {gib(cap)}")
        no_gc = [p for (k, zz, g, p) in tried if k == n and zz == z and not g]
        if gc and no_gc:
            reasons.append(f"gradient checkpointing on: without it micro-batch 1 needs {gib(no_gc[0])}")
        eff = fit.mb * fit.accum * n
        mb_txt = f"micro-batch {fit.mb} x grad-accum {fit.accum}" + (f" x {n} GPUs" if n > 1 else "") + \
            f" = effective batch {eff}"
        if fit.next_peak is not None:
            why = {"tight": "tight: over 90% of the card or its high end over it",
                   "cache": "only the allocator's cache is over the card: it might run at the card's limit, not "
                            "promised",
                   "oom": "out of memory"}.get(fit.next_status, fit.next_status)
            mb_txt += f"; micro-batch {fit.mb * 2} would need {gib(fit.next_peak)} ({why})"
        if fit.status == "tight":
            mb_txt += " (no micro-batch stays under the line)"
        reasons.append(mb_txt)
        if precision != base.training.precision:
            reasons.append(f"{gpu.name} has no bf16: trained in {precision}")
        rng = throughput.time_range(chosen, shape, gpu)
        reasons.append(f"about {duration(hours)} ({duration(hours / rng.high)}-{duration(hours / rng.low)}) for "
                       f"{tokens:,.0f} tokens at {tps:,.0f} tokens/s per GPU (step-time model calibrated on A100 "
                       f"and H100 runs of the plain stack"
                       + (f"; range wider: {'; '.join(rng.outside)})" if rng.outside else ")"))
        if cost is not None:
            reasons.append(f"costs about ${cost:,.2f} ({hours:,.2f} h x {n} GPU{'s' if n > 1 else ''} x "
                           f"${gpu.price_usd_hour:.2f}/h)")
        else:
            reasons.append(f"no hourly price for {gpu.name} in the GPU table, so no cost")
        return Option(method, gpu.name, n, z, "single" if n == 1 else STRATEGY[z], fit.mb, fit.accum, gc,
                      fit.peak, cap, True, hours, cost, reasons, precision, gpu_id=gpu.id, status=fit.status,
                      tokens_per_s_per_gpu=tps)
    # nothing fits: report the smallest need on one GPU and on the most GPUs tried
    on_one = [t for t in tried if t[0] == 1]
    n_max = max(t[0] for t in tried)
    best1 = min(on_one or tried, key=lambda t: t[3])
    reasons = [f"{word} needs {gib(best1[3])} on {_where(gpu, best1[0], best1[1])} ({gib(cap)}; out of memory) "
               f"even at micro-batch 1"
               + (" with gradient checkpointing" if best1[2] else "")]
    bestn = min((t for t in tried if t[0] == n_max), key=lambda t: t[3])
    if n_max > 1:
        reasons.append(f"even on {_where(gpu, n_max, bestn[1])} it needs {gib(bestn[3])} per GPU")
    if unsharded[0] > cap and (len(tuple(counts)) > 1 or n_max > 1):
        reasons.append(f"more GPUs cannot help: ZeRO-3 shards the weights, gradients and optimizer states, but "
                       f"every GPU keeps {unsharded[1]} ({gib(unsharded[0])} at micro-batch 1 with checkpointing, "
                       f"of the card's {gib(cap)})")
    worst = bestn if n_max > 1 else best1
    return Option(method, gpu.name, worst[0], worst[1], "single" if worst[0] == 1 else STRATEGY[worst[1]], 1,
                  accum_for(target, 1, worst[0]), worst[2], worst[3], cap, False, None, None, reasons, precision,
                  gpu_id=gpu.id, status="oom")


def _validate(examples: int, avg_tokens: int, epochs: float, target_batch: int, budget_usd: float | None,
              gpus: int | None, methods: tuple[str, ...]) -> None:
    problems = []
    if examples < 1:
        problems.append(f"examples must be at least 1 (got {examples}); give the number of training examples")
    if avg_tokens < 1:
        problems.append(f"avg_tokens must be at least 1 (got {avg_tokens}); give the mean tokens per example")
    if not epochs > 0:
        problems.append(f"epochs must be above 0 (got {epochs}); 1-3 is usual for thousands of examples")
    if target_batch < 1:
        problems.append(f"target batch must be at least 1 (got {target_batch}); 16 is a common effective batch")
    if budget_usd is not None and not budget_usd > 0:
        problems.append(f"budget must be a positive number of US dollars (got {budget_usd}); leave it out for "
                        "no limit")
    if gpus is not None and not 1 <= gpus <= 4096:
        problems.append(f"gpus must be between 1 and 4096 (got {gpus}); leave it out to let the advisor choose")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        problems.append(f"unknown method(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
    if problems:
        raise AdviceError("; ".join(problems))


def _choice_key(o: Option, ranks: dict[str, int], min_gpus: dict[str, int]) -> tuple:
    """Fewest GPUs the method needs anywhere, then the method's rank, then "fits" before "tight", then the
    cheapest, then the fastest."""
    return (min_gpus[o.method], ranks[o.method], o.status == "tight",
            o.cost_usd if o.cost_usd is not None else math.inf, o.hours or math.inf, o.num_gpus)


def recommend(shape: ModelShape, base_plan: Plan, gpu: Gpu | None, *, gpus: int | None, examples: int,
              avg_tokens: int, epochs: float, target_batch: int = 16, budget_usd: float | None = None,
              methods: tuple[str, ...] = METHODS) -> Advice:
    """Method, GPU(s), micro-batch, time and cost for fine-tuning `shape` on `examples` examples.

    `base_plan` supplies sequence length, optimizer, LoRA settings and attention; method,
    precision (bf16 or fp16 by card), checkpointing, micro-batch, accumulation, GPU count and
    ZeRO stage are chosen here. `gpu=None` ranks every priced GPU in the table by total cost.
    `gpus` fixes the GPU count; None searches 1, then 2..64 when one GPU cannot hold the job.
    """
    methods = tuple(methods)
    _validate(examples, avg_tokens, epochs, target_batch, budget_usd, gpus, methods)
    tokens = float(examples) * avg_tokens * epochs
    counts = (gpus,) if gpus is not None else GPU_COUNTS
    notes: list[str] = []
    if gpu is not None:
        cards = [gpu]
    else:
        table = list(gpu_table().values())
        cards = [g for g in table if g.price_usd_hour is not None]
        skipped = [g.name for g in table if g.price_usd_hour is None]
        if skipped:
            notes.append(f"skipped {len(skipped)} GPUs with no hourly price in the table: {', '.join(skipped)}")
    if "qlora" in methods:  # MoE on transformers 5: QLoRA leaves the experts unquantized, in fp32
        from advisor.memory import moe_qlora_note

        t = base_plan.training.model_copy(update={"method": "qlora"})
        moe = moe_qlora_note(shape, t, base_plan.hardware)
        if moe:
            notes.append(moe)
    options = [_option_for(shape, base_plan, g, m, counts, target_batch, tokens)
               for g in cards for m in methods]
    ranks = {m: method_rank(m, shape, examples)[0] for m in methods}
    for o in options:
        if budget_usd is not None and o.fits:
            o.within_budget = o.cost_usd is not None and o.cost_usd <= budget_usd
            if o.cost_usd is None:
                o.reasons.append(f"no price for {o.gpu}, so the ${budget_usd:,.2f} budget cannot be checked")
            elif not o.within_budget:
                o.reasons.append(f"over budget: about ${o.cost_usd:,.2f} > ${budget_usd:,.2f}")

    fitting = [o for o in options if o.fits]
    pool = fitting
    if budget_usd is not None:
        within = [o for o in fitting if o.within_budget]
        if within:
            pool = within
        elif fitting:
            notes.append(f"nothing that fits stays within the ${budget_usd:,.2f} budget; the choice below is over it")
    choice = None
    if pool:
        min_gpus = {m: min((o.num_gpus for o in pool if o.method == m), default=10**9) for m in methods}
        choice = min(pool, key=lambda o: _choice_key(o, ranks, min_gpus))
        choice.reasons = _choice_reasons(choice, options, shape, examples, methods, gpu is None,
                                         budget_usd) + choice.reasons
        order = {id(o): i for i, o in enumerate(sorted(fitting, key=lambda o: _choice_key(o, ranks, min_gpus)))}
        from advisor.gpu_memory import validation_note

        known = validation_note(choice.method, bool(shape.num_experts), choice.num_gpus, choice.zero, "cuda")
        if known:  # the choice is of a kind where published runs found the estimate short
            notes.append(known)
    else:
        order = {}
        where = f"one {gpu.name}" if gpu is not None and gpus in (None, 1) else "the GPUs considered"
        notes.append(f"nothing fits on {where}: the nearest plans that fit are listed, and each option's reasons "
                     "say the memory it needs")
    options.sort(key=lambda o: (o is not choice, not o.fits, order.get(id(o), 0), ranks[o.method], o.gpu))

    lo, hi = throughput.BAND
    assumptions = [
        (f"fits = the expected nvidia-smi peak per GPU, with the known error of plans of its kind added, is on the "
         f"card (a plan that only the allocator's cache pushes over is not proposed); tight = over "
         f"{TIGHT_SHARE:.0%} of it or its high end over the card; fits is preferred over tight"),
        ("time: advisor.throughput's step-time model (GEMM roofline, attention, memory-bound work, QLoRA "
         f"dequantization, communication), calibrated on A100 and H100 runs of the plain stack; range "
         f"{lo:.2f}-{hi:.2f}x where a plan is inside the calibration, wider where it is not (each option says "
         "why)"),
        ("memory: a batch of several sequences is padded (sdpa gets an attention mask; data.padded=false for "
         "data packed to exactly seq_len tokens); time: every sequence counts seq_len tokens"),
        "FSDP full shard is estimated as ZeRO-3",
        f"tokens = {examples:,} examples x {avg_tokens:,} tokens x {epochs:g} epochs = {tokens:,.0f}",
    ]
    job = {"model": shape.name, "params_total": shape.params_total, "examples": examples,
           "avg_tokens": avg_tokens, "epochs": epochs, "tokens": int(tokens), "target_batch": target_batch,
           "seq_len": base_plan.training.seq_len, "optimizer": base_plan.training.optimizer,
           "budget_usd": budget_usd, "gpu": gpu.name if gpu else None, "gpus": gpus}
    nearest: list[Nearest] = []
    if choice is None:  # "nothing fits" is never the last word
        card = gpu or max(cards, key=lambda g: g.memory_bytes)
        lightest = next(m for m in ("qlora", "lora", "full") if m in methods)
        near = _plan(base_plan, lightest, precision_for(lightest, card, base_plan.training.precision),
                     base_plan.training.grad_checkpointing, base_plan.training.micro_batch,
                     base_plan.training.grad_accum, gpus or 1, base_plan.hardware.zero if (gpus or 1) > 1 else 0)
        nearest = nearest_plans(shape, near, card, tokens)
        base_t = base_plan.training
        lead = {k: v for k, v in (("training.method", near.training.method),
                                  ("training.precision", near.training.precision)) if v != getattr(base_t, k[9:])}
        for n in nearest:  # the changes from the plan the user gave (the search started from its lightest method)
            n.changes = {**lead, **n.changes}
    return Advice(choice, options, job, assumptions, notes, nearest)


def _choice_reasons(c: Option, options: list[Option], shape: ModelShape, examples: int,
                    methods: tuple[str, ...], ranked: bool, budget_usd: float | None) -> list[str]:
    """Why this option: its method's rank, then why each other method was not taken."""
    out = []
    if len(methods) > 1:
        out.append(method_rank(c.method, shape, examples)[1])
    for o in options:
        if o is c or o.gpu_id != c.gpu_id or o.method == c.method:
            continue
        word = METHOD_WORDS[o.method]
        if not o.fits:
            out.append(f"{word} does not fit: {o.reasons[0]}")
        elif o.num_gpus > c.num_gpus:
            out.append(f"{word} would need {o.num_gpus} GPUs")
        elif budget_usd is not None and not any(x.within_budget for x in options if x.method == o.method):
            cheapest = min(x.cost_usd for x in options if x.method == o.method and x.fits and x.cost_usd is not None)
            out.append(f"{word} fits but costs at least ${cheapest:,.2f}, over the ${budget_usd:,.2f} budget")
        else:
            out.append(f"{word} also fits ({gib(o.peak_reserved_bytes)}) but is ranked lower here")
    if ranked:
        out.append(f"cheapest {METHOD_WORDS[c.method]} option among the priced GPUs that fit "
                   f"(ties go to the faster card)")
    return out


# --- the nearest plans that fit -------------------------------------------------------------------

@dataclass
class Nearest:
    """A plan near the asked one that fits a card: what changed (plan fields and their values, which a
    front end turns into a command or applies to its form) and its numbers."""

    what: str
    changes: dict[str, Any]
    gpu: str
    gpu_id: str
    num_gpus: int
    need_bytes: int  # expected nvidia-smi peak per GPU (the known error of its kind added)
    capacity_bytes: int
    status: str
    hours: float | None
    cost_usd: float | None
    plan: Plan | None = None  # the whole plan (a front end's command or form takes it from here)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "plan"}
        d["hours"] = None if self.hours is None else round(self.hours, 3)
        d["cost_usd"] = None if self.cost_usd is None else round(self.cost_usd, 2)
        return d


def _changed(plan: Plan, **fields: Any) -> tuple[Plan, dict[str, Any]]:
    """The plan with ``section__field=value`` changes (``training__lora__r``: nested), and the changes
    by plan field ("training.lora.r")."""

    def put(model, path: list[str], v: Any):
        if len(path) == 1:
            return model.model_copy(update={path[0]: v})
        return model.model_copy(update={path[0]: put(getattr(model, path[0]), path[1:], v)})

    out, changes = plan, {}
    for key, v in fields.items():
        out = put(out, key.split("__"), v)
        changes[key.replace("__", ".")] = v
    return out, changes


def _savers(plan: Plan, shape: ModelShape, gpu: Gpu | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The switches practitioners flip to make a job fit, in the order they reach for them (each adds to
    the one before): checkpointing, micro-batch 1 (accumulation keeps the effective batch), an 8-bit paged
    optimizer, FSDP / ZeRO mixed precision for a sharded amp-bf16 full fine-tune (no time cost), Liger's kernels on
    an NVIDIA card for the families Liger-Kernel patches (faster: the time model's loss and elementwise terms),
    offloading the checkpointed activations to host RAM (not with unified memory), LoRA, QLoRA, a smaller LoRA rank.
    Each rung's time cost is the time model's (the offload copies over the host link)."""
    t = plan.training
    out: list[tuple[str, dict[str, Any]]] = []
    if not t.grad_checkpointing:
        out.append(("gradient checkpointing on", {"training__grad_checkpointing": True}))
    if t.micro_batch > 1:
        out.append((f"micro-batch 1 x grad-accum {t.micro_batch * t.grad_accum} (the same effective batch)",
                    {"training__micro_batch": 1, "training__grad_accum": t.micro_batch * t.grad_accum}))
    if t.optimizer in ("adamw", "paged_adamw_32bit"):
        out.append(("8-bit paged AdamW (optimizer states in 8 bits)", {"training__optimizer": "paged_adamw_8bit"}))
    hw = plan.hardware
    if t.method == "full" and t.precision == "amp-bf16" and hw.gpus > 1 and hw.zero >= 1:
        out.append(("FSDP / ZeRO mixed precision (mixed-bf16: fp32 masters sharded, bf16 compute copies)",
                    {"training__precision": "mixed-bf16"}))
    if not t.liger and liger_offered(shape.model_type, hw.device, gpu.vendor if gpu else None):
        out.append(("Liger kernels (fused linear cross-entropy: logits never materialized)",
                    {"training__liger": True}))
    if not t.offload_activations and (gpu is None or gpu.host_link_gbs):
        out.append(("activation checkpoints offloaded to host RAM (a copy each way over the host link)",
                    {"training__offload_activations": True, "training__grad_checkpointing": True}))
    if t.method == "full" and shape.linears:
        out.append(("LoRA (frozen weights, adapters trained)", {"training__method": "lora"}))
    if t.method != "qlora" and shape.linears:
        out.append(("QLoRA (4-bit frozen weights)", {"training__method": "qlora"}))
    if t.lora.r > 8:
        out.append(("LoRA rank 8", {"training__lora__r": 8}))
    return out


def short_name(gpu: Gpu) -> str:
    return gpu.name.replace("NVIDIA ", "").replace("GeForce ", "")


def _longest_seq(plan: Plan, shape: ModelShape, gpu: Gpu) -> int:
    """The longest sequence the advice calls "fits" (under 90% of the card, the known error added), in
    steps of 128 tokens above 256 (a number people choose); 0 when none."""
    def ok(seq: int) -> bool:
        p = plan.model_copy(update={"training": plan.training.model_copy(update={"seq_len": seq})})
        return advice_fit(p, shape, gpu).status == "fits"

    seq = _largest(ok, plan.training.seq_len)
    return seq - seq % 128 if seq >= 256 else seq


def nearest_plans(shape: ModelShape, plan: Plan, gpu: Gpu, tokens: float, limit: int = 6) -> list[Nearest]:
    """When ``plan`` does not fit ``gpu``: the nearest plans that do, ranked by how little they change and
    then by cost. Found: the first rung of the savers' ladder that fits this card; the longest sequence
    that fits with the plan as it is, and with every saver; the largest micro-batch that fits; the
    cheapest priced card the plan (or its ladder) fits on alone. Each with its memory, time and cost."""
    out: list[Nearest] = []
    seen: set[str] = set()

    def add(what: str, p: Plan, changes: dict[str, Any], card: Gpu) -> bool:
        key = repr(sorted(changes.items(), key=lambda kv: kv[0])) + card.id
        if key in seen:
            return False
        af = advice_fit(p, shape, card)
        if not af.fits:
            return False
        seen.add(key)
        hours = cost = None
        if card.tflops:
            try:
                hours = train_hours(shape, p, card, p.hardware.gpus, p.hardware.zero, tokens)
                cost = hours * p.hardware.gpus * card.price_usd_hour if card.price_usd_hour is not None else None
            except Exception:  # noqa: BLE001 - a card the time model cannot time: memory still stands
                pass
        p = p.model_copy(update={"hardware": p.hardware.model_copy(update={"gpu": card.id})})
        out.append(Nearest(what, changes, card.name, card.id, p.hardware.gpus, af.need_bytes, card.memory_bytes,
                           af.status, hours, cost, p))
        return True

    base = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"device": "cuda"})})
    ladder: list[tuple[str, Plan, dict[str, Any]]] = []
    p = base
    changes: dict[str, Any] = {}
    words: dict[str, str] = {}
    for what, fields in _savers(base, shape, gpu):
        p, ch = _changed(p, **fields)
        if p.training.method != "full" and p.training.precision == "mixed-bf16":  # mixed-bf16 is for full
            asked = base.training.precision  # fine-tuning: adapters keep the asked precision (bf16 for mixed-bf16)
            p, _ = _changed(p, training__precision=asked if asked != "mixed-bf16" else "bf16")
            changes.pop("training.precision", None)
            words.pop("training.precision", None)
        changes = {**changes, **ch}
        words[next(iter(ch))] = what  # a later rung on the same field (QLoRA after LoRA) replaces its words
        if "training.precision" not in words and p.training.precision != base.training.precision:
            words["training.precision"] = "adapters over bf16 weights (mixed-bf16 is for full fine-tuning)"
            changes["training.precision"] = p.training.precision
        ladder.append(("; ".join(words.values()), p, dict(changes)))
    for what, lp, ch in ladder:  # the first rung that fits
        if add(what, lp, ch, gpu):
            break
    for what, lp, ch in [("", base, {})] + ladder[-1:]:  # the longest sequence: as it is, and with every saver
        seq = _longest_seq(lp, shape, gpu)
        if 0 < seq < lp.training.seq_len:
            sp, sch = _changed(lp, training__seq_len=seq)
            add(f"sequences of {seq:,} tokens (longer examples are cut)" + (f"; {what}" if what else ""), sp,
                {**ch, **sch}, gpu)
    if gpu.interconnect != "none":  # more of the same card, where sharding lowers what overflows
        for n in GPU_COUNTS[1:]:
            sp, sch = _changed(base, hardware__gpus=n, hardware__zero=3)
            if advice_fit(sp, shape, gpu).fits:
                add(f"{n} × {short_name(gpu)} with ZeRO-3 (FSDP full shard)", sp, sch, gpu)
                break
    cheapest: list[tuple[float, Gpu, str, Plan, dict[str, Any]]] = []
    for card in gpu_table().values():  # the next card: the plan as it is, else its whole ladder, on one GPU
        if card.id == gpu.id or card.price_usd_hour is None or card.interconnect == "none" and plan.hardware.gpus > 1:
            continue
        for what, lp, ch in [("", base, {})] + ladder[-1:]:
            if advice_fit(lp, shape, card).fits:
                try:
                    h = train_hours(shape, lp, card, lp.hardware.gpus, lp.hardware.zero, tokens)
                except Exception:  # noqa: BLE001
                    continue
                cheapest.append((h * lp.hardware.gpus * card.price_usd_hour, card, what, lp, ch))
                break
    for _cost, card, what, lp, ch in sorted(cheapest, key=lambda c: c[0])[:2]:
        add(what or "the plan as it is, on another card", lp,
            {**ch, "hardware.gpu": card.id}, card)
    out.sort(key=lambda n: (len(n.changes), n.cost_usd if n.cost_usd is not None else math.inf))
    return out[:limit]
