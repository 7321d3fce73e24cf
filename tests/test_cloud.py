"""`tuneplan cloud`: the SkyPilot task (parsed by SkyPilot's own loader, sky.Task.from_yaml) and the
Slurm batch script (checked by bash -n) for a plan; bad input gives one clear problem each."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from advisor.planfile import save_plan
from advisor.problems import Problems
from advisor.spec import build_plan
from runner.cloud import SKYPILOT_NAMES
from runner.demo import DEMO_DATA
from runner.rent import render


def _plan(tmp_path, **hw):
    d = {"model": {"ref": "meta-llama/Llama-3.1-70B"},
         "training": {"method": "full", "precision": "bf16", "seq_len": 2048},
         "hardware": {"gpu": "H100 SXM", "gpus": 16, "zero": 3, **hw},
         "data": {"path": str(DEMO_DATA)}, "run": {"name": "big"}}
    plan = build_plan(d)
    return plan, save_plan(plan, tmp_path / "plan.yaml")


def _sky_python():
    """A Python with SkyPilot: this one, TUNEPLAN_SKY_PYTHON, or the one behind `sky` on PATH (SkyPilot
    installed with pipx or in its own venv: its click pin conflicts with huggingface_hub's)."""
    try:
        import sky  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    if os.environ.get("TUNEPLAN_SKY_PYTHON"):
        return os.environ["TUNEPLAN_SKY_PYTHON"]
    exe = shutil.which("sky")
    if exe:
        first = Path(exe).read_text(errors="replace").splitlines()[0]
        if first.startswith("#!") and Path(first[2:].strip()).exists():
            return first[2:].strip()
    return None


LOADER = """
import json, sys
import sky
t = sky.Task.from_yaml(sys.argv[1])
print(json.dumps({"num_nodes": t.num_nodes, "accelerators": [r.accelerators for r in t.resources],
                  "disk_size": [r.disk_size for r in t.resources], "file_mounts": t.file_mounts, "run": t.run,
                  "secrets": sorted(t.secrets), "secret_refs": [r.name for r in t.managed_secret_refs]}))
"""


def sky_load(path, tmp_path):
    python = _sky_python()
    if python is None:
        pytest.skip("SkyPilot is not installed (pip install skypilot, or set TUNEPLAN_SKY_PYTHON)")
    out = subprocess.run([python, "-c", LOADER, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path)})  # the loader keeps its state under ~/.sky
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_sixteen_h100_two_nodes_of_eight(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_write_me")
    plan, path = _plan(tmp_path)
    text = render(plan, "sky", path)
    assert "hf_do_not_write_me" not in text
    task = yaml.safe_load(text)
    assert task["num_nodes"] == 2 and task["resources"]["accelerators"] == "H100:8"
    assert "# Estimated cost: 16 x $3.49/GPU-hour = $55.84/hour" in text
    assert "# Next: sky launch -c tuneplan-big FILE --secret HF_TOKEN" in text
    assert task["resources"]["disk_size"] >= 1000  # 70B full: 141 GB of weights, checkpoints with Adam states
    for var in ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES", "SKYPILOT_NUM_GPUS_PER_NODE"):
        assert var in task["run"]
    # two nodes share one run directory (every rank's checkpoint state): a bucket, made if missing
    assert task["file_mounts"]["/tuneplan-runs"] == {"name": "tuneplan-big-runs", "mode": "MOUNT_CACHED"}
    assert "--run-dir /tuneplan-runs/big" in task["run"]
    script = render(plan, "slurm", path, partition="gpu", time="12:00:00")
    assert "hf_do_not_write_me" not in script
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00"):
        assert line in script.splitlines()
    assert "srun --nodes=2 --ntasks-per-node=1" in script and 'hardware.node_rank="$SLURM_NODEID"' in script
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    (tmp_path / "task.yaml").write_text(text)
    loaded = sky_load(tmp_path / "task.yaml", tmp_path)
    assert loaded["num_nodes"] == 2 and loaded["accelerators"] == [{"H100": 8}]
    assert loaded["disk_size"] == [task["resources"]["disk_size"]]
    assert loaded["file_mounts"]["~/tuneplan/plan.yaml"] == str(path.resolve())
    assert loaded["file_mounts"]["~/tuneplan/data/instructions.jsonl"] == str(DEMO_DATA.resolve())
    assert "HF_TOKEN" in loaded["secrets"] + loaded["secret_refs"]


def test_one_rtx_4090_one_node(tmp_path):
    plan, path = _plan(tmp_path, gpu="RTX 4090", gpus=1, zero=0)
    plan = plan.model_copy(update={"training": plan.training.model_copy(update={"method": "qlora"})})
    path = save_plan(plan, tmp_path / "plan.yaml")
    text = render(plan, "sky", path)
    task = yaml.safe_load(text)
    assert task["num_nodes"] == 1 and task["resources"]["accelerators"] == "RTX4090:1"
    assert task["resources"]["disk_size"] == 256  # SkyPilot's default holds a QLoRA run of 70B
    assert "/tuneplan-runs" not in task["file_mounts"] and "--run-dir $HOME/tuneplan/runs/big" in task["run"]
    with pytest.raises(Problems, match="not a valid bucket name"):
        render(plan, "sky", path, bucket="Not_A_Bucket")
    assert "# Estimated cost: 1 x $0.59/GPU-hour = $0.59/hour" in text
    script = render(plan, "slurm", path)
    assert "#SBATCH --nodes=1" in script and "#SBATCH --gpus-per-node=1" in script
    (tmp_path / "task.yaml").write_text(text)
    loaded = sky_load(tmp_path / "task.yaml", tmp_path)
    assert loaded["num_nodes"] == 1 and loaded["accelerators"] == [{"RTX4090": 1}]


def test_local_model_directory_is_mounted_and_measured(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    plan = build_plan({"model": {"ref": str(model)}, "hardware": {"gpu": "L4"}, "data": {"path": str(DEMO_DATA)},
                       "run": {"name": "small"}})
    from runner.cloud import stage

    staged = stage(plan, tmp_path / "plan.yaml")
    assert staged.mounts["~/tuneplan/model"] == str(model.resolve()) and not staged.hub_model
    assert "model.ref=$HOME/tuneplan/model" in staged.overrides and staged.local_model_bytes > 1000


def test_every_skypilot_name_is_one_tuneplan_knows():
    from advisor.gpus import gpu_table

    ids = set(gpu_table())
    assert set(SKYPILOT_NAMES) <= ids
    nvidia_amd = {i for i, g in gpu_table().items() if g.vendor.lower() in ("nvidia", "amd")}
    assert nvidia_amd <= set(SKYPILOT_NAMES), "say for every data-centre GPU whether SkyPilot names it"


@pytest.mark.parametrize("hw, data, field, words", [
    ({"gpu": "RTX 4060 Ti", "gpus": 1}, None, "hardware.gpu", "has no SkyPilot accelerator name"),
    ({"gpus": 12}, None, "hardware.gpus", "do not fill nodes of 8"),
    ({}, "missing.jsonl", "data.path", "does not exist on this machine"),
    ({"device": "cpu", "gpu": None}, None, "hardware.gpu", "renting needs a GPU"),
])
def test_bad_input_one_problem_each(tmp_path, hw, data, field, words):
    plan, path = _plan(tmp_path, **hw)
    if data:
        plan = plan.model_copy(update={"data": plan.data.model_copy(update={"path": str(tmp_path / data)})})
    with pytest.raises(Problems) as e:
        render(plan, "sky", path)
    assert [p.field for p in e.value.items] == [field] and words in e.value.items[0].what


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "advisor.launcher", "cloud", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_command_writes_the_file_and_bad_nodes_are_one_line(tmp_path):
    _, path = _plan(tmp_path)
    out = _cli(tmp_path, str(path), "--target", "slurm", "-o", "job.sbatch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("wrote job.sbatch") and (tmp_path / "job.sbatch").exists()
    out = _cli(tmp_path, "plan.yaml")
    assert out.returncode == 0 and "Next: sky launch -c tuneplan-big plan.sky.yaml --secret HF_TOKEN" in out.stdout
    for over, words in [("hardware.nodes=2", "2 nodes need the address of node 0"),
                        ("hardware.node_rank=3", "node rank 3 is out of range for 1 node")]:
        out = _cli(tmp_path, str(path), over)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and words in out.stderr, out.stderr


def test_a_model_config_that_cannot_be_read_is_one_problem(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no sizes
    plan = build_plan({"model": {"ref": str(model)}, "hardware": {"gpu": "L4"}, "data": {"path": str(DEMO_DATA)}})
    with pytest.raises(Problems) as e:
        render(plan, "sky", tmp_path / "plan.yaml")
    assert [p.field for p in e.value.items] == ["model.ref"] and "size the disk" in e.value.items[0].what


@pytest.mark.slow
def test_overrides_reach_the_nodes_through_the_mounted_plan(tmp_path):
    """Every node reads the plan file: `tuneplan cloud PLAN k=v` writes the plan with the overrides and
    mounts that one, not the original."""
    _, path = _plan(tmp_path)
    out = _cli(tmp_path, str(path), "run.max_steps=7", "training.micro_batch=2", "-o", "task.yaml")
    assert out.returncode == 0, out.stderr
    task = yaml.safe_load((tmp_path / "task.yaml").read_text())
    mounted = Path(task["file_mounts"]["~/tuneplan/plan.yaml"])
    assert mounted != path.resolve() and mounted.is_file()
    from advisor.planfile import load_plan

    effective = load_plan(mounted)
    assert effective.run.max_steps == 7 and effective.training.micro_batch == 2
    assert load_plan(path).run.max_steps is None  # the user's file is untouched
