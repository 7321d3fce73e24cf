"""`estimate --data`: the job and the longest batch from the dataset, checked against the runner itself.

The lengths are the runner's loader's (runner.data.measure against runner.data.prepare), the steps, tokens
and micro-batches the recipe's own (Recipe._setup_data and Recipe._micro_batch, every process), the token
counts those of a real tiny run's step events, the longest batch the fail-fast probe's, and its peak what
the probe measures on the CPU (torch.profiler, runner.profiling)."""

import json
import random

import pytest
from conftest import cpu_plan_file

from advisor import service
from advisor.batches import data_job
from advisor.spec import DataSpec, build_plan
from runner import api as runner_api
from runner.demo import DEMO_DATA


@pytest.fixture(scope="module")
def long_tailed(tmp_path_factory):
    """300 records whose responses follow a Pareto tail (most a few words, some hundreds), in the demo's words
    (its tokenizer knows them), some with an input; a few are longer than 256 tokens, none than 512."""
    words = sorted({w for line in DEMO_DATA.read_text().splitlines() for w in json.loads(line)["output"].split()})
    rng = random.Random(30)
    lines = []
    for i in range(300):
        k = min(int(rng.paretovariate(1.1) * 3), 160)
        rec = {"instruction": " ".join(rng.choice(words) for _ in range(rng.randint(2, 12))),
               "input": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) if i % 3 == 0 else "",
               "output": " ".join(rng.choice(words) for _ in range(k))}
        lines.append(json.dumps(rec))
    f = tmp_path_factory.mktemp("data") / "long_tailed.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


DATASETS = ("demo", "long_tailed")
SPECS = [{}, {"packing": True}, {"val_split": 0.1, "prompt_loss_weight": 0.5}, {"template": "chat"},
         {"max_examples": 50, "pad_to": "seq_len"}, {"template": "plain", "val_split": 0.0}]


def _data(which, long_tailed):
    return DEMO_DATA if which == "demo" else long_tailed


@pytest.mark.parametrize("which", DATASETS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
@pytest.mark.parametrize("seq_len", [80, 256])
@pytest.mark.slow
def test_the_lengths_are_the_runner_loaders(which, spec, seq_len, tokenizer, long_tailed):
    from runner.data import measure, prepare

    d = DataSpec(path=str(_data(which, long_tailed)), **spec)
    p = prepare(d, tokenizer, seq_len, 41)
    m = measure(d, tokenizer, seq_len, 41)
    assert m.train == [len(e.input_ids) for e in p.train]  # the same sequences, in the same order
    assert m.lines == [e.line for e in p.train]
    assert m.val == [len(e.input_ids) for e in p.val]
    assert (m.trained_tokens, m.truncated, m.records, m.warnings) == (
        p.stats["trained_tokens"], p.stats["truncated"], p.records, p.warnings)
    assert m.exact and m.examples == p.stats["train"]


def _plan(model_dir, path, seq_len=256, world=1, **over):
    training = {"method": "lora", "precision": "fp32", "micro_batch": 4, "seq_len": seq_len,
                "grad_checkpointing": False, "lora": {"r": 4, "alpha": 8}, **over.pop("training", {})}
    return build_plan({"model": {"ref": str(model_dir)}, "training": training,
                       "hardware": {"gpu": None, "device": "cpu", "gpus": world},
                       "data": {"path": str(path), "val_split": 0.05, **over.pop("data", {})},
                       "run": {"seed": 7, **over.pop("run", {})}})


@pytest.mark.parametrize("which", DATASETS)
@pytest.mark.parametrize("world, training, data, run", [
    (1, {}, {}, {}),
    (1, {"grad_accum": 3}, {"packing": True}, {"epochs": 2}),
    (2, {"micro_batch": 3}, {"pad_to": "seq_len"}, {"epochs": 1.5}),
    (3, {"grad_accum": 2}, {}, {"max_steps": 40}),
])
@pytest.mark.slow
def test_steps_tokens_and_batches_are_the_recipes(which, world, training, data, run, tiny_model_dir, long_tailed,
                                                  tmp_path):
    """Every process's micro-batches, position after position, from the recipe itself."""
    from runner.failfast import longest_batch
    from runner.recipe import Recipe

    plan = _plan(tiny_model_dir, _data(which, long_tailed), world=world, training=training, data=data, run=run)
    r = Recipe(plan, tmp_path / "r", log=lambda m: None)
    r.world, r.device = world, "cpu"
    r._setup_data()
    dj = data_job(plan, runner_api.data_lengths(plan))
    assert (dj.steps, dj.batches_per_epoch, dj.sequences) == (r.total_steps, r.batches_per_epoch, len(r.data.train))
    t = plan.training
    tokens = positions = 0
    shapes0, step_tokens = [], []
    for rank in range(world):
        r.rank = rank
        for step in range(r.total_steps):
            real = 0
            for i in range(t.grad_accum):
                b = r._micro_batch(step * t.grad_accum + i)
                real += int(b["attention_mask"].sum())
                positions += b["attention_mask"].numel()
                if rank == 0:
                    shapes0.append(tuple(b["input_ids"].shape))
            tokens += real
            if rank == 0:
                step_tokens.append(real * world)  # what the step event says (Recipe.train)
    assert (dj.tokens, dj.positions) == (tokens, positions)
    assert list(dj.shapes) == shapes0 and list(dj.step_tokens) == step_tokens
    pad_to = t.seq_len if plan.data.pad_to == "seq_len" else None
    _, longest = longest_batch(r.data.train, t.micro_batch, r.tokenizer.pad_token_id, pad_to)
    assert (dj.longest.rows, dj.longest.length, dj.longest.lines) == (longest.rows, longest.length, longest.lines)
    assert dj.longest.words() == longest.words()


@pytest.mark.parametrize("which", DATASETS)
@pytest.mark.slow
def test_a_real_run_counts_what_the_estimate_said(which, tiny_model_dir, long_tailed, tmp_path):
    """A real tiny CPU run: its start event's steps, every step event's tokens and the fail-fast probe's batch
    are what `estimate --data` said before it ran."""
    from advisor.planfile import load_plan
    from runner.events import read_events
    from runner.recipe import Recipe

    path = cpu_plan_file(tmp_path / "plan.yaml", tiny_model_dir, _data(which, long_tailed),
                         training={"seq_len": 160}, max_steps=None, epochs=0.25)
    plan = load_plan(path)
    de = service.data_estimate(service.context_of(plan), runner_api.data_lengths(plan))
    assert Recipe(plan, tmp_path / "run", log=lambda m: None).run() == 0
    events, _ = read_events(tmp_path / "run")
    start = next(e for e in events if e["type"] == "start")
    steps = [e for e in events if e["type"] == "step"]
    assert start["total_steps"] == de.job.steps == len(steps) == {"demo": 6, "long_tailed": 19}[which]
    assert [e["tokens"] for e in steps] == list(de.job.step_tokens)
    assert sum(e["tokens"] for e in steps) == de.job.tokens
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert any(f"the longest batch, {de.job.longest.words()}, fitted" in n for n in report["notes"])
    assert de.result.plan.job.examples == de.job.examples == start["data"]["train"]


@pytest.mark.parametrize("which", DATASETS)
@pytest.mark.slow
def test_the_longest_batch_peak_is_what_the_fail_fast_probe_measures(which, tiny_model_dir, long_tailed, tmp_path):
    """The estimate at the data's longest batch against the probe on that batch, measured on the CPU
    (torch.profiler's memory events: runner.profiling); the plan's nominal micro_batch x seq_len is far off."""
    from runner.failfast import longest_batch, probe
    from runner.memtrace import gc_live_tensor_bytes
    from runner.profiling import profiled_step
    from runner.recipe import Recipe

    # tensors other tests keep alive in this process (session fixtures) are not this step's
    others = gc_live_tensor_bytes()
    plan = _plan(tiny_model_dir, _data(which, long_tailed), seq_len=512, data={"val_split": 0.0})
    de = service.data_estimate(service.context_of(plan), runner_api.data_lengths(plan))
    r = Recipe(plan, tmp_path / "r", log=lambda m: None)
    r.take_run_dir()
    try:
        r.setup()  # the runner's own probe runs here (check_longest_batch)
        batch, longest = longest_batch(r.data.train, 4, r.tokenizer.pad_token_id)
        _, measured = profiled_step(probe, (r.model, batch, "fp32"), {"optimizer": r.optimizer})
        measured -= others
    finally:
        r.stop_sampling()
        r.cleanup()
    assert (longest.rows, longest.length) == (de.job.longest.rows, de.job.longest.length)
    assert de.job.longest.length < 512
    ours = de.result.peak_allocated_bytes
    print(f"\n{which}: longest {de.job.longest.words()}: estimate {ours:,} B, probe measured {measured:,} B, "
          f"{ours / measured - 1:+.2%}")
    assert abs(ours / measured - 1) <= 0.03, (ours, measured)
    # every batch 4 x 512 is not what this data does (the demo's longest is 106 tokens, the long tail's 463)
    assert de.nominal_allocated_bytes > (2 if which == "demo" else 1.05) * measured


def test_estimate_data_json_and_the_plan_it_carries(tiny_model_dir, long_tailed, capsys):
    from advisor.cli.main import main

    args = ["estimate", str(tiny_model_dir), "--method", "lora", "--batch", "4", "--seq", "256", "--gpu",
            "a100-80gb", "--data", str(long_tailed), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    d = out["data"]
    plan = build_plan(out["plan"])  # the plan the estimate carries: its job fields are the data's
    dj = data_job(plan, runner_api.data_lengths(plan))
    assert d["exact"] and d["job"] == dj.as_json() and d["file"] == str(long_tailed)
    assert out["plan"]["data"]["path"] == str(long_tailed)
    assert out["plan"]["job"]["examples"] == d["job"]["examples"] and out["plan"]["job"]["avg_tokens"] == \
        d["job"]["avg_tokens"]
    assert out["plan"]["training"]["seq_len"] == 256  # the user's plan; the breakdown is the longest batch's
    assert out["time"]["steps"] == d["job"]["steps"] and out["time"]["tokens"] == d["job"]["tokens"]
    assert out["time"]["positions_per_token"] == d["job"]["positions_per_token"] > 1  # padding counted
    assert "padding counted" not in out["time"]["assumptions"] and "counted" in out["time"]["assumptions"]
    over = d["reserved_over_run"]
    assert over["with_probe"]["settle_step"] == 1 and over["probe_runs"]
    assert over["without_probe"]["settled_bytes"] >= over["without_probe"]["first_bytes"]
    assert out["peak_allocated_bytes"] <= d["nominal"]["peak_allocated_bytes"]


def test_without_a_tokenizer_it_approximates_and_says_so(long_tailed, capsys):
    """A hub id offline (the tests never reach the hub): UTF-8 bytes / 4 tokens, said in the output."""
    from advisor.cli.main import main

    assert main(["estimate", "meta-llama/Llama-3.1-8B", "--method", "qlora", "--batch", "4", "--seq", "1024",
                 "--gpu", "rtx 4090", "--data", str(long_tailed)]) == 0
    text = capsys.readouterr().out
    assert "APPROXIMATE:" in text and "UTF-8 bytes / 4" in text and "the longest batch:" in text
    assert "the job:" in text and "without the probe" in text


def test_bad_input_is_one_message(tmp_path, long_tailed, capsys):
    from advisor.cli.main import main

    assert main(["estimate", "meta-llama/Llama-3.1-8B", "--data", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["estimate", "meta-llama/Llama-3.1-8B", "--data", str(long_tailed), "--examples", "5"]) == 2
    assert "--examples with --data" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\nnot json\n')
    assert main(["estimate", "meta-llama/Llama-3.1-8B", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 1: missing 'output'" in err and "line 2: not valid JSON" in err


@pytest.mark.asyncio
@pytest.mark.slow
async def test_the_launch_screen_shows_the_job_and_peak_from_the_data(tiny_model_dir, long_tailed, tmp_path):
    """Once a dataset is chosen the app shows the data's steps, tokens and longest-batch peak, and Start's plan
    carries the data's job fields."""
    pytest.importorskip("textual")
    from advisor.tui.app import make_app

    plan = _plan(tiny_model_dir, long_tailed, run={"output_dir": str(tmp_path / "runs")})
    de = service.data_estimate(service.context_of(plan), runner_api.data_lengths(plan))
    app = make_app(plan=plan, plan_path=tmp_path / "plan.yaml")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.pause()
        shown = str(app.screen.query_one("#preview").content)
        assert f"from the data: {de.job.steps:,} steps, {de.job.tokens:,} tokens" in shown
        assert f"longest batch {de.job.longest.rows} x {de.job.longest.length}" in shown
        to_run = app.screen.plan_to_run()
        assert (to_run.job.examples, to_run.job.avg_tokens) == (de.job.examples, de.job.avg_tokens)
