"""Fail fast: the runner runs the longest batch once before step 1, so a batch that does not fit fails
then, not when it finally comes up; the probe leaves training exactly as it was."""

import json

import pytest

from advisor.spec import build_plan
from runner.data import Example
from runner.demo import DEMO_DATA
from runner.events import read_events
from runner.failfast import data_check_longest, longest_batch
from runner.hooks import Hooks


def _ex(n, line):
    return Example(list(range(1, n + 1)), list(range(1, n + 1)), None, line)


def test_longest_batch_is_the_longest_examples_padded_as_the_run_pads():
    exs = [_ex(n, i + 1) for i, n in enumerate([5, 40, 7, 33, 12])]
    batch, longest = longest_batch(exs, 2, pad_id=0)
    assert batch["input_ids"].shape == (2, 40) and longest.lines == (2, 4) and longest.tokens == 80
    assert int(batch["attention_mask"].sum()) == 73
    batch, longest = longest_batch(exs, 8, pad_id=0, pad_to=64)  # data.pad_to=seq_len
    assert batch["input_ids"].shape == (5, 64) and longest.words() == "5 x 64 tokens (lines 2, 4, 5, 3, ...)"


def test_data_check_longest_warns_above_seq_len():
    exs = [_ex(n, i + 1) for i, n in enumerate([5, 300, 7])]
    assert data_check_longest(exs, 512) == {"line": 2, "tokens": 300, "seq_len": 512}
    out = data_check_longest(exs, 256)
    assert "line 2, 300 tokens" in out["warning"] and "raise training.seq_len to 300" in out["warning"]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd_momentum"])
@pytest.mark.slow
def test_probe_creates_the_optimizer_state_and_moves_no_weight(optimizer):
    import torch
    from tiny import build

    from advisor.stack import make_optimizer
    from runner.failfast import probe

    model = build("llama")
    opt = make_optimizer(model, optimizer, 1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    created = []
    opt.register_step_post_hook(lambda o, args, kwargs: created.append(sum(len(s) for s in o.state.values())))
    batch = {"input_ids": torch.randint(0, 1000, (2, 32)), "labels": torch.randint(0, 1000, (2, 32))}
    rng = torch.get_rng_state()
    seconds, with_states = probe(model, batch, "fp32", optimizer=opt)
    assert with_states and created and created[0] > 0  # the step made the state (its memory was in the probe)
    assert not opt.state and opt.param_groups[0]["lr"] == 1e-3  # dropped again, the learning rate back
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # to the bit
    assert torch.equal(rng, torch.get_rng_state())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from runner.demo import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model"), DEMO_DATA)


@pytest.fixture(scope="module")
def one_long(tmp_path_factory):
    """40 short demo examples and, on line 41, one about ten times longer."""
    lines = DEMO_DATA.read_text().splitlines()[:40]
    long_text = " ".join(json.loads(x)["output"] for x in lines)
    lines.append(json.dumps({"instruction": "Repeat all of this.", "input": "", "output": long_text}))
    f = tmp_path_factory.mktemp("data") / "one_long.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def _plan(model_dir, data, out, **run):
    return build_plan({
        "model": {"ref": str(model_dir)},
        "training": {"method": "lora", "precision": "fp32", "micro_batch": 2, "seq_len": 1024,
                     "grad_checkpointing": False, "learning_rate": 5e-3, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        "hardware": {"gpu": None, "device": "cpu"},
        "data": {"path": str(data), "val_split": 0.0},
        "run": {"output_dir": str(out), "name": "r", "max_steps": 25, "warmup_steps": 0, "save_every": 100, "seed": 41,
                "eval_every": 100, **run},
    })


def _run(plan, run_dir, hooks=None):
    from runner.recipe import Recipe

    r = Recipe(plan, run_dir, log=lambda m: None, hooks=hooks)
    return r, r.run()


@pytest.mark.slow
def test_a_batch_that_does_not_fit_fails_before_the_first_step(model_dir, one_long, tmp_path, monkeypatch):
    # No GPU here: the test hook raises torch.OutOfMemoryError (what CUDA's allocator raises) in any
    # forward of more than 400 tokens; the short batches hold about 2 x 40, the long one 2 x 500+.
    hooks = Hooks(oom_above_tokens=400)
    # without the probe (run.fail_fast off): the run fails when the long example comes up
    r, code = _run(_plan(model_dir, one_long, tmp_path / "a", fail_fast=False), tmp_path / "a" / "r", hooks)
    assert code == 1
    events, _ = read_events(tmp_path / "a" / "r")
    late = [e for e in events if e["type"] == "step"]
    assert events[-1]["type"] == "error" and events[-1]["kind"] == "oom" and len(late) >= 1

    r, code = _run(_plan(model_dir, one_long, tmp_path / "b"), tmp_path / "b" / "r", hooks)
    assert code == 1
    events, _ = read_events(tmp_path / "b" / "r")
    assert not [e for e in events if e["type"] == "step"]  # failed before step 1
    err = events[-1]
    assert err["type"] == "error" and err["kind"] == "oom"
    assert "the longest batch, 2 x" in err["message"] and "(lines 41, " in err["message"], err["message"]
    assert err["suggestion"]["changes"] or err["suggestion"].get("note")


@pytest.mark.slow
def test_probe_leaves_training_unchanged(model_dir, one_long, tmp_path, monkeypatch):
    """LoRA dropout draws from torch's generator: the probe puts it back, drops its gradients and
    never steps the optimizer, so the losses are the same to the bit with and without it."""
    runs = {}
    for name, on in (("with", True), ("without", False)):
        r, code = _run(_plan(model_dir, one_long, tmp_path / name, max_steps=4, fail_fast=on), tmp_path / name / "r")
        assert code == 0, getattr(r, "error", None)
        events, _ = read_events(tmp_path / name / "r")
        runs[name] = [e["loss"] for e in events if e["type"] == "step"]
        notes = json.loads((tmp_path / name / "r" / "report.json").read_text())["notes"]
        assert any("fail-fast" in n and "with the optimizer state" in n for n in notes) == on
    assert len(runs["with"]) == 4 and runs["with"] == runs["without"]


def test_data_check_shows_the_longest_example_and_warns(model_dir, one_long, capsys):
    from advisor.cli.main import main

    assert main(["data", "check", str(one_long), "--model", str(model_dir), "--seq", "128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    longest = out["longest"]
    assert longest["line"] == 41 and longest["tokens"] > 128 and "longer than" in longest["warning"]
    assert main(["data", "check", str(one_long), "--model", str(model_dir), "--seq", "128"]) == 0
    assert "longest example: line 41" in capsys.readouterr().out


@pytest.mark.slow
def test_the_error_is_the_last_event_even_with_the_monitor_sampling_fast(model_dir, one_long, tmp_path):
    """The memory monitor is stopped before the run writes its error (or end): a sample a moment later
    used to land after it (seen in CI: the last event was "memory")."""
    from runner.recipe import Recipe

    plan = _plan(model_dir, one_long, tmp_path / "a", fail_fast=False)
    r = Recipe(plan, tmp_path / "a" / "r", log=lambda m: None, hooks=Hooks(oom_above_tokens=400),
               monitor_interval=0.001)
    assert r.run() == 1
    events, _ = read_events(tmp_path / "a" / "r")
    assert [e for e in events if e["type"] == "memory"]  # it did sample
    assert events[-1]["type"] == "error" and events[-1]["kind"] == "oom"
