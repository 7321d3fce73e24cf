"""`python -m runner PLAN.yaml [key=value ...]`: `tuneplan run` as a module, what the launchers start on
every process (runner.launch.build_command). The runner's flags are the CLI's (advisor.cli.runs), so this
shim hands the arguments to the CLI: the one place the runner enters a front end, as the `tuneplan`
console script does.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from advisor.cli.main import main as cli

    return cli(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
