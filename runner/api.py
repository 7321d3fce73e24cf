"""The runner as the front ends see it: the one module the CLI (advisor.cli) and the app (advisor.tui)
import from the runner. The commands behind `tuneplan run`, `data check`, `demo`, `cloud`, `chat`,
`eval` and `export` (their flags are the CLI's, advisor.cli.runs), and what the app needs to start a
run, follow it, preview its data and write its cloud files. Light at import time: each name imports
its module when first used, so the app still opens without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# --- the commands (called with the CLI's parsed arguments) --------------------------------------------


def cmd_run(a, hooks=None) -> int:
    from runner.commands import cmd_run as run

    return run(a, hooks)


def cmd_data_check(a) -> int:
    from runner.commands import cmd_data_check as check

    return check(a)


def cmd_demo(a) -> int:
    from runner.commands import cmd_demo as demo

    return demo(a)


def cmd_cloud(a) -> int:
    from runner.rent import cmd_cloud as cloud

    return cloud(a)


def cmd_chat(a) -> int:
    from runner.after import cmd_chat as chat

    return chat(a)


def cmd_eval(a) -> int:
    from runner.after import cmd_eval as evaluate

    return evaluate(a)


def cmd_export(a) -> int:
    from runner.after import cmd_export as export

    return export(a)


# --- for the app: start and follow a run ---------------------------------------------------------------


def start_run(plan_path, run_dir=None, resume=None, overrides=(), force: bool = False, env=None, capture=True):
    """Start a run in a subprocess (runner.launch.start_run): a RunHandle, or UserError at once."""
    from runner.launch import start_run as start

    return start(plan_path, run_dir, resume, overrides, force, env, capture)


def build_command(plan_path, run_dir=None, resume=None, overrides=(), force: bool = False) -> list[str]:
    from runner.launch import build_command as build

    return build(plan_path, run_dir, resume, overrides, force)


def node_commands(plan, plan_path, run_dir) -> list[list[str]]:
    from runner.launch import node_commands as nodes

    return nodes(plan, plan_path, run_dir)


def format_command(cmd: list[str]) -> str:
    from runner.launch import format_command as fmt

    return fmt(cmd)


def read_events(run_dir: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    from runner.events import read_events as read

    return read(run_dir, offset)


def next_command(run_dir: str | Path) -> dict[str, str] | None:
    """What to type (or press) to continue a stopped run: resume from its checkpoint, or start it again."""
    from runner.rundir import next_command as nxt

    return nxt(Path(run_dir))


def render_cloud(plan, kind: str, plan_path, **options: Any) -> str:
    """The SkyPilot task (kind "sky") or sbatch script ("slurm") `tuneplan cloud` writes for the plan."""
    from runner.rent import render

    return render(plan, kind, plan_path, **options)


def check_data(path: str | Path, fmt: str = "auto"):
    """(records, format, problems) of a data file (runner.data.load_and_check); DataError when unreadable."""
    from runner.data import load_and_check

    return load_and_check(path, fmt)


def longest_in_file(*args, **kwargs) -> dict:
    """The longest example of a data file in the model's tokens (runner.failfast.longest_in_file)."""
    from runner.failfast import longest_in_file as longest

    return longest(*args, **kwargs)


def gpu_snapshot():
    from runner.monitor import gpu_snapshot as snap

    return snap()


def system_memory():
    from runner.monitor import system_memory as mem

    return mem()
