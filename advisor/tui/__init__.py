"""The Textual app (`tuneplan` with no arguments, `tuneplan tui`, `tuneplan watch`).

Importing this package imports nothing from Textual; :func:`run` does. May import: the core through
advisor.service, advisor.forms and advisor.present, and runner.api; never the CLI.
"""

from __future__ import annotations


def run(plan_path: str | None = None, mode: str = "plan", run_dir: str | None = None) -> int:
    """Open the app; returns the exit code. A plan file that does not validate is reported, not opened."""
    import sys

    from advisor.spec import SpecError

    try:
        from advisor.tui.app import make_app

        app = make_app(plan_path=plan_path, mode=mode, run_dir=run_dir)
    except SpecError as e:
        print(f"tuneplan: cannot open {plan_path}:", file=sys.stderr)
        for p in e.problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    app.run()
    return app.return_code or 0


def main(argv: list[str] | None = None) -> int:
    """`python -m advisor.tui [--plan FILE] [watch [RUN_DIR]]`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m advisor.tui")
    p.add_argument("--plan", help="a plan.yaml to open (and save back to)")
    p.add_argument("screen", nargs="?", choices=["plan", "advice", "launch", "watch"], default="plan")
    p.add_argument("run_dir", nargs="?", help="watch: a run directory to follow")
    a = p.parse_args(argv)
    return run(a.plan, a.screen, a.run_dir)
