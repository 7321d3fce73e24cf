"""What the run, data check and demo commands print: progress, the report, errors, a data check."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from advisor.units import GIB, mib_or_gib


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


class _Progress:
    """A rich progress bar on stderr, or a plain line every few steps when not a terminal."""

    def __init__(self, live: bool, plan):
        self.live = live
        self.bar = None
        self.task = None
        self.total = plan.run.max_steps
        self.every = 1

    def __enter__(self):
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]training[/]"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=Console(stderr=True, highlight=False), transient=False)
            self.bar.start()
        return self

    def update(self, ev: dict) -> None:
        speed = ev.get("speed") or {}
        if speed.get("words") and not getattr(self, "speed_shown", False):  # once, after warm-up (runner.speed)
            self.speed_shown = True
            self.log(f"speed: {speed['words']}")
        if ev.get("type") == "eval":
            self.log(f"step {ev['step']}: validation loss {_num(ev.get('val_loss'), '.4f')}")
            return
        total = ev.get("total_steps") or self.total
        mem = ev.get("memory") or {}
        used = mem.get("torch_peak") or mem.get("rss")
        loss = ev.get("loss")
        info = (f"loss {_num(loss, '.4f')} lr {_num(ev.get('lr'), '.1e')} {ev.get('tokens_per_s') or 0:,.0f} tok/s "
                f"{'peak' if mem.get('torch_peak') else 'rss'} {used / GIB:.2f} GiB" if used else "")
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("train", total=total, info=info, completed=ev["step"] - 1)
            self.bar.update(self.task, completed=ev["step"], info=info)
        else:
            self.every = max(1, (total or 20) // 20)
            if ev["step"] % self.every == 0 or ev["step"] == total:
                print(f"step {ev['step']}/{total}  {info}", file=sys.stderr, flush=True)

    def log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def _num(v, spec: str) -> str:
    """A number for the console: 'nan' for the null that a non-finite value becomes in an event."""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "nan"


def print_report(rep: dict[str, Any]) -> None:
    from rich.console import Console

    con = Console(highlight=False)
    loss = rep["loss"]
    status = {"completed": "[green]completed[/]", "interrupted": "[yellow]interrupted[/]"}.get(rep["status"],
                                                                                             rep["status"])
    con.print(f"run {status}: {rep['steps']}/{rep['total_steps']} steps in {rep['runtime_s']:.1f} s "
              f"(training {rep['train_s']:.1f} s, {rep['tokens_per_s'] or 0:,.0f} tokens/s) on {rep['device']}")
    first, last = loss.get("first"), loss.get("final_train")
    if first is not None and last is not None:
        val = f", validation {loss['final_val']:.4f}" if loss.get("final_val") is not None else ""
        con.print(f"loss {first:.4f} → {last:.4f} (mean of the last 5 steps){val}")
    p, c = rep["predicted"], rep["compare"]
    con.print(f"peak memory: predicted {mib_or_gib(p.get('peak_allocated_bytes'))} allocated"
              + (f" / {mib_or_gib(p.get('peak_reserved_bytes'))} reserved" if p.get("device") == "cuda" else "")
              + f"; measured {mib_or_gib(c.get('measured'))}" + (f" (× {c['ratio']})" if c.get("ratio") else ""))
    con.print(f"[dim]measured = {c['what']}[/]")
    speed = rep.get("speed") or {}
    if speed.get("words"):
        con.print(f"speed: {speed['words']}", soft_wrap=True)
    for n in rep.get("notes", []):
        con.print(f"[dim]note: {n}[/]")
    con.print(f"run directory: {rep['run_dir']}")
    if rep.get("adapter"):
        con.print(f"adapter: {rep['adapter']}  (PeftModel.from_pretrained(base, this))")
    nxt = rep.get("next")
    if nxt:
        con.print(f"{nxt['what']}: {nxt['command']}", soft_wrap=True)


def print_problems(lines: list[str]) -> None:
    """Problems as every tuneplan command prints them: one line, or a count and one line each."""
    from advisor.problems import problem_text

    print(problem_text(lines), file=sys.stderr)


def _print_error(err: dict, run_dir: Path) -> None:
    kind = err["kind"]
    if kind in ("data", "model", "plan"):
        return  # raised as a UserError by the caller
    what = {"oom": "out of memory", "interrupted": "interrupted", "disk": "the disk is full"}.get(kind,
                                                                                               "the run failed")
    print(f"tuneplan: {err['message'] if kind == 'diverged' else f'{what}: ' + err['message']}", file=sys.stderr)
    if err.get("measured_peak"):
        print(f"  measured peak before the failure: {mib_or_gib(err['measured_peak'])}", file=sys.stderr)
    s = err.get("suggestion") or {}
    if kind == "diverged" and s.get("command"):
        print(f"  {s['what']}:\n    {s['command']}", file=sys.stderr)
    elif s.get("command"):
        changes = ", ".join(f"{k}={v}" for k, v in s["changes"].items())
        print(f"  the advisor's next plan ({changes}) would fit:\n    {s['command']}", file=sys.stderr)
    elif s.get("note"):
        print(f"  {s['note']}", file=sys.stderr)
    if kind == "runtime":
        print(f"  details: {run_dir / 'traceback.txt'}", file=sys.stderr)
    nxt = err.get("next")
    if nxt and not s.get("command"):
        print(f"  {nxt['what']}: {nxt['command']}", file=sys.stderr)


def _print_data_problems(lines: list[str]) -> None:
    """The data file's problems on stderr, as every command words them (``data check --json`` printed them on
    stdout inside its one object)."""
    _stderr(f"tuneplan: {lines[0]}" if len(lines) == 1 else
            f"tuneplan: {len(lines)} problems:\n" + "\n".join(f"  - {line}" for line in lines))


def _print_data_check(out: dict) -> None:
    from rich.console import Console
    from rich.text import Text

    con = Console(highlight=False)
    con.print(f"[bold]{out['file']}[/]: {out['valid_records']} valid records, format {out['format'] or '?'}"
              + (f", template {out['template']}" if out.get("template") else "")
              + (f", [red]{len(out['problems'])} problems[/]" if out["problems"] else ", no problems"))
    if "tokens" in out:
        s = out["tokens"]
        con.print(f"tokens per example: min {s['min']}, mean {s['mean']}, median {s['median']}, p95 {s['p95']}, "
                  f"max {s['max']}; trained tokens per example: mean {out['trained_tokens']['mean']}")
        longest = out.get("longest") or {}
        if longest:
            con.print(f"longest example: line {longest['line']}, {longest['tokens']} tokens")
        if longest.get("warning"):
            con.print(f"[yellow]{longest['warning']}[/]")
        if out["truncated"]:
            con.print(f"[yellow]{out['truncated']} examples are longer than --seq and get cut[/]")
        if out["no_trained_tokens"]:
            con.print(f"[yellow]{len(out['no_trained_tokens'])} examples lose every response token to truncation "
                      f"(lines {', '.join(map(str, out['no_trained_tokens'][:10]))})[/]")
    elif "characters" in out:
        s = out["characters"]
        con.print(f"characters per example: min {s['min']}, mean {s['mean']}, max {s['max']} "
                  "(give --model DIR for token counts and the label mask)")
    ex = out.get("example")
    if ex:
        con.print(f"\nexample (line {ex['line']}): [green]green = trained on[/] (loss), [dim]dim = masked (-100)[/]")
        text = Text()
        if "tokens" in ex:
            for t in ex["tokens"]:
                text.append(t["text"], style="green" if t["trained"] else "dim")
                text.append("|", style="dim blue")
        else:
            for s in ex["segments"]:
                text.append(s["text"], style="green" if s["trained"] else "dim")
        con.print(text)
        if "tokens" in ex:
            trained = "".join(t["text"] for t in ex["tokens"] if t["trained"])
            con.print(f"[dim]({len(ex['tokens'])} tokens, {sum(t['trained'] for t in ex['tokens'])} trained; "
                      "| separates tokens)[/]")
            con.print(f"trained on: {trained!r}")
