"""`python -m runner PLAN.yaml [key=value ...]`: the same as `tuneplan run` (the launcher's entry)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from advisor.cli.common import parse_with_overrides, report_user_error
    from advisor.problems import UserError
    from runner.cli import add_run_arguments, cmd_run

    p = argparse.ArgumentParser(prog="python -m runner", description="Run a tuneplan plan (as `tuneplan run`).")
    add_run_arguments(p)
    args = parse_with_overrides(p, argv)
    try:
        return cmd_run(args)
    except UserError as e:
        return report_user_error(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
