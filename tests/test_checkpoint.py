"""Checkpoints cannot run code: a pickle planted in any checkpoint file is refused with a clear
message and never executed; every optimizer tuneplan offers loads through the weights-only loader;
half-written checkpoint folders of dead writers are removed; no torch.load(weights_only=False)
is left anywhere in the repository."""

import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_stopped_after

from runner.demo import DEMO_DATA


class Planted:
    """Unpickling this calls open(marker, "w"): code execution, visible as a file (no shell)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return builtins.open, (self.marker, "w")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A LoRA run stopped after step 2 (a checkpoint at step-2) and its plan."""
    from advisor.spec import build_plan
    from runner.demo import build_model_dir

    root = tmp_path_factory.mktemp("ck")
    model = build_model_dir(root / "model", DEMO_DATA)
    data = root / "eight.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:8]))
    plan = build_plan({
        "model": {"ref": str(model)},
        "training": {"method": "lora", "precision": "fp32", "micro_batch": 4, "seq_len": 64,
                     "grad_checkpointing": False, "lora": {"r": 4, "alpha": 8}},
        "hardware": {"gpu": None, "device": "cpu"},
        "data": {"path": str(data), "val_split": 0.0},
        "run": {"output_dir": str(root), "name": "r", "max_steps": 4, "save_every": 100, "eval_every": 100},
    })
    assert run_stopped_after(plan, root / "r", 2) == 130
    return root / "r", plan


def plant(path, marker):
    """Write a malicious pickle to ``path`` in torch.save's format (what torch.load would unpickle)."""
    import torch

    torch.save(Planted(marker), path)


def test_the_planted_pickle_is_live(tmp_path):
    """The control: the payload really runs when its pickle is unpickled (plain pickle, in a child
    process), so the refusals below mean something."""
    marker = tmp_path / "PWNED"
    plant(tmp_path / "evil.pt", marker)
    code = ("import pickle, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); "
            "pickle.loads(z.read(next(n for n in z.namelist() if n.endswith('data.pkl'))))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "evil.pt")], capture_output=True,
                   cwd=ROOT / "tests", timeout=120)
    assert marker.exists()


def _ck_files(run_dir):
    ck = run_dir / "checkpoints" / "step-2"
    return sorted(p.relative_to(ck) for p in ck.rglob("*") if p.is_file())


@pytest.mark.slow
def test_checkpoint_files(stopped_run):
    run_dir, _ = stopped_run
    names = {str(p) for p in _ck_files(run_dir)}
    assert {"optimizer.pt", "scheduler.json", "rng.json", "rng.safetensors", "state.json",
            "adapter/adapter_model.safetensors"} <= names
    assert not any(n.endswith((".pkl", ".pickle")) or n == "rng.pt" for n in names)


@pytest.mark.slow
def test_a_planted_pickle_in_any_checkpoint_file_never_runs(stopped_run, tmp_path):
    """Every file of the checkpoint, one at a time, replaced by a pickle that would create a marker
    file: loading refuses each one the loader reads (a message naming it), and nothing runs."""
    from runner.checkpoint import CheckpointError, load_checkpoint
    from runner.recipe import Recipe

    run_dir, plan = stopped_run
    r = Recipe(plan, tmp_path / "scratch", log=lambda m: None)
    r.setup()  # model, optimizer, scheduler of this plan (no run directory lock needed for loading)
    refused = []
    for rel in _ck_files(run_dir):
        ck = tmp_path / f"ck-{str(rel).replace('/', '-')}"
        shutil.copytree(run_dir / "checkpoints" / "step-2", ck)
        marker = tmp_path / f"PWNED-{rel.name}"
        plant(ck / rel, marker)
        try:
            load_checkpoint(ck, model=r.model, optimizer=r.optimizer, scheduler=r.scheduler, is_peft=True)
        except CheckpointError as e:
            refused.append(str(rel))
            assert str(ck) in str(e) and "\n" not in str(e)
        assert not marker.exists(), f"code planted in {rel} ran"
    r.cleanup()
    # what the loader reads is refused; the rest (README.md, adapter_config.json) is never read
    assert set(refused) >= {"optimizer.pt", "scheduler.json", "rng.json", "rng.safetensors", "state.json",
                            "adapter/adapter_model.safetensors"}


@pytest.mark.slow
def test_a_planted_pickle_as_bin_weights_is_refused(stopped_run, tmp_path):
    from runner.checkpoint import CheckpointError, load_weights

    marker = tmp_path / "PWNED"
    (tmp_path / "adapter").mkdir()
    plant(tmp_path / "adapter" / "adapter_model.bin", marker)
    with pytest.raises(CheckpointError, match="not loaded"):
        load_weights(tmp_path / "adapter")
    assert not marker.exists()


@pytest.mark.slow
def test_resume_refuses_a_planted_optimizer_pickle(stopped_run, tmp_path, capsys):
    """As a user meets it: `tuneplan run --resume DIR` on a downloaded run directory."""
    from advisor.cli.main import main

    run_dir, _ = stopped_run
    copy = tmp_path / "downloaded"
    shutil.copytree(run_dir, copy)
    marker = tmp_path / "PWNED"
    plant(copy / "checkpoints" / "step-2" / "optimizer.pt", marker)
    assert main(["run", "--resume", str(copy), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.pt holds more than tensors" in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "adamw_8bit", "paged_adamw_8bit",
                                  "paged_adamw_32bit"])
@pytest.mark.slow
def test_every_optimizer_state_loads_weights_only(name, tmp_path):
    import torch

    from advisor.stack import make_optimizer
    from runner.checkpoint import safe_torch_load

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = make_optimizer(m, name, 1e-3)
    m(torch.randn(4, 64)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    again = make_optimizer(m, name, 1e-3)
    again.load_state_dict(safe_torch_load(tmp_path / "optimizer.pt"))
    assert again.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_half_written_checkpoints_of_dead_writers_are_removed(tmp_path):
    from runner.checkpoint import clean_partial

    root = tmp_path / "checkpoints"
    root.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        (root / f".tmp-step-3-{dead}").mkdir()
        (root / f".tmp-step-4-{sleeper.pid}").mkdir()  # its writer is alive: still being written
        (root / "step-2").mkdir()
        removed, promoted = clean_partial(tmp_path)
        assert [p.name for p in removed] == [f".tmp-step-3-{dead}"] and promoted == []
        assert sorted(p.name for p in root.iterdir()) == [f".tmp-step-4-{sleeper.pid}", "step-2"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_unsafe_torch_load_anywhere():
    pattern = re.compile(r"weights_only\s*=\s*False")
    hits = []
    for folder in ("advisor", "runner", "benchmarks", "tests"):
        for f in (ROOT / folder).rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            if f.name != "test_checkpoint.py" and pattern.search(text):
                hits.append(str(f.relative_to(ROOT)))
    assert hits == []
