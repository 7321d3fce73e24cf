"""The plan form (the app's inputs, on the Plan screen and the job's on the Advice screen) -> service
calls -> what the screens show. Headless: no Textual here, and no formula either.

The form keeps its inputs as a flat dict of strings (``FORM_DEFAULTS``): the plan's fields and the
job's (``job_examples``, ``job_avg_tokens``, ``epochs``, ``job_target_batch``, ``job_budget``), so one
form is the whole plan the app holds. :func:`evaluate` turns it into a plan dict, calls
:func:`advisor.service.build` (every problem at once, typed) and puts each problem on the form field
of its plan field (``LOC_FIELD``); a problem with no field is general. The numbers come from
:mod:`advisor.service` alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.problems import Change, Problem, Problems
from advisor.spec import Plan, field_table

FORM_DEFAULTS: dict[str, Any] = {
    "model": "meta-llama/Llama-3.1-8B", "gpu": "rtx-4090", "gpus": "1", "zero": "0", "task": "training",
    "method": "qlora", "precision": "bf16", "optimizer": "adamw", "batch": "1", "seq": "2048", "accum": "1",
    "ckpt": True, "lora_r": "16", "lora_alpha": "16", "lora_targets": "all-linear", "weight_quant": "none",
    "transformers": "5", "harness": "tuneplan", "offload": False, "liger": False, "device": "cuda",
    # the job (job.*, run.epochs), edited on the Advice screen
    "job_examples": "1000", "job_avg_tokens": "512", "epochs": "3", "job_target_batch": "16", "job_budget": "",
}
JOB_INPUTS = ("job_examples", "job_avg_tokens", "epochs", "job_target_batch", "job_budget")
CHECKBOXES = ("ckpt", "offload", "liger")  # true/false fields: no bad value exists
# the form's choice of transformers release: one per set of memory rules (advisor/software.py); a loaded
# plan's own release string is offered beside them
TRANSFORMERS_CHOICES = [("transformers 5", "5"), ("transformers 4.49-4.57", "4.57"),
                        ("transformers 4.46-4.48", "4.48")]
# what runs the job, whose band the estimate carries (training.harness; advisor.gpu_memory.HARNESS_BANDS)
HARNESS_CHOICES = [("tuneplan run", "tuneplan"), ("HF Trainer / TRL", "hf-trainer"), ("another harness", "other")]

NO_GPU = "none"  # the GPU select's "no GPU" choice (plan.hardware.gpu = None)

# plan field -> the app's form field: the plan schema's own metadata (advisor.spec.field_table); "model"
# is where a whole model section that is wrong lands
LOC_FIELD = {path: meta["form"] for path, meta in field_table().items() if meta.get("form")} | {"model": "model"}
# form field -> its help (the tooltip): the description of the first plan field it edits (training's, where a
# form field edits training.* or inference.* by the task)
FIELD_HELP: dict[str, str] = {}
for _path, _meta in field_table().items():
    if _meta.get("form") and _meta["description"]:
        FIELD_HELP.setdefault(_meta["form"], _meta["description"])


def say_change(c: Change, on_field: str | None = None) -> str:
    """A fix as the app words it: on the field it changes, the value alone ('use 2048 or less'); on
    another field, that field by its form name ('set method to full')."""
    here = LOC_FIELD.get(c.field)
    if on_field is not None and here == LOC_FIELD.get(on_field):
        return "use " + c.words("", "").strip()
    return "set " + c.words(here or c.field, " to ")
_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


def form_from_plan(plan: Plan) -> dict[str, Any]:
    """A loaded plan.yaml -> the form's values."""
    t, i, hw = plan.training, plan.inference, plan.hardware
    inf = plan.task == "inference"
    targets = t.lora.targets if isinstance(t.lora.targets, str) else ",".join(t.lora.targets)
    return {
        "model": plan.model.ref, "gpu": hw.gpu or NO_GPU, "gpus": str(hw.gpus), "zero": str(hw.zero), "task": plan.task,
        "method": t.method, "precision": i.precision if inf else t.precision, "optimizer": t.optimizer,
        "batch": str(i.batch if inf else t.micro_batch), "seq": str(i.seq_len if inf else t.seq_len),
        "accum": str(t.grad_accum), "ckpt": t.grad_checkpointing, "lora_r": str(t.lora.r),
        "lora_alpha": f"{t.lora.alpha:g}", "lora_targets": targets, "weight_quant": i.weight_quant,
        "transformers": t.transformers, "harness": t.harness, "offload": t.offload_activations, "liger": t.liger,
        "device": hw.device,
        "job_examples": str(plan.job.examples), "job_avg_tokens": str(plan.job.avg_tokens),
        "epochs": f"{plan.run.epochs:g}", "job_target_batch": str(plan.job.target_batch),
        "job_budget": "" if plan.job.budget_usd is None else f"{plan.job.budget_usd:g}",
    }


def plan_dict(form: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The form's strings as a nested plan dict; pydantic does the parsing and reports what is wrong.
    ``base`` (a loaded plan's dump) keeps the sections the form does not show (data, run, ...)."""
    import copy

    d = copy.deepcopy(base) if base else {}
    d.setdefault("model", {})["ref"] = form["model"].strip()
    d["task"] = form["task"]
    tr = d.setdefault("training", {})
    tr.update({"method": form["method"], "optimizer": form["optimizer"], "grad_accum": form["accum"],
               "grad_checkpointing": bool(form["ckpt"]), "transformers": form.get("transformers") or "5",
               "harness": form.get("harness") or "tuneplan", "offload_activations": bool(form.get("offload")),
               "liger": bool(form.get("liger"))})
    tr.setdefault("lora", {}).update({"r": form["lora_r"], "alpha": form["lora_alpha"],
                                      "targets": form["lora_targets"]})
    inf = d.setdefault("inference", {})
    if form["task"] == "inference":
        inf.update({"batch": form["batch"], "seq_len": form["seq"], "weight_quant": form["weight_quant"]})
        if form["precision"] in ("fp32", "bf16", "fp16"):
            inf["precision"] = form["precision"]
    else:
        tr.update({"precision": form["precision"], "micro_batch": form["batch"], "seq_len": form["seq"]})
    hw = d.setdefault("hardware", {})
    hw.update({"gpu": None if form["gpu"] in (NO_GPU, "", None) else form["gpu"], "gpus": form["gpus"],
               "zero": int(form["zero"]) if str(form["zero"]).isdigit() else form["zero"],
               "device": form.get("device") or "cuda"})
    job = d.setdefault("job", {})
    for name, key in (("job_examples", "examples"), ("job_avg_tokens", "avg_tokens"),
                      ("job_target_batch", "target_batch")):
        if name in form:
            job[key] = form[name]
    if "job_budget" in form:
        job["budget_usd"] = None if str(form["job_budget"]).strip() in ("", "none") else form["job_budget"]
    if "epochs" in form:
        d.setdefault("run", {})["epochs"] = form["epochs"]
    return d


def apply_changes(form: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """The form with plan changes applied (plan field -> value: a recommendation's, a nearest plan's, a
    problem's fix), each on its form field; a change with no form field is left out."""
    out = dict(form)
    for path, v in changes.items():
        name = LOC_FIELD.get(path)
        if name is None:
            continue
        if name == "gpu" and v in (None, ""):
            v = NO_GPU
        elif isinstance(v, list):
            v = ",".join(v)
        elif isinstance(v, float):
            v = f"{v:g}"
        out[name] = v if isinstance(v, bool) or name in ("gpu",) else str(v)
    return out


def needs_fetch(ref: str) -> bool:
    """True for a hub id that is neither bundled nor local: resolving it may reach the network (and
    count the architecture with torch), so the form resolves it on Enter, in a worker."""
    from advisor.service import is_offline_ref

    ref = ref.strip()
    if not ref or Path(ref).expanduser().exists() or is_offline_ref(ref):
        return False
    return bool(_HUB_ID.fullmatch(ref))


@dataclass
class Evaluation:
    """Everything the plan screen shows for one state of the form."""

    form: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)  # form field -> reason
    general: list[str] = field(default_factory=list)  # problems that belong to no single field
    problems: list[Problem] = field(default_factory=list)  # the typed problems behind errors and general
    plan: Plan | None = None
    shape: Any = None
    gpu: Any = None
    result: Any = None  # advisor.service.EstimateResult
    compare: list[Any] = field(default_factory=list)  # advisor.service.Variant
    gpu_rows: list[Any] = field(default_factory=list)  # advisor.service.GpuRow
    limits: list[Any] = field(default_factory=list)  # advisor.limits.Limit: longest seq, largest micro-batch
    serving: Any = None  # advisor.service.ServeResult: an inference plan on a GPU, served with vLLM
    serving_error: str | None = None  # why vLLM's estimate could not be made (its problems, worded)

    @property
    def ok(self) -> bool:
        return self.result is not None

    @property
    def status(self) -> str | None:
        """The one fit verdict (advisor.policy) of the plan on its GPU; None without a GPU."""
        return self.result.status if self.result is not None else None

    @property
    def context(self):
        from advisor.service import PlanContext

        return PlanContext(self.plan, self.shape, self.gpu)


def place(problems: list[Problem]) -> tuple[dict[str, str], list[str]]:
    """Each typed problem on its form field (by plan field), or general when it has none on the form."""
    errors: dict[str, str] = {}
    general: list[str] = []
    for p in problems:
        name = LOC_FIELD.get(p.field or "")
        message = p.worded(lambda c, f=p.field: say_change(c, f))
        if name is None:
            general.append(f"{p.field}: {message}" if p.field else message)
        else:
            errors[name] = f"{errors[name]}; {message}" if name in errors else message
    return errors, general


def evaluate(form: dict[str, Any], base: dict[str, Any] | None = None, job: Any = None) -> Evaluation:
    """Validate and estimate one state of the form (with the job, its time and cost, and the longest
    sequence and largest micro-batch that fit the GPU); never raises on user input. ``job`` (an
    advisor.job.Job) replaces the form's job fields."""
    from advisor import service

    ev = Evaluation(dict(form))
    ref = form["model"].strip()
    if needs_fetch(ref) and ref not in FETCHED:
        ev.errors["model"] = f"{ref!r} is not a bundled profile; press Enter to fetch its config.json from the hub"
        return ev
    data = plan_dict(form, base)
    if job is not None:  # the job's fields, as the plan carries them (job.*, run.epochs)
        for section, values in job.plan_values().items():
            data.setdefault(section, {}).update(values)
    try:
        ctx = service.build(data)
    except Problems as e:
        ev.problems = e.items
        ev.errors, ev.general = place(e.items)
        return ev
    ev.plan, ev.shape, ev.gpu = ctx.plan, ctx.shape, ctx.gpu
    try:
        ev.result = service.estimate(ctx)
        ev.compare = service.compare(ctx)
        ev.gpu_rows = service.gpu_rows(ctx)
        if ctx.gpu is not None and ctx.plan.task == "training" and ctx.plan.hardware.device == "cuda":
            ev.limits = [service.limits(ctx, "seq"), service.limits(ctx, "batch")]
        if ctx.plan.task == "inference" and service.default_engine(ctx) == "vllm":
            try:  # vLLM at the plan's seq_len (max_model_len) over its GPUs (tensor parallel)
                ev.serving = service.serve(ctx)
            except Problems as e:
                ev.serving_error = "; ".join(p.worded(lambda c, f=p.field: say_change(c, f)) for p in e.items)
    except Exception as e:  # an estimator limit (EstimateError) or anything unforeseen: shown, never a crash
        ev.general.append(f"{type(e).__name__}: {e}")
        ev.result = None
    return ev


FETCHED: set[str] = set()  # hub ids resolved in this process (after a fetch on Enter): cached, now quick


def fetch_model(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> str | None:
    """Resolve a hub id (network, maybe torch): call from a worker thread. Returns the error, or None."""
    from advisor import service

    try:
        service.resolve_model(ref.strip(), revision, trust_remote_code)
    except Problems as e:
        return "; ".join(p.message for p in e.items)
    FETCHED.add(ref.strip())
    return None
