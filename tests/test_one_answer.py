"""One plan, one answer: the same borderline plan gets the same fit verdict, and the same time, from
`tuneplan estimate`, its --json, the TUI's plan form, `recommend` and `run`'s pre-flight check (they all
call advisor.service / advisor.policy)."""

import json

import pytest

from advisor import service
from advisor.forms import FORM_DEFAULTS, evaluate
from advisor.recommend import recommend
from advisor.spec import build_plan

MODEL, GPU = "meta-llama/Llama-3.1-8B", "rtx-4090"


def _data(seq: int) -> dict:
    return {"model": {"ref": MODEL}, "training": {"method": "qlora", "seq_len": seq, "micro_batch": 1},
            "hardware": {"gpu": GPU}}


@pytest.fixture(scope="module")
def borderline():
    """The longest sequence whose peak is on the card (tight: within 10% of it), the one after (only the
    allocator's cache is over: still tight), and the first that is out of memory."""
    lim = service.limits(service.build(_data(2048)), "seq")
    assert lim.status == "tight" and lim.next_value == lim.value + 1 and lim.launchable_value > lim.next_value
    return {"tight": lim.value, "cache": lim.next_value, "oom": lim.launchable_value + 1}


@pytest.mark.parametrize("case", ["tight", "cache", "oom"])
@pytest.mark.slow
def test_estimate_json_tui_recommend_and_run_agree(borderline, case, capsys):
    from advisor.cli.main import main
    from runner.preflight import fit_check

    seq = borderline[case]
    status = "oom" if case == "oom" else "tight"
    # estimate --json and the table
    assert main(["estimate", "--model", MODEL, "--gpu", GPU, "--seq", str(seq), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu"]["status"] == status
    assert main(["estimate", "--model", MODEL, "--gpu", GPU, "--seq", str(seq)]) == 0
    shown = capsys.readouterr().out
    assert ("tight" if status == "tight" else "out of memory") in shown
    # the TUI's plan form
    ev = evaluate({**FORM_DEFAULTS, "model": MODEL, "gpu": GPU, "method": "qlora", "batch": "1", "seq": str(seq)})
    assert ev.status == status
    # recommend, on the same plan at micro-batch 1 with checkpointing (its own search)
    ctx = service.build(_data(seq))
    adv = recommend(ctx.shape, ctx.plan, ctx.gpu, gpus=1, examples=1000, avg_tokens=512, epochs=1, target_batch=1,
                    methods=("qlora",))
    same = [o for o in adv.options if o.micro_batch == 1 and o.gradient_checkpointing]
    if case == "tight":
        assert adv.choice is not None and adv.choice.status == "tight" and adv.choice.fits
    else:  # the advice never proposes a plan over the card: not where only the allocator's cache is over either
        assert adv.choice is None and not same or all(not o.fits for o in same)
        assert adv.nearest and all(n.need_bytes <= n.capacity_bytes for n in adv.nearest)
    # run's pre-flight
    plan = build_plan(_data(seq))
    verdict, why = service.check_fit(plan)
    assert why is None and verdict.status == status
    said: list[str] = []
    if status == "oom":
        from advisor.problems import Problems

        with pytest.raises(Problems, match="will not fit"):
            fit_check(plan, force=False, log=said.append)
    else:
        fit_check(plan, force=False, log=said.append)
        assert any("(tight)" in s for s in said)


def test_estimate_time_equals_recommends_time_for_the_same_plan(capsys):
    from advisor.cli.main import main

    ctx = service.build(_data(2048))
    adv = recommend(ctx.shape, ctx.plan, ctx.gpu, gpus=1, examples=2000, avg_tokens=256, epochs=2, target_batch=1,
                    methods=("qlora",))
    c = adv.choice
    assert c is not None and c.micro_batch == 1
    args = ["estimate", "--model", MODEL, "--gpu", GPU, "--method", "qlora", "--batch", "1", "--seq", "2048",
            "--precision", c.precision, "--examples", "2000", "--avg-tokens", "256", "--epochs", "2", "--json"]
    if not c.gradient_checkpointing:
        args.append("--no-grad-checkpointing")
    assert main(args) == 0
    t = json.loads(capsys.readouterr().out)["time"]
    assert t["hours"] == pytest.approx(c.hours, rel=1e-3)
    assert t["cost_usd"] == pytest.approx(c.cost_usd, abs=0.005)  # --json rounds dollars to cents
    # and the TUI's plan form with that job shows the same hours
    ev = evaluate({**FORM_DEFAULTS, "model": MODEL, "gpu": GPU, "method": "qlora", "batch": "1", "seq": "2048",
                   "precision": c.precision, "ckpt": c.gradient_checkpointing},
                  job=service.Job(2000, 256, 2.0))
    assert ev.result.time.hours == pytest.approx(c.hours, rel=1e-3)
