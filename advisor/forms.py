"""The form -> advisor calls -> what the screens show. No Textual here, no formula either.

The plan screen keeps its inputs as a flat dict of strings (``FORM_DEFAULTS``); :func:`evaluate`
turns it into a plan dict, calls :func:`advisor.cli.load_plan_and_shape` (every problem at once)
and maps each problem back to the form field it belongs to. The numbers come from
:func:`advisor.memory.estimate` and :func:`advisor.recommend.train_hours` alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.spec import Plan

GIB = 1024**3

FORM_DEFAULTS: dict[str, Any] = {
    "model": "meta-llama/Llama-3.1-8B", "gpu": "rtx-4090", "gpus": "1", "zero": "0", "task": "training",
    "method": "qlora", "precision": "bf16", "optimizer": "adamw", "batch": "1", "seq": "2048", "accum": "1",
    "ckpt": True, "lora_r": "16", "lora_alpha": "16", "lora_targets": "all-linear", "weight_quant": "none",
}

NO_GPU = "none"  # the GPU select's "no GPU" choice (plan.hardware.gpu = None)

# pydantic location -> form field
LOC_FIELD = {
    "model.ref": "model", "model": "model", "hardware.gpu": "gpu", "hardware.gpus": "gpus", "hardware.zero": "zero",
    "task": "task", "training.method": "method", "training.precision": "precision",
    "inference.precision": "precision", "training.optimizer": "optimizer", "training.micro_batch": "batch",
    "inference.batch": "batch", "training.seq_len": "seq", "inference.seq_len": "seq",
    "training.grad_accum": "accum", "training.grad_checkpointing": "ckpt", "training.lora.r": "lora_r",
    "training.lora.alpha": "lora_alpha", "training.lora.targets": "lora_targets",
    "inference.weight_quant": "weight_quant",
}
# problems from advisor.spec.check_against_shape / load_plan_and_shape that carry no location
KEYWORD_FIELD = (("sequence length", "seq"), ("LoRA rank", "lora_r"), ("LoRA targets", "lora_targets"),
                 ("no linear layers", "method"), ("no bf16 support", "precision"))
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
               "grad_checkpointing": bool(form["ckpt"])})
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
               "zero": int(form["zero"]) if str(form["zero"]).isdigit() else form["zero"]})
    return d


def needs_fetch(ref: str) -> bool:
    """True for a hub id that is neither bundled nor local: resolving it may reach the network (and
    count the architecture with torch), so the form resolves it on Enter, in a worker."""
    from advisor.model import _bundled_lookup  # the advisor's own forgiving profile match

    ref = ref.strip()
    if not ref or Path(ref).expanduser().exists() or _bundled_lookup(ref) is not None:
        return False
    return bool(_HUB_ID.fullmatch(ref))


@dataclass
class Evaluation:
    """Everything the plan screen shows for one state of the form."""

    form: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)  # field -> reason
    general: list[str] = field(default_factory=list)  # problems that belong to no single field
    plan: Plan | None = None
    shape: Any = None
    gpu: Any = None
    result: dict[str, Any] | None = None  # advisor.cli.estimate_result
    status: str | None = None  # advisor.cli.fit_status
    compare: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (label, estimate_result)
    gpu_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result is not None


def _field_of(problem: str, model_err: str | None, gpu_err: str | None) -> tuple[str | None, str]:
    m = re.match(r"^--[\w-]+ \(([\w.]+)\): (.*)$", problem, re.S) or re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$",
                                                                             problem, re.S)
    if m and m.group(1) in LOC_FIELD:
        return LOC_FIELD[m.group(1)], m.group(2)
    if problem == model_err:
        return "model", problem
    if problem == gpu_err:
        return "gpu", problem
    for word, name in KEYWORD_FIELD:
        if word in problem:
            return name, problem
    return None, problem


def _errors_of(data: dict[str, Any], problems: list[str]) -> tuple[dict[str, str], list[str]]:
    from advisor.gpus import GpuError, find_gpu
    from advisor.model import ModelError, resolve

    model_err = gpu_err = None
    m = data["model"]
    try:
        resolve(m.get("ref", ""), m.get("revision"), bool(m.get("trust_remote_code")))
    except ModelError as e:
        model_err = str(e)
    if data["hardware"].get("gpu"):
        try:
            find_gpu(data["hardware"]["gpu"])
        except GpuError as e:
            gpu_err = str(e)
    errors: dict[str, str] = {}
    general: list[str] = []
    for p in problems:
        name, msg = _field_of(p, model_err, gpu_err)
        if name is None:
            general.append(msg)
        else:
            errors[name] = f"{errors[name]}; {msg}" if name in errors else msg
    return errors, general


def evaluate(form: dict[str, Any], base: dict[str, Any] | None = None, tokens: float | None = None) -> Evaluation:
    """Validate and estimate one state of the form; never raises on user input."""
    from advisor.cli import UserError, estimate_result, fit_status, load_plan_and_shape

    ev = Evaluation(dict(form))
    ref = form["model"].strip()
    if needs_fetch(ref):
        if ref not in FETCHED:
            ev.errors["model"] = (f"{ref!r} is not a bundled profile; press Enter to fetch its config.json "
                                  "from the hub")
            return ev
    data = plan_dict(form, base)
    try:
        ev.plan, ev.shape, ev.gpu = load_plan_and_shape(data)
    except UserError as e:
        ev.errors, ev.general = _errors_of(data, e.problems)
        return ev
    try:
        ev.result = estimate_result(ev.plan, ev.shape, ev.gpu)
        ev.compare = compare(ev.plan, ev.shape, ev.gpu)
        ev.gpu_rows = gpu_rows(ev.plan, ev.shape, tokens)
    except Exception as e:  # an estimator limit (EstimateError) or anything unforeseen: shown, never a crash
        ev.general.append(f"{type(e).__name__}: {e}")
        ev.result = None
        return ev
    if ev.gpu is not None:
        ev.status = fit_status(ev.result["peak_reserved_bytes"], ev.gpu.memory_bytes)
    return ev


FETCHED: set[str] = set()  # hub ids resolved in this process (after a fetch on Enter): cached, now quick


def fetch_model(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> str | None:
    """Resolve a hub id (network, maybe torch): call from a worker thread. Returns the error, or None."""
    from advisor.model import ModelError, resolve

    try:
        resolve(ref.strip(), revision, trust_remote_code)
    except ModelError as e:
        return str(e)
    FETCHED.add(ref.strip())
    return None


def compare(plan: Plan, shape, gpu) -> list[tuple[str, dict[str, Any]]]:
    """The same settings three ways: Full / LoRA / QLoRA for training, none / int8 / nf4 weights for serving."""
    from advisor.cli import estimate_result

    out = []
    if plan.task == "training":
        variants = [("Full", "method", "full"), ("LoRA", "method", "lora"), ("QLoRA", "method", "qlora")]
        section = "training"
    else:
        variants = [("16-bit", "weight_quant", "none"), ("int8", "weight_quant", "int8"),
                    ("nf4", "weight_quant", "nf4")]
        section = "inference"
    for label, key, value in variants:
        sub = getattr(plan, section).model_copy(update={key: value})
        try:
            out.append((label, estimate_result(plan.model_copy(update={section: sub}), shape, gpu)))
        except Exception as e:  # noqa: BLE001 - one variant the estimator refuses must not hide the others
            out.append((label, {"error": str(e)}))
    return out


def gpu_rows(plan: Plan, shape, tokens: float | None) -> list[dict[str, Any]]:
    """Every GPU in the table: does this plan fit (advisor.cli.fit_status) and what the job would cost
    (advisor.recommend.train_hours x the table's price)."""
    from advisor.cli import estimate_result, fit_status
    from advisor.gpus import gpu_table
    from advisor.recommend import train_hours

    n, zero = plan.hardware.gpus, plan.hardware.zero
    need = estimate_result(plan, shape, None)["peak_reserved_bytes"]  # per GPU; the card does not change it
    rows = []
    for g in gpu_table().values():
        row: dict[str, Any] = {"id": g.id, "name": g.name, "memory_bytes": g.memory_bytes, "need_bytes": need,
                               "status": fit_status(need, g.memory_bytes), "hours": None, "cost_usd": None,
                               "price": g.price_usd_hour, "bf16": g.bf16}
        if plan.task == "training" and tokens:
            row["hours"] = train_hours(shape, plan, g, n, zero, tokens)
            if g.price_usd_hour is not None:
                row["cost_usd"] = row["hours"] * n * g.price_usd_hour
        if plan.task == "training" and not g.bf16 and plan.training.precision in ("bf16", "amp-bf16"):
            row["status"] = "no-bf16"
        rows.append(row)
    order = {"fits": 0, "tight": 1, "no-bf16": 2, "oom": 3}
    rows.sort(key=lambda r: (order[r["status"]], r["cost_usd"] if r["cost_usd"] is not None else float("inf"),
                             r["memory_bytes"]))
    return rows
