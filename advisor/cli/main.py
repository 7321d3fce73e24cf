"""The `tuneplan` command. User mistakes end with a clear message and exit code 2, never a traceback.

The estimate path imports neither torch nor transformers when the model's shape is cached
(bundled profiles ship theirs), so `tuneplan estimate --model <profile> --json` is fast cold.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from advisor.spec import OPTIMIZERS, PRECISIONS

EXIT_USER_ERROR = 2
GIB = 1024**3


class UserError(Exception):
    """Problems to show the user, one line each."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _bool_flag(p: argparse.ArgumentParser, name: str, default: bool | None, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                   default=default, help=help)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the CLI contract (DESIGN.md); None means 'the plan's default'."""
    p.add_argument("--model", help="bundled profile, local config.json or model dir, or hub id")
    p.add_argument("--task", choices=["training", "inference"], default="training")
    p.add_argument("--method", choices=["full", "lora", "qlora"], help="default: qlora")
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default: adamw")
    p.add_argument("--batch", type=int, help="micro-batch (training) or concurrent sequences (inference)")
    p.add_argument("--seq", type=int, help="tokens per sequence (inference: prompt + generated)")
    p.add_argument("--grad-accum", type=int)
    _bool_flag(p, "grad-checkpointing", None, "recompute activations in backward (default: on)")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="all-linear or a comma list such as q_proj,v_proj")
    p.add_argument("--attn", dest="attn_impl", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--weight-quant", choices=["none", "int8", "nf4"], help="inference weight storage")
    p.add_argument("--prompt-len", type=int, help="inference: prompt tokens (default: the whole --seq)")
    p.add_argument("--gpu", help="GPU name, e.g. 'RTX 4090', h100, a100-40gb")
    p.add_argument("--gpus", type=int, help="number of GPUs (default 1)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage across GPUs")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--revision", help="hub revision")


def plan_dict_from_args(a: argparse.Namespace) -> dict[str, Any]:
    def put(d: dict, key: str, val: Any) -> None:
        if val is not None:
            d[key] = val

    training: dict[str, Any] = {}
    inference: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    hardware: dict[str, Any] = {"device": a.device}
    put(training, "method", a.method)
    put(training, "precision", a.precision)
    put(training, "optimizer", a.optimizer)
    put(training, "grad_accum", a.grad_accum)
    put(training, "grad_checkpointing", a.grad_checkpointing)
    put(training, "attn_impl", a.attn_impl)
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
    return {"model": model, "task": a.task, "training": training, "inference": inference, "hardware": hardware}


FLAGS = {
    "training.micro_batch": "--batch", "inference.batch": "--batch", "training.seq_len": "--seq",
    "inference.seq_len": "--seq", "inference.prompt_len": "--prompt-len", "training.grad_accum": "--grad-accum",
    "training.lora.r": "--lora-r",
    "training.lora.alpha": "--lora-alpha", "training.lora.dropout": "--lora-dropout",
    "training.lora.targets": "--lora-targets", "hardware.gpus": "--gpus", "model.ref": "--model",
}


def _with_flag(problem: str) -> str:
    """'training.micro_batch: ...' -> '--batch (training.micro_batch): ...' for CLI users."""
    field, sep, rest = problem.partition(": ")
    return f"{FLAGS[field]} ({field}): {rest}" if sep and field in FLAGS else problem


def load_plan_and_shape(data: dict[str, Any]):
    """Validate the plan and resolve the model; every problem reported together."""
    from advisor.model import ModelError, resolve
    from advisor.spec import SpecError, build_plan, check_against_shape

    problems: list[str] = []
    plan = None
    try:
        plan = build_plan(data)
    except SpecError as e:
        problems += [_with_flag(p) for p in e.problems]
    shape = None
    model = data.get("model", {})
    try:
        shape = resolve(model.get("ref", ""), model.get("revision"), bool(model.get("trust_remote_code")))
    except ModelError as e:
        problems.append(str(e))
    if plan is not None and shape is not None:
        problems += check_against_shape(plan, shape)
    gpu = None
    gpu_name = data.get("hardware", {}).get("gpu")
    if gpu_name:
        from advisor.gpus import GpuError, find_gpu
        try:
            gpu = find_gpu(gpu_name)
        except GpuError as e:
            problems.append(str(e))
    if plan is not None and gpu is not None and plan.task == "training" and not gpu.bf16 \
            and plan.training.precision in ("bf16", "amp-bf16") and plan.hardware.device == "cuda":
        problems.append(f"{gpu.name} has no bf16 support (needs Ampere or newer); use --precision fp16 "
                        "or amp-fp16")
    if problems:
        raise UserError(problems)
    return plan, shape, gpu


def estimate_result(plan, shape, gpu, mode: str = "analytic", progress=None) -> dict[str, Any]:
    """The --json object of the CLI contract."""
    from advisor.memory import estimate, trainable_params

    if mode == "simulate":
        from advisor.simulate import SimulateError, simulate

        try:
            bd = simulate(plan, shape, progress=progress)
        except SimulateError as e:
            raise UserError(str(e)) from None
        except Exception as e:  # a bug, not the user's mistake: say so plainly, keep the analytic way open
            raise UserError(f"the simulation failed for {shape.name} ({type(e).__name__}: {str(e)[:200]}); "
                            "use --mode analytic, and please report it") from None
    else:
        bd = estimate(plan, shape)
    trainable = trainable_params(shape, plan.training) if plan.task == "training" else 0
    out: dict[str, Any] = {
        "model": {
            "name": shape.name, "model_type": shape.model_type, "architecture": shape.architecture,
            "params_total": shape.params_total, "params_trainable": trainable,
            "params_embedding": shape.params_embedding, "params_lm_head": shape.params_lm_head,
            "params_linear": shape.params_linear, "params_other": shape.params_other,
            "num_layers": shape.num_layers, "hidden_size": shape.hidden_size, "vocab_size": shape.vocab_size,
        },
        "plan": plan.model_dump(mode="json"),
        "mode": mode,
        "breakdown": bd.components,
        "peak_phase": bd.peak_phase,
        "phases": bd.phases,
        "overhead": bd.overhead,
        "peak_allocated_bytes": bd.peak_allocated_bytes,
        "peak_reserved_bytes": bd.peak_reserved_bytes,
        "notes": bd.notes,
    }
    if gpu is not None:
        cap = gpu.memory_bytes
        out["gpu"] = {"name": gpu.name, "id": gpu.id, "memory_bytes": cap,
                      "fits": bd.peak_reserved_bytes <= cap,
                      "headroom_bytes": cap - bd.peak_reserved_bytes,
                      "status": fit_status(bd.peak_reserved_bytes, cap)}
    return out


def fit_status(need: int, capacity: int) -> str:
    """fits (under 90% of the card), tight (90-100%), oom (over)."""
    if need > capacity:
        return "oom"
    return "tight" if need > 0.9 * capacity else "fits"


def _gib(b: int) -> str:
    return f"{b / GIB:,.2f} GiB"


COMPONENT_LABELS = {
    "weights": "weights", "lora_adapters": "LoRA adapters", "gradients": "gradients",
    "optimizer_states": "optimizer states", "activations": "activations",
    "logits_and_loss": "logits + loss", "transient": "transient buffers", "kv_cache": "KV cache",
    "prefill_activations": "prefill activations", "zero3_gathered_params": "ZeRO-3 gathered params",
    "ddp_buckets": "DDP gradient buckets", "cuda_context": "CUDA context", "cublas_workspace": "cuBLAS workspace",
    "allocator_slack": "allocator slack", "inputs": "input batch", "logits": "logits",
}


def print_estimate(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    m, plan = res["model"], res["plan"]
    if plan["task"] == "training":
        t = plan["training"]
        what = (f"{t['method']} · {t['precision']} · {t['optimizer']} · batch {t['micro_batch']} × seq "
                f"{t['seq_len']} · grad-ckpt {'on' if t['grad_checkpointing'] else 'off'}")
        if t["method"] != "full":
            targets = t["lora"]["targets"]
            what += f" · LoRA r={t['lora']['r']} on {targets if isinstance(targets, str) else ','.join(targets)}"
    else:
        i = plan["inference"]
        what = f"inference · {i['precision']} · weights {i['weight_quant']} · batch {i['batch']} × seq {i['seq_len']}"
    hw = plan["hardware"]
    con.print(f"[bold]{m['name']}[/] ({m['architecture']}, {m['params_total']:,} parameters, "
              f"{m['params_trainable']:,} trainable)")
    multi = f" × {hw['gpus']} GPUs, ZeRO-{hw['zero']}" if hw["gpus"] > 1 else ""
    con.print(f"{what} · device {hw['device']}{multi}")
    table = Table(title=f"Peak memory (at {res['peak_phase'].replace('_', ' ')})", title_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("share", justify="right")
    total = res["peak_reserved_bytes"] or 1
    order = list(COMPONENT_LABELS)
    for k, v in sorted(res["breakdown"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        table.add_row(COMPONENT_LABELS.get(k, k), f"{v / GIB:,.2f}", f"{100 * v / total:.0f}%")
    table.add_row("[bold]peak allocated (tensors)[/]", f"[bold]{res['peak_allocated_bytes'] / GIB:,.2f}[/]", "")
    for k, v in res["overhead"].items():
        table.add_row(COMPONENT_LABELS.get(k, k), f"{v / GIB:,.2f}", f"{100 * v / total:.0f}%")
    if res["overhead"]:
        table.add_row("[bold]peak reserved (nvidia-smi)[/]", f"[bold]{res['peak_reserved_bytes'] / GIB:,.2f}[/]", "")
    con.print(table)
    if "gpu" in res:
        g = res["gpu"]
        badge = {"fits": "[green]fits[/]", "tight": "[yellow]tight[/]", "oom": "[red]out of memory[/]"}[g["status"]]
        con.print(f"{g['name']}: {_gib(g['memory_bytes'])} → {badge} "
                  f"({'headroom' if g['headroom_bytes'] >= 0 else 'short by'} {_gib(abs(g['headroom_bytes']))})")
    for n in res["notes"]:
        con.print(f"[dim]note: {n}[/]")


def _simulate_with_progress(plan, shape, gpu) -> dict[str, Any]:
    """Run the simulation with a progress bar on stderr (stdout stays clean for --json)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("simulating", total=1.0)

        def progress(fraction: float, message: str) -> None:
            bar.update(task, completed=fraction, description=f"simulating: {message}")

        return estimate_result(plan, shape, gpu, "simulate", progress)


def plan_data(a: argparse.Namespace) -> dict[str, Any]:
    """The plan as a dict: from --plan FILE (flags given on the command line override it) or flags."""
    if getattr(a, "plan", None):
        from advisor.planfile import load_plan
        from advisor.spec import SpecError

        try:
            base = load_plan(a.plan).model_dump(mode="json")
        except SpecError as e:
            raise UserError(e.problems) from None
        if a.model:
            base["model"]["ref"] = a.model
        flags = plan_dict_from_args(a)
        for section in ("training", "inference", "hardware"):
            base[section].update({k: v for k, v in flags[section].items()
                                  if v is not None and k not in ("device", "gpu")})
        if a.gpu:
            base["hardware"]["gpu"] = a.gpu
        return base
    if not a.model:
        raise UserError("--model is required (a bundled profile, a config.json, a model directory or a hub id), "
                        "or give --plan FILE")
    return plan_dict_from_args(a)


def cmd_estimate(a: argparse.Namespace) -> int:
    plan, shape, gpu = load_plan_and_shape(plan_data(a))
    if a.mode == "simulate":
        res = _simulate_with_progress(plan, shape, gpu)
    else:
        res = estimate_result(plan, shape, gpu)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print_estimate(res)
    return 0


def cmd_profiles(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if a.gpus:
        from advisor.gpus import gpu_table, prices_as_of
        t = Table(title=f"GPU profiles (prices as of {prices_as_of()})", title_justify="left")
        for col in ("id", "name", "memory", "bf16", "TFLOPS", "$/hour"):
            t.add_column(col, justify="right" if col in ("memory", "TFLOPS", "$/hour") else "left")
        for g in gpu_table().values():
            t.add_row(g.id, g.name, f"{g.memory_gib:.1f} GiB", "yes" if g.bf16 else "no", f"{g.tflops:g}",
                      f"{g.price_usd_hour:.2f}" if g.price_usd_hour is not None else "-")
        con.print(t)
        return 0
    from advisor.model import bundled_profiles, resolve
    t = Table(title="Bundled model profiles (offline; `--model NAME`)", title_justify="left")
    for col in ("name", "type", "parameters", "layers", "hidden", "vocab"):
        t.add_column(col, justify="left" if col in ("name", "type") else "right")
    for name in bundled_profiles():
        s = resolve(name)
        t.add_row(name, s.model_type, f"{s.params_total / 1e9:.2f}B", str(s.num_layers), str(s.hidden_size),
                  str(s.vocab_size))
    con.print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneplan", description="Will this fine-tune fit, and what will it cost?")
    sub = p.add_subparsers(dest="command")
    e = sub.add_parser("estimate", help="peak memory of a training step or of serving")
    add_plan_arguments(e)
    e.add_argument("--mode", choices=["analytic", "simulate"], default="analytic")
    e.add_argument("--plan", help="a plan.yaml (as saved by the TUI; read by `tuneplan run`)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_estimate)
    pr = sub.add_parser("profiles", help="list bundled model profiles (or --gpus)")
    pr.add_argument("--gpus", action="store_true", help="list GPU profiles instead")
    pr.set_defaults(func=cmd_profiles)
    from advisor.cli_advice import add_commands  # imports UserError from here, so not at the top

    add_commands(sub)
    from runner.cli import add_commands as add_runner_commands  # run, data check, demo (light imports)

    add_runner_commands(sub)
    t = sub.add_parser("tui", help="the app: plan, compare, decide, launch and watch (also: tuneplan with no command)")
    t.add_argument("--plan", help="a plan.yaml to open (and save back to with ctrl+s)")
    t.set_defaults(func=cmd_tui)
    w = sub.add_parser("watch", help="live GPU memory per device and process (NVML); with RUN_DIR, a run vs its plan")
    w.add_argument("run_dir", nargs="?", help="a run directory to follow (events.jsonl)")
    w.set_defaults(func=cmd_watch)
    return p


def cmd_tui(a: argparse.Namespace) -> int:
    from advisor.tui import run

    return run(a.plan)


def cmd_watch(a: argparse.Namespace) -> int:
    from advisor.tui import run

    return run(mode="watch", run_dir=a.run_dir)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse stops collecting `key=value` positionals at the first option (`PLAN --run-dir D k=v`);
    gather the ones after it too, and refuse anything else it did not know."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def report_user_error(e: UserError) -> int:
    """Every problem on its own line, on stderr; the exit code for user mistakes."""
    if len(e.problems) == 1:
        print(f"tuneplan: {e.problems[0]}", file=sys.stderr)
    else:
        print(f"tuneplan: {len(e.problems)} problems:", file=sys.stderr)
        for line in e.problems:
            print(f"  - {line}", file=sys.stderr)
    return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    if not getattr(args, "command", None):
        if not (sys.stdin.isatty() and sys.stdout.isatty()):  # piped or scripted: help, not the app
            parser.print_help()
            return 0
        from advisor.tui import run

        return run()
    try:
        return args.func(args)
    except UserError as e:
        return report_user_error(e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tuneplan ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
