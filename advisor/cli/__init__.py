"""The `tuneplan` command line: argparse front end over :mod:`advisor.service`.

``main`` (the console script) assembles the advisor's commands and the runner's; ``common`` holds
what every command shares (flags, problem rendering). This package file imports nothing, so
``runner.cli`` can use ``advisor.cli.common`` without an import cycle.
"""
