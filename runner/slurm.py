"""`tuneplan cloud PLAN --target slurm`: the plan as a Slurm batch script for `sbatch`.

One task per node (``srun --ntasks-per-node=1``); each runs ``tuneplan run`` with its node's rank
($SLURM_NODEID) and the first host of the allocation as the main address, and that `tuneplan run`
starts the node's GPU processes itself (accelerate launch). A cluster shares its file system, so
the plan, the data, a local model and the run directory keep their absolute paths from here.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from advisor.problems import Problem, Problems
from advisor.spec import Plan


def render_sbatch(plan: Plan, plan_path: str | Path, partition: str | None = None, time: str | None = None,
                  out: str | None = None) -> str:
    """The sbatch script's text. Raises advisor.problems.Problems (the same checks as the SkyPilot
    task: a GPU plan, a training task, data and model that exist here)."""
    from runner.cloud import _comment, _safe, checked, run_name

    problems = []
    try:
        lay, staged = checked(plan, plan_path, need_name=False)  # Slurm names GPUs its own way (per site)
    except Problems as e:
        problems += e.items
    if partition is not None and not _safe_word(partition):
        problems.append(Problem(f"partition {partition!r} is not a Slurm partition name", None,
                                "letters, digits, - and _ only"))
    if time is not None and not _SLURM_TIME.fullmatch(time):
        problems.append(Problem(f"time limit {time!r} is not a Slurm time", None,
                                "MINUTES, HOURS:MINUTES:SECONDS or DAYS-HOURS[:MINUTES[:SECONDS]], e.g. 12:00:00 or "
                                "2-00:00:00"))
    if problems:
        raise Problems(problems)
    name = run_name(plan)
    plan_file = Path(plan_path).resolve()
    run_dir = Path(plan.run.output_dir).expanduser()
    if not run_dir.is_absolute():
        run_dir = plan_file.parent / run_dir
    run_dir = run_dir / name
    overrides = [o for o in _local_overrides(plan, plan_file)]
    inner = shlex.join(["tuneplan", "run", str(plan_file), "--run-dir", str(run_dir), *overrides,
                        f"hardware.nodes={lay.nodes}", f"hardware.gpus={lay.gpus}"])
    inner += ' hardware.node_rank="$SLURM_NODEID" hardware.main_address="$MAIN_ADDR"'
    lines = [
        "#!/bin/bash",
        _comment([f"Slurm batch script written by `tuneplan cloud {plan_path} --target slurm` (the plan: "
                  f"{plan.model.ref}, {plan.training.method}, {lay.gpus} x {lay.gpu_name}, ZeRO {plan.hardware.zero})",
                  f"{lay.nodes} node{'s' if lay.nodes > 1 else ''} x {lay.per_node} GPUs; add the GPU type your site "
                  f"names ({lay.gpu_name}) to --gpus-per-node, e.g. --gpus-per-node=TYPE:{lay.per_node}, if it has "
                  "several"]).rstrip("\n"),
        f"#SBATCH --job-name={_safe(name)[:64]}",
        f"#SBATCH --nodes={lay.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={lay.per_node}",
        "#SBATCH --exclusive",
        f"#SBATCH --output={_safe(name)}-%j.log",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time:
        lines.append(f"#SBATCH --time={time}")
    lines += ["", "set -euo pipefail"]
    if sys.prefix != sys.base_prefix:
        lines.append(f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}  # the environment "
                     "tuneplan cloud ran in")
    if staged.hub_model:
        lines.append("# a gated hub model needs HF_TOKEN: export it before sbatch (the job inherits it; it is never "
                     "written here)")
    lines += [
        'MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MAIN_ADDR",
        f"srun --nodes={lay.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}",
        "",
        _comment([f"Next: sbatch {shlex.quote(str(out)) if out else 'FILE'}; progress: tail -f "
                  f"{shlex.quote(str(run_dir / 'events.jsonl'))}"]).rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"


def _local_overrides(plan: Plan, plan_file: Path) -> list[str]:
    """Absolute paths for the data and a local model, as `tuneplan run` resolves them here."""
    out = []
    data = Path(plan.data.path or "").expanduser()
    if plan.data.path and not data.is_absolute():
        here = (plan_file.parent / data) if (plan_file.parent / data).exists() else data
        out.append(f"data.path={here.resolve()}")
    ref = Path(plan.model.ref).expanduser()
    if plan.model.ref.startswith((".", "~")) or (ref.exists() and not ref.is_absolute()):
        out.append(f"model.ref={ref.resolve()}")
    return out


# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds (sbatch(1))
_SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}")


def _safe_word(s: str) -> bool:
    return bool(s) and all(c.isalnum() or c in "-_" for c in s)
