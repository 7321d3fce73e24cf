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

def add_commands(subparsers) -> None:
    """`tuneplan cloud PLAN [--target sky|slurm] [-o FILE]`."""
    c = subparsers.add_parser("cloud", help="rent the plan's GPUs: a SkyPilot task or a Slurm script for it",
                              description="Write a SkyPilot task (--target sky) or a Slurm sbatch script "
                              "(--target slurm) that runs the plan with `tuneplan run` on every node. Launches "
                              "nothing; prints the command that would.")
    c.add_argument("plan", help="plan.yaml")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. hardware.gpus=16")
    c.add_argument("--target", choices=["sky", "slurm"], default="sky", help="sky (default) or slurm")
    c.add_argument("-o", "--output", help="file to write (default: PLAN's name + .sky.yaml or .sbatch; - prints)")
    c.add_argument("--bucket", help="sky: the bucket mounted at /tuneplan-runs for the run directory (shared by "
                   "every node, kept after the cluster is gone; default with several nodes: tuneplan-RUN-runs)")
    c.add_argument("--partition", help="slurm: the partition (#SBATCH --partition)")
    c.add_argument("--time", help="slurm: the time limit (#SBATCH --time, e.g. 12:00:00)")
    c.set_defaults(func=cmd_cloud)


def cmd_cloud(a: argparse.Namespace) -> int:
    from advisor.planfile import apply_overrides, load_plan
    from advisor.spec import SpecError

    path = Path(a.plan)
    if not path.is_file():
        raise Problems(Problem(f"plan file {a.plan} does not exist", None,
                               "give a plan.yaml (`tuneplan recommend --save` writes one)"))
    try:
        plan = load_plan(path)
        if a.overrides:
            plan = apply_overrides(plan, list(a.overrides))
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


def main(argv: list[str] | None = None) -> int:
    """`python -m runner.rent PLAN ...`: the command alone, as advisor.cli.main runs it."""
    from advisor.cli.common import parse_with_overrides, report_problems

    parser = argparse.ArgumentParser(prog="tuneplan")
    add_commands(parser.add_subparsers(dest="command"))
    args = parse_with_overrides(parser, ["cloud", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except Problems as e:
        return report_problems(e)


if __name__ == "__main__":
    sys.exit(main())
