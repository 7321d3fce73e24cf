"""The `tuneplan` command line: argparse front end over :mod:`advisor.service` and :mod:`runner.api`.

``main`` (the console script's commands) assembles the advisor's commands (``main``, ``advice``) and
the runner's (``runs``: their flags live here, their work in the runner); ``common`` holds what every
command shares (flags, problem rendering). May import: the core (advisor.*), ``runner.api``; never the
app (advisor.tui) or another runner module.
"""
