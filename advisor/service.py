"""The one API every front end calls: resolve a model, build and validate a plan, estimate, compare
methods, rank GPUs, check a plan before a run. Results are typed; user mistakes are raised as
:class:`advisor.problems.Problems` (all of them at once, each with its plan field).

The CLI (``advisor.cli``), the TUI (``advisor.tui`` through ``advisor.forms``) and the runner
(``runner``) call only this module for planning, so they cannot disagree: one estimate, one fit
verdict (:mod:`advisor.policy`), one set of checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from advisor.job import (  # noqa: F401  (the service's job API)
    DEFAULT_AVG_TOKENS,
    DEFAULT_EPOCHS,
    DEFAULT_EXAMPLES,
    DEFAULT_SEQ,
    DEFAULT_TARGET_BATCH,
    Job,
    job_problems,
    make_job,
)
from advisor.policy import Verdict, breakdown_verdict, precision_problem
from advisor.problems import Problem, Problems

if TYPE_CHECKING:
    from advisor.breakdown import Breakdown
    from advisor.gpus import Gpu
    from advisor.model import ModelShape
    from advisor.spec import Plan


def resolve_model(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """A bundled profile, local config.json or model directory, or hub id -> its shape."""
    from advisor.model import ModelError, resolve

    try:
        return resolve(ref, revision, trust_remote_code)
    except ModelError as e:
        raise Problems(Problem(str(e), "model.ref")) from None


def is_offline_ref(ref: str) -> bool:
    """A bundled profile or a variant of one (resolved without the network, as advisor.model does)."""
    from advisor.catalog import bundled_lookup, variant_lookup

    return bundled_lookup(ref) is not None or variant_lookup(ref) is not None


def find_gpu(name: str) -> Gpu:
    """A GPU profile by forgiving name ('RTX 4090', h100, a100-40gb)."""
    from advisor.gpus import GpuError
    from advisor.gpus import find_gpu as _find

    try:
        return _find(name)
    except GpuError as e:
        raise Problems(Problem(str(e), "hardware.gpu")) from None


@dataclass(frozen=True)
class PlanContext:
    """A validated plan with its resolved model and GPU (None when the plan names none)."""

    plan: Plan
    shape: ModelShape
    gpu: Gpu | None


def build(data: dict[str, Any]) -> PlanContext:
    """Validate the plan dict and resolve its model and GPU; every problem raised together."""
    from advisor.spec import SpecError, build_plan, check_against_shape

    problems: list[Problem] = []
    plan = shape = gpu = None
    try:
        plan = build_plan(data)
    except SpecError as e:
        problems += e.items
    model = data.get("model") or {}
    try:
        shape = resolve_model(model.get("ref") or "", model.get("revision"), bool(model.get("trust_remote_code")))
    except Problems as e:
        problems += e.items
    if plan is not None and shape is not None:
        problems += check_against_shape(plan, shape)
        from advisor.liger import problems as liger_problems

        problems += liger_problems(plan, shape)
    gpu_name = (data.get("hardware") or {}).get("gpu")
    if gpu_name:
        try:
            gpu = find_gpu(gpu_name)
        except Problems as e:
            problems += e.items
    if plan is not None and plan.task == "training" and plan.hardware.device == "cuda":
        bad = precision_problem(gpu, plan.training.precision)
        if bad:
            problems.append(bad)
    if plan is not None and plan.hardware.device == "cpu" and plan.hardware.gpu:
        problems.append(Problem(f"the plan runs on the CPU (hardware.device=cpu) but names the GPU "
                                f"{plan.hardware.gpu}: its verdict would count the tensors alone", "hardware.device",
                                "set the device to cuda to size it on that GPU, or choose no GPU for a CPU run"))
    if problems:
        raise Problems(problems)
    assert plan is not None and shape is not None  # each is None only with a problem raised above
    if plan.task == "training":  # the model as the plan's transformers release builds it (MoE: per-expert on 4.x)
        from advisor.software import layout

        shape = layout(shape, plan.training.transformers)
    return PlanContext(plan, shape, gpu)


def context_of(plan: Plan) -> PlanContext:
    """A PlanContext for an already validated Plan (the runner's plan.yaml)."""
    return build(plan.model_dump(mode="json"))


def trainable(plan: Plan, shape: ModelShape) -> int:
    from advisor.memory import trainable_params

    return trainable_params(shape, plan.training) if plan.task == "training" else 0


@dataclass
class EstimateResult:
    """The estimate of one plan: the breakdown at the peak and, with a GPU, the fit verdict."""

    plan: Plan
    shape: ModelShape
    gpu: Gpu | None
    mode: str
    breakdown: Breakdown
    params_trainable: int
    verdict: Verdict | None = None
    plan_notes: list[str] = field(default_factory=list)  # about the plan itself (advisor.service.plan_notes)
    moments: dict[str, Any] = field(default_factory=dict)  # advisor.lifecycle: loading, evaluation, ...
    run_peak: tuple[str, int] | None = None  # (moment, bytes): the run's device peak, "step" or a moment
    host_ram_bytes: int | None = None  # the largest host RAM need over the run
    time: Any = None  # advisor.throughput.JobTime for a training plan on a GPU, with the job
    time_note: str | None = None  # why there is no time (no GPU, serving, a card without TFLOPS)
    job: Job | None = None

    @property
    def notes(self) -> list[str]:
        """What the user should know: the plan's notes, then the estimate's."""
        return [*self.plan_notes, *self.breakdown.notes]

    @property
    def peak_allocated_bytes(self) -> int:
        return self.breakdown.peak_allocated_bytes

    @property
    def peak_reserved_bytes(self) -> int:
        return self.breakdown.peak_reserved_bytes

    @property
    def peak_reserved_high_bytes(self) -> int:
        return self.breakdown.peak_reserved_high_bytes

    @property
    def status(self) -> str | None:
        return self.verdict.status if self.verdict else None

    def as_json(self) -> dict[str, Any]:
        """The --json object of the CLI contract (docs/memory-model.md, DESIGN.md)."""
        s, bd = self.shape, self.breakdown
        out: dict[str, Any] = {
            "model": {
                "name": s.name, "model_type": s.model_type, "architecture": s.architecture,
                "params_total": s.params_total, "params_trainable": self.params_trainable,
                "params_embedding": s.params_embedding, "params_lm_head": s.params_lm_head,
                "params_linear": s.params_linear, "params_other": s.params_other,
                "num_layers": s.num_layers, "hidden_size": s.hidden_size, "vocab_size": s.vocab_size,
            },
            "plan": self.plan.model_dump(mode="json"),
            "mode": self.mode,
            "breakdown": bd.components,
            "host": bd.host,  # host RAM the step holds beside the device peak (offloaded activations)
            "peak_phase": bd.peak_phase,
            "phases": bd.phases,
            "overhead": bd.overhead,
            "peak_allocated_bytes": bd.peak_allocated_bytes,
            "peak_reserved_bytes": bd.peak_reserved_bytes,
            "peak_reserved_high_bytes": bd.peak_reserved_high_bytes,
            "peak_reserved_low_bytes": bd.peak_reserved_low_bytes,
            "band": bd.band,  # whose band and its widths (training.harness; docs/accuracy.md)
            "reserved_model": bd.reserved_model,
            "stack": modelled_stack(self.plan),
            "notes": self.notes,
        }
        if self.gpu is not None and self.verdict is not None:
            out["gpu"] = {"name": self.gpu.name, "id": self.gpu.id, **self.verdict.as_json()}
        # what nvidia-smi will read: never above the card (at its limit when only the cache is over; none
        # when out of memory); peak_reserved_bytes stays the allocator's reserve with no card limit
        v = self.verdict
        out["nvidia_smi_bytes"] = (bd.peak_reserved_bytes if v is None else
                                   None if v.status == "oom" else v.on_card_bytes)
        if self.job is not None:
            out["job"] = {"examples": self.job.examples, "avg_tokens": self.job.avg_tokens, "epochs": self.job.epochs}
        if self.run_peak is not None:
            out["moments"] = {k: m.to_dict() for k, m in self.moments.items()}
            out["run_peak"] = {"moment": self.run_peak[0], "bytes": self.run_peak[1]}
            out["host_ram_bytes"] = self.host_ram_bytes
        out["time"] = self.time.as_json() if self.time is not None else None
        if self.time_note:
            out["time_note"] = self.time_note
        return out


def modelled_stack(plan: Plan | None = None) -> dict[str, str]:
    """The versions of torch / transformers / peft / bitsandbytes / accelerate the estimate models
    (transformers: the plan's training.transformers where its rules differ from the installed one)."""
    from advisor.gpu_memory import modelled_stack as stack

    return stack(plan.training.transformers if plan is not None and plan.task == "training" else None)


def _gpu_name(ctx: PlanContext) -> str:
    return ctx.gpu.name if ctx.gpu is not None else "the GPU"


def verdict_for(bd: Breakdown, gpu: Gpu | None) -> Verdict | None:
    """The one fit verdict of a breakdown on a card (advisor.policy.fit_verdict)."""
    if gpu is None:
        return None
    return breakdown_verdict(bd, gpu.memory_bytes)


def estimate(ctx: PlanContext, mode: str = "analytic", progress: Callable[[float, str], None] | None = None,
             job: Job | None = None) -> EstimateResult:
    """Peak memory of the plan: analytic (milliseconds) or simulate (the real stack on fake tensors);
    and the time and cost of its job on the plan's GPU (advisor.throughput, the model recommend uses):
    the plan's own job (job.*, run.epochs) unless ``job`` is given. A plan that does not fit its card
    gets no time or cost (there is no run to time)."""
    from advisor.memory import estimate as analytic

    if mode == "simulate":
        from advisor.simulate import SimulateError, simulate

        try:
            bd = simulate(ctx.plan, ctx.shape, progress=progress)
        except SimulateError as e:
            raise Problems(str(e)) from None
        except Exception as e:  # a bug, not the user's mistake: say so plainly, keep the analytic way open
            raise Problems(Problem(f"the simulation failed for {ctx.shape.name} ({type(e).__name__}: "
                                   f"{str(e)[:200]})", None, "use the analytic estimate, and please report it")) \
                from None
    elif mode == "analytic":
        bd = analytic(ctx.plan, ctx.shape)
    else:
        raise Problems(Problem(f"unknown estimate mode {mode!r}", None, "use analytic or simulate"))
    res = EstimateResult(ctx.plan, ctx.shape, ctx.gpu, mode, bd, trainable(ctx.plan, ctx.shape),
                         verdict_for(bd, ctx.gpu), plan_notes(ctx.plan))
    if ctx.plan.task == "training":
        from advisor.gpu_memory import validation_note

        hw = ctx.plan.hardware
        known = validation_note(ctx.plan.training.method, bool(ctx.shape.num_experts), hw.gpus, hw.zero, hw.device)
        if known:  # either mode: what published runs of this kind showed
            res.plan_notes.append(known)
        run_moments(res)
    if ctx.plan.task == "training":
        res.job = job = job or Job.of(ctx.plan)
        if res.status == "oom":
            res.time_note = (f"no time or cost: the plan does not fit {_gpu_name(ctx)} (out of memory), so there is "
                             "no run to time")
        else:
            res.time, res.time_note = job_time(ctx, job)
    return res


def run_moments(res: EstimateResult) -> None:
    """The moments outside the training step (advisor.lifecycle: loading, evaluation, saving, merging),
    the run's device peak among them and the step, and the host RAM the run needs. The verdict stays
    the step's; a moment that alone would not fit the card gets a note."""
    from advisor import lifecycle
    from advisor.units import gib_str

    plan, shape = res.plan, res.shape
    res.moments = lifecycle.run_moments(plan, shape)
    res.run_peak = lifecycle.run_peak(plan, shape, res.peak_reserved_bytes)
    res.host_ram_bytes = lifecycle.host_ram_bytes(plan, shape, sum(res.breakdown.host.values()))
    name, peak = res.run_peak
    if res.gpu is not None and name != "step" and peak > res.gpu.memory_bytes and plan.hardware.device == "cuda":
        res.plan_notes.append(f"the run's peak is not the training step but {name.replace('_', ' ')}: "
                              f"{gib_str(peak)} on one GPU, more than the card's {gib_str(res.gpu.memory_bytes)} "
                              f"({res.moments[name].what})")


def job_time(ctx: PlanContext, job: Job):
    """(JobTime, None), or (None, why there is no time for this plan)."""
    from advisor.throughput import job_time as _job_time

    if ctx.plan.task != "training":
        return None, "time and cost are for training plans"
    if ctx.gpu is None or ctx.plan.hardware.device != "cuda":
        return None, "no GPU chosen: name one for time and cost"
    try:
        return _job_time(ctx.plan, ctx.shape, ctx.gpu, job.examples, job.avg_tokens, job.epochs), None
    except Problems as e:
        if any(p.field and p.field.startswith("job.") for p in e.items):
            raise  # the user's numbers: a problem to fix
        return None, "; ".join(p.message for p in e.items)


def limits(ctx: PlanContext, what: str):
    """The largest seq_len ('seq') or micro-batch ('batch') that fits the plan's GPU (advisor.limits)."""
    from advisor.limits import limit

    if ctx.gpu is None:
        raise Problems(Problem("the largest seq_len or micro-batch is the one that fits a GPU: the plan names none",
                               "hardware.gpu", "name the GPU (--gpu)"))
    return limit(ctx.plan, ctx.shape, ctx.gpu, what)


def plan_notes(plan: Plan) -> list[str]:
    """Settings that are valid but do nothing, or that the user should know about."""
    hw, notes = plan.hardware, []
    if hw.zero and hw.gpus == 1:
        notes.append(f"ZeRO-{hw.zero} on one GPU changes nothing (ZeRO shards states across GPUs): use 2 or more "
                     "GPUs, or ZeRO 0")
    if plan.model.trust_remote_code:
        notes.append("trust_remote_code is on: the model's own code from the hub will run; only for repositories "
                     "you trust")
    if hw.gpu:
        from advisor.gpus import gpu_name_note

        said = gpu_name_note(hw.gpu)  # 'a100' is read as the 80 GB SXM: say so, and name the others
        if said:
            notes.append(said)
    if plan.task == "training":
        from advisor.policy import precision_note

        t = plan.training
        said = precision_note(t.method, t.precision, t.optimizer)  # pure bf16 vs amp, pure fp16's underflow
        if said:
            notes.append(said)
        if t.liger and 0 < plan.data.prompt_loss_weight < 1:
            notes.append("with data.prompt_loss_weight between 0 and 1 the runner weighs each token's loss from the "
                         "logits, which Liger's fused loss does not return: the logits are materialized as without "
                         "Liger, so this estimate's loss term is low")
    return notes


def with_changes(ctx: PlanContext, section: str, **changes: Any) -> PlanContext:
    """The same context with some fields of one plan section changed (no re-validation of the rest)."""
    sub = getattr(ctx.plan, section).model_copy(update=changes)
    return PlanContext(ctx.plan.model_copy(update={section: sub}), ctx.shape, ctx.gpu)


@dataclass
class Variant:
    """One column of the side-by-side comparison: an estimate, or why the estimator refused it."""

    label: str
    result: EstimateResult | None = None
    error: str | None = None


def compare(ctx: PlanContext) -> list[Variant]:
    """The same settings three ways: Full / LoRA / QLoRA for training, none / int8 / nf4 weights for serving."""
    if ctx.plan.task == "training":
        section, key = "training", "method"
        variants = [("Full", "full"), ("LoRA", "lora"), ("QLoRA", "qlora")]
    else:
        section, key = "inference", "weight_quant"
        variants = [("16-bit", "none"), ("int8", "int8"), ("nf4", "nf4")]
    out = []
    for label, value in variants:
        try:
            out.append(Variant(label, estimate(with_changes(ctx, section, **{key: value}))))
        except Exception as e:  # noqa: BLE001 - one variant the estimator refuses must not hide the others
            out.append(Variant(label, error=str(e)))
    return out


@dataclass
class GpuRow:
    """One row of the GPU table: does this plan fit that card, and what the job would take there."""

    id: str
    name: str
    memory_bytes: int
    need_bytes: int
    status: str  # fits / tight / oom / no-bf16
    price: float | None
    bf16: bool
    hours: float | None = None
    cost_usd: float | None = None


GPU_ROW_ORDER = {"fits": 0, "tight": 1, "no-bf16": 2, "oom": 3}


def gpu_rows(ctx: PlanContext, tokens: float | None = None) -> list[GpuRow]:
    """Every GPU in the table, cheapest fitting first: the plan's per-GPU need (the card does not
    change it), the one fit verdict, and time and cost from the one time model for the plan's job
    (``tokens``: another job's)."""
    from advisor.gpus import gpu_table
    from advisor.memory import estimate as analytic
    from advisor.recommend import train_hours

    plan = ctx.plan
    if tokens is None and plan.task == "training":
        tokens = Job.of(plan).tokens
    n, zero = plan.hardware.gpus, plan.hardware.zero
    bd = analytic(plan, ctx.shape)
    rows = []
    for g in gpu_table().values():
        v = breakdown_verdict(bd, g.memory_bytes)
        row = GpuRow(g.id, g.name, g.memory_bytes, bd.peak_reserved_bytes, v.status, g.price_usd_hour, g.bf16)
        if plan.task == "training" and tokens and v.status != "oom" and (n == 1 or g.interconnect != "none"):
            row.hours = train_hours(ctx.shape, plan, g, n, zero, tokens)
            if g.price_usd_hour is not None:
                row.cost_usd = row.hours * n * g.price_usd_hour
        if plan.task == "training" and precision_problem(g, plan.training.precision):
            row.status = "no-bf16"
        rows.append(row)
    rows.sort(key=lambda r: (GPU_ROW_ORDER[r.status], r.cost_usd if r.cost_usd is not None else float("inf"),
                             r.memory_bytes))
    return rows


def check_fit(plan: Plan) -> tuple[Verdict | None, str | None]:
    """The runner's pre-flight: the plan's verdict on hardware.gpu, or (None, why it could not be checked)."""
    if not plan.hardware.gpu:
        return None, None
    try:
        ctx = context_of(plan)
    except Problems as e:
        return None, "; ".join(p.message for p in e.items)
    res = estimate(ctx)
    return res.verdict, None


# --- the job (time and cost) and advice -----------------------------------------------------------

def default_seq(shape: ModelShape) -> int:
    """2048, or the model's maximum when shorter (gpt2: 1024)."""
    mp = shape.max_position
    return min(DEFAULT_SEQ, mp) if mp else DEFAULT_SEQ


def advise(ctx: PlanContext, job: Job | None = None, gpu: Gpu | None = None, gpus: int | None = None,
           methods: tuple[str, ...] | None = None):
    """Method, GPU(s), micro-batch, time and cost (advisor.recommend) for the plan's model, settings and
    job (the plan's own unless ``job``); ``gpu`` None ranks every priced GPU."""
    from advisor.recommend import AdviceError, recommend
    from advisor.spec import METHODS

    job = job or Job.of(ctx.plan)
    try:
        return recommend(ctx.shape, ctx.plan, gpu, gpus=gpus, examples=job.examples, avg_tokens=job.avg_tokens,
                         epochs=job.epochs, target_batch=job.target_batch, budget_usd=job.budget_usd,
                         methods=tuple(methods or METHODS))
    except AdviceError as e:
        raise Problems(str(e)) from None


def speed_prediction(plan: Plan, shape: ModelShape | None, device_name: str | None, positions_per_seq: float,
                     world: int) -> dict[str, Any]:
    """What the time model predicts for a run's measured batch shape on its card (advisor.speedcheck):
    the runner's speed check compares its measured step with this."""
    from advisor.speedcheck import speed_prediction as predict

    return predict(plan, shape, device_name, positions_per_seq, world)


def nearest_plans(ctx: PlanContext, limit: int = 6):
    """When a training plan does not fit its GPU: the nearest plans that do (advisor.recommend.nearest_plans),
    each with its changes (plan fields), memory, time and cost, for the plan's job. [] when it fits or
    there is no GPU to fit."""
    from advisor.recommend import advice_fit
    from advisor.recommend import nearest_plans as _nearest

    plan = ctx.plan
    if plan.task != "training" or ctx.gpu is None or advice_fit(plan, ctx.shape, ctx.gpu).fits:
        return []
    return _nearest(ctx.shape, plan, ctx.gpu, Job.of(plan).tokens, limit)


def apply_changes(plan: Plan, changes: dict[str, Any]) -> Plan:
    """The plan with some fields changed (plan field -> value, as Nearest.changes and Problem changes name
    them), validated."""
    from advisor.spec import build_plan

    return build_plan(_with_fields(plan.model_dump(mode="json"), changes))


def guide(answers: dict[str, Any]):
    """The RAG / fine-tune questionnaire (advisor.guide); problems carry the question's name as field."""
    from pydantic import ValidationError

    from advisor.guide import Questionnaire
    from advisor.guide import guide as _guide
    from advisor.spec import validation_problems

    try:
        q = Questionnaire(**answers)
    except ValidationError as e:
        raise Problems([Problem(p.what, f"guide.{p.field}" if p.field else None) for p in validation_problems(e)]) \
            from None
    return q, _guide(q)


# --- what the runner and the after-run commands ask (they reach the core's numbers only here) -------------

class UnshapedModel(Problems):
    """A model the advisor cannot shape (an architecture transformers does not know here, custom code
    not allowed): the runner may still load it; the estimate is what is missing."""


def model_shape(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """resolve_model for a model that is about to be loaded: a broken config.json is a Problems (the load
    would fail too), a model the advisor cannot shape is an UnshapedModel (the load may still work)."""
    from advisor.model import ConfigError, ModelError, resolve

    try:
        return resolve(ref, revision, trust_remote_code)
    except ConfigError as e:
        raise Problems(Problem(str(e), "model.ref")) from None
    except ModelError as e:
        raise UnshapedModel(Problem(str(e), "model.ref")) from None


def prediction(plan: Plan, model_dir: str) -> EstimateResult:
    """The estimate a run compares its measurement with: the plan on the model as it lies in
    ``model_dir`` (the runner's local copy), analytic, with the plan's job. The run is tuneplan's own runner
    whatever harness the plan was sized for, so the band is the runner's (training.harness = tuneplan)."""
    data = plan.model_dump(mode="json")
    data["model"]["ref"] = str(model_dir)
    if plan.task == "training" and plan.training.harness != "tuneplan":
        data["training"]["harness"] = "tuneplan"
        res = estimate(build(data))
        res.plan_notes.append(f"the plan was sized for {plan.training.harness}'s band; tuneplan run runs tuneplan's "
                              "own runner, so this run is compared with the runner's band")
        return res
    return estimate(build(data))


def smaller_plan(plan: Plan, shape: ModelShape, capacity: int | None, below: float) -> dict[str, Any] | None:
    """After an out-of-memory error: the first rung of the ladder that the one fit verdict says *fits*
    ``capacity`` (not merely "tight": the plan before it has just run out) and whose expected peak is
    below ``below`` bytes. The rungs, each adding to the one before: gradient checkpointing on; halve
    the micro-batch (doubling accumulation: the effective batch stays) down to 1; an 8-bit paged
    optimizer; Liger's kernels (a family it patches, on CUDA); offloaded activation checkpoints; LoRA (from full);
    QLoRA. ``{"changes": {field: value}, "need_bytes": ...}`` or None."""
    from advisor import liger
    from advisor.memory import estimate as analytic
    from advisor.spec import build_plan

    data = plan.model_dump(mode="json")
    t = data["training"]

    def rungs():
        if not t["grad_checkpointing"]:
            yield {"training.grad_checkpointing": True}
        mb, acc = t["micro_batch"], t["grad_accum"]
        while mb > 1:
            mb, acc = max(1, mb // 2), acc * 2
            yield {"training.micro_batch": mb, "training.grad_accum": acc}
        if t["optimizer"] in ("adamw", "paged_adamw_32bit"):
            yield {"training.optimizer": "paged_adamw_8bit"}
        if not t["liger"] and liger.offered(shape.model_type, plan.hardware.device):
            yield {"training.liger": True}  # no time cost (liger-kernel: tuneplan[liger])
        if not t["offload_activations"]:
            yield {"training.grad_checkpointing": True, "training.offload_activations": True}
        # (mixed-bf16 is for full fine-tuning: adapters in bf16)
        keep = {"training.precision": "bf16"} if t["precision"] == "mixed-bf16" else {}
        if t["method"] == "full":
            yield {"training.method": "lora", **keep}
        if t["method"] != "qlora":
            yield {"training.method": "qlora", **keep}

    changes: dict[str, Any] = {}
    for rung in rungs():
        changes.update(rung)
        try:
            trial = build_plan(_with_fields(data, changes))
        except Problems:
            continue
        bd = analytic(trial, shape)
        fits = capacity is None or breakdown_verdict(bd, capacity).status == "fits"
        if bd.peak_reserved_bytes <= below and fits:
            return {"changes": dict(changes), "need_bytes": bd.peak_reserved_bytes}
    return None


def expected_peak(plan: Plan, shape: ModelShape) -> int:
    """The plan's expected peak reserved bytes per GPU (analytic)."""
    from advisor.memory import estimate as analytic

    return analytic(plan, shape).peak_reserved_bytes


def gpu_memory(name: str | None) -> int | None:
    """A GPU profile's memory in bytes (None without a name, or for an unknown one)."""
    if not name:
        return None
    try:
        return find_gpu(name).memory_bytes
    except Problems:
        return None


def _with_fields(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(data)
    for key, v in changes.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return out


def checkpoint_bytes(plan: Plan) -> tuple[ModelShape, int, int]:
    """(shape, trainable weight bytes, optimizer state bytes) of one checkpoint of the plan: what a
    rented disk must hold per checkpoint (runner.cloud sizes SkyPilot's disk with it)."""
    from advisor.memory import optimizer_states_bytes, trainable_bytes_per_param, trainable_params

    shape = resolve_model(plan.model.ref, plan.model.revision, plan.model.trust_remote_code)
    t = plan.training
    return shape, trainable_params(shape, t) * trainable_bytes_per_param(t), optimizer_states_bytes(shape, t)


def export_bytes(plan: Plan, shape: ModelShape, dtype: str, nf4: bool, merge: bool) -> dict[str, Any]:
    """Host RAM an export needs, by part (advisor.lifecycle's merge moment for an adapter, the model in
    ``dtype`` for a full fine-tune), with ``"merged"`` (the merged model's bytes on disk) and, with
    ``nf4``, ``"4-bit copy"`` (a bitsandbytes NF4 copy built after the merge) and ``"nf4_disk"``."""
    from advisor.breakdown import DTYPE_BYTES, nf4_bytes
    from advisor.lifecycle import merge_parts

    if merge:
        p2 = plan.model_copy(update={"training": plan.training.model_copy(update={"precision": dtype}),
                                     "run": plan.run.model_copy(update={"merge_export": True})})
        parts = dict(merge_parts(p2, shape))
    else:
        parts = {"base": DTYPE_BYTES[dtype] * shape.params_total}
    out = {"ram": parts, "merged": DTYPE_BYTES[dtype] * shape.params_total}
    if nf4:
        q = sum(g.count * nf4_bytes(g.in_features * g.out_features, True) for g in shape.linears if g.quantized)
        nf4_model = q + DTYPE_BYTES[dtype] * (shape.params_total - shape.params_quantized)
        parts["4-bit copy"] = nf4_model
        out["nf4_model"] = nf4_model
    return out


# --- re-exported: serving with vLLM (advisor/service_serving.py: its KV cache at start-up, which GPUs to rent)
# and the estimate from the data (advisor.batches, advisor.fragmentation: the runner's real batches; the front
# ends tokenize through runner.api.data_lengths, the runner's own loader, as lengths, and hand the lengths here;
# the core never tokenizes)
from advisor.batches import DataJob, DataLengths, LongestBatch  # noqa: E402,F401  (the service's data API)
from advisor.service_serving import (  # noqa: E402,F401  (the service's serving API)
    DEFAULT_CONCURRENCY,
    DEFAULT_CONTEXT,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    ENGINES,
    KV_CACHE_DTYPES,
    SERVING_COUNTS,
    SERVING_WEIGHTS,
    ServeResult,
    ServingAdvice,
    default_engine,
    rank_serving,
    serve,
    vllm_command,
)


@dataclass
class DataEstimate:
    """A training plan estimated from its data: ``result`` is the estimate at the longest batch the runner
    forms (the run's peak) with the data's job and time, its plan the user's plan with the data's job fields
    (job.examples, job.avg_tokens); ``nominal`` the plan's own estimate (every batch micro_batch x seq_len);
    ``over_run`` the nvidia-smi reserve over the run's batches (advisor.fragmentation; GPU plans)."""

    result: EstimateResult
    data: DataLengths
    job: DataJob
    nominal_allocated_bytes: int
    nominal_reserved_bytes: int
    over_run: Any = None

    def as_json(self) -> dict[str, Any]:
        out = self.result.as_json()
        d, p = self.data, self.result.plan.training
        out["data"] = {
            "file": d.path, "records": d.records, "examples": d.examples, "val_sequences": d.val, "format": d.format,
            "template": d.template, "tokenizer": d.source, "exact": d.exact, "tokens": d.stats(),
            "trained_tokens": d.trained_tokens, "truncated": d.truncated, "skipped": d.skipped,
            "warnings": list(d.warnings), "job": self.job.as_json(),
            "nominal": {"micro_batch": p.micro_batch, "seq_len": p.seq_len,
                        "peak_allocated_bytes": self.nominal_allocated_bytes,
                        "peak_reserved_bytes": self.nominal_reserved_bytes},
            "reserved_over_run": self.over_run.as_json() if self.over_run is not None else None}
        return out


def data_estimate(ctx: PlanContext, data: DataLengths, mode: str = "analytic",
                  progress: Callable[[float, str], None] | None = None) -> DataEstimate:
    """The plan from its data's real lengths (runner.api.data_lengths): the runner's exact steps, tokens and
    padded positions (advisor.batches.data_job), the time model over every batch's own shape, the peak of
    the longest batch the runner forms (the fail-fast probe's), and the reserve over the run's batches."""
    from advisor.batches import MicroSeconds, data_job, data_job_time
    from advisor.memory import estimate as analytic

    plan = ctx.plan
    if plan.task != "training":
        raise Problems(Problem("an estimate from data is for training plans", "task", "use --task training"))
    gpu = ctx.gpu if plan.hardware.device == "cuda" else None  # time is a GPU's
    micro = MicroSeconds(plan, ctx.shape, gpu, data.train) if gpu is not None else None
    job = data_job(plan, data, micro, micro.fixed if micro else 0.0)
    job_fields = plan.job.model_copy(update=job.plan_values()["job"])
    job_plan = plan.model_copy(update={"job": job_fields})
    longest = job.longest
    at_longest = with_changes(PlanContext(job_plan, ctx.shape, ctx.gpu), "training", micro_batch=longest.rows,
                              seq_len=longest.length)
    the_job = Job(job.examples, job.avg_tokens, job.epochs, job_fields.target_batch, job_fields.budget_usd)
    res = estimate(at_longest, mode, progress, job=the_job)
    res.plan = job_plan
    if data.exact:
        res.plan_notes.append(f"from the data: the longest batch the runner forms, {longest.words()}, sets the "
                              f"peak (the plan's micro_batch x seq_len is {plan.training.micro_batch} x "
                              f"{plan.training.seq_len})")
    else:
        res.plan_notes.append(f"from the data, approximately: {data.source}; the longest batch, {longest.words()}, "
                              "sets the peak")
    res.plan_notes += list(job.notes)
    if res.time is not None and gpu is not None:
        res.time = data_job_time(plan, ctx.shape, gpu, job)
    nominal = analytic(plan, ctx.shape)
    over = None
    if plan.hardware.device == "cuda":
        over = _reserve_over_run(plan, ctx, job)
    return DataEstimate(res, data, job, nominal.peak_allocated_bytes, nominal.peak_reserved_bytes, over)


def _reserve_over_run(plan: Plan, ctx: PlanContext, job: DataJob):
    """advisor.fragmentation over process 0's batches, each shape's terms from the analytic estimate."""
    from advisor.fragmentation import plan_over_run

    return plan_over_run(plan, ctx.shape, ctx.gpu.memory_bytes if ctx.gpu else None, job.shapes,
                         (job.longest.rows, job.longest.length))
