"""Renting the plan's GPUs with SkyPilot: the task that runs the same plan with ``tuneplan run`` on
every node, and what every target shares (the node layout, the staged files, the disk). The command
(`tuneplan cloud`) and the choice of target live in :mod:`runner.rent`; the Slurm script in
:mod:`runner.slurm`.

The SkyPilot task: ``resources.accelerators`` from the plan's GPU (SkyPilot's own accelerator name,
see SKYPILOT_NAMES) and count per node (8 GPUs per node at most, fewer where the GPU's profile says a
node holds fewer), ``num_nodes``, ``disk_size`` for the model and checkpoints, ``file_mounts`` for the
plan, the data and a local model directory, ``setup`` that installs tuneplan and its stack, and ``run``
that starts ``tuneplan run`` with SkyPilot's node rank and node IPs. The hub token is a SkyPilot secret
named HF_TOKEN (``sky launch --secret HF_TOKEN`` reads it from the environment); no secret is written.

Light imports (pyyaml, the advisor's tables).
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advisor.problems import Problem, Problems
from advisor.spec import Plan
from advisor.units import GB

# tuneplan GPU id -> SkyPilot accelerator name (None: SkyPilot has none). SkyPilot's names are the
# AcceleratorName column of skypilot-org/skypilot-catalog catalogs/v7/common/accelerators.csv
# (commit 03d79776571e), what `sky show-gpus -a` lists. SkyPilot's A100-80GB and H100 are the names
# the big clouds' SXM machines go by (AWS p4de/p5, GCP a2-ultragpu/a3); PCIe cards are offered under
# the same names, so a PCIe plan may get an SXM machine (same memory, faster links) and vice versa.
SKYPILOT_NAMES: dict[str, str | None] = {
    "t4": "T4", "v100-16gb": "V100", "v100-32gb": "V100-32GB", "a10g": "A10G", "a10": "A10", "l4": "L4",
    "l40s": "L40S", "a40": "A40", "a100-40gb": "A100", "a100-80gb-sxm": "A100-80GB", "a100-80gb-pcie": "A100-80GB",
    "h100-pcie": "H100", "h100-sxm": "H100", "h100-nvl": "H100-NVL", "h200": "H200", "b200": "B200",
    "gh200": "GH200", "mi300x": "MI300X", "mi250x": None, "mi325x": None,
    "rtx-3090": "RTX3090", "rtx-4090": "RTX4090", "rtx-5090": "RTX5090", "rtx-3060": "RTX3060",
    "rtx-4060-ti-16gb": None,  # SkyPilot's RTX4060 does not say Ti 16GB
    "rtx-4080": "RTX4080", "rtx-a6000": "RTXA6000", "rtx-6000-ada": "RTX6000-Ada", "rtx-a5000": "RTXA5000",
}
SKYPILOT_SOURCE = "skypilot-org/skypilot-catalog catalogs/v7/common/accelerators.csv"
MAX_GPUS_PER_NODE = 8
SKYPILOT_DEFAULT_DISK_GB = 256  # SkyPilot's default resources.disk_size
DISK_MARGIN_GB = 100  # room for the OS image, the Python stack and the hub's download cache
REMOTE = "~/tuneplan"  # where file_mounts put the plan, data and a local model on every node
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Layout:
    """How the plan's GPUs are rented: ``nodes`` machines of ``per_node`` ``accelerator`` each."""

    gpu_name: str
    accelerator: str | None
    nodes: int
    per_node: int
    price_usd_hour: float | None  # per GPU, from tuneplan's GPU profile
    price_source: str

    @property
    def gpus(self) -> int:
        return self.nodes * self.per_node

    @property
    def cost_per_hour(self) -> float | None:
        return None if self.price_usd_hour is None else round(self.price_usd_hour * self.gpus, 2)


def layout(plan: Plan, need_name: bool = True) -> Layout:
    """Nodes and GPUs per node for the plan. Several nodes when hardware.gpus is more than one node
    holds (hardware.nodes, when set above 1, decides instead). Raises Problems."""
    from advisor.service import find_gpu

    hw = plan.hardware
    if hw.device != "cuda" or not hw.gpu:
        raise Problems(Problem("the plan runs on the CPU (hardware.device=cpu or no hardware.gpu); renting needs a "
                               "GPU", "hardware.gpu", "set hardware.gpu=NAME and hardware.device=cuda"))
    gpu = find_gpu(hw.gpu)  # Problems on hardware.gpu
    name = SKYPILOT_NAMES.get(gpu.id)
    if name is None and need_name:
        offered = sorted({n for n in SKYPILOT_NAMES.values() if n})
        raise Problems(Problem(f"{gpu.name} has no SkyPilot accelerator name ({SKYPILOT_SOURCE} lists none for it), "
                               "so SkyPilot cannot rent it", "hardware.gpu",
                               f"pick a GPU SkyPilot offers ({', '.join(offered)}; `sky show-gpus -a`), or use "
                               "--target slurm on your own cluster"))
    most = min(MAX_GPUS_PER_NODE, gpu.gpus_per_node)
    if hw.nodes > 1:
        nodes, per_node = hw.nodes, hw.gpus // hw.nodes
        if per_node > most:
            raise Problems(Problem(f"{per_node} {gpu.name} per node is more than a node holds ({most})",
                                   "hardware.nodes", f"use hardware.nodes={math.ceil(hw.gpus / most)} or more"))
    elif hw.gpus <= most:
        nodes, per_node = 1, hw.gpus
    elif hw.gpus % most == 0:
        nodes, per_node = hw.gpus // most, most
    else:
        raise Problems(Problem(f"{hw.gpus} {gpu.name} do not fill nodes of {most}", "hardware.gpus",
                               f"use a multiple of {most} (e.g. {most * math.ceil(hw.gpus / most)}), or set "
                               "hardware.nodes so that each node gets an equal share"))
    return Layout(gpu.name, name, nodes, per_node, gpu.price_usd_hour, gpu.price_source)


# --- what travels to the nodes --------------------------------------------------------------------

@dataclass(frozen=True)
class Staged:
    """Local files the nodes need (remote path -> local path) and the overrides that point the plan
    at their remote copies."""

    mounts: dict[str, str]
    overrides: list[str]
    local_model_bytes: int | None
    hub_model: bool


def stage(plan: Plan, plan_path: str | Path, remote: str = REMOTE) -> Staged:
    """Check the local files (every problem at once) and name their remote copies."""
    problems: list[Problem] = []
    if plan.task != "training":
        problems.append(Problem("task is inference; `tuneplan cloud` rents GPUs for a fine-tune", "task",
                                "set task: training"))
    plan_path = Path(plan_path)
    mounts = {f"{remote}/plan.yaml": str(plan_path.resolve())}
    overrides: list[str] = []
    data = plan.data.path
    if not data:
        problems.append(Problem("data.path is not set", "data.path", "give a .jsonl/.json/.csv file (data.path=FILE)"))
    else:
        p = Path(data).expanduser()
        if not p.exists() and not p.is_absolute() and (plan_path.parent / p).exists():
            p = plan_path.parent / p
        if not p.is_file():
            problems.append(Problem(f"data file {data} does not exist on this machine (the nodes get it from here)",
                                    "data.path", "give the path of the training file on this machine"))
        else:
            mounts[f"{remote}/data/{_safe(p.name)}"] = str(p.resolve())
            overrides.append(f"data.path=$HOME/tuneplan/data/{_safe(p.name)}")
    ref = plan.model.ref
    local = Path(ref).expanduser()
    model_bytes, hub = None, False
    if local.exists() or ref.startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            problems.append(Problem(f"model directory {ref} does not exist here or has no config.json", "model.ref",
                                    "give a model directory with config.json and weights, or a hub id"))
        else:
            mounts[f"{remote}/model"] = str(local.resolve())
            overrides.append("model.ref=$HOME/tuneplan/model")
            model_bytes = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    elif ref.count("/") == 1:
        hub = True
    else:
        problems.append(Problem(f"model.ref {ref!r} is a bundled profile (a config, no weights); the nodes need a "
                                "model to train", "model.ref", "use a hub id (org/name) or a local model directory"))
    if problems:
        raise Problems(problems)
    return Staged(mounts, overrides, model_bytes, hub)


def disk_gb(plan: Plan, local_model_bytes: int | None = None) -> tuple[int, dict[str, int]]:
    """resources.disk_size in GB and its parts in bytes: the model files (a local directory's size,
    or parameters x the config's dtype for a hub download), keep_checkpoints + 1 checkpoints
    (trainable weights + optimizer states, advisor.memory), the final adapter or model, the merged
    export, plus DISK_MARGIN_GB; never below SkyPilot's default."""
    from advisor.service import checkpoint_bytes

    t = plan.training
    try:
        shape, weights, states = checkpoint_bytes(plan)
    except Problems as e:  # no config, offline, an architecture transformers does not know
        raise Problems(Problem(f"cannot read the model's config to size the disk: {e.items[0].what}",
                               "model.ref", "check model.ref (a bundled profile, a local directory or a hub id)")
                       ) from None
    if local_model_bytes is None:
        dtype = str(shape.config.get("torch_dtype") or shape.config.get("dtype") or "float32")
        per_param = 2 if dtype in ("bfloat16", "float16") else 4
        local_model_bytes = shape.params_total * per_param
    parts = {"model": local_model_bytes,
             "checkpoints": (plan.run.keep_checkpoints + 1) * (weights + states),
             "final": weights,
             "merged": shape.params_total * 2 if plan.run.merge_export and t.method != "full" else 0}
    need = math.ceil(sum(parts.values()) / GB) + DISK_MARGIN_GB
    return max(SKYPILOT_DEFAULT_DISK_GB, 10 * math.ceil(need / 10)), parts


def run_name(plan: Plan) -> str:
    """The run directory's name, the same on every node: run.name, else model-method-time (as the
    runner names it), in characters that need no quoting in a shell."""
    import time

    name = plan.run.name
    if not name:
        short = plan.model.ref.rstrip("/").replace("\\", "/").split("/")[-1] or "model"
        name = f"{short}-{plan.training.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return _safe(name)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "run"


def setup_lines(plan: Plan) -> list[str]:
    """Install tuneplan and its stack on a node: from this checkout (SkyPilot's workdir) when tuneplan
    runs from one, else the released package; DeepSpeed for ZeRO-1/2 plans."""
    lines = ["set -e", "python -m pip install --upgrade pip", "python -m pip install 'torch>=2.4'"]
    src = source_checkout()
    lines.append("python -m pip install ~/sky_workdir" if src else f"python -m pip install 'tuneplan=={_version()}'")
    if plan.hardware.zero in (1, 2) and plan.hardware.gpus > 1:
        lines.append("python -m pip install deepspeed")
    return lines


def source_checkout() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "advisor").is_dir() else None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tuneplan")
    except Exception:
        return "0.1.0"


def run_command(staged: Staged, plan_file: str, run_dir: str, node_rank: str, main_address: str, nodes: str,
                gpus: str) -> str:
    """The `tuneplan run` line every node runs: a shell line, because the node's rank and the main
    node's address come from the scheduler's environment variables. Every path in it is built from
    characters that need no quoting (see _safe); $VARIABLES expand on the node."""
    parts = ["tuneplan run " + plan_file, f"--run-dir {run_dir}", *staged.overrides, f"hardware.nodes={nodes}",
             f"hardware.gpus={gpus}", f"hardware.node_rank={node_rank}", f"hardware.main_address={main_address}"]
    return " \\\n  ".join(parts)


def checked(plan: Plan, plan_path: str | Path, need_name: bool = True) -> tuple[Layout, Staged]:
    """layout() and stage() with the problems of both at once."""
    found: list[Problem] = []
    lay = staged = None
    try:
        lay = layout(plan, need_name)
    except Problems as e:
        found += e.items
    try:
        staged = stage(plan, plan_path)
    except Problems as e:
        found += e.items
    if found:
        raise Problems(found)
    return lay, staged


def sky_task(plan: Plan, plan_path: str | Path, bucket: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The SkyPilot task as a dict and the comment lines for its head. Raises Problems."""
    lay, staged = checked(plan, plan_path)
    disk, parts = disk_gb(plan, staged.local_model_bytes)
    name = run_name(plan)
    if bucket is None and lay.nodes > 1:  # every rank's checkpoint state must reach one run directory
        bucket = _sky_name(name)[:57] + "-runs"
    if bucket is not None and not _BUCKET.fullmatch(bucket):
        raise Problems(Problem(f"bucket name {bucket!r} is not a valid bucket name", None,
                               "3 to 63 lowercase letters, digits, dots and dashes (--bucket NAME)"))
    runs = "/tuneplan-runs" if bucket else "$HOME/tuneplan/runs"
    task: dict[str, Any] = {"name": _sky_name(name)}
    src = source_checkout()
    if src:
        task["workdir"] = str(src)
    task["resources"] = {"accelerators": f"{lay.accelerator}:{lay.per_node}", "disk_size": disk}
    task["num_nodes"] = lay.nodes
    if staged.hub_model:
        task["secrets"] = {"HF_TOKEN": None}  # given at launch: sky launch --secret HF_TOKEN
    mounts: dict[str, Any] = dict(staged.mounts)
    if bucket:
        mounts["/tuneplan-runs"] = {"name": bucket, "mode": "MOUNT_CACHED"}
    task["file_mounts"] = mounts
    task["setup"] = "\n".join(setup_lines(plan)) + "\n"
    main = "$MAIN_ADDR"
    line = run_command(staged, "$HOME/tuneplan/plan.yaml", f"{runs}/{name}", "$SKYPILOT_NODE_RANK", main,
                       "$SKYPILOT_NUM_NODES", "$((SKYPILOT_NUM_NODES * SKYPILOT_NUM_GPUS_PER_NODE))")
    task["run"] = 'set -e\nMAIN_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n 1)\n' + line + "\n"
    head = [f"SkyPilot task written by `tuneplan cloud {plan_path}` (the plan: {plan.model.ref}, "
            f"{plan.training.method}, {plan.hardware.gpus} x {lay.gpu_name}, ZeRO {plan.hardware.zero})",
            f"{lay.nodes} node{'s' if lay.nodes > 1 else ''} x {lay.per_node} {lay.accelerator} (SkyPilot's name "
            f"for {lay.gpu_name})"]
    if lay.cost_per_hour is not None:
        head.append(f"Estimated cost: {lay.gpus} x ${lay.price_usd_hour:.2f}/GPU-hour = ${lay.cost_per_hour:.2f}/hour "
                    f"on demand (tuneplan's GPU profile: {lay.price_source}); SkyPilot picks the cheapest offer")
    else:
        head.append(f"Estimated cost: tuneplan's GPU profile has no price for {lay.gpu_name}")
    head.append(f"disk_size {disk} GB: model {parts['model'] / GB:.1f} GB + {plan.run.keep_checkpoints + 1} "
                f"checkpoints {parts['checkpoints'] / GB:.1f} GB + final {parts['final'] / GB:.1f} GB"
                + (f" + merged {parts['merged'] / GB:.1f} GB" if parts["merged"] else "")
                + f" + {DISK_MARGIN_GB} GB for the OS, the stack and caches (at least SkyPilot's default "
                f"{SKYPILOT_DEFAULT_DISK_GB})")
    if bucket:
        head.append(f"Run directory: /tuneplan-runs/{name}, the bucket {bucket} (SkyPilot creates it if it does not "
                    "exist; MOUNT_CACHED: written to local disk, uploaded in the background) that every node shares: "
                    "each rank's checkpoint state lands in one place and outlives the cluster")
    head.append(f"Next: sky launch -c {task['name']} FILE" + (" --secret HF_TOKEN" if staged.hub_model else ""))
    return task, head


def _sky_name(name: str) -> str:
    """SkyPilot cluster names: lowercase letters, digits and dashes, starting with a letter."""
    s = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return ("tuneplan-" + s)[:60].rstrip("-")


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """Text for a comment line of a script or task: every control character (a line break above all,
    which would end the comment and start a command) shown as '?'."""
    return _UNPRINTABLE.sub("?", str(text))


def _comment(lines: list[str]) -> str:
    return "".join(f"# {one_line(line)}\n" for line in lines)


def render_sky(plan: Plan, plan_path: str | Path, bucket: str | None = None, out: str | None = None) -> str:
    import yaml

    task, head = sky_task(plan, plan_path, bucket)
    if out:
        head = [h.replace("FILE", shlex.quote(str(out))) if h.startswith("Next:") else h for h in head]
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):  # scripts as literal blocks, as people write them
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return _comment(head) + yaml.dump(task, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=1000)
