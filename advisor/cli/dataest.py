"""`tuneplan estimate ... --data FILE`: the plan estimated from its data. The runner's loader counts the
file's tokens (runner.api.data_lengths: the plan's tokenizer and template, a progress bar on stderr), the
service turns the lengths into the job and the longest batch (advisor.service.data_estimate)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from advisor.problems import Problem, UserError


def add_data_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="FILE", help="estimate from a dataset (.jsonl/.json/.csv, as `tuneplan run` "
                   "reads it): its real lengths with the plan's tokenizer and template give the job's exact steps, "
                   "tokens and padding, and the peak of the longest batch the runner forms; sets data.path, "
                   "job.examples and job.avg_tokens (instead of --examples / --avg-tokens)")


def into_plan(a: argparse.Namespace, data: dict[str, Any]) -> None:
    """--data into the plan dict: data.path; the job's size then comes from the file."""
    given = [f for f, v in (("--examples", getattr(a, "examples", None)),
                            ("--avg-tokens", getattr(a, "avg_tokens", None))) if v is not None]
    if given:
        raise UserError([Problem(f"{' and '.join(given)} with --data: the data gives the job's examples and tokens",
                                 None, f"leave out {' and '.join(given)}, or --data")])
    if (data.get("task") or "training") != "training":
        raise UserError([Problem("--data is for training plans", None, "use --task training, or leave out --data")])
    data.setdefault("data", {})["path"] = a.data


def estimate_from_data(a: argparse.Namespace, ctx) -> int:
    from advisor import service
    from runner import api as runner_api

    lengths = _measure_with_progress(runner_api, ctx.plan)
    de = service.data_estimate(ctx, lengths, a.mode)
    nearest = service.nearest_plans(ctx) if de.result.status == "oom" else []
    if a.json:
        out = de.as_json()
        if nearest:
            out["nearest"] = [n.to_json() for n in nearest]
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console

    from advisor.cli.advice import print_nearest
    from advisor.present import print_estimate

    con = Console()
    print_estimate(de.result, con)
    print_data(de, con)
    print_nearest(con, nearest)
    return 0


def _measure_with_progress(runner_api, plan):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("reading the data", total=1.0)

        def progress(fraction: float, words: str) -> None:
            bar.update(task, completed=fraction, description=f"tokenizing: {words}")

        return runner_api.data_lengths(plan, progress=progress)


def data_lines(de) -> list[str]:
    """The data part of the estimate, as lines (the CLI prints them; tests read them)."""
    from advisor.units import duration, gib_str

    d, j, p = de.data, de.job, de.result.plan
    s = d.stats()
    lines = [f"data: {d.path}: {d.records:,} records ({d.format}, template {d.template}) -> {d.examples:,} training "
             f"examples, {d.val:,} held out; {'counted with' if d.exact else 'APPROXIMATE:'} {d.source}",
             f"tokens per example: mean {s['mean']:,}, median {s['median']:,}, p95 {s['p95']:,}, max {s['max']:,}"
             + (f"; {d.truncated:,} cut at seq_len {p.training.seq_len}" if d.truncated else "")
             + (f"; {d.skipped:,} skipped (nothing left to train on)" if d.skipped else ""),
             f"the job: {j.steps:,} steps ({j.epochs:.3g} epochs of {j.sequences:,} sequences"
             + (f" over {j.processes} processes" if j.processes > 1 else "") + f"), {j.tokens:,} tokens, "
             f"{j.positions:,} positions with padding ({j.positions_per_token:.3g} per token)",
             f"the longest batch: {j.longest.words()}: peak {gib_str(de.result.peak_reserved_bytes)} "
             f"(every batch {p.training.micro_batch} x {p.training.seq_len}: {gib_str(de.nominal_reserved_bytes)})"]
    over = de.over_run
    if over is not None:
        def series(g) -> str:
            pts = ", ".join(f"step {k}: {gib_str(b, 1)}" for k, b in g.records[:6])
            more = f", ... ({len(g.records) - 6} more)" if len(g.records) > 6 else ""
            end = " (the card's limit: the allocator gives its cache back and retries)" if g.at_limit else ""
            return f"{pts}{more}; settles at {gib_str(g.settled, 1)} from step {g.settle_step:,}{end}"

        lines.append("nvidia-smi over the run, with the longest batch first (the runner's fail-fast probe): "
                     + series(over.probe))
        lines.append("without the probe (run.fail_fast=false, DeepSpeed ZeRO-1/2, or a trainer that does not probe): "
                     + series(over.no_probe))
        lines += over.notes
    if de.result.time is not None:
        t = de.result.time
        lines.append(f"time from the data's batches: {duration(t.hours)} ({duration(t.hours_low)}-"
                     f"{duration(t.hours_high)})" + (f", ${t.cost_usd:,.2f}" if t.cost_usd is not None else ""))
    lines += [f"warning: {w}" for w in d.warnings]
    return lines


def print_data(de, con) -> None:
    for line in data_lines(de):
        con.print(line, markup=False, highlight=False)
