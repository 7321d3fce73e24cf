import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_stopped_after(plan, run_dir, step: int) -> int:
    """Run the recipe in-process and stop it as SIGTERM would once step ``step`` is done (it then
    checkpoints and exits); returns its exit code (130)."""
    from runner.recipe import Recipe

    holder = {}

    def stop(ev):
        if ev.get("type") == "step" and ev["step"] == step:
            holder["r"].stop_requested = "SIGTERM"

    holder["r"] = Recipe(plan, run_dir, log=lambda m: None, progress=stop)
    return holder["r"].run()


# --- one tiny model and data for the runner's tests (built once per session) ------------------------

import pytest  # noqa: E402

# Fixtures that build, load or train a real model, or render the app to an SVG snapshot: a test that asks for
# one is in the slow tier (`make test` and CI run it; `make check` leaves it out). Tests that train or load a
# model without such a fixture carry @pytest.mark.slow themselves, as does any test over about half a second.
SLOW_FIXTURES = {"tiny_model_dir", "model_dir", "trained", "stopped_run", "cpu_run", "tiny_model", "models",
                 "tiny_plan", "installed", "snap_compare"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The demo's tiny Llama with its BPE tokenizer, saved to disk (random weights, nothing downloaded)."""
    from runner.demo import DEMO_DATA, build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("tiny-model") / "m", DEMO_DATA)


@pytest.fixture(scope="session")
def eight_examples(tmp_path_factory):
    """The first eight records of the demo data (two micro-batches of 4)."""
    from runner.demo import DEMO_DATA

    f = tmp_path_factory.mktemp("data") / "eight.jsonl"
    f.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:8]))
    return f


def cpu_plan_file(path, model_dir, data, training=None, hardware=None, **run):
    """A LoRA plan on the CPU (fp32, micro-batch 4 x 64 tokens, 4 steps, no checkpoint unless asked),
    saved to ``path``; keyword arguments override run.*."""
    from advisor.planfile import save_plan
    from advisor.spec import build_plan

    plan = build_plan({
        "model": {"ref": str(model_dir)},
        "training": {"method": "lora", "precision": "fp32", "micro_batch": 4, "seq_len": 64,
                     "grad_checkpointing": False, "lora": {"r": 4, "alpha": 8}, **(training or {})},
        "hardware": {"gpu": None, "device": "cpu", **(hardware or {})},
        "data": {"path": str(data), "val_split": 0.0},
        "run": {"output_dir": str(Path(path).parent / "runs"), "name": "r", "max_steps": 4, "save_every": 100,
                "eval_every": 100, **run},
    })
    return save_plan(plan, path)


def runner_env(hooks: str = "") -> dict:
    """The environment of a `python -m runner` subprocess (optionally with test hooks)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEPLAN_NO_PROGRESS": "1"}
    if hooks:
        env["TUNEPLAN_TEST_HOOKS"] = hooks
    return env
