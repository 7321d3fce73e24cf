"""Several nodes: the plan's hardware fields, the launcher command each node runs, and a real
two-"node" run on 127.0.0.1 (one CPU process per node, gloo) through `tuneplan run` on each node,
ending with one run directory that resumes; a killed two-process run resumes with every rank's
optimizer state and generators, equal to an uninterrupted run."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from advisor.problems import Problems
from advisor.spec import build_plan
from runner.demo import DEMO_DATA
from runner.launch import free_port


def _hw(**hw):
    return build_plan({"hardware": hw})


def test_gpus_are_the_total_and_split_over_nodes():
    from runner.launch import gpus_per_node

    plan = _hw(gpu="H100 SXM", gpus=16, nodes=2, main_address="10.0.0.1")
    assert gpus_per_node(plan) == 8 and plan.hardware.main_port == 29500


@pytest.mark.parametrize("hw, field, words", [
    ({"gpus": 16, "nodes": 3, "main_address": "h"}, "hardware.nodes", "do not split evenly over 3 nodes"),
    ({"gpus": 4, "nodes": 2, "node_rank": 2, "main_address": "h"}, "hardware.node_rank", "out of range for 2 nodes"),
    ({"gpus": 4, "nodes": 2}, "hardware.main_address", "need the address of node 0"),
    ({"gpus": 2, "nodes": 2, "main_address": "h; rm -rf /"}, "hardware.main_address", "not an IP address"),
    ({"nodes": 1, "node_rank": 1}, "hardware.node_rank", "use 0 to 0"),
])
def test_bad_node_settings_one_clear_problem_each(hw, field, words):
    with pytest.raises(Problems) as e:
        _hw(**hw)
    assert len(e.value.items) == 1
    p = e.value.items[0]
    assert p.field == field and words in p.what, p


def test_launcher_commands_per_node(tmp_path):
    from runner.launch import accelerate_config, build_command, node_commands

    plan = _hw(gpu="H100 SXM", gpus=16, nodes=2, node_rank=1, main_address="10.0.0.1", main_port=29400, zero=3)
    cfg = accelerate_config(plan)
    assert (cfg["num_machines"], cfg["machine_rank"], cfg["num_processes"]) == (2, 1, 16)
    assert (cfg["main_process_ip"], cfg["main_process_port"], cfg["distributed_type"]) == ("10.0.0.1", 29400, "FSDP")
    from advisor.planfile import save_plan

    path = save_plan(plan, tmp_path / "plan.yaml")
    cmd = build_command(path, tmp_path / "run", force=True, python="python")
    assert cmd[:3] == ["python", "-m", "accelerate.commands.launch"]
    flags = dict(zip(cmd[5:15:2], cmd[6:16:2], strict=True))
    assert flags == {"--num_machines": "2", "--machine_rank": "1", "--num_processes": "16",
                     "--main_process_ip": "10.0.0.1", "--main_process_port": "29400"}
    assert cmd[15:17] == ["-m", "runner"] and cmd[-1] == "--worker"

    cpu = build_plan({"hardware": {"gpu": None, "device": "cpu", "gpus": 4, "nodes": 2, "main_address": "h"}})
    path = save_plan(cpu, tmp_path / "cpu.yaml")
    cmd = build_command(path, tmp_path / "run", overrides=["hardware.node_rank=1"], python="python")
    assert cmd[:13] == ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
                        "--nproc_per_node", "2", "--master_addr", "h", "--master_port", "29500"]
    assert node_commands(cpu, "plan.yaml", "runs/r") == [
        ["tuneplan", "run", "plan.yaml", "--run-dir", "runs/r", "hardware.node_rank=0"],
        ["tuneplan", "run", "plan.yaml", "--run-dir", "runs/r", "hardware.node_rank=1"]]
    one = build_plan({"hardware": {"gpus": 1}})
    assert node_commands(one, "p.yaml", "d") == [["tuneplan", "run", "p.yaml", "--run-dir", "d"]]


# --- a real run: two nodes on this machine ---------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from runner.demo import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model"), DEMO_DATA)


def _two_node_plan(tmp_path, model_dir, **run):
    from advisor.planfile import save_plan

    d = {
        "model": {"ref": str(model_dir)},
        "training": {"method": "lora", "precision": "fp32", "micro_batch": 2, "seq_len": 128,
                     "grad_checkpointing": False, "learning_rate": 5e-3, "lora": {"r": 4, "alpha": 8}},
        "hardware": {"gpu": None, "device": "cpu", "gpus": 2, "nodes": 2, "main_address": "127.0.0.1",
                     "main_port": free_port()},
        "data": {"path": str(DEMO_DATA), "val_split": 0.05, "max_examples": 64},
        "run": {"output_dir": str(tmp_path / "runs"), "name": "r", "max_steps": 3, "save_every": 2,
                "eval_every": 100, **run},
    }
    return save_plan(build_plan(d), tmp_path / "plan.yaml")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "TUNEPLAN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def _run_nodes(tmp_path, args_per_node, timeout=300):
    """Start node 1 first and wait until it has passed `tuneplan run`'s checks and started its launcher
    (it then waits for node 0 at the rendezvous), then node 0: both are real `tuneplan run` processes."""
    procs = {}
    logs = {k: open(tmp_path / f"node{k}.log", "w+") for k in (1, 0)}  # noqa: SIM115
    try:
        for k in (1, 0):
            procs[k] = subprocess.Popen([sys.executable, "-m", "runner", *args_per_node[k]], cwd=tmp_path,
                                        env=_env(), stdout=logs[k], stderr=subprocess.STDOUT)
            if k == 1:
                deadline = time.time() + 120
                while "launching:" not in (tmp_path / "node1.log").read_text():
                    assert procs[1].poll() is None and time.time() < deadline, (tmp_path / "node1.log").read_text()
                    time.sleep(0.2)
        codes = {k: p.wait(timeout) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for f in logs.values():
            f.close()
    return codes, {k: (tmp_path / f"node{k}.log").read_text() for k in (0, 1)}


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_nodes_on_localhost_one_run_directory_that_resumes(tmp_path, model_dir):
    plan = _two_node_plan(tmp_path, model_dir)
    run_dir = tmp_path / "runs" / "r"
    codes, logs = _run_nodes(tmp_path, {k: [str(plan), "--run-dir", str(run_dir), f"hardware.node_rank={k}"]
                                        for k in (0, 1)})
    assert codes == {0: 0, 1: 0}, logs
    assert "--nnodes 2 --node_rank 1" in logs[1] and "--nnodes 2 --node_rank 0" in logs[0]
    events = _events(run_dir)
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2  # one event stream: global rank 0 only
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert events[-1]["type"] == "end" and events[-1]["status"] == "completed"
    assert sorted(p.name for p in run_dir.glob("*.yaml")) == ["plan.yaml"]  # CPU: no accelerate config
    from advisor.planfile import load_plan

    saved = load_plan(run_dir / "plan.yaml")
    assert (saved.hardware.nodes, saved.hardware.node_rank) == (2, 0)
    assert (run_dir / "checkpoints" / "step-2" / "ranks" / "rank-1" / "optimizer.pt").exists()
    assert (run_dir / "adapter").is_dir()

    # resume both nodes from step 2 to step 5: the plan in the run directory, node 1 its own rank
    codes, logs = _run_nodes(tmp_path, {0: ["--resume", str(run_dir), "run.max_steps=5"],
                                        1: ["--resume", str(run_dir), "run.max_steps=5", "hardware.node_rank=1"]})
    assert codes == {0: 0, 1: 0}, logs
    events = _events(run_dir)
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith("step-2") and starts[1]["world_size"] == 2
    after = [e["step"] for e in events[events.index(starts[1]):] if e["type"] == "step"]
    assert after == [3, 4, 5] and events[-1]["status"] == "completed"


# --- a killed two-process run resumes with every rank's state ----------------------------------------

def _two_process_plan(tmp_path, model_dir):
    from advisor.planfile import save_plan

    d = {
        "model": {"ref": str(model_dir)},
        "training": {"method": "lora", "precision": "fp32", "micro_batch": 2, "seq_len": 128,
                     "grad_checkpointing": False, "learning_rate": 5e-3,
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},  # dropout: each rank draws from its generator
        "hardware": {"gpu": None, "device": "cpu", "gpus": 2},
        "data": {"path": str(DEMO_DATA), "val_split": 0.0, "max_examples": 64},
        "run": {"output_dir": str(tmp_path / "runs"), "name": "r", "max_steps": 8, "save_every": 2,
                "keep_checkpoints": 10, "eval_every": 100, "warmup_steps": 0},
    }
    return save_plan(build_plan(d), tmp_path / "plan.yaml")


def _losses(run_dir):
    return {e["step"]: e["loss"] for e in _events(run_dir) if e["type"] == "step"}


def _rank_states(ck):
    """Each rank's optimizer state and generators in checkpoint ``ck``: {rank: (optimizer, rng)}."""
    from safetensors.torch import load_file

    from runner.checkpoint import rank_dir, safe_torch_load

    return {k: (safe_torch_load(rank_dir(ck, k) / "optimizer.pt"), load_file(rank_dir(ck, k) / "rng.safetensors"))
            for k in (0, 1)}


def _same(a, b):
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.slow
def test_killed_two_process_run_resumes_every_rank(tmp_path, model_dir):
    from runner.launch import start_run

    plan = _two_process_plan(tmp_path, model_dir)
    whole = tmp_path / "runs" / "whole"
    out = subprocess.run([sys.executable, "-m", "runner", str(plan), "--run-dir", str(whole)], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    killed = tmp_path / "runs" / "killed"
    handle = start_run(plan, killed, env={"TUNEPLAN_TEST_HOOKS": "step_delay=0.4", "OMP_NUM_THREADS": "1"})
    assert handle.command[2] == "torch.distributed.run"
    deadline = time.time() + 180
    from runner.events import read_events

    while time.time() < deadline and max((e["step"] for e in read_events(killed)[0] if e["type"] == "step"),
                                         default=0) < 3:
        assert handle.poll() is None, (killed / "run.log").read_text()[-3000:]
        time.sleep(0.1)
    handle.stop()  # SIGTERM to torchrun, which passes it to both processes
    handle.wait(120)
    end = _events(killed)[-1]
    assert end["type"] == "end" and end["status"] == "interrupted", (killed / "run.log").read_text()[-3000:]
    stopped = end["step"]
    assert 3 <= stopped < 6
    assert (killed / "checkpoints" / f"step-{stopped}" / "ranks" / "rank-1" / "optimizer.pt").is_file()
    assert not list((killed / "checkpoints").glob(".tmp-*"))  # staging folders moved into the checkpoint

    out = subprocess.run([sys.executable, "-m", "runner", "--resume", str(killed)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _events(killed)[-1]["status"] == "completed"
    assert _losses(killed) == _losses(whole) and len(_losses(whole)) == 8  # every step's loss, to the bit
    a, b = _rank_states(whole / "checkpoints" / "step-6"), _rank_states(killed / "checkpoints" / "step-6")
    for rank in (0, 1):
        assert a[rank][0]["state"], "Adam moments are in the checkpoint"
        assert _same(a[rank][0], b[rank][0]), f"rank {rank}: optimizer state differs from the uninterrupted run"
        assert _same(a[rank][1], b[rank][1]), f"rank {rank}: generators differ from the uninterrupted run"


@pytest.mark.slow
def test_a_node_that_does_not_see_the_run_directory_fails_at_the_start(tmp_path, model_dir):
    """Node 1 writing elsewhere (its own disk) could never hold its ranks' checkpoint state: the run
    stops before step 1 with what to do."""
    plan = _two_node_plan(tmp_path, model_dir)
    run_dir = tmp_path / "runs" / "r"
    codes, logs = _run_nodes(tmp_path, {0: [str(plan), "--run-dir", str(run_dir)],
                                        1: [str(plan), "--run-dir", str(tmp_path / "elsewhere"),
                                            "hardware.node_rank=1"]})
    assert codes[0] != 0 and codes[1] != 0
    events = _events(run_dir)
    assert not [e for e in events if e["type"] == "step"]
    assert "1 of 2 processes do not see the run directory" in events[-1]["message"], events[-1]
    assert "do not see the run directory" in logs[0] and "Traceback" not in logs[0].split("launching:")[0]
