"""`python -m runner PLAN.yaml [key=value ...]`: the same as `tuneplan run` (the launcher's entry).

Tests that need the loop to act at a given step in a real subprocess set ``TUNEPLAN_TEST_HOOKS``
(``step_delay=SECONDS,oom_at_step=N``, see :meth:`runner.recipe.Hooks.from_spec`); this is the one
place the variable is read, and it only builds :class:`runner.recipe.Hooks` for the recipe.
"""

from __future__ import annotations

import argparse
import os
import sys

TEST_HOOKS_ENV = "TUNEPLAN_TEST_HOOKS"


def main(argv: list[str] | None = None) -> int:
    from advisor.cli.common import parse_with_overrides, report_user_error
    from advisor.problems import UserError
    from runner.cli import add_run_arguments, cmd_run

    p = argparse.ArgumentParser(prog="python -m runner", description="Run a tuneplan plan (as `tuneplan run`).")
    add_run_arguments(p)
    args = parse_with_overrides(p, argv)
    hooks = None
    if os.environ.get(TEST_HOOKS_ENV):
        from runner.recipe import Hooks

        hooks = Hooks.from_spec(os.environ[TEST_HOOKS_ENV])
    try:
        return cmd_run(args, hooks=hooks)
    except UserError as e:
        return report_user_error(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
