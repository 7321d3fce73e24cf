"""`tuneplan recommend` and `tuneplan guide`: advice commands, added to the main parser by
:func:`add_commands`. User mistakes raise advisor.cli.UserError (exit code 2, one line each)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from advisor.cli import UserError
from advisor.spec import METHODS, OPTIMIZERS

DEFAULT_EXAMPLES = 1000
DEFAULT_AVG_TOKENS = 512
DEFAULT_EPOCHS = 3.0
DEFAULT_SEQ = 2048
TABLE_ROWS = 20


def add_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("recommend", help="method, GPU, batch, time and cost for a fine-tune",
                       description="Choose method (full/LoRA/QLoRA), GPU and count, micro-batch and "
                       "checkpointing; estimate hours and dollars. Without --gpu, ranks every priced GPU.")
    r.add_argument("--model", required=True, help="bundled profile, local config.json or model dir, or hub id")
    r.add_argument("--gpu", help="GPU name, e.g. 'RTX 4090', h100, t4 (default: rank all priced GPUs)")
    r.add_argument("--gpus", type=int, help="fix the number of GPUs (default: 1, more only when one cannot hold it)")
    r.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                   help=f"training examples (default {DEFAULT_EXAMPLES})")
    r.add_argument("--avg-tokens", type=int, default=DEFAULT_AVG_TOKENS,
                   help=f"mean tokens per example, for time and cost (default {DEFAULT_AVG_TOKENS})")
    r.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS:g})")
    r.add_argument("--batch", type=int, default=16, help="target effective batch (default 16)")
    r.add_argument("--seq", type=int, help=f"tokens per sequence for memory (default {DEFAULT_SEQ} or the "
                   "model's maximum if smaller)")
    r.add_argument("--budget", type=float, help="most US dollars to spend; options over it are marked")
    r.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of methods to consider (default full,lora,qlora)")
    r.add_argument("--optimizer", choices=OPTIMIZERS, help="default: adamw")
    r.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    r.add_argument("--serving", action="store_true", help="also size serving (inference) on the GPU")
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
    from advisor.cli import load_plan_and_shape
    from advisor.gpus import GpuError, find_gpu
    from advisor.model import ModelError, resolve

    problems: list[str] = []
    if a.examples < 1:
        problems.append(f"--examples must be at least 1 (got {a.examples}): the number of training examples")
    if a.avg_tokens < 1:
        problems.append(f"--avg-tokens must be at least 1 (got {a.avg_tokens}): mean tokens per example")
    if not a.epochs > 0:
        problems.append(f"--epochs must be above 0 (got {a.epochs:g}); 1-3 is usual")
    if a.batch < 1:
        problems.append(f"--batch must be at least 1 (got {a.batch}): the target effective batch, e.g. 16")
    if a.budget is not None and not a.budget > 0:
        problems.append(f"--budget must be a positive amount of US dollars (got {a.budget:g}); leave it out for "
                        "no limit")
    if a.gpus is not None and not 1 <= a.gpus <= 4096:
        problems.append(f"--gpus must be between 1 and 4096 (got {a.gpus}); leave it out to let tuneplan choose")
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        problems.append(f"--methods: unknown {', '.join(bad) or '(empty)'}; use a comma list of "
                        f"{', '.join(METHODS)}")
    gpu = None
    if a.gpu is not None:
        try:
            gpu = find_gpu(a.gpu)
        except GpuError as e:
            problems.append(str(e))
    try:  # resolved once here (a hub id costs a request); load_plan_and_shape then hits the cache
        mp = resolve(a.model, a.revision, a.trust_remote_code).max_position
    except ModelError as e:
        raise UserError([*problems, str(e)]) from None
    # default sequence: 2048, or the model's maximum when shorter (gpt2: 1024)
    seq = a.seq if a.seq is not None else (min(DEFAULT_SEQ, mp) if mp else DEFAULT_SEQ)
    training: dict[str, Any] = {"seq_len": seq}
    if a.optimizer:
        training["optimizer"] = a.optimizer
    if a.lora_r is not None:
        training["lora"] = {"r": a.lora_r}
    model = {"ref": a.model, "trust_remote_code": a.trust_remote_code}
    if a.revision:
        model["revision"] = a.revision
    data = {"model": model, "task": "training", "training": training,
            "hardware": {"gpu": None, "device": a.device}}
    plan = shape = None
    try:
        plan, shape, _ = load_plan_and_shape(data)
    except UserError as e:
        problems += e.problems
    if problems:
        raise UserError(problems)
    return plan, shape, gpu, methods


def cmd_recommend(a: argparse.Namespace) -> int:
    from advisor.recommend import AdviceError, recommend, serving_capacity

    plan, shape, gpu, methods = _inputs(a)
    try:
        adv = recommend(shape, plan, gpu, gpus=a.gpus, examples=a.examples, avg_tokens=a.avg_tokens,
                        epochs=a.epochs, target_batch=a.batch, budget_usd=a.budget, methods=methods)
    except AdviceError as e:
        raise UserError(str(e)) from None
    serving = None
    if a.serving:
        if gpu is None:
            raise UserError("--serving needs --gpu: name the card to size serving on")
        serving = serving_capacity(shape, gpu, a.gpus or 1)
    if a.json:
        out = adv.to_json()
        if serving is not None:
            out["serving"] = [s.to_json() for s in serving]
        print(json.dumps(out, indent=2))
    else:
        print_advice(adv, serving)
    if a.save and adv.choice is not None:
        from advisor.planfile import save_plan

        path = save_plan(chosen_plan(plan, adv.choice), a.save)
        if not a.json:
            print(f"plan saved to {path}; run it with: tuneplan run {path} data.path=YOUR.jsonl")
    return 0 if adv.choice is not None else 1


def chosen_plan(plan, c):
    """The base plan with the recommended option's method, precision, batch, GPUs and checkpointing."""
    from advisor.spec import build_plan

    data = plan.model_dump(mode="json")
    data["training"].update(method=c.method, precision=c.precision, micro_batch=c.micro_batch,
                            grad_accum=c.grad_accum, grad_checkpointing=c.gradient_checkpointing)
    data["hardware"].update(gpu=c.gpu_id or c.gpu, gpus=c.num_gpus, zero=c.zero)
    return build_plan(data)


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def print_advice(adv, serving=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from advisor.recommend import GIB, METHOD_WORDS, duration

    con = Console()
    j = adv.job
    con.print(f"[bold]{j['model']}[/] ({j['params_total'] / 1e9:.2f}B parameters) · {j['examples']:,} examples × "
              f"{j['avg_tokens']:,} tokens × {j['epochs']:g} epochs · seq {j['seq_len']} · target batch "
              f"{j['target_batch']}" + (f" · budget ${j['budget_usd']:,.2f}" if j["budget_usd"] else ""))
    c = adv.choice
    if c is None:
        con.print("[bold red]Nothing fits.[/]")
    else:
        where = f"{c.num_gpus} × {c.gpu} ({c.strategy})" if c.num_gpus > 1 else c.gpu
        con.print(f"\n[bold green]Recommended:[/] [bold]{METHOD_WORDS[c.method]}[/] on {where} · micro-batch "
                  f"{c.micro_batch} × grad-accum {c.grad_accum} · checkpointing "
                  f"{'on' if c.gradient_checkpointing else 'off'} · {c.peak_reserved_bytes / GIB:,.1f} GiB · "
                  f"{duration(c.hours)} · {_money(c.cost_usd)}")
        for r in c.reasons:
            con.print(f"  • {r}")
    t = Table(title="Options", title_justify="left")
    shown = adv.options[:TABLE_ROWS]
    whys = [o.reasons[0] if not o.fits else next((r for r in o.reasons if r.startswith("over budget")), "")
            for o in shown]
    cols = ["method", "GPU", "×", "strategy", "batch", "ckpt", "GiB / card", "fits", "time", "cost"]
    for col in cols + (["why"] if any(whys) else []):
        t.add_column(col, justify="right" if col in ("×", "GiB / card", "time", "cost") else "left",
                     overflow="fold")
    for o, why in zip(shown, whys, strict=False):
        fit = "[green]yes[/]" if o.fits else "[red]no[/]"
        if o.fits and o.within_budget is False:
            fit = "[yellow]over budget[/]"
        t.add_row(o.method, o.gpu, str(o.num_gpus), o.strategy, f"{o.micro_batch}×{o.grad_accum}",
                  "on" if o.gradient_checkpointing else "off",
                  f"{o.peak_reserved_bytes / GIB:,.1f} / {o.capacity_bytes / GIB:,.1f}", fit,
                  duration(o.hours) if o.hours is not None else "-", _money(o.cost_usd),
                  *([why] if any(whys) else []))
    con.print(t)
    if len(adv.options) > TABLE_ROWS:
        con.print(f"[dim]{len(adv.options) - TABLE_ROWS} more options: use --json[/]")
    if serving:
        st = Table(title="Serving (largest batch per context; longest context at batch 1)", title_justify="left")
        ctxs = list(serving[0].max_batch)
        for col in ["weights", "GiB", *[f"batch @ {k // 1024}k" if k >= 1024 else f"batch @ {k}" for k in ctxs],
                    "max context @ batch 1"]:
            st.add_column(col, justify="left" if col == "weights" else "right")
        for s in serving:
            st.add_row(s.weights, f"{s.weights_bytes / GIB:,.1f}", *[str(s.max_batch[k]) for k in ctxs],
                       f"{s.max_context_batch1:,}")
        con.print(st)
    for n in adv.notes:
        con.print(f"[dim]note: {n}[/]")
    for n in adv.assumptions:
        con.print(f"[dim]assumed: {n}[/]")


# --- guide --------------------------------------------------------------------------------------

def cmd_guide(a: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from advisor.guide import Questionnaire, guide
    from advisor.spec import format_validation_error

    try:
        q = Questionnaire(gap=a.gap, knowledge_changes_often=a.changes_often, must_cite_sources=a.cite,
                          labelled_examples=a.examples, prompting_tried=a.prompting_tried,
                          latency_or_cost_limits=a.latency_limits, many_query_types=a.many_query_types)
    except ValidationError as e:
        raise UserError([p.replace("labelled_examples", "--examples") for p in format_validation_error(e)]) from None
    g = guide(q)
    if a.json:
        print(json.dumps({"questionnaire": q.model_dump(), **g.to_json()}, indent=2))
        return 0
    from rich.console import Console

    con = Console()
    con.print(f"[bold]Verdict: {g.verdict}[/]")
    for r in g.reasons:
        con.print(f"  • {r}")
    con.print("[bold]Next steps[/]")
    for i, s in enumerate(g.next_steps, 1):
        con.print(f"  {i}. {s}")
    return 0
