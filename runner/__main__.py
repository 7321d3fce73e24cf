"""`python -m runner PLAN.yaml [key=value ...]`: the same as `tuneplan run` (the launcher's entry)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from advisor.cli import EXIT_USER_ERROR, UserError
    from runner.cli import add_run_arguments, cmd_run

    p = argparse.ArgumentParser(prog="python -m runner", description="Run a tuneplan plan (as `tuneplan run`).")
    add_run_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_run(args)
    except UserError as e:
        for line in e.problems:
            print(f"tuneplan: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
