"""The `tuneplan` command. User mistakes end with a clear message and exit code 2, never a traceback.

The estimate path imports neither torch nor transformers when the model's shape is cached
(bundled profiles ship theirs), so `tuneplan estimate --model <profile> --json` is fast cold.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from advisor.cli.common import (  # noqa: F401
    EXIT_USER_ERROR,
    add_model_arguments,
    parse_with_overrides,
    put,
    report_problems,
    take_model,
)
from advisor.job import DEFAULT_AVG_TOKENS, DEFAULT_EPOCHS, DEFAULT_EXAMPLES
from advisor.problems import Problems, UserError
from advisor.spec import (
    ATTN_IMPLS,
    DEVICES,
    HARNESSES,
    METHODS,
    OPTIMIZERS,
    PRECISION_ADAPTERS,
    PRECISION_WORDS,
    PRECISIONS,
    TASKS,
    WEIGHT_QUANTS,
    ZERO_STAGES,
)


def _bool_flag(p: argparse.ArgumentParser, name: str, default: bool | None, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                   default=default, help=help)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the CLI contract (DESIGN.md); None means 'the plan's default'."""
    add_model_arguments(p)
    p.add_argument("--task", choices=TASKS, help="training (default) or inference")
    p.add_argument("--method", choices=METHODS, help="default: qlora")
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16. " + "; ".join(
        f"{k} = {v}" for k, v in PRECISION_WORDS.items()) + f". {PRECISION_ADAPTERS}")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default: adamw")
    p.add_argument("--batch", type=int, help="micro-batch (training) or concurrent sequences (inference)")
    p.add_argument("--seq", type=int, help="tokens per sequence (inference: prompt + generated)")
    p.add_argument("--grad-accum", type=int)
    _bool_flag(p, "grad-checkpointing", None, "recompute activations in backward (default: on)")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="all-linear or a comma list such as q_proj,v_proj")
    p.add_argument("--attn", dest="attn_impl", choices=ATTN_IMPLS)
    p.add_argument("--transformers", metavar="VERSION", help="transformers release the run uses: 5 (default) or "
                   "4.46-4.57 (the loss and MoE layers differ; see docs/memory-model.md)")
    p.add_argument("--harness", choices=HARNESSES, help="what runs the job, for the band around the expected GPU "
                   "peak: tuneplan (default: its own runner, the tightest band), hf-trainer (HF Trainer / TRL) or "
                   "other (the widest; docs/accuracy.md)")
    _bool_flag(p, "padded", None, "batches carry padding, which gives sdpa a mask (default: when --batch > 1); "
               "--no-padded for data packed to exactly --seq tokens")
    _bool_flag(p, "offload-activations", None, "keep the checkpointed layers' inputs in pinned host memory "
               "(torch's save_on_cpu): less GPU memory, as much more host RAM, a copy each way over the host link "
               "per step (needs gradient checkpointing)")
    _bool_flag(p, "liger", None, "Liger kernels (CUDA, pip install 'tuneplan[liger]'): fused linear cross-entropy, "
               "the logits never materialized; RMSNorm, SwiGLU, RoPE (the model types Liger-Kernel patches)")
    p.add_argument("--weight-quant", choices=WEIGHT_QUANTS, help="inference weight storage")
    p.add_argument("--prompt-len", type=int, help="inference: prompt tokens (default: the whole --seq)")
    p.add_argument("--gpu", help="one card's name, e.g. 'RTX 4090', h100, a100-40gb (the count is --gpus)")
    p.add_argument("--gpus", type=int, help="number of GPUs (default 1)")
    p.add_argument("--zero", type=int, choices=ZERO_STAGES, help="ZeRO stage across GPUs")
    p.add_argument("--device", choices=DEVICES, help="cuda (default): GPU memory with the CUDA context and "
                   "allocator; cpu: RAM for the tensors alone")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--revision", help="hub revision")


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The job's size for time and cost: plan fields job.examples, job.avg_tokens and run.epochs."""
    p.add_argument("--examples", type=int, help=f"training examples, for time and cost (default {DEFAULT_EXAMPLES})")
    p.add_argument("--avg-tokens", type=int, help=f"mean tokens per example (default {DEFAULT_AVG_TOKENS})")
    p.add_argument("--epochs", type=float, help=f"passes over the data (default {DEFAULT_EPOCHS:g})")


def plan_dict_from_args(a: argparse.Namespace) -> dict[str, Any]:
    training: dict[str, Any] = {}
    inference: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    hardware: dict[str, Any] = {}
    put(hardware, "device", a.device)
    put(training, "method", a.method)
    put(training, "precision", a.precision)
    put(training, "optimizer", a.optimizer)
    put(training, "grad_accum", a.grad_accum)
    put(training, "grad_checkpointing", a.grad_checkpointing)
    put(training, "attn_impl", a.attn_impl)
    put(training, "transformers", getattr(a, "transformers", None))
    put(training, "harness", getattr(a, "harness", None))
    put(training, "offload_activations", getattr(a, "offload_activations", None))
    put(training, "liger", getattr(a, "liger", None))
    put(lora, "r", a.lora_r)
    put(lora, "alpha", a.lora_alpha)
    put(lora, "dropout", a.lora_dropout)
    put(lora, "targets", a.lora_targets)
    if lora:
        training["lora"] = lora
    if a.task == "inference":
        put(inference, "batch", a.batch)
        put(inference, "seq_len", a.seq)
        put(inference, "weight_quant", a.weight_quant)
        put(inference, "prompt_len", getattr(a, "prompt_len", None))
        if a.precision in ("fp32", "bf16", "fp16"):
            inference["precision"] = a.precision
        training.pop("precision", None)
    else:
        put(training, "micro_batch", a.batch)
        put(training, "seq_len", a.seq)
    hardware["gpu"] = a.gpu
    put(hardware, "gpus", a.gpus)
    put(hardware, "zero", a.zero)
    model = {"ref": a.model, "trust_remote_code": a.trust_remote_code}
    put(model, "revision", a.revision)
    data: dict[str, Any] = {}
    put(data, "padded", getattr(a, "padded", None))
    job: dict[str, Any] = {}
    put(job, "examples", getattr(a, "examples", None))
    put(job, "avg_tokens", getattr(a, "avg_tokens", None))
    run: dict[str, Any] = {}
    put(run, "epochs", getattr(a, "epochs", None))
    out = {"model": model, "task": a.task or "training", "training": training, "inference": inference,
           "hardware": hardware}
    for name, section in (("data", data), ("job", job), ("run", run)):
        if section:
            out[name] = section
    return out


def _simulate_with_progress(ctx):
    """Run the simulation with a progress bar on stderr (stdout stays clean for --json)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from advisor import service

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("simulating", total=1.0)

        def progress(fraction: float, message: str) -> None:
            bar.update(task, completed=fraction, description=f"simulating: {message}")

        return service.estimate(ctx, "simulate", progress)


def plan_data(a: argparse.Namespace) -> dict[str, Any]:
    """The plan as a dict: from --plan FILE (flags given on the command line override it) or flags."""
    if getattr(a, "plan", None) and a.model_ref and "=" in a.model_ref and not a.model:  # --plan F key=value
        a.overrides = [a.model_ref, *(getattr(a, "overrides", None) or [])]
        a.model_ref = None
    take_model(a)
    if getattr(a, "plan", None):
        from advisor.planfile import apply_overrides, consent, load_plan
        from advisor.spec import SpecError

        try:
            plan = load_plan(a.plan, a.trust_remote_code)
            if getattr(a, "overrides", None):  # as `tuneplan run PLAN key=value` reads them
                plan = consent(apply_overrides(plan, a.overrides), a.trust_remote_code)
        except SpecError as e:
            raise UserError(e.items) from None
        base = plan.model_dump(mode="json")
        if a.model:
            base["model"]["ref"] = a.model
        a.task = a.task or base["task"]
        flags = plan_dict_from_args(a)
        for section in ("training", "inference", "hardware", "data", "job", "run"):
            _merge(base[section], flags.get(section, {}))
        base["task"] = a.task
        return base
    if not a.model:
        raise UserError("name the model: `tuneplan estimate MODEL` or --model MODEL (a bundled profile, a "
                        "config.json, a model directory or a hub id), or give --plan FILE")
    return plan_dict_from_args(a)


def _merge(into: dict[str, Any], flags: dict[str, Any]) -> None:
    """The flags given on the command line over a plan's section (nested: --lora-r keeps the plan's alpha)."""
    for k, v in flags.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        elif v is not None:
            into[k] = v


def cmd_estimate(a: argparse.Namespace) -> int:
    from advisor import service
    from advisor.cli.serving import engine_of, estimate_vllm, kv_cache_into_plan, print_engine
    from advisor.present import print_estimate

    data = plan_data(a)
    kv_cache_into_plan(a, data)
    if getattr(a, "data", None):  # the job and the longest batch from the dataset (advisor/cli/dataest.py)
        from advisor.cli.dataest import estimate_from_data, into_plan

        into_plan(a, data)
        return estimate_from_data(a, service.build(data))
    ctx = service.build(data)  # the job's numbers are plan fields (job.*, run.epochs): checked there
    engine = engine_of(a, ctx)  # inference: vllm or transformers; None for training
    if engine == "vllm":
        return estimate_vllm(a, ctx)
    res = _simulate_with_progress(ctx) if a.mode == "simulate" else service.estimate(ctx)
    found = [service.limits(ctx, what) for what in (a.max or [])]
    nearest = service.nearest_plans(ctx)  # an out-of-memory plan is never the last word
    if a.json:
        out = res.as_json()
        if engine is not None:
            out["engine"] = engine
        if found:
            out["max"] = {lim.knob: lim.as_json() for lim in found}
        if nearest:
            out["nearest"] = [n.to_json() for n in nearest]
        print(json.dumps(out, indent=2))
    else:
        from rich.console import Console

        from advisor.cli.advice import print_nearest

        print_estimate(res, limits=found)
        if engine is not None:
            print_engine(engine)
        print_nearest(Console(), nearest)
    return 0


def cmd_profiles(a: argparse.Namespace) -> int:
    """The bundled model profiles (or, with --gpus, the GPU table): a table that reads at 80 columns, or with
    --json one object ({"profiles": [...]} or {"prices_as_of": ..., "gpus": [...]})."""
    from rich.console import Console

    con = Console()
    if a.gpus:
        from dataclasses import asdict

        from advisor.gpus import gpu_table, prices_as_of

        gpus = list(gpu_table().values())
        if a.json:
            print(json.dumps({"prices_as_of": prices_as_of(), "gpus": [
                {**asdict(g), "memory_bytes": g.memory_bytes, "tflops": g.tflops} for g in gpus]}, indent=2))
            return 0
        rows = [[g.id, g.name, f"{g.memory_gib:.1f} GiB", "yes" if g.bf16 else "no", f"{g.tflops:g}",
                 f"{g.price_usd_hour:.2f}" if g.price_usd_hour is not None else "-"] for g in gpus]
        con.print(_narrow_table(f"GPU profiles (prices as of {prices_as_of()})",
                                ("id", "name", "memory", "bf16", "TFLOPS", "$/hour"), rows, wrap="name"))
        return 0
    from advisor.model import bundled_profiles, resolve

    shapes = [resolve(name) for name in bundled_profiles()]
    if a.json:
        print(json.dumps({"profiles": [
            {"name": name, "type": s.model_type, "architecture": s.architecture, "params_total": s.params_total,
             "layers": s.num_layers, "hidden": s.hidden_size, "vocab": s.vocab_size, "max_position": s.max_position}
            for name, s in zip(bundled_profiles(), shapes, strict=True)]}, indent=2))
        return 0
    rows = [[name, s.model_type, f"{s.params_total / 1e9:.2f}B", str(s.num_layers), str(s.hidden_size),
             str(s.vocab_size)] for name, s in zip(bundled_profiles(), shapes, strict=True)]
    con.print(_narrow_table("Bundled model profiles (offline; `--model NAME`)",
                            ("name", "type", "params", "layers", "hidden", "vocab"), rows, wrap="name",
                            width=con.width))
    return 0


def _narrow_table(title: str, columns: tuple[str, ...], rows: list[list[str]], wrap: str, width: int | None = None):
    """A borderless table whose columns never cut a number: every column but ``wrap`` keeps its widest cell;
    ``wrap`` takes what is left, wrapping at spaces, and (given ``width``) a hub id too long for it breaks after
    its 'org/' ('meta-llama/' over 'Llama-3.1-405B'), so names that share a prefix still read apart."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    for i, col in enumerate(columns):
        numeric = i >= 2 and col not in ("bf16",)
        t.add_column(col, justify="right" if numeric else "left", no_wrap=col != wrap, overflow="fold")
    if width is not None:
        k = columns.index(wrap)
        rest = sum(max(len(col), *(len(r[i]) for r in rows)) for i, col in enumerate(columns) if i != k)
        room = width - rest - 2 * (len(columns) - 1)
        for r in rows:
            if len(r[k]) > room and "/" in r[k]:
                org, name = r[k].split("/", 1)
                r[k] = f"{org}/\n {name}"
    for r in rows:
        t.add_row(*r)
    return t


def build_parser(extra: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The `tuneplan` parser: the advisor's commands and the runner's; ``extra`` adds more subcommands
    (advisor.launcher adds the app's: tui and watch)."""
    p = argparse.ArgumentParser(prog="tuneplan", description="Will this fine-tune fit, and what will it cost?")
    sub = p.add_subparsers(dest="command")
    e = sub.add_parser("estimate", help="peak memory of a training step or of serving")
    add_plan_arguments(e)
    e.add_argument("--mode", choices=["analytic", "simulate"], default="analytic")
    e.add_argument("--plan", help="a plan.yaml (as saved by the TUI; read by `tuneplan run`)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="with --plan: overrides of its fields, as `tuneplan run` reads them (training.seq_len=4096)")
    add_job_arguments(e)
    from advisor.cli.dataest import add_data_argument

    add_data_argument(e)  # --data FILE: the job and the longest batch from the dataset
    e.add_argument("--max", action="append", choices=["seq", "batch"],
                   help="also find the longest sequence / largest micro-batch that fits the GPU (repeatable)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    from advisor.cli.serving import add_engine_arguments

    add_engine_arguments(e)  # --engine vllm|transformers and vLLM's flags, for --task inference
    e.set_defaults(func=cmd_estimate)
    pr = sub.add_parser("profiles", help="list bundled model profiles (or --gpus)")
    pr.add_argument("--gpus", action="store_true", help="list GPU profiles instead")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.set_defaults(func=cmd_profiles)
    from advisor.cli.advice import add_commands

    add_commands(sub)
    from advisor.cli.runs import add_commands as add_runner_commands  # run, data, demo, cloud, chat, eval, export

    add_runner_commands(sub)
    if extra is not None:
        extra(sub)
    return p


def main(argv: list[str] | None = None, extra: Callable[[Any], None] | None = None,
         no_command: Callable[[], int] | None = None) -> int:
    """Run one command; user mistakes end in one clear message and exit code 2. Without a command:
    ``no_command`` (the launcher opens the app there) when on a terminal, else the help."""
    parser = build_parser(extra)
    args = parse_with_overrides(parser, argv)
    if not getattr(args, "command", None):
        if no_command is None or not (sys.stdin.isatty() and sys.stdout.isatty()):  # piped or scripted: help
            parser.print_help()
            return 0
        return no_command()
    try:
        return args.func(args)
    except Problems as e:
        return report_problems(e, as_json=bool(getattr(args, "json", False)))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tuneplan ... | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # a path given on the command line that the system refuses (too long, not writable...)
        name = str(e.filename or "")
        shown = name if len(name) <= 80 else name[:77] + "..."
        print(f"tuneplan: cannot use {shown or 'a file'}: {e.strerror or e}; check the path "
              "(and that its folder exists and can be written)", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
