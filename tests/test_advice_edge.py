"""Advice a user can act on (issue 28): never a plan over its card, always a next plan that fits, one
job everywhere. The questions people bring before renting a GPU, answered end to end through the CLI."""

import json

import pytest

from advisor.cli.main import main
from advisor.gpus import find_gpu

QUESTIONS = [  # model, card, sequence length: the issue's examples first
    ("meta-llama/Llama-3.1-8B", "RTX 3060", 4096),
    ("Qwen/Qwen2.5-1.5B", "RTX 3060", 2048),
    ("meta-llama/Llama-3.1-70B", "RTX 4090", 2048),
    ("meta-llama/Llama-3.1-8B", "RTX 4090", 2048),
    ("meta-llama/Llama-3.1-8B", "RTX 4090", 8192),
    ("meta-llama/Llama-3.1-70B", "H100 SXM", 4096),
    ("mistralai/Mistral-7B-v0.3", "T4", 2048),
    ("google/gemma-2-9b", "A10G", 4096),
    ("Qwen/Qwen2.5-7B", "L4", 8192),
    ("microsoft/phi-4", "A100 40GB", 4096),
    ("meta-llama/Llama-3.2-1B", "RTX 3060", 16384),
    ("mistralai/Mixtral-8x7B-v0.1", "A100 80GB", 4096),
    ("Qwen/Qwen2.5-72B", "H100 SXM", 2048),
]


def _json(argv, capsys):
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def _estimate_fits(command: list[str], capsys) -> dict:
    """Run a command the advice printed (`tuneplan estimate ...`) and return its GPU verdict."""
    assert command[:2] == ["tuneplan", "estimate"], command
    code, out = _json(command[1:], capsys)
    assert code == 0, out
    return out


@pytest.mark.parametrize("model, card, seq", QUESTIONS)
@pytest.mark.slow
def test_no_recommendation_is_over_its_card_and_nothing_fits_is_never_the_last_word(model, card, seq, capsys):
    from advisor.cli.common import plan_command
    from advisor.service import apply_changes, build

    code, adv = _json(["recommend", model, "--gpu", card, "--seq", str(seq)], capsys)
    cap = find_gpu(card).memory_bytes
    for o in adv["options"]:
        if o["fits"]:  # with the known error of its kind added, never over the card
            assert o["peak_reserved_bytes"] <= o["capacity_bytes"] == cap, o
    if adv["choice"] is None:
        assert code == 1 and adv["nearest"], "nothing fits, and no nearest plan either"
        plan = build(_base(model, card, seq)).plan
        for n in adv["nearest"]:  # each, applied to the plan asked about, is a command that estimate confirms
            assert n["need_bytes"] <= n["capacity_bytes"]
            near = apply_changes(plan, {**n["changes"], "hardware.gpu": n["gpu_id"]})
            out = _estimate_fits(plan_command(near), capsys)
            assert out["gpu"]["status"] in ("fits", "tight") and out["nvidia_smi_bytes"] <= out["gpu"]["memory_bytes"]
    else:
        assert adv["choice"]["fits"] and adv["choice"]["peak_reserved_bytes"] <= cap


def _base(model, card, seq):
    return {"model": {"ref": model}, "training": {"seq_len": seq}, "hardware": {"gpu": card}}


@pytest.mark.slow
def test_the_issues_rtx_3060_question(capsys):
    """QLoRA Llama-3.1-8B on a 12 GB RTX 3060 at 4k: was "QLoRA on 16 x RTX 3060, 14.5 GiB on a 12 GiB card,
    tight"; with --gpus 1, only "Nothing fits." Now: no plan over the card, more GPUs are not proposed
    (the activations and logits do not shard), and the nearest plans each print a command that fits."""
    code = main(["recommend", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 3060", "--seq", "4096"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 1 and "16 ×" not in out and "Nothing fits as asked" in out
    assert "more GPUs cannot help" in out and "The nearest plans that fit" in out
    assert "tuneplan estimate meta-llama/Llama-3.1-8B --gpu rtx-3060" in out  # on the card asked about
    assert "on another card" in out  # and the next card, with its cost
    code, adv = _json(["recommend", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 3060", "--seq", "4096", "--gpus", "1"],
                      capsys)
    assert adv["choice"] is None and any(n["gpu_id"] == "rtx-3060" for n in adv["nearest"])


def test_an_out_of_memory_estimate_lists_the_nearest_plans_and_no_time(capsys):
    code, out = _json(["estimate", "meta-llama/Llama-3.1-8B", "--gpu", "a100-80gb", "--method", "full",
                       "--precision", "amp-bf16"], capsys)
    assert out["gpu"]["status"] == "oom" and out["time"] is None and "no time or cost" in out["time_note"]
    assert out["nvidia_smi_bytes"] is None  # nothing to read on a card it does not fit
    assert any(n["changes"] == {"hardware.gpus": 4, "hardware.zero": 3} for n in out["nearest"])


@pytest.mark.slow
def test_nvidia_smi_never_reads_above_the_card(capsys):
    """Where only the allocator's cache is over the card, nvidia-smi reads the card's memory and the run goes
    on at its limit; the reserve with no card limit stays in --json under its own name."""
    for seq in range(5000, 8000, 250):
        code, out = _json(["estimate", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--seq", str(seq)], capsys)
        if out["gpu"]["cache_limited"]:
            break
    else:
        pytest.fail("no cache-limited plan found")
    assert out["peak_reserved_bytes"] > out["gpu"]["memory_bytes"] == out["nvidia_smi_bytes"]
    main(["estimate", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--seq", str(seq)])
    text = capsys.readouterr().out
    assert "nvidia-smi (at the card's limit)" in text and "peak reserved, no card limit" in text


@pytest.mark.slow
def test_one_job_from_recommend_save_to_estimate_plan(tmp_path, capsys):
    """recommend --epochs 2 --examples 5000 --save wrote run.epochs 1.0 and the default job; estimate --plan then
    timed 1000 x 512 x 3. Now the plan carries the job, and every command times the same one."""
    plan = tmp_path / "p.yaml"
    code, adv = _json(["recommend", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--epochs", "2", "--examples",
                       "5000", "--save", str(plan)], capsys)
    assert code == 0
    code, est = _json(["estimate", "--plan", str(plan)], capsys)
    assert est["time"]["tokens"] == 5000 * 512 * 2 == adv["job"]["tokens"]
    assert est["time"]["hours"] == pytest.approx(adv["choice"]["hours"], rel=1e-6)
    code, est2 = _json(["estimate", "--plan", str(plan), "job.examples=100"], capsys)  # overrides as run reads them
    assert est2["time"]["tokens"] == 100 * 512 * 2
    assert main(["run", str(plan), "--dry-run", "data.path=/dev/null"]) in (0, 2)
    capsys.readouterr()
