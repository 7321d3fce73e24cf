"""Run directories that cannot be turned against the user, and failures that say what they are.

Each test reproduces one finding of a hostile or unlucky user (it failed on the code before the fix)
with the real runner: real files and links, real processes and signals, a real NaN in a real forward.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cpu_plan_file, runner_env

from advisor.cli.main import main
from runner.events import read_events


def _run(args, capsys):
    code = main(["run", *map(str, args), "--no-progress"])
    return code, capsys.readouterr()


def _follow(command, capsys):
    """Run a command the tool printed, as the user would (a `mv ... && tuneplan run ...` runs both)."""
    for part in command.split(" && "):
        words = shlex.split(part)
        if words[0] == "mv":
            os.replace(words[1], words[2])
            continue
        assert words[:2] == ["tuneplan", "run"], command
        code, cap = _run(words[2:], capsys)
    return code, cap


def _stopped(tmp_path, model_dir, data, step=2, **run):
    """A run directory stopped (as by SIGTERM) after ``step``, with its checkpoint."""
    from conftest import run_stopped_after

    from advisor.planfile import load_plan

    plan = load_plan(cpu_plan_file(tmp_path / "plan.yaml", model_dir, data, **run))
    run_dir = tmp_path / "D"
    assert run_stopped_after(plan, run_dir, step) == 130
    return run_dir


# --- 1. nothing is written through a symbolic link ---------------------------------------------------

LINKED = ["run.lock", "events.jsonl", "report.json", "traceback.txt", "plan.yaml", "checkpoints", "adapter",
          "run.log", "attempts"]


@pytest.mark.parametrize("name", LINKED)
def test_a_link_planted_under_a_run_written_name_is_refused_and_its_target_untouched(
        name, tmp_path, tiny_model_dir, eight_examples, capsys):
    """`ln -s /some/file RUN/run.lock; tuneplan run plan.yaml --run-dir RUN` emptied /some/file."""
    victim = tmp_path / "victim"
    if name in ("checkpoints", "adapter", "attempts"):
        victim.mkdir()
        (victim / "keep.txt").write_text("precious")
    else:
        victim.write_text("precious")
    run_dir = tmp_path / "RUN"
    run_dir.mkdir()
    (run_dir / name).symlink_to(victim)
    plan = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples)
    code, cap = _run([plan, "--run-dir", run_dir], capsys)
    assert code == 2 and "symbolic link" in cap.err and name in cap.err and "Traceback" not in cap.err
    if victim.is_dir():
        assert [p.name for p in victim.iterdir()] == ["keep.txt"] and (victim / "keep.txt").read_text() == "precious"
    else:
        assert victim.read_text() == "precious"


@pytest.mark.slow
def test_a_link_inside_checkpoints_is_refused_on_resume(tmp_path, tiny_model_dir, eight_examples, capsys):
    """A checkpoint folder swapped for a link into another directory: the run would read, write and
    delete step-N folders there."""
    run_dir = _stopped(tmp_path, tiny_model_dir, eight_examples)
    elsewhere = tmp_path / "elsewhere"
    os.replace(run_dir / "checkpoints" / "step-2", elsewhere)
    (run_dir / "checkpoints" / "step-2").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    code, cap = _run(["--resume", run_dir], capsys)
    assert code == 2 and "checkpoints/step-2" in cap.err and "symbolic link" in cap.err
    assert sorted(p.name for p in elsewhere.iterdir()) == before


def test_the_lock_is_never_opened_through_a_link(tmp_path):
    from advisor.problems import Problems
    from runner.rundir import RunLock

    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "R").mkdir()
    (tmp_path / "R" / "run.lock").symlink_to(victim)
    with pytest.raises(Problems, match="symbolic link"):
        RunLock.acquire(tmp_path / "R")
    assert victim.read_text() == "precious"


def test_whole_file_writes_replace_a_link_and_appends_refuse_one(tmp_path):
    from advisor.safefile import LinkRefused, open_append, write_atomic

    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "report.json").symlink_to(victim)
    write_atomic(tmp_path / "report.json", "{}")
    assert victim.read_text() == "precious" and not (tmp_path / "report.json").is_symlink()
    (tmp_path / ".report.json.tmp-name").symlink_to(victim)  # a planted temporary name does not matter either
    (tmp_path / "events.jsonl").symlink_to(victim)
    with pytest.raises(LinkRefused):
        open_append(tmp_path / "events.jsonl")
    assert victim.read_text() == "precious"


# --- 2. plan values never reach a script unquoted -----------------------------------------------------

def _hostile_setup(tmp_path, tiny_model_dir):
    """A plan whose paths hold shell syntax (all legal file names) and a model folder named to match."""
    import shutil

    from advisor.planfile import save_plan
    from advisor.spec import build_plan
    from runner.demo import DEMO_DATA

    marker = tmp_path / "PWNED"  # the scripts run in tmp_path: any of these commands would create it
    evil = "$(touch PWNED)`touch PWNED`;touch PWNED'\""
    model = tmp_path / f"model {evil}"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / f"data {evil}.jsonl"
    shutil.copy(DEMO_DATA, data)
    plan = build_plan({"model": {"ref": str(model)}, "training": {"method": "lora"},
                       "hardware": {"gpu": "H100 SXM", "gpus": 2, "device": "cuda"},
                       "data": {"path": str(data)}, "run": {"output_dir": str(tmp_path / f"runs {evil}")}})
    plan_path = save_plan(plan, tmp_path / f"plan {evil}.yaml")
    return plan, plan_path, marker


def _stub_bin(tmp_path):
    """Stand-ins for the cluster's own commands (scontrol, srun) and for tuneplan on the node: each
    records its arguments; srun runs the command it was given, as srun does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.jsonl"
    calls.unlink(missing_ok=True)
    rec = (f"#!{sys.executable}\nimport json, sys\nwith open({str(calls)!r}, 'a') as f:\n"
           "    f.write(json.dumps(sys.argv) + '\\n')\n")
    (bin_dir / "tuneplan").write_text(rec)
    (bin_dir / "scontrol").write_text(rec + "print('node0')\n")
    (bin_dir / "srun").write_text(rec + "import os\nargs = sys.argv[1:]\nwhile args[0].startswith('--'):\n"
                                  "    args = args[1:]\nos.execvp(args[0], args)\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir, calls


def _run_sbatch(text, tmp_path):
    """Run an sbatch script with the stand-ins; the recorded `tuneplan` arguments."""
    # the line that activates this environment holds no plan value; dropped so that the stand-ins run
    activate = (f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}  # the environment "
                "tuneplan cloud ran in")
    assert sys.prefix == sys.base_prefix or activate in text.splitlines()
    script = tmp_path / "job.sbatch"
    script.write_text(text.replace(activate, "# (activation dropped by the test)"))
    bin_dir, calls = _stub_bin(tmp_path)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node0", "SLURM_NODEID": "0",
           "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return [json.loads(line)[1:] for line in calls.read_text().splitlines() if json.loads(line)[0].endswith("tuneplan")]


def _run_sky(text, tmp_path):
    """Run a SkyPilot task's run section as a node's bash would, with the stand-ins; tuneplan's arguments."""
    import yaml

    task = yaml.safe_load(text)
    assert set(task) == {"name", "workdir", "resources", "num_nodes", "file_mounts", "setup", "run"}
    bin_dir, calls = _stub_bin(tmp_path)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SKYPILOT_NODE_RANK": "0",
           "SKYPILOT_NODE_IPS": "10.0.0.1", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NUM_GPUS_PER_NODE": "2"}
    out = subprocess.run(["bash", "-c", task["run"]], env=env, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return [json.loads(line)[1:] for line in calls.read_text().splitlines()]


def test_a_hostile_plan_runs_no_command_from_the_slurm_script(tmp_path, tiny_model_dir):
    from runner.slurm import render_sbatch

    plan, plan_path, marker = _hostile_setup(tmp_path, tiny_model_dir)
    runs = _run_sbatch(render_sbatch(plan, plan_path, out=str(tmp_path / "job $(touch PWNED).sbatch")), tmp_path)
    assert not marker.exists() and len(runs) == 1
    argv = runs[0]
    assert argv[:2] == ["run", str(plan_path.resolve())]  # the hostile names arrive as one argument each
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    assert run_dir.parent == Path(plan.run.output_dir)
    assert "hardware.node_rank=0" in argv and "hardware.main_address=node0" in argv


def test_a_hostile_plan_runs_no_command_from_the_skypilot_task(tmp_path, tiny_model_dir):
    from runner.cloud import render_sky

    plan, plan_path, marker = _hostile_setup(tmp_path, tiny_model_dir)
    argv = _run_sky(render_sky(plan, plan_path, out="task $(touch PWNED).yaml"), tmp_path)[0]
    assert not marker.exists()
    assert argv[0] == "run" and "hardware.main_address=10.0.0.1" in argv


def test_a_line_break_in_a_plan_value_is_refused_and_never_ends_a_comment(tmp_path, tiny_model_dir):
    """The schema refuses control characters in names, references and paths; a value that bypassed it
    (model_copy does not validate) or a plan file name with a line break still ends no comment."""
    from advisor.spec import SpecError, build_plan
    from runner.cloud import render_sky
    from runner.slurm import render_sbatch

    with pytest.raises(SpecError, match="control character"):
        build_plan({"model": {"ref": "org/model\ntouch PWNED"}})
    plan, plan_path, marker = _hostile_setup(tmp_path, tiny_model_dir)
    odd = tmp_path / "odd\ntouch PWNED\n.yaml"
    odd.write_bytes(plan_path.read_bytes())
    bad = plan.model_copy(update={"run": plan.run.model_copy(update={"output_dir": f"{tmp_path}/r\ntouch PWNED"})})
    _run_sbatch(render_sbatch(bad, odd, out="x\ntouch PWNED"), tmp_path)
    _run_sky(render_sky(bad, odd, out="x\ntouch PWNED"), tmp_path)
    assert not marker.exists()


# --- 3. a diverging loss is a clear stop, with advice that works -----------------------------------------

def _nan_at(step):
    from runner.hooks import Hooks

    def poison(r):
        if r.step + 1 == step:
            import torch

            with torch.no_grad():
                next(p for p in r.model.parameters() if p.requires_grad).fill_(float("nan"))

    return Hooks(before_step=poison)


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_clearly_and_the_advice_resumes_it(tmp_path, tiny_model_dir, eight_examples, capsys):
    from advisor.planfile import load_plan
    from runner.commands import run_in_process

    plan = load_plan(cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples, save_every=2,
                                   max_steps=5))
    run_dir = tmp_path / "D"
    assert run_in_process(plan, run_dir, progress=False, hooks=_nan_at(3)) == 1
    err = capsys.readouterr().err
    assert "the loss diverged at step 3 (loss nan" in err and "last good checkpoint is step-2" in err
    assert "Traceback" not in err and "NoneType" not in err and not (run_dir / "traceback.txt").exists()
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["error"]["kind"] == "diverged" and rep["error"]["suggestion"]["changes"] == {
        "training.learning_rate": 5e-05}
    assert not (run_dir / "checkpoints" / "step-3").exists()  # the poisoned weights are never saved
    command = rep["error"]["suggestion"]["command"]
    assert command.startswith(f"tuneplan run --resume {run_dir}") and command in " ".join(err.split())
    code, cap = _follow(command, capsys)
    assert code == 0, cap.err
    events = read_events(run_dir)[0]
    assert events[-1]["status"] == "completed" and events[-1]["report"]["resumed_from"].endswith("step-2")
    assert any("learning_rate=5e-05" in n for n in events[-1]["report"]["notes"])


@pytest.mark.slow
def test_a_resume_with_another_learning_rate_trains_at_it(tmp_path, tiny_model_dir, eight_examples, capsys):
    run_dir = _stopped(tmp_path, tiny_model_dir, eight_examples, max_steps=4)
    code, cap = _run(["--resume", run_dir, "training.learning_rate=0.00005"], capsys)
    assert code == 0, cap.err
    steps = [e for e in read_events(run_dir)[0] if e["type"] == "step"]
    saved = json.loads((run_dir / "checkpoints" / "step-2" / "scheduler.json").read_text())["base_lrs"][0]
    assert saved == pytest.approx(2e-4)
    # cosine after 5 warmup steps: step 3 is still warmup, lr = peak * 3/5 at the new peak
    assert steps[-2]["lr"] == pytest.approx(5e-5 * 3 / 5, rel=1e-6)


@pytest.mark.slow
def test_non_finite_gradients_without_clipping_are_never_saved(tmp_path, tiny_model_dir, eight_examples, capsys):
    """No clipping, so no gradient norm: a NaN gradient leaves NaN weights behind a finite loss. The
    checkpoint at that step would be the 'last good' one; it is refused instead."""
    from advisor.planfile import load_plan
    from runner.commands import run_in_process
    from runner.hooks import Hooks

    def nan_grads(r):
        if r.step + 1 == 2:
            p = next(p for p in r.model.parameters() if p.requires_grad)
            p.register_hook(lambda g: g * float("nan"))

    plan = load_plan(cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples, save_every=2,
                                   max_steps=4, max_grad_norm=None))
    run_dir = tmp_path / "D"
    assert run_in_process(plan, run_dir, progress=False, hooks=Hooks(before_step=nan_grads)) == 1
    err = capsys.readouterr().err
    assert "diverged at step 2 (the weights are no longer finite numbers)" in err
    assert not (run_dir / "checkpoints" / "step-2").exists()
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["error"]["suggestion"]["changes"]["run.max_grad_norm"] == 1.0


@pytest.mark.parametrize("key, value", [
    ("training.lora.alpha", ".inf"), ("run.max_grad_norm", ".inf"), ("run.seed", "-1"), ("run.seed", str(2**32)),
    ("training.learning_rate", ".nan"), ("training.micro_batch", "true")])
def test_numbers_that_fail_mid_run_are_refused_up_front(key, value, tmp_path, tiny_model_dir, eight_examples, capsys):
    plan = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples)
    code, cap = _run([plan, f"{key}={value}", "--dry-run"], capsys)
    assert code == 2 and key in cap.err and "Traceback" not in cap.err


# --- 4. resume checks what it loaded -------------------------------------------------------------------

def _edit_adapter(ck, edit):
    from safetensors.torch import load_file, save_file

    f = ck / "adapter" / "adapter_model.safetensors"
    save_file(edit(load_file(f)), f)


@pytest.mark.parametrize("edit, words", [
    (lambda w: {}, "holds no weights"),
    (lambda w: {k.replace("lora_A", "lora_X"): v for k, v in w.items()}, "missing from it"),
    (lambda w: {k: (v[:2] if "lora_A" in k else v) for k, v in w.items()}, "another shape"),
])
@pytest.mark.slow
def test_a_checkpoint_adapter_that_does_not_match_is_refused(edit, words, tmp_path, tiny_model_dir, eight_examples,
                                                             capsys):
    """set_peft_model_state_dict's result was not checked: an adapter matching nothing loaded nothing
    and the run reported 'resumed from step 2' with a fresh adapter."""
    run_dir = _stopped(tmp_path, tiny_model_dir, eight_examples)
    _edit_adapter(run_dir / "checkpoints" / "step-2", edit)
    code, cap = _run(["--resume", run_dir], capsys)
    assert code == 2 and words in cap.err and "step-2" in cap.err and "Traceback" not in cap.err
    assert "set step-2 aside" in cap.err


@pytest.mark.slow
def test_optimizer_state_of_another_shape_or_none_is_refused(tmp_path, tiny_model_dir, eight_examples, capsys):
    import torch

    run_dir = _stopped(tmp_path, tiny_model_dir, eight_examples)
    opt = run_dir / "checkpoints" / "step-2" / "optimizer.pt"
    good = torch.load(opt, weights_only=True)
    bad = {**good, "state": {k: {**v, "exp_avg": v["exp_avg"][:1]} for k, v in good["state"].items()}}
    torch.save(bad, opt)
    code, cap = _run(["--resume", run_dir], capsys)
    assert code == 2 and "exp_avg of parameter 0" in cap.err
    torch.save({**good, "state": {}}, opt)
    code, cap = _run(["--resume", run_dir], capsys)
    assert code == 2 and "holds no state for any of the" in cap.err


# --- 5. a checkpoint is never deleted before its replacement is in place ---------------------------------

@pytest.mark.slow
def test_sigterm_on_a_checkpoint_step_saves_it_once(tmp_path, tiny_model_dir, eight_examples):
    """The step was saved twice (its save_every checkpoint, then the stop's): the second save deleted
    step-N before renaming its copy into place."""
    run_dir = _stopped(tmp_path, tiny_model_dir, eight_examples, step=2, save_every=2)
    saved = [e["step"] for e in read_events(run_dir)[0] if e["type"] == "checkpoint"]
    assert saved == [2]


@pytest.mark.slow
def test_a_complete_copy_left_by_a_killed_writer_is_promoted(tmp_path, tiny_model_dir, eight_examples, capsys):
    """SIGKILL between renaming the old step-N aside and the new one into place left only the copy;
    the next run deleted it and started from step 0."""
    run_dir = _stopped(tmp_path, tiny_model_dir, eight_examples)
    root = run_dir / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    os.replace(root / "step-2", root / f".tmp-step-2-{dead}")
    code, cap = _run(["--resume", run_dir], capsys)
    assert code == 0, cap.err
    events = read_events(run_dir)[0]
    assert events[-1]["report"]["resumed_from"].endswith("step-2")
    assert any("completed step-2" in n for n in events[-1]["report"]["notes"])


def test_replacing_a_checkpoint_keeps_a_complete_copy_at_every_moment(tmp_path, monkeypatch):
    """A kill between the two renames of a replacement (simulated by stopping at the second rename):
    the old copy is aside, whole, and clean_partial puts the newest complete copy back."""
    from runner import checkpoint as ckm

    root = tmp_path / "checkpoints"
    (root / "step-3").mkdir(parents=True)
    (root / "step-3" / "state.json").write_text('{"step": 3, "position": 3, "v": "old"}')
    new = root / ".tmp-step-3-999999999"
    new.mkdir()
    (new / "state.json").write_text('{"step": 3, "position": 3, "v": "new"}')
    real = os.replace
    calls = []

    def dying_replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise SystemExit("killed")
        real(a, b)

    monkeypatch.setattr(ckm.os, "replace", dying_replace)
    with pytest.raises(SystemExit):
        ckm.replace_dir(new, root / "step-3", aside=root / ".old-step-3-999999998")
    monkeypatch.setattr(ckm.os, "replace", real)
    assert not (root / "step-3").exists() and (root / ".old-step-3-999999998" / "state.json").is_file()
    removed, promoted = ckm.clean_partial(tmp_path)
    assert [p.name for p in promoted] == ["step-3"] and [p.name for p in removed] == [".old-step-3-999999998"]
    assert json.loads((root / "step-3" / "state.json").read_text())["v"] == "new"


# --- 6. signals reach every process -------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_to_a_two_process_run_checkpoints_every_rank(tmp_path, tiny_model_dir):
    import psutil

    from runner.demo import DEMO_DATA

    plan = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, DEMO_DATA, hardware={"gpus": 2}, max_steps=40)
    run_dir = tmp_path / "runs" / "r"
    proc = subprocess.Popen([sys.executable, "-m", "runner", str(plan)], cwd=tmp_path,
                            env=runner_env("step_delay=0.3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while not [e for e in read_events(run_dir)[0] if e["type"] == "step"]:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    everyone = psutil.Process(proc.pid).children(recursive=True)
    assert len(everyone) >= 3  # the launcher and its two workers
    proc.send_signal(signal.SIGTERM)  # to `tuneplan run` alone, as Slurm or a container runtime would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    end = read_events(run_dir)[0][-1]
    assert end["type"] == "end" and end["status"] == "interrupted"
    stopped = end["step"]
    assert (run_dir / "checkpoints" / f"step-{stopped}" / "ranks" / "rank-1" / "optimizer.pt").is_file()
    assert "ChildFailedError" not in err and "Traceback" not in err
    time.sleep(0.5)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_as_pid_1_in_a_container_sigterm_still_stops_a_two_process_run(tmp_path, tiny_model_dir):
    """PID 1 gets no signal it has no handler for (the kernel drops it): `tuneplan run` as a container's
    first process ignored `docker stop`'s SIGTERM while its workers trained on. A real PID namespace."""
    import psutil

    from runner.demo import DEMO_DATA

    ns = ["unshare", "--pid", "--fork", "--mount-proc"]
    if subprocess.run([*ns, "true"], capture_output=True).returncode:
        pytest.skip("cannot make a PID namespace here (unshare needs root)")
    plan = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, DEMO_DATA, hardware={"gpus": 2}, max_steps=40)
    run_dir = tmp_path / "runs" / "r"
    proc = subprocess.Popen([*ns, sys.executable, "-m", "runner", str(plan)], cwd=tmp_path,
                            env=runner_env("step_delay=0.3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while not [e for e in read_events(run_dir)[0] if e["type"] == "step"]:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    first = psutil.Process(proc.pid).children()[0]  # `python -m runner`, PID 1 in its namespace
    first.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    end = read_events(run_dir)[0][-1]
    assert end["type"] == "end" and end["status"] == "interrupted"
    assert (run_dir / "checkpoints" / f"step-{end['step']}" / "state.json").is_file()


@pytest.mark.slow
def test_a_repeated_sigterm_does_not_abort_the_checkpoint(tmp_path, tiny_model_dir, eight_examples):
    """Schedulers and launchers send SIGTERM to every process, and tuneplan forwards it too: a second
    SIGTERM must not turn the orderly stop into an immediate one (only a second Ctrl-C does)."""
    from advisor.planfile import load_plan
    from runner.hooks import Hooks
    from runner.recipe import Recipe

    def twice(r):
        if r.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    plan = load_plan(cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples))
    r = Recipe(plan, tmp_path / "D", log=lambda m: None, hooks=Hooks(after_step=twice))
    assert r.run() == 130
    assert (tmp_path / "D" / "checkpoints" / "step-1" / "state.json").is_file()


# --- 7. custom code only with --trust-remote-code on the command ----------------------------------------

@pytest.mark.slow
def test_a_plans_trust_remote_code_alone_is_refused(tmp_path, tiny_model_dir, eight_examples, capsys):
    from advisor.planfile import load_plan, save_plan

    plan_path = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples)
    plan = load_plan(plan_path)
    save_plan(plan.model_copy(update={"model": plan.model.model_copy(update={"trust_remote_code": True})}), plan_path)
    code, cap = _run([plan_path, "--run-dir", tmp_path / "D"], capsys)
    assert code == 2 and "--trust-remote-code" in cap.err and not (tmp_path / "D").exists()
    code, cap = _run([cpu_plan_file(tmp_path / "p2.yaml", tiny_model_dir, eight_examples),
                      "model.trust_remote_code=true", "--run-dir", tmp_path / "D"], capsys)
    assert code == 2 and "--trust-remote-code" in cap.err
    code, cap = _run([plan_path, "--run-dir", tmp_path / "D", "--trust-remote-code"], capsys)
    assert code == 0, cap.err
    assert "notice: --trust-remote-code" in cap.err
    # the run directory's plan now allows custom code: resuming it needs the consent again
    code, cap = _run(["--resume", tmp_path / "D", "run.max_steps=6"], capsys)
    assert code == 2 and "--trust-remote-code" in cap.err


# --- 8. errors that say what they are -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_damaged_optimizer_file_is_named_and_the_advice_resumes_from_the_checkpoint_before(
        tmp_path, tiny_model_dir, eight_examples, capsys):
    """A corrupt optimizer.pt gave 'the run failed: 101' and advice to repeat the failing resume."""
    from conftest import run_stopped_after

    from advisor.planfile import load_plan

    plan_path = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples, save_every=2, max_steps=6,
                              keep_checkpoints=3)
    run_dir = tmp_path / "D"
    assert run_stopped_after(load_plan(plan_path), run_dir, 4) == 130
    opt = run_dir / "checkpoints" / "step-4" / "optimizer.pt"
    raw = bytearray(opt.read_bytes())
    for i in range(60, len(raw), 97):
        raw[i] ^= 0x5A
    opt.write_bytes(bytes(raw))
    code, cap = _run(["--resume", run_dir], capsys)
    assert code == 2 and "optimizer.pt is damaged" in cap.err and "Traceback" not in cap.err
    rep = json.loads((run_dir / "report.json").read_text())
    nxt = rep["error"]["next"]
    assert "set step-4 aside, then resume from step-2" == nxt["what"]
    code, cap = _follow(nxt["command"], capsys)
    assert code == 0, cap.err
    assert read_events(run_dir)[0][-1]["report"]["resumed_from"].endswith("step-2")


@pytest.mark.slow
def test_a_non_numeric_loss_in_state_json_is_a_damaged_checkpoint(tmp_path, tiny_model_dir, eight_examples, capsys):
    run_dir = _stopped(tmp_path, tiny_model_dir, eight_examples)
    state = run_dir / "checkpoints" / "step-2" / "state.json"
    st = json.loads(state.read_text())
    state.write_text(json.dumps({**st, "first_loss": "high"}))
    code, cap = _run(["--resume", run_dir], capsys)
    assert code == 2 and "state.json holds values of the wrong type (first_loss)" in cap.err
    assert "Traceback" not in cap.err


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (a real file system that fills up); skipped where mounting is not allowed."""
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(d):
    """Write until the file system is full (ENOSPC); the filler's path."""
    filler = d / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_full_disk_is_named_whoever_writes(writer, small_disk):
    """torch.save and safetensors lose or hide the errno of a full disk: their real errors on a full file
    system, as the checkpoint writers raise them, classified."""
    import torch

    from runner.exits import classify

    _fill(small_disk)
    try:
        if writer == "torch.save":
            from runner.checkpoint import save_torch

            save_torch({"x": torch.zeros(1 << 20)}, small_disk / "x.pt")
        else:
            from safetensors.torch import save_file

            save_file({"x": torch.zeros(1 << 20)}, small_disk / "x.safetensors")
    except Exception as e:  # noqa: BLE001 - whatever the writer raises
        kind, message = classify(e)
    else:
        pytest.fail("writing to a full disk succeeded")
    assert kind == "disk" and message.startswith("no space left on the device"), message


@pytest.mark.slow
def test_a_run_on_a_disk_that_fills_up_is_one_message_and_resumes(small_disk, tmp_path, tiny_model_dir, eight_examples,
                                                                   capsys):
    """The disk fills after step 1; the checkpoint of step 2 fails inside torch.save or safetensors with a
    real ENOSPC. One message, no empty traceback; with room again the advised command resumes."""
    from advisor.planfile import load_plan
    from runner.commands import run_in_process
    from runner.hooks import Hooks

    state = {}

    def fill(r):
        if r.step == 1:
            state["filler"] = _fill(small_disk)

    plan = load_plan(cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples, save_every=2,
                                   max_steps=4))
    run_dir = small_disk / "D"
    assert run_in_process(plan, run_dir, progress=False, hooks=Hooks(after_step=fill)) == 1
    err = capsys.readouterr().err
    assert "the disk is full: no space left on the device" in err and "Traceback" not in err, err
    assert not (run_dir / "traceback.txt").exists()
    state["filler"].unlink()  # report.json could not be written either: the console said what to do
    command = "tuneplan run" + " ".join(err.split()).split("tuneplan run", 1)[1]
    code, cap = _follow(command, capsys)
    assert code == 0, cap.err


def _retokenized(tmp_path, tiny_model_dir, edit):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    edit(d)
    return d


def test_a_tokenizer_with_neither_pad_nor_eos_is_one_message(tmp_path, tiny_model_dir, eight_examples, capsys):
    def no_special(d):
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            f = d / name
            if f.exists():
                cfg = json.loads(f.read_text())
                for k in ("eos_token", "pad_token", "bos_token"):
                    cfg.pop(k, None)
                f.write_text(json.dumps(cfg))

    model = _retokenized(tmp_path, tiny_model_dir, no_special)
    code, cap = _run([cpu_plan_file(tmp_path / "plan.yaml", model, eight_examples), "--run-dir", tmp_path / "D"],
                     capsys)
    assert code == 2 and "neither a padding nor an end-of-sequence token" in cap.err and "Traceback" not in cap.err


def test_a_tokenizer_larger_than_the_embedding_is_one_message(tmp_path, tiny_model_dir, eight_examples, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    def shrink(d):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        m.resize_token_embeddings(100)
        m.save_pretrained(d)

    model = _retokenized(tmp_path, tiny_model_dir, shrink)
    code, cap = _run([cpu_plan_file(tmp_path / "plan.yaml", model, eight_examples), "--run-dir", tmp_path / "D"],
                     capsys)
    assert code == 2 and "the model's embedding has 100 rows" in cap.err and "Traceback" not in cap.err


@pytest.mark.slow
def test_a_data_error_in_a_two_process_run_is_one_message(tmp_path, tiny_model_dir):
    one = tmp_path / "one.jsonl"
    from runner.demo import DEMO_DATA

    one.write_text(DEMO_DATA.read_text().splitlines(keepends=True)[0])
    plan = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, one, hardware={"gpus": 2})
    out = subprocess.run([sys.executable, "-m", "runner", str(plan)], cwd=tmp_path, env=runner_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("cannot feed 2 processes") == 1
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr


def test_a_half_written_event_line_does_not_swallow_the_next_start(tmp_path):
    from runner.events import EventWriter

    (tmp_path / "events.jsonl").write_text('{"type": "start"}\n{"type": "step", "lo')  # killed mid-line
    with EventWriter(tmp_path) as w:
        w.emit("start", step=3)
    events = read_events(tmp_path)[0]
    assert [e.get("step") for e in events if e["type"] == "start"] == [None, 3]


@pytest.mark.slow
def test_a_restart_killed_midway_leaves_a_directory_that_starts_again(tmp_path, tiny_model_dir, eight_examples,
                                                                       capsys):
    from advisor.planfile import load_plan
    from runner.commands import run_in_process
    from runner.hooks import Hooks

    plan_path = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples)
    run_dir = tmp_path / "D"
    assert run_in_process(load_plan(plan_path), run_dir, progress=False, hooks=Hooks.from_spec("oom_at_step=1")) == 1
    capsys.readouterr()
    (run_dir / "attempts" / "1").mkdir(parents=True)  # SIGKILL after the first move of a restart
    os.replace(run_dir / "events.jsonl", run_dir / "attempts" / "1" / "events.jsonl")
    code, cap = _run([plan_path, "--run-dir", run_dir], capsys)
    assert code == 0, cap.err


def test_watch_survives_badly_typed_events():
    from advisor.tui.runs import RunState

    run = RunState("D")
    run.apply([{"type": "start", "predicted": "x", "total_steps": "ten"},
               {"type": "step", "step": "3", "loss": "abc", "memory": [1], "tokens_per_s": {}},
               {"type": "eval", "val_loss": None}, {"type": "error", "suggestion": "rm -rf"}, 7,
               {"type": "step", "step": 2, "loss": 1.5, "memory": {"rss": "big"}}])
    assert run.step == 2 and run.losses == [1.5] and run.series("rss") == [] and run.error == {"type": "error"}


# --- 9. values that should be refused ------------------------------------------------------------------------

def test_more_cpu_processes_than_cores_are_refused(tmp_path, tiny_model_dir, eight_examples, capsys):
    plan = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples)
    code, cap = _run([plan, "hardware.gpus=4096", "--run-dir", tmp_path / "D"], capsys)
    assert code == 2 and f"which has {os.cpu_count()} cores" in cap.err and not (tmp_path / "D").exists()


def test_a_dry_run_needs_no_gpu_here(tmp_path, tiny_model_dir, eight_examples, capsys):
    plan = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, eight_examples, hardware={"device": "cuda",
                                                                                            "gpu": "H100 SXM",
                                                                                            "gpus": 2})
    code, cap = _run([plan, "--dry-run"], capsys)
    assert code == 0, cap.err
    assert "accelerate.commands.launch" in cap.out and "distributed_type: MULTI_GPU" in cap.out


def test_cli_values_that_should_be_refused(tmp_path, capsys):
    from advisor.cli.main import main as cli

    for argv, words in [
        (["recommend", "--model", "gpt2", "--save", ""], "--save"),
        (["recommend", "--model", "gpt2", "--save", str(tmp_path / ("x" * 300))], "File name too long"),
        (["estimate", "--model", "gpt2", "--transformers", "4.99"], "4.57 was the last"),
        (["estimate", "--model", "y" * 300], "File name too long"),
    ]:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)


def test_cloud_refuses_a_bad_time_and_an_unwritable_output(tmp_path, tiny_model_dir, capsys):
    from advisor.cli.main import main as cli

    plan, plan_path, _ = _hostile_setup(tmp_path, tiny_model_dir)
    assert cli(["cloud", str(plan_path), "--target", "slurm", "--time", "-1"]) == 2
    assert "is not a Slurm time" in capsys.readouterr().err
    assert cli(["cloud", str(plan_path), "-o", str(tmp_path / "no" / "such" / "dir.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err


def test_cloud_output_to_a_full_disk_is_one_message(small_disk, tmp_path, tiny_model_dir, capsys):
    from advisor.cli.main import main as cli

    plan, plan_path, _ = _hostile_setup(tmp_path, tiny_model_dir)
    _fill(small_disk)
    assert cli(["cloud", str(plan_path), "-o", str(small_disk / "task.yaml")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err


# --- 10. fsync -----------------------------------------------------------------------------------------------

def test_checkpoint_files_and_renames_are_flushed(tmp_path, monkeypatch):
    """write_checkpoint fsyncs every file of the new folder and the checkpoints directory after the rename."""
    import torch

    from runner import checkpoint as ckm

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    model = torch.nn.Linear(2, 2)

    class Saver(torch.nn.Module):
        def save_pretrained(self, d, state_dict=None):
            Path(d).mkdir()
            from safetensors.torch import save_file

            save_file(model.state_dict(), Path(d) / "model.safetensors")

    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    final = ckm.write_checkpoint(tmp_path, 1, model=Saver(), optimizer=opt, scheduler=sched,
                                 state={"position": 1}, keep=2, weights_name="model")
    names = {Path(p).name for p in synced}
    assert {"optimizer.pt", "state.json", "model.safetensors", "checkpoints"} <= names
    assert str(final.parent) in synced  # the rename itself
