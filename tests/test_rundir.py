"""The run directory as a user meets it: never clobbered (the model it trains from, a plan that is
not the run's), never written by two processes (real processes, real signals), and always either
resumable or restartable, with advice that works when followed."""

import json
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_stopped_after

from advisor.cli.main import main
from runner.demo import DEMO_DATA
from runner.events import read_events


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from runner.demo import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model") / "m", DEMO_DATA)


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "eight.jsonl"
    f.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:8]))
    return f


def plan_file(path, model_dir, data, **run):
    from advisor.planfile import save_plan
    from advisor.spec import build_plan

    plan = build_plan({
        "model": {"ref": str(model_dir)},
        "training": {"method": "lora", "precision": "fp32", "micro_batch": 4, "seq_len": 64,
                     "grad_checkpointing": False, "lora": {"r": 4, "alpha": 8}},
        "hardware": {"gpu": None, "device": "cpu"},
        "data": {"path": str(data), "val_split": 0.0},
        "run": {"output_dir": str(path.parent / "runs"), "name": "r", "max_steps": 4, "save_every": 100,
                "eval_every": 100, **run},
    })
    return save_plan(plan, path)


def _env(hooks=""):
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEPLAN_NO_PROGRESS": "1"}
    if hooks:
        env["TUNEPLAN_TEST_HOOKS"] = hooks
    return env


def _start(args, cwd, hooks=""):
    return subprocess.Popen([sys.executable, "-m", "runner", *map(str, args)], cwd=cwd, env=_env(hooks),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_start(run_dir, proc, timeout=120):
    """Until the run's start event is written (the model is being loaded)."""
    deadline = time.time() + timeout
    while not [e for e in read_events(run_dir)[0] if e["type"] == "start"]:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)


def _wait_for_step(run_dir, proc, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [e for e in read_events(run_dir)[0] if e["type"] == "step"]
        if len(steps) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("no step events")


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- never clobbered -------------------------------------------------------------------------------

def test_run_dir_holding_the_model_and_a_foreign_plan_is_refused(tmp_path, model_dir, data8, capsys):
    """The issue's reproduction: `demo --out clob; run clob/plan.yaml training.method=full --run-dir clob`."""
    import shutil

    clob = tmp_path / "clob"
    shutil.copytree(model_dir, clob / "model")
    plan = plan_file(clob / "plan.yaml", clob / "model", data8)
    before = _snapshot(clob)
    assert main(["run", str(plan), "training.method=full", "run.max_steps=5", "--run-dir", str(clob)]) == 2
    err = capsys.readouterr().err
    assert "contains the model directory" in err and "holds plan.yaml, model" in err and "Traceback" not in err
    assert _snapshot(clob) == before  # nothing overwritten, nothing added


def test_run_dir_inside_the_model_or_a_file_is_refused(tmp_path, model_dir, data8, capsys):
    plan = plan_file(tmp_path / "plan.yaml", model_dir, data8)
    assert main(["run", str(plan), "--run-dir", str(model_dir / "runs" / "x")]) == 2
    assert "is inside the model directory" in capsys.readouterr().err
    assert not (model_dir / "runs").exists()
    (tmp_path / "afile").write_text("x")
    assert main(["run", str(plan), "--run-dir", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "afile")]) == 2
    assert "it is a file" in capsys.readouterr().err
    assert main(["run", str(plan), "--run-dir", str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot write the run directory" in capsys.readouterr().err


def test_damaged_weights_are_a_model_error(tmp_path, model_dir, data8, capsys):
    import shutil

    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    plan = plan_file(tmp_path / "plan.yaml", bad, data8)
    assert main(["run", str(plan), "--run-dir", str(tmp_path / "D"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot load {bad}" in err and "Traceback" not in err
    assert not (tmp_path / "D" / "traceback.txt").exists()


# --- one writer ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_runs_started_at_once_one_is_refused(tmp_path, model_dir, data8):
    plan = plan_file(tmp_path / "plan.yaml", model_dir, data8, max_steps=6)
    run_dir = tmp_path / "D"
    a = _start([plan, "--run-dir", run_dir], tmp_path, hooks="step_delay=0.4")
    b = _start([plan, "--run-dir", run_dir], tmp_path, hooks="step_delay=0.4")
    outs = [p.communicate(timeout=300) for p in (a, b)]
    codes = sorted(p.returncode for p in (a, b))
    assert codes == [0, 2], outs
    loser = outs[[a.returncode, b.returncode].index(2)][1]
    # the loser may read the lock before its owner has written its PID in it: "in use by another process"
    assert ("is in use by" in loser or "holds a finished run" in loser) and "Traceback" not in loser
    events = read_events(run_dir)[0]
    assert [e["type"] for e in events].count("start") == 1
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_resume_while_training_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, model_dir, data8):
    plan = plan_file(tmp_path / "plan.yaml", model_dir, data8, max_steps=8, save_every=2)
    run_dir = tmp_path / "D"
    a = _start([plan, "--run-dir", run_dir], tmp_path, hooks="step_delay=0.5")
    _wait_for_step(run_dir, a, 3)
    for args in (["--resume", run_dir], [plan, "--run-dir", run_dir]):
        out = subprocess.run([sys.executable, "-m", "runner", *map(str, args)], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and f"is in use by process {a.pid}" in out.stderr, out.stderr
    a.send_signal(signal.SIGKILL)  # no handler runs: the lock file stays, the kernel drops the lock
    a.wait(30)
    assert (run_dir / "run.lock").read_text()  # still names the dead owner
    out = subprocess.run([sys.executable, "-m", "runner", "--resume", str(run_dir)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    events = read_events(run_dir)[0]
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"]
    assert events[-1]["type"] == "end" and events[-1]["status"] == "completed" and events[-1]["step"] == 8
    assert (run_dir / "run.lock").read_text() == ""  # released: no owner


# --- one life cycle --------------------------------------------------------------------------------

def _follow(command, capsys):
    """Run the command the tool printed (`tuneplan run ...`), as the user would."""
    words = shlex.split(command)
    assert words[:2] == ["tuneplan", "run"], command
    code = main(["run", *words[2:], "--no-progress"])
    return code, capsys.readouterr()


@pytest.mark.slow
def test_failed_before_the_first_checkpoint_restarts_as_advised(tmp_path, model_dir, data8, capsys):
    from runner.commands import run_in_process
    from runner.recipe import Hooks

    plan_path = plan_file(tmp_path / "plan.yaml", model_dir, data8)
    from advisor.planfile import load_plan

    run_dir = tmp_path / "D"
    code = run_in_process(load_plan(plan_path), run_dir, progress=False, hooks=Hooks.from_spec("oom_at_step=1"))
    assert code == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "resume" not in err.split("would fit")[0]
    # re-running into the same directory starts it again cleanly
    assert main(["run", str(plan_path), "--run-dir", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    events = read_events(run_dir)[0]
    assert [e["type"] for e in events].count("start") == 1 and events[-1]["status"] == "completed"
    assert (run_dir / "attempts" / "1" / "events.jsonl").exists()  # the failed attempt, kept aside
    # a finished run is not resumed again, and is not overwritten by a new one
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "finished run" in capsys.readouterr().err
    assert main(["run", str(plan_path), "--run-dir", str(run_dir)]) == 2
    assert "finished run" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, model_dir, data8, capsys):
    from runner.recipe import Recipe

    plan_path = plan_file(tmp_path / "plan.yaml", model_dir, data8)
    from advisor.planfile import load_plan

    run_dir = tmp_path / "D"
    r = Recipe(load_plan(plan_path), run_dir, log=lambda m: None)
    r.stop_requested = "SIGINT"  # Ctrl-C while loading: the loop stops before its first step
    assert r.run() == 130
    rep = r.final_report
    assert rep["status"] == "interrupted" and rep["steps"] == 0
    assert "--resume" not in rep["next"]["command"] and "nothing to resume" in rep["next"]["what"]
    from runner.console import print_report

    print_report(rep)
    out = capsys.readouterr().out
    assert "resume with" not in out and "start it again" in out
    code, cap = _follow(rep["next"]["command"], capsys)
    assert code == 0, cap.err
    # and --resume of such a directory restarts from step 0 too
    run2 = tmp_path / "D2"
    r = Recipe(load_plan(plan_path), run2, log=lambda m: None)
    r.stop_requested = "SIGINT"
    assert r.run() == 130
    assert main(["run", "--resume", str(run2), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "starting from step 0" in cap.err
    assert [e["step"] for e in read_events(run2)[0] if e["type"] == "step"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_second_ctrl_c_is_an_interruption_not_an_empty_failure(tmp_path, model_dir, data8, capsys):
    from advisor.planfile import load_plan
    from runner.commands import run_in_process
    from runner.recipe import Hooks

    def second_ctrl_c(r):
        if r.step == 2:
            raise KeyboardInterrupt  # what the signal handler raises on the second SIGINT

    plan = load_plan(plan_file(tmp_path / "plan.yaml", model_dir, data8, save_every=1))
    run_dir = tmp_path / "D"
    assert run_in_process(plan, run_dir, progress=False, hooks=Hooks(after_step=second_ctrl_c)) == 130
    cap = capsys.readouterr()
    assert "the run failed" not in cap.err and not (run_dir / "traceback.txt").exists()
    assert "resume from step-2: tuneplan run --resume" in " ".join(cap.out.split())
    events = read_events(run_dir)[0]
    assert events[-1]["type"] == "end" and events[-1]["status"] == "interrupted"


@pytest.mark.slow
def test_after_an_oom_the_advice_resumes_from_the_checkpoint(tmp_path, model_dir, data8, capsys):
    from advisor.planfile import load_plan
    from runner.commands import run_in_process
    from runner.recipe import Hooks

    # a CPU run names no GPU (a GPU with device cpu is a problem of the plan): the next plan is sized below
    # what the failed one needed
    plan = load_plan(plan_file(tmp_path / "plan.yaml", model_dir, data8, save_every=2, max_steps=5))
    run_dir = tmp_path / "D"
    assert run_in_process(plan, run_dir, progress=False, hooks=Hooks.from_spec("oom_at_step=3")) == 1
    err = json.loads((run_dir / "report.json").read_text())["error"]
    s = err["suggestion"]
    assert err["kind"] == "oom" and s["command"], err
    capsys.readouterr()
    if s.get("resumes"):  # the changes keep the checkpoint loadable: resume it
        assert s["command"].startswith(f"tuneplan run --resume {run_dir}")
        code, cap = _follow(s["command"], capsys)
        assert code == 0, cap.err
        events = read_events(run_dir)[0]
        assert events[-1]["status"] == "completed" and events[-1]["report"]["resumed_from"].endswith("step-2")
    else:  # a new run with another optimizer or method: into a new directory
        assert "--run-dir" in s["command"] and "--resume" not in s["command"]


@pytest.mark.slow
def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path, model_dir, data8, capsys):
    from advisor.planfile import load_plan

    plan = load_plan(plan_file(tmp_path / "plan.yaml", model_dir, data8, save_every=2, max_steps=4))
    assert run_stopped_after(plan, tmp_path / "D", 3) == 130
    assert main(["run", "--resume", str(tmp_path / "D"), "run.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "at step 3" in err and "run.max_steps above 3" in err
    assert main(["run", "--resume", str(tmp_path / "D"), "training.method=full"]) == 2
    assert "resuming cannot change it" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "plan.yaml"), "--run-dir", str(tmp_path / "D")]) == 2
    assert "stopped at step 3" in capsys.readouterr().err


def test_a_second_ctrl_c_while_loading_ends_cleanly(tmp_path, model_dir, data8, monkeypatch):
    """KeyboardInterrupt before the events file is open (the very start of setup)."""
    from advisor.planfile import load_plan
    from runner.recipe import Recipe

    r = Recipe(load_plan(plan_file(tmp_path / "plan.yaml", model_dir, data8)), tmp_path / "D", log=lambda m: None)

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(r, "setup", interrupted)
    assert r.run() == 130
    assert r.final_report["status"] == "interrupted" and not (tmp_path / "D" / "traceback.txt").exists()
    assert read_events(tmp_path / "D")[0][-1]["type"] == "end"


@pytest.mark.slow
def test_ctrl_c_while_loading_a_real_process_then_the_advice_works(tmp_path, model_dir, data8):
    """SIGINT while the model loads (a real process; loading held for 4 s by a hook): exit 130, no
    checkpoint, no "resume with"; the printed command starts it again and completes."""
    plan = plan_file(tmp_path / "plan.yaml", model_dir, data8)
    run_dir = tmp_path / "D"
    a = _start([plan, "--run-dir", run_dir], tmp_path, hooks="load_delay=4")
    _wait_for_start(run_dir, a)
    a.send_signal(signal.SIGINT)
    out, err = a.communicate(timeout=120)
    assert a.returncode == 130, err
    assert "resume with" not in out + err and "--resume" not in out + err and "Traceback" not in out + err
    assert "start it again from step 0" in " ".join(out.split())
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("step-*"))
    command = json.loads((run_dir / "report.json").read_text())["next"]["command"]
    words = shlex.split(command)
    done = subprocess.run([sys.executable, "-m", "runner", *words[2:]], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_events(run_dir)[0][-1]["status"] == "completed"


@pytest.mark.slow
def test_a_failed_download_leaves_a_directory_that_restarts(tmp_path, model_dir, data8, capsys):
    """The hub cannot be reached (offline): one message; then the same directory with a local model runs."""
    plan = plan_file(tmp_path / "plan.yaml", model_dir, data8)
    run_dir = tmp_path / "D"
    assert main(["run", str(plan), "model.ref=nobody-here/no-such-model", "--run-dir", str(run_dir),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot download nobody-here/no-such-model" in err and "Traceback" not in err
    assert main(["run", str(plan), "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert read_events(run_dir)[0][-1]["status"] == "completed"


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_resume_starts_from_step_0(tmp_path, model_dir, data8):
    plan = plan_file(tmp_path / "plan.yaml", model_dir, data8)
    run_dir = tmp_path / "D"
    a = _start([plan, "--run-dir", run_dir], tmp_path, hooks="load_delay=30")
    _wait_for_start(run_dir, a)
    a.kill()
    a.wait(30)
    out = subprocess.run([sys.executable, "-m", "runner", "--resume", str(run_dir)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "starting from step 0" in out.stderr
    events = read_events(run_dir)[0]
    assert [e["type"] for e in events].count("start") == 1 and events[-1]["status"] == "completed"
    assert (run_dir / "attempts" / "1" / "events.jsonl").is_file()


@pytest.mark.slow
def test_a_finished_run_trains_further_as_advised(tmp_path, model_dir, data8, capsys):
    plan = plan_file(tmp_path / "plan.yaml", model_dir, data8, save_every=2, max_steps=4)
    run_dir = tmp_path / "D"
    assert main(["run", str(plan), "--run-dir", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["run", str(plan), "--run-dir", str(run_dir)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"tuneplan run --resume {run_dir} run.max_steps=N" in err
    assert main(["run", "--resume", str(run_dir), "run.max_steps=6", "--no-progress"]) == 0
    events = read_events(run_dir)[0]
    assert events[-1]["status"] == "completed" and events[-1]["step"] == 6
    assert events[-1]["report"]["resumed_from"].endswith("step-2")  # the newest checkpoint (none at the end)


@pytest.mark.slow
def test_a_full_disk_is_one_message_and_the_run_resumes(tmp_path, model_dir, data8, capsys):
    import errno

    from advisor.planfile import load_plan
    from runner.commands import run_in_process
    from runner.hooks import Hooks

    def disk_full(r):
        if r.step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(r.run_dir / "checkpoints"))

    plan = load_plan(plan_file(tmp_path / "plan.yaml", model_dir, data8, save_every=2, max_steps=4))
    run_dir = tmp_path / "D"
    assert run_in_process(plan, run_dir, progress=False, hooks=Hooks(after_step=disk_full)) == 1
    err = capsys.readouterr().err
    assert "the disk is full: no space left on the device writing" in err and "Traceback" not in err
    assert f"resume from step-2: tuneplan run --resume {run_dir}" in " ".join(err.split())
    assert not (run_dir / "traceback.txt").exists()
    code, cap = _follow(f"tuneplan run --resume {run_dir}", capsys)
    assert code == 0, cap.err


@pytest.mark.slow
def test_resuming_with_another_model_is_refused_when_it_loads(tmp_path, model_dir, data8, capsys):
    """A moved model (same weights, new path) resumes; a different architecture is refused clearly."""
    import shutil

    from advisor.planfile import load_plan
    from runner.demo import build_model_dir

    plan = load_plan(plan_file(tmp_path / "plan.yaml", model_dir, data8, save_every=2, max_steps=4))
    assert run_stopped_after(plan, tmp_path / "D", 2) == 130
    shutil.copytree(tmp_path / "D", tmp_path / "E")
    other = build_model_dir(tmp_path / "wide", DEMO_DATA, hidden_size=64, intermediate_size=128)
    assert main(["run", "--resume", str(tmp_path / "D"), f"model.ref={other}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not match this model and plan" in err and "Traceback" not in err
    assert load_plan(tmp_path / "D" / "plan.yaml").model.ref == str(model_dir)  # a failed resume changes nothing
    moved = shutil.copytree(model_dir, tmp_path / "moved")
    assert main(["run", "--resume", str(tmp_path / "E"), f"model.ref={moved}", "--no-progress"]) == 0
