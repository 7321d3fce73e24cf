"""What `tuneplan run` checks before it loads anything big: the plan, the data, the model, the run directory.

Shared by the command (:mod:`runner.commands`) and the launcher (:mod:`runner.launch`, which the TUI
uses), so both refuse the same inputs with the same messages. Every problem is raised at once as
:class:`advisor.problems.Problems` (exit code 2, one line each).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from advisor.problems import Problem, Problems


def inputs(a: argparse.Namespace):
    """(plan, plan_path, run_dir, overrides) from `tuneplan run`'s arguments, or Problems."""
    from advisor.planfile import apply_overrides, consent, load_plan
    from runner.rundir import default_run_dir

    overrides = list(a.overrides or [])
    plan_path = a.plan
    if a.resume:
        if plan_path and "=" in plan_path and not Path(plan_path).exists():
            overrides.insert(0, plan_path)
            plan_path = None
        if plan_path:
            raise Problems("give either PLAN or --resume RUN_DIR, not both (the run directory has its plan.yaml)")
        run_dir = Path(a.resume)
        if not run_dir.is_dir():
            raise Problems(f"{run_dir} is not a run directory ("
                           + ("it is a file)" if run_dir.exists() else "it does not exist)"))
        plan_path = run_dir / "plan.yaml"
        if not plan_path.is_file():
            raise Problems(f"{run_dir} is not a run directory (no plan.yaml)")
    elif not plan_path:
        raise Problems("give a plan file: tuneplan run PLAN.yaml [key=value ...] (or --resume RUN_DIR)")
    trust = bool(getattr(a, "trust_remote_code", False))
    plan = load_plan(plan_path, trust)  # SpecError is Problems: every mistake, with its plan field
    if overrides:  # an override cannot consent to custom code either: only --trust-remote-code does
        plan = consent(apply_overrides(plan, overrides), trust, "the override model.trust_remote_code=true")
    if not a.resume:
        run_dir = Path(a.run_dir) if a.run_dir else default_run_dir(plan)
    return plan, Path(plan_path), run_dir, overrides


def _data_problems(plan, plan_path: Path | None) -> tuple[object, list[str]]:
    problems: list[str] = []
    data_path = plan.data.path
    if not data_path:
        return plan, ["data.path is not set; give a .jsonl/.json/.csv file (override: data.path=FILE)"]
    p = Path(data_path).expanduser()
    if not p.exists() and not p.is_absolute() and plan_path is not None and (plan_path.parent / p).exists():
        p = plan_path.parent / p
    if not p.exists():
        return plan, [f"data file {data_path} does not exist"]
    if not p.is_file():
        what = "a directory" if p.is_dir() else "not a regular file"
        return plan, [f"data.path {data_path} is {what}; give a .jsonl/.json/.csv file"]
    from runner.data import DataError, load_and_check

    try:
        _, _, found = load_and_check(p, plan.data.format)
    except DataError as e:
        found = e.problems
    if found:
        more = len(found) - 10
        problems += [f"{p}: {x}" for x in found[:10]] + ([f"... and {more} more"] if more > 0 else [])
        problems.append(f"see `tuneplan data check {p}`")
    plan = plan.model_copy(update={"data": plan.data.model_copy(update={"path": str(p.resolve())})})
    return plan, problems


def _model_problems(plan, log) -> tuple[object, list]:
    """The model directory (config.json and weights), then the plan against the model's shape, as
    `tuneplan estimate` checks it (advisor.service): maximum positions, LoRA targets, rank, precision."""
    from runner.modeldir import ModelLoadError, check_ref, looks_local

    ref = plan.model.ref
    try:
        check_ref(ref)
    except ModelLoadError as e:
        return plan, [str(e)]
    if looks_local(ref):
        plan = plan.model_copy(update={"model": plan.model.model_copy(
            update={"ref": str(Path(ref).expanduser().resolve())})})
    from advisor.service import UnshapedModel, context_of, model_shape

    try:
        model_shape(plan.model.ref, plan.model.revision, plan.model.trust_remote_code)
    except UnshapedModel as e:  # an architecture the advisor cannot shape: the run may still load it
        log(f"warning: the plan cannot be checked against the model: {e.items[0].what}")
        return plan, []
    except Problems as e:  # a config.json that no model can be built from
        return plan, [p.what for p in e.items]

    try:
        context_of(plan)
    except Problems as e:
        return plan, list(e.items)
    return plan, []


def preflight(plan, plan_path: Path | None, force: bool = False, log=print, *, run_dir: Path | None = None,
              resume: bool = False, here: bool = True):
    """Check what can be checked before loading anything big; every problem at once.
    Returns the plan with the data path and a local model path made absolute. ``here``: the run starts
    on this machine (False for --dry-run, which prepares the command for another: no GPU needed here,
    and the processes per node are not this machine's cores)."""
    problems: list = []
    if plan.task != "training":
        problems.append("task is inference; `tuneplan run` fine-tunes (set task: training)")
    from advisor.software import installed, mismatch

    why = plan.task == "training" and mismatch(plan.training.transformers, "`tuneplan run`")
    if why:
        problems.append(Problem(f"{why}: the live memory would not match the estimate", "training.transformers",
                                f"set it to the installed release (override training.transformers={installed()})"))
    plan, found = _data_problems(plan, plan_path)
    problems += found
    plan, found = _model_problems(plan, log)
    problems += found
    if run_dir is not None:
        from runner.rundir import check

        try:
            check(run_dir, plan, resume=resume)
        except Problems as e:
            problems += e.items
    if plan.task == "training" and plan.training.liger and here:  # Triton on CUDA, an optional extra
        from advisor.stack import liger_problem

        why = liger_problem(plan.hardware.device)
        if why:
            problems.append(Problem(why, "training.liger"))
    if plan.hardware.device == "cpu" and here:
        import os

        per_node, cores = plan.hardware.gpus // plan.hardware.nodes, os.cpu_count() or 1
        if per_node > cores:
            problems.append(Problem(f"hardware.gpus={plan.hardware.gpus} on the CPU starts {per_node} training "
                                    f"processes on this machine, which has {cores} cores", "hardware.gpus",
                                    f"use at most {cores} processes per machine"))
    if problems:
        raise Problems(problems)
    if plan.model.trust_remote_code:  # consented with --trust-remote-code (planfile.consent)
        log(f"notice: --trust-remote-code: the Python code in {plan.model.ref} runs with your permissions while "
            "the model loads")
    if plan.hardware.device == "cuda" and not here:
        fit_check(plan, force, log)
    elif plan.hardware.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise Problems(Problem("hardware.device is cuda but no CUDA GPU is visible here", None,
                                   "run on the CPU with the override hardware.device=cpu"))
        fit_check(plan, force, log)
    return plan


def fit_check(plan, force: bool, log) -> None:
    """Warn (and require --force) when the advisor says the plan does not fit hardware.gpu: the same
    verdict as `tuneplan estimate` and the TUI (advisor.service.check_fit, advisor.policy)."""
    from advisor.service import check_fit
    from advisor.units import gib_str

    verdict, why = check_fit(plan)
    if why:
        log(f"warning: cannot check the fit before running: {why}")
    if verdict is None:
        return
    words = (f"the plan needs about {gib_str(verdict.need_bytes)} per GPU; {plan.hardware.gpu} has "
             f"{gib_str(verdict.capacity_bytes)}")
    if verdict.status == "oom" and not force:
        raise Problems([f"{words}: it will not fit", "`tuneplan recommend --plan FILE` finds a plan that fits; "
                        "add --force to run anyway"])
    if verdict.status != "fits":
        log(f"warning: {words}" + (" (tight)" if verdict.status == "tight" else " (--force: running anyway)"))
