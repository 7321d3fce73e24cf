"""`tuneplan recommend` and `tuneplan guide`: advice commands, added to the main parser by
:func:`add_commands`. User mistakes raise advisor.problems.Problems (exit code 2, one line each)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from advisor.cli.common import add_model_arguments, put, take_model
from advisor.problems import Problem, Problems
from advisor.service import DEFAULT_AVG_TOKENS, DEFAULT_EPOCHS, DEFAULT_EXAMPLES, DEFAULT_SEQ, DEFAULT_TARGET_BATCH
from advisor.spec import HARNESSES, METHODS, OPTIMIZERS, field_table

TABLE_ROWS = 20


def add_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("recommend", help="method, GPU, batch, time and cost for a fine-tune",
                       description="Choose method (full/LoRA/QLoRA), GPU and count, micro-batch and "
                       "checkpointing; estimate hours and dollars. Without --gpu, ranks every priced GPU.")
    add_model_arguments(r)
    r.add_argument("--gpu", help="GPU name, e.g. 'RTX 4090', h100, t4 (default: rank all priced GPUs)")
    r.add_argument("--gpus", type=int, help="fix the number of GPUs (default: 1, more only when one cannot hold it)")
    r.add_argument("--examples", type=int, help=f"training examples (default {DEFAULT_EXAMPLES})")
    r.add_argument("--avg-tokens", type=int,
                   help=f"mean tokens per example, for time and cost (default {DEFAULT_AVG_TOKENS})")
    r.add_argument("--epochs", type=float, help=f"passes over the data (default {DEFAULT_EPOCHS:g})")
    r.add_argument("--batch", type=int, help=f"target effective batch (default {DEFAULT_TARGET_BATCH})")
    r.add_argument("--seq", type=int, help=f"tokens per sequence for memory (default {DEFAULT_SEQ} or the "
                   "model's maximum if smaller)")
    r.add_argument("--budget", type=float, help="most US dollars to spend; options over it are marked")
    r.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of methods to consider (default full,lora,qlora)")
    r.add_argument("--optimizer", choices=OPTIMIZERS, help="default: adamw")
    r.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    r.add_argument("--transformers", metavar="VERSION", help="transformers release the run will use: 5 (default) "
                   "or 4.46-4.57 (a mixture of experts is quantized by QLoRA on 4.x)")
    r.add_argument("--harness", choices=HARNESSES, help=field_table()["training.harness"]["description"]
                   .replace("%", "%%") + " (default tuneplan)")
    from advisor.cli.serving import add_serving_arguments

    add_serving_arguments(r)  # --serving: a question of its own (vLLM: context, requests at once, weights)
    r.add_argument("--device", choices=["cuda"], default="cuda", help="recommendations are for GPUs")
    r.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    r.add_argument("--revision", help="hub revision")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--save", metavar="PLAN", help="write the recommended choice as a plan.yaml for `tuneplan run`")
    r.set_defaults(func=cmd_recommend)

    g = sub.add_parser("guide", help="prompt, RAG or fine-tune? a short questionnaire",
                       description="Fine-tuning is for form, RAG is for facts. Answer with flags; get a verdict.")
    g.add_argument("--gap", choices=["knowledge", "behaviour", "both", "unsure"], default="unsure",
                   help="why the model fails: lacks knowledge, behaves wrongly (format/style), both, or unsure")
    g.add_argument("--changes-often", action="store_true", help="the needed knowledge changes often")
    g.add_argument("--cite", action="store_true", help="answers must cite their sources")
    g.add_argument("--examples", type=int, default=0, help="labelled input/output pairs you have")
    g.add_argument("--prompting-tried", action="store_true", help="careful prompting was tried and measured")
    g.add_argument("--latency-limits", action="store_true", help="serving latency or per-query cost is a hard limit")
    g.add_argument("--many-query-types", action="store_true", help="the model must keep serving other tasks")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_guide)


# --- recommend ----------------------------------------------------------------------------------

def _inputs(a: argparse.Namespace):
    """Validate flags, resolve model and GPU; every problem reported together."""
    from advisor import service

    take_model(a)
    if not a.model:
        raise Problems(Problem("no model given", "model.ref", "name it: `tuneplan recommend MODEL` or --model MODEL "
                               "(a bundled profile, a config.json, a model directory or a hub id)"))

    problems: list[Problem] = [p for p in service.job_problems(1, 1, 1, gpus=a.gpus) if p.field == "job.gpus"]
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        problems.append(Problem(f"unknown {', '.join(bad) or '(empty)'}", "job.methods",
                                f"use a comma list of {', '.join(METHODS)}"))
    if a.save is not None:
        problems += save_problems(a.save)
    gpu = None
    if a.gpu is not None:
        try:
            gpu = service.find_gpu(a.gpu)
        except Problems as e:
            problems += e.items
    try:  # resolved once here (a hub id costs a request); service.build then hits the cache
        shape = service.resolve_model(a.model, a.revision, a.trust_remote_code)
    except Problems as e:
        raise Problems([*problems, *e.items]) from None
    training: dict[str, Any] = {"seq_len": a.seq if a.seq is not None else service.default_seq(shape)}
    put(training, "optimizer", a.optimizer)
    put(training, "transformers", a.transformers)
    put(training, "harness", a.harness)
    if a.lora_r is not None:
        training["lora"] = {"r": a.lora_r}
    model = {"ref": a.model, "trust_remote_code": a.trust_remote_code}
    put(model, "revision", a.revision)
    job: dict[str, Any] = {}
    for key, value in (("examples", a.examples), ("avg_tokens", a.avg_tokens), ("target_batch", a.batch),
                       ("budget_usd", a.budget)):
        put(job, key, value)
    run: dict[str, Any] = {}
    put(run, "epochs", a.epochs)
    data = {"model": model, "task": "training", "training": training, "hardware": {"gpu": None, "device": a.device},
            "job": job, "run": run}
    ctx = None
    try:
        ctx = service.build(data)
    except Problems as e:
        problems += e.items
    if problems:
        raise Problems(problems)
    return ctx, gpu, methods


def save_problems(path: str) -> list[Problem]:
    """--save PLAN must name a file that can be written (checked before the search, so nothing is lost)."""
    from pathlib import Path

    if not path.strip():
        return [Problem("needs a file name", "job.save", "e.g. --save plan.yaml")]
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            return [Problem(f"{path} is a directory", "job.save", f"name a file, e.g. {Path(path) / 'plan.yaml'}")]
        if not p.parent.is_dir():
            return [Problem(f"the folder {p.parent} does not exist", "job.save", "create it first, or save elsewhere")]
    except OSError as e:  # a name longer than the file system allows, a path through a file
        return [Problem(f"cannot save to {path[:80]}{'...' if len(path) > 80 else ''}: {e.strerror}", "job.save",
                        "give a shorter file name in a folder that exists")]
    return []


def cmd_recommend(a: argparse.Namespace) -> int:
    from advisor import service
    from advisor.cli.serving import cmd_recommend_serving, serving_flags_without_serving

    if a.serving:  # which GPU serves the model (advisor/cli/serving.py); the training flags are not read
        return cmd_recommend_serving(a)
    if serving_flags_without_serving(a):
        raise Problems(serving_flags_without_serving(a))
    ctx, gpu, methods = _inputs(a)
    plan = ctx.plan
    adv = service.advise(ctx, None, gpu, a.gpus, methods)  # the plan's job (job.*, run.epochs)
    if a.json:
        print(json.dumps(adv.to_json(), indent=2))
    else:
        print_advice(adv)
    if a.save is not None:
        if adv.choice is None:
            print(f"tuneplan: nothing fits, so no plan was written to {a.save}", file=sys.stderr)
        else:
            from advisor.planfile import save_plan

            path = save_plan(chosen_plan(plan, adv.choice), a.save)
            if not a.json:
                print(f"plan saved to {path}; run it with: tuneplan run {path} data.path=YOUR.jsonl")
    return 0 if adv.choice is not None else 1


def chosen_plan(plan, c):
    """The base plan with the recommended option's method, precision, batch, GPUs and checkpointing."""
    from advisor import service

    return service.apply_changes(plan, c.changes())


def print_advice(adv) -> None:
    from rich.console import Console

    from advisor import present

    con = Console()
    con.print(f"[bold]{present.job_line(adv)}[/]")
    con.print()
    con.print(present.recommendation_text(adv, notes=False), end="")
    con.print(present.options_table(adv, TABLE_ROWS))
    if len(adv.options) > TABLE_ROWS:
        con.print(f"[dim]{len(adv.options) - TABLE_ROWS} more options: use --json[/]")
    print_nearest(con, adv.nearest)
    for n in adv.notes:
        con.print(f"[dim]note: {n}[/]")
    for n in adv.assumptions:
        con.print(f"[dim]assumed: {n}[/]")


def print_nearest(con, nearest) -> None:
    """The nearest plans that fit, each with the command that shows it (`tuneplan estimate ...`)."""
    import shlex

    from advisor.cli.common import plan_command
    from advisor.present import nearest_line

    if not nearest:
        return
    con.print("[bold]The nearest plans that fit[/] (each command shows its estimate):")
    for i, n in enumerate(nearest, 1):
        con.print(f" {i}. ", nearest_line(n), sep="")
        con.print(f"    {shlex.join(plan_command(n.plan))}", style="cyan", soft_wrap=True)


# --- guide --------------------------------------------------------------------------------------

def cmd_guide(a: argparse.Namespace) -> int:
    from advisor import present, service

    q, g = service.guide({"gap": a.gap, "knowledge_changes_often": a.changes_often, "must_cite_sources": a.cite,
                          "labelled_examples": a.examples, "prompting_tried": a.prompting_tried,
                          "latency_or_cost_limits": a.latency_limits, "many_query_types": a.many_query_types})
    if a.json:
        print(json.dumps({"questionnaire": q.model_dump(), **g.to_json()}, indent=2))
        return 0
    from rich.console import Console

    Console().print(present.guide_text(g), end="")
    return 0
