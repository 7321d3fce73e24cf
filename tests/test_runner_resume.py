"""A run killed with SIGTERM (a real subprocess) checkpoints, and --resume finishes it; a
two-process CPU run (DDP over gloo) through the launcher."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from runner.demo import DEMO_DATA
from runner.events import read_events


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from runner.demo import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model"), DEMO_DATA)


def _plan_file(tmp_path, model_dir, **over):
    from advisor.planfile import save_plan
    from advisor.spec import build_plan

    d = {
        "model": {"ref": str(model_dir)},
        "training": {"method": "lora", "precision": "fp32", "micro_batch": 4, "seq_len": 128,
                     "grad_checkpointing": False, "learning_rate": 5e-3, "lora": {"r": 8, "alpha": 16}},
        "hardware": {"gpu": None, "device": "cpu", **over.get("hardware", {})},
        "data": {"path": str(DEMO_DATA), "val_split": 0.05},
        "run": {"output_dir": str(tmp_path / "runs"), "name": "r", "max_steps": 30, "save_every": 100,
                "eval_every": 100, **over.get("run", {})},
    }
    return save_plan(build_plan(d), tmp_path / "plan.yaml")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "TUNEPLAN_NO_PROGRESS": "1"}


def _all_lines_json(path):
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]  # raises on any invalid line


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_finishes(tmp_path, model_dir):
    from runner.launch import start_run

    plan = _plan_file(tmp_path, model_dir)
    run_dir = tmp_path / "runs" / "r"
    handle = start_run(plan, run_dir, env={"TUNEPLAN_TEST_HOOKS": "step_delay=0.2"})
    assert handle.command[:3] == [sys.executable, "-m", "runner"]
    offset, steps = 0, []
    deadline = time.time() + 120
    while time.time() < deadline and len(steps) < 3:
        events, offset = read_events(run_dir, offset)
        steps += [e for e in events if e["type"] == "step"]
        assert handle.poll() is None, (run_dir / "run.log").read_text()
        time.sleep(0.1)
    assert len(steps) >= 3
    handle.stop()
    assert handle.wait(60) == 130
    events = _all_lines_json(run_dir / "events.jsonl")
    end = events[-1]
    assert end["type"] == "end" and end["status"] == "interrupted"
    stopped_at = end["step"]
    assert 3 <= stopped_at < 30
    ck = [e for e in events if e["type"] == "checkpoint"]
    assert ck and ck[-1]["step"] == stopped_at
    assert json.loads((run_dir / "report.json").read_text())["status"] == "interrupted"

    out = subprocess.run([sys.executable, "-m", "runner", "--resume", str(run_dir)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    events = _all_lines_json(run_dir / "events.jsonl")
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith(f"step-{stopped_at}")
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps[-1] == 30 and steps[steps.index(stopped_at) + 1] == stopped_at + 1
    assert events[-1]["type"] == "end" and events[-1]["status"] == "completed"
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["steps"] == 30 and rep["resumed_from"] and (run_dir / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path, model_dir):
    """DDP over gloo on two CPU processes (torchrun under the hood; see runner.launch), merged at the
    end by rank 0 (runner.saving.merge_export, with accelerate holding the training model)."""
    plan = _plan_file(tmp_path, model_dir, hardware={"gpus": 2},
                      run={"max_steps": 3, "save_every": 2, "merge_export": True})
    out = subprocess.run([sys.executable, "-m", "runner", str(plan)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "r"
    events = _all_lines_json(run_dir / "events.jsonl")
    assert events[0]["type"] == "start" and events[0]["world_size"] == 2
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert events[-1]["status"] == "completed"
    assert (run_dir / "checkpoints" / "step-2" / "adapter").is_dir() and (run_dir / "adapter").is_dir()
    assert (run_dir / "merged" / "config.json").is_file()
