"""`tuneplan cloud PLAN`: rent the plan's GPUs. Writes a SkyPilot task (``--target sky``, the
default, :mod:`runner.cloud`) or a Slurm batch script (``--target slurm``, :mod:`runner.slurm`) that
runs the same plan with ``tuneplan run`` on every node; it never launches anything itself. The TUI's
Launch screen shows the same text with :func:`render`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from advisor.problems import Problem, Problems
from advisor.spec import Plan


def render(plan: Plan, kind: str, plan_path: str | Path = "plan.yaml", **options: Any) -> str:
    """The text of the file `tuneplan cloud` writes: kind "sky" (a SkyPilot task YAML) or "slurm" (an
    sbatch script). The TUI Launch screen shows it. Raises advisor.problems.Problems."""
    if kind == "sky":
        from runner.cloud import render_sky

        return render_sky(plan, plan_path, options.get("bucket"), options.get("out"))
    if kind == "slurm":
        from runner.slurm import render_sbatch

        return render_sbatch(plan, plan_path, partition=options.get("partition"), time=options.get("time"),
                             out=options.get("out"))
    raise Problems(Problem(f"unknown target {kind!r}", None, "use sky or slurm"))


# --- the command ----------------------------------------------------------------------------------

def cmd_cloud(a: argparse.Namespace) -> int:
    from advisor.planfile import apply_overrides, consent, load_plan
    from advisor.spec import SpecError

    path = Path(a.plan)
    if not path.is_file():
        raise Problems(Problem(f"plan file {a.plan} does not exist", None,
                               "give a plan.yaml (`tuneplan recommend --save` writes one)"))
    try:
        trust = bool(getattr(a, "trust_remote_code", False))
        plan = load_plan(path, trust)
        if a.overrides:
            plan = consent(apply_overrides(plan, list(a.overrides)), trust)
    except SpecError as e:
        raise Problems(e.items) from None
    suffix = ".sky.yaml" if a.target == "sky" else ".sbatch"
    out = a.output or str(path.with_name(path.stem + suffix))
    if a.overrides:  # the nodes read the plan file itself: it must hold the overrides too
        from advisor.planfile import save_plan

        path = save_plan(plan, path.with_name(f"{path.stem}.{a.target}.plan.yaml"))
        print(f"wrote {path} (the plan with {' '.join(a.overrides)})", file=sys.stderr if out == "-" else sys.stdout)
    text = render(plan, a.target, path, bucket=a.bucket, out=None if out == "-" else out, partition=a.partition,
                  time=a.time)
    if out == "-":
        sys.stdout.write(text)
        return 0
    try:
        Path(out).write_text(text)
    except OSError as e:
        raise Problems(Problem(f"cannot write {out}: {e.strerror or e}", None,
                               "give -o a file in a folder you can write (or -o - to print it)")) from None
    print(f"wrote {out}")
    for line in text.splitlines():
        if line.startswith(("# Estimated cost", "# Next:")) or line.startswith("# ") and " node" in line[:12]:
            print(line[2:])
    return 0
