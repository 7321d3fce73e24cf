"""Advice decisions a practitioner would sign off, and the promises behind them: every option marked
as fitting really fits by advisor.memory.estimate, every rejected one says the number that did not.
Decisions are pinned, not byte counts (the memory formulas may still move)."""

from __future__ import annotations

import argparse
import json

import pytest

from advisor.gpus import find_gpu
from advisor.memory import estimate
from advisor.model import resolve
from advisor.policy import breakdown_verdict, fit_verdict
from advisor.problems import UserError
from advisor.recommend import (
    AdviceError,
    Option,
    flops_per_token,
    gib,
    method_rank,
    precision_for,
    recommend,
    train_hours,
)
from advisor.spec import Plan


def fits(bd_or_need, capacity: int) -> bool:
    """The one fit policy: launchable when the verdict is not out of memory."""
    if isinstance(bd_or_need, int):
        return fit_verdict(bd_or_need, capacity).fits
    return breakdown_verdict(bd_or_need, capacity).fits


JOB = {"gpus": None, "examples": 1000, "avg_tokens": 512, "epochs": 3}
LLAMA8 = "meta-llama/Llama-3.1-8B"
LLAMA70 = "meta-llama/Llama-3.1-70B"


def base() -> Plan:
    return Plan.model_validate({"hardware": {"gpu": None}})


def advise(model: str, gpu: str | None, **kw):
    args = {**JOB, **kw}
    return recommend(resolve(model), base(), find_gpu(gpu) if gpu else None, **args)


def replan(o: Option, b: Plan | None = None) -> Plan:
    """The plan an option stands for, rebuilt from its public fields."""
    b = b or base()
    t = b.training.model_copy(update={"method": o.method, "precision": o.precision, "micro_batch": o.micro_batch,
                                      "grad_accum": o.grad_accum, "grad_checkpointing": o.gradient_checkpointing})
    hw = b.hardware.model_copy(update={"gpus": o.num_gpus, "zero": o.zero, "device": "cuda"})
    return b.model_copy(update={"training": t, "hardware": hw})


def check_promises(adv, model: str) -> None:
    from advisor.recommend import advice_fit

    shape = resolve(model)
    for o in adv.options:
        if o.fits:
            bd = estimate(replan(o), shape)
            af = advice_fit(replan(o), shape, find_gpu(o.gpu_id))
            assert af.need_bytes == o.peak_reserved_bytes >= bd.peak_reserved_bytes  # the known error added
            assert o.peak_reserved_bytes <= o.capacity_bytes  # never over the card
            assert fits(bd, o.capacity_bytes), o
            assert o.status in ("fits", "tight")
            assert o.effective_batch >= 16 and o.hours > 0
            if o.num_gpus == 1:
                assert o.strategy == "single" and o.zero == 0
        elif o.peak_reserved_bytes:  # rejected for memory: the number is in the words
            from advisor.recommend import advice_fit

            assert any(gib(o.peak_reserved_bytes) in r for r in o.reasons), o.reasons
            assert not advice_fit(replan(o), shape, find_gpu(o.gpu_id)).fits, o
        assert o.reasons and all(isinstance(r, str) and r for r in o.reasons)


# --- decisions --------------------------------------------------------------------------------

def test_llama8b_on_a_24gib_card_is_an_adapter_method_with_checkpointing_not_full():
    adv = advise(LLAMA8, "RTX 4090")
    c = adv.choice
    assert c.method in ("lora", "qlora") and c.num_gpus == 1
    if c.method == "lora":
        assert c.gradient_checkpointing
    full = next(o for o in adv.options if o.method == "full")
    assert not (full.fits and full.num_gpus == 1)
    check_promises(adv, LLAMA8)


def test_llama70b_on_one_h100_is_qlora():
    adv = advise(LLAMA70, "H100 SXM", gpus=1)
    assert adv.choice.method == "qlora" and adv.choice.num_gpus == 1
    rejected = {o.method for o in adv.options if not o.fits}
    assert rejected == {"full", "lora"}
    check_promises(adv, LLAMA70)


@pytest.mark.slow
def test_llama70b_one_h100_free_count_still_prefers_one_gpu_qlora():
    adv = advise(LLAMA70, "H100 SXM")
    assert adv.choice.method == "qlora" and adv.choice.num_gpus == 1
    assert any("would need" in r and "GPUs" in r for r in adv.choice.reasons)


@pytest.mark.slow
def test_small_model_on_an_80gb_card_is_full_fine_tuning():
    adv = advise("Qwen/Qwen2.5-0.5B", "A100 80GB")
    assert adv.choice.method == "full" and adv.choice.num_gpus == 1
    assert "small" in adv.choice.reasons[0]
    check_promises(adv, "Qwen/Qwen2.5-0.5B")


def test_mistral7b_on_a_t4_is_qlora_in_fp16():
    adv = advise("mistralai/Mistral-7B-v0.3", "T4", gpus=1)
    c = adv.choice
    assert c.method == "qlora" and c.num_gpus == 1
    assert c.precision == "fp16"  # a T4 has no bf16
    assert all("bf16" not in o.precision for o in adv.options)
    assert any("no bf16" in r for r in c.reasons)
    check_promises(adv, "mistralai/Mistral-7B-v0.3")


def test_full_on_a_card_without_bf16_uses_amp_fp16():
    assert precision_for("full", find_gpu("T4"), "bf16") == "amp-fp16"
    assert precision_for("lora", find_gpu("V100"), "bf16") == "fp16"
    assert precision_for("lora", find_gpu("H100 SXM"), "bf16") == "bf16"


@pytest.mark.slow
def test_forced_full_70b_takes_several_h100s_with_zero3():
    adv = advise(LLAMA70, "H100 SXM", methods=("full",))
    c = adv.choice
    assert c.method == "full" and c.num_gpus in (8, 16, 32) and c.zero == 3 and c.strategy == "zero3/fsdp"
    assert any("FSDP" in r for r in c.reasons)
    assert any("one NVIDIA H100 SXM 80GB is not enough" in r for r in c.reasons)
    # the count is the smallest that fits: half as many GPUs does not fit with any stage
    half = advise(LLAMA70, "H100 SXM", methods=("full",), gpus=c.num_gpus // 2)
    assert half.choice is None and not half.options[0].fits
    check_promises(adv, LLAMA70)
    check_promises(half, LLAMA70)


@pytest.mark.slow
def test_a_sharded_lora_choice_carries_the_known_error_of_published_runs():
    """LoRA of a 70B on H100s is sharded (ZeRO-3 / FSDP): the advice says what published 2-GPU runs of
    that kind showed (advisor.gpu_memory.validation_note); one-GPU QLoRA and full fine-tuning do not."""
    sharded = advise(LLAMA70, "H100 SXM", methods=("lora",))
    assert sharded.choice.num_gpus > 1 and sharded.choice.zero == 3
    assert any(n.startswith("known error:") and "6%-19%" in n for n in sharded.notes)
    for adv in (advise(LLAMA70, "H100 SXM", gpus=1), advise(LLAMA70, "H100 SXM", methods=("full",))):
        assert not any(n.startswith("known error:") for n in adv.notes)


@pytest.mark.slow
def test_fixed_gpu_count_is_respected():
    adv = advise(LLAMA8, "RTX 4090", gpus=4)
    assert {o.num_gpus for o in adv.options} == {4}


@pytest.mark.slow
def test_nothing_fits_gives_no_choice_and_numbers():
    adv = advise("meta-llama/Llama-3.1-405B", "RTX 3060", gpus=1)
    assert adv.choice is None
    assert all(not o.fits for o in adv.options)
    check_promises(adv, "meta-llama/Llama-3.1-405B")
    assert adv.to_json()["choice"] is None


@pytest.mark.slow
def test_the_faster_of_checkpointing_on_and_off_is_taken():
    """Was "no checkpointing when it fits". With the step-time model a fixed cost per layer and
    micro-step (fitted on the plain stack) makes micro-batch 16 with checkpointing faster than 8 x 2
    without it for a 0.5B model on an H200; the advisor takes whichever is faster."""
    from advisor import throughput

    adv = advise("Qwen/Qwen2.5-0.5B", "H200")
    c = adv.choice
    assert c.method == "full"
    shape = resolve("Qwen/Qwen2.5-0.5B")
    other = replan(c).model_copy(update={"training": replan(c).training.model_copy(
        update={"grad_checkpointing": not c.gradient_checkpointing, "micro_batch": 8, "grad_accum": 2})})
    mine = throughput.step_time(replan(c), shape, find_gpu("H200")).tokens_per_s
    if fits(estimate(other, shape), c.capacity_bytes):
        assert mine >= throughput.step_time(other, shape, find_gpu("H200")).tokens_per_s


def test_many_examples_make_full_preferred_for_a_mid_size_model():
    shape = resolve(LLAMA8)
    assert method_rank("full", shape, 1000)[0] > method_rank("qlora", shape, 1000)[0]
    assert method_rank("full", shape, 50_000)[0] < method_rank("lora", shape, 50_000)[0]
    adv = advise(LLAMA8, "H200", examples=50_000)
    assert adv.choice.method == "full" and adv.choice.num_gpus == 1


def test_larger_micro_batch_is_taken_and_the_next_one_did_not_fit():
    adv = advise("Qwen/Qwen2.5-0.5B", "A100 80GB")
    c = adv.choice
    assert c.micro_batch * c.grad_accum == 16
    if c.micro_batch < 16:
        assert any(f"micro-batch {c.micro_batch * 2} would need" in r for r in c.reasons)
        bigger = replan(c).model_copy(update={"training": replan(c).training.model_copy(
            update={"micro_batch": c.micro_batch * 2, "grad_accum": max(1, 16 // (c.micro_batch * 2))})})
        # the next one up is over the line of "fits" (advisor/policy.py): tight or out of memory
        assert breakdown_verdict(estimate(bigger, resolve("Qwen/Qwen2.5-0.5B")), c.capacity_bytes).status != "fits"


# --- time and cost ------------------------------------------------------------------------------

def test_flops_per_token_rules():
    shape = resolve(LLAMA8)
    p = base()

    def f(method, gc):
        return flops_per_token(shape, p.model_copy(update={"training": p.training.model_copy(
            update={"method": method, "grad_checkpointing": gc})}))

    full, lora, qlora = f("full", False), f("lora", False), f("qlora", False)
    assert full / lora == pytest.approx(6 / 4, rel=0.02)  # 6N vs 4N + tiny adapters
    assert lora == qlora  # QLoRA's extra time is a separate slowdown, not FLOPs
    assert f("full", True) / full == pytest.approx(8 / 6)


def test_cost_is_hours_times_gpus_times_price_and_qlora_is_slower():
    adv = advise(LLAMA8, "RTX 4090")
    gpu = find_gpu("RTX 4090")
    for o in adv.options:
        if o.fits:
            assert o.cost_usd == pytest.approx(o.hours * o.num_gpus * gpu.price_usd_hour)
    shape, p = resolve(LLAMA8), base()
    lora = p.model_copy(update={"training": p.training.model_copy(update={"method": "lora"})})
    qlora = p.model_copy(update={"training": p.training.model_copy(update={"method": "qlora"})})
    # QLoRA is slower than LoRA (dequantization, fp32 output head), by the step-time model
    assert train_hours(shape, qlora, gpu, 1, 0, 1e6) > train_hours(shape, lora, gpu, 1, 0, 1e6)
    double = advise(LLAMA8, "RTX 4090", epochs=6)
    assert double.choice.hours == pytest.approx(2 * adv.choice.hours)


@pytest.mark.slow
def test_without_a_gpu_every_priced_gpu_is_ranked_and_the_cheapest_wins():
    adv = advise(LLAMA8, None)  # its speed is a benchmark's goal (benchmarks/bench_estimate.py), not a test's
    c = adv.choice
    same = [o for o in adv.options if o.fits and o.method == c.method]
    assert c.cost_usd == min(o.cost_usd for o in same)
    assert any("no hourly price" in n for n in adv.notes)
    assert not any(o.gpu.startswith("Apple") for o in adv.options)
    assert adv.options[0] is c
    check_promises(adv, LLAMA8)


@pytest.mark.slow
def test_budget_is_respected_when_something_fits_within_it():
    free = advise(LLAMA70, None)
    cheapest = min(o.cost_usd for o in free.options if o.fits)
    adv = advise(LLAMA70, None, budget_usd=cheapest * 1.01)
    assert adv.choice.cost_usd <= cheapest * 1.01 and adv.choice.within_budget
    over = [o for o in adv.options if o.fits and not o.within_budget]
    assert over and all(any("over budget" in r for r in o.reasons) for o in over)
    # nothing within budget: still a choice, marked as over it
    tight = advise(LLAMA70, "H100 SXM", budget_usd=0.01)
    assert tight.choice is not None and tight.choice.within_budget is False
    assert any("budget" in n for n in tight.notes)


# --- JSON contract ------------------------------------------------------------------------------

def test_json_contract():
    out = advise(LLAMA8, "RTX 4090").to_json()
    json.dumps(out)
    keys = {"method", "gpu", "num_gpus", "micro_batch", "grad_accum", "gradient_checkpointing",
            "peak_reserved_bytes", "hours", "cost_usd", "reasons"}
    assert keys <= set(out["choice"])
    assert out["options"] and all(keys | {"fits"} <= set(o) for o in out["options"])
    assert isinstance(out["choice"]["peak_reserved_bytes"], int)


# --- bad inputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    ({"examples": 0}, "examples must be at least 1"),
    ({"avg_tokens": -5}, "avg_tokens"),
    ({"epochs": 0}, "epochs must be above 0"),
    ({"budget_usd": -1.0}, "budget must be a positive"),
    ({"target_batch": 0}, "target batch"),
    ({"gpus": 0}, "gpus must be between"),
    ({"methods": ("full", "dora")}, "unknown method"),
])
def test_bad_inputs_raise_with_a_clear_message(kw, words):
    with pytest.raises(AdviceError, match=words):
        advise(LLAMA8, "RTX 4090", **kw)
    assert issubclass(AdviceError, ValueError)


# --- CLI ----------------------------------------------------------------------------------------

def parser():
    from advisor.cli.advice import add_commands

    p = argparse.ArgumentParser(prog="tuneplan")
    add_commands(p.add_subparsers(dest="command"))
    return p


def run(argv):
    a = parser().parse_args(argv)
    return a.func(a)


def test_cli_recommend_json(capsys):
    assert run(["recommend", "--model", LLAMA8, "--gpu", "RTX 4090", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["choice"]["method"] in ("lora", "qlora")


def test_cli_recommend_table_and_serving(capsys):
    assert run(["recommend", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "a100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "Recommended" in out and "full fine-tuning" in out
    # --serving is a question of its own (vLLM on that card; tests/test_serving_cli.py), not the training advice
    assert run(["recommend", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "a100-80gb", "--serving"]) == 0
    out = capsys.readouterr().out
    assert "Serving Qwen/Qwen2.5-0.5B" in out and "vllm serve" in out and "full fine-tuning" not in out


def test_cli_forced_methods(capsys):
    assert run(["recommend", "--model", LLAMA70, "--gpu", "h100 sxm", "--methods", "full", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["choice"]
    assert c["method"] == "full" and c["num_gpus"] > 1 and c["strategy"] == "zero3/fsdp"


def test_cli_nothing_fits_exits_1(capsys):
    assert run(["recommend", "--model", "meta-llama/Llama-3.1-405B", "--gpu", "rtx 3060", "--gpus", "1"]) == 1
    assert "Nothing fits" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--gpu", "rtx 9999"], "unknown GPU"),
    (["--budget", "-5"], "--budget must be above 0"),
    (["--examples", "0"], "--examples must be at least 1"),
    (["--epochs", "0"], "--epochs must be above 0"),
    (["--methods", "full,dora"], "--methods: unknown dora"),
    (["--seq", "999999"], "use --seq 131072 or less"),
    (["--gpus", "0"], "--gpus must be between"),
])
def test_cli_bad_input_is_a_user_error(argv, words):
    with pytest.raises(UserError) as e:
        run(["recommend", "--model", LLAMA8, *argv])
    from advisor.cli.common import render

    shown = [render(p) for p in e.value.items]  # as the CLI prints them
    assert any(words in p for p in shown), shown


def test_cli_reports_every_problem_at_once():
    with pytest.raises(UserError) as e:
        run(["recommend", "--model", LLAMA8, "--gpu", "rtx 9999", "--budget", "-1", "--examples", "0"])
    assert len(e.value.problems) == 3


def test_cli_serving_without_a_gpu_ranks_gpus(capsys):
    assert run(["recommend", "--model", LLAMA8, "--serving", "--json"]) == 0  # it used to need --gpu
    out = json.loads(capsys.readouterr().out)
    assert out["choice"] is not None and out["question"]["gpu"] is None and len(out["options"]) > 1


def test_cli_seq_defaults_to_the_model_maximum_when_shorter(capsys):
    assert run(["recommend", "--model", "openai-community/gpt2", "--gpu", "t4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["job"]["seq_len"] == 1024


def test_recommend_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, advisor.recommend, advisor.guide, advisor.cli.advice; "
            "assert 'torch' not in sys.modules and 'textual' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_recommend_save_writes_a_runnable_plan(tmp_path, capsys):
    from advisor.cli.main import main
    from advisor.planfile import load_plan

    path = tmp_path / "rec.yaml"
    assert main(["recommend", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "a10g", "--save", str(path), "--json"]) == 0
    import json

    choice = json.loads(capsys.readouterr().out)["choice"]
    plan = load_plan(path)
    assert (plan.training.method, plan.training.micro_batch, plan.training.grad_accum) == (
        choice["method"], choice["micro_batch"], choice["grad_accum"])
    assert plan.hardware.gpus == choice["num_gpus"] and plan.hardware.gpu


@pytest.mark.slow
def test_one_gpu_machines_are_never_joined():
    """Apple silicon has no interconnect: the advisor never times several of them, it says why."""
    adv = advise("meta-llama/Llama-3.1-405B", "apple-m3-max-128gb")
    assert adv.choice is None and all(o.num_gpus == 1 for o in adv.options)
    fixed = advise("Qwen/Qwen2.5-0.5B", "apple-m3-max-128gb", gpus=2)
    assert fixed.choice is None
    assert any("one GPU per machine" in r for o in fixed.options for r in o.reasons)
