"""Execution engine: turns a Plan into a real training run (the only part of tuneplan that trains).

May import from the advisor: advisor.service (every number: the prediction, the out-of-memory ladder,
disk and export sizes), the foundations (problems, units, safefile, policy, spec, job, software),
advisor.planfile (the plan file) and advisor.stack (the real stack it trains with). Never a front end,
but for runner.__main__, the `python -m runner` shim that hands its arguments to the CLI's `run`. The
front ends reach the runner through runner.api alone (tests/test_layering.py checks both).
"""
