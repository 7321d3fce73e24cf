"""The `tuneplan` console script: the command line (advisor.cli) plus the app (advisor.tui).

The composition root: the only module that imports both front ends, so that the CLI and the TUI never
import each other. `tuneplan` with no command on a terminal opens the app; `tuneplan tui` and
`tuneplan watch [RUN_DIR]` open it on a screen; every other command is the CLI's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from advisor.cli import main as cli
from advisor.problems import Problem, Problems


def cmd_tui(a: argparse.Namespace) -> int:
    from advisor.tui import run

    return run(a.plan)


def watch_problems(run_dir: str | None, interactive: bool) -> list[Problem]:
    """What stops `tuneplan watch` before it opens: no terminal to draw on, a run directory that is
    missing or is a file."""
    problems = []
    if not interactive:
        problems.append(Problem("watch draws a live screen and needs a terminal", None,
                                "run it in a terminal; for a script, read RUN_DIR/events.jsonl instead"))
    if run_dir is not None:
        path = Path(run_dir).expanduser()
        if not path.exists():
            problems.append(Problem(f"run directory {run_dir} does not exist", None,
                                    "give the folder `tuneplan run` printed (it holds events.jsonl)"))
        elif not path.is_dir():
            problems.append(Problem(f"{run_dir} is a file, not a run directory", None,
                                    "give the folder that holds events.jsonl"))
    return problems


def cmd_watch(a: argparse.Namespace) -> int:
    problems = watch_problems(a.run_dir, sys.stdin.isatty() and sys.stdout.isatty())
    if problems:
        raise Problems(problems)
    from advisor.tui import run

    return run(mode="watch", run_dir=a.run_dir)


def add_app_commands(sub) -> None:
    t = sub.add_parser("tui", help="the app: plan, compare, decide, launch and watch (also: tuneplan with no command)")
    t.add_argument("--plan", help="a plan.yaml to open (and save back to with ctrl+s)")
    t.set_defaults(func=cmd_tui)
    w = sub.add_parser("watch", help="live GPU memory per device and process (NVML); with RUN_DIR, a run vs its plan")
    w.add_argument("run_dir", nargs="?", help="a run directory to follow (events.jsonl)")
    w.set_defaults(func=cmd_watch)


def open_app() -> int:
    from advisor.tui import run

    return run()


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, extra=add_app_commands, no_command=open_app)


if __name__ == "__main__":
    sys.exit(main())
