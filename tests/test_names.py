"""Names a user types that mean more than they say: a GPU name with a count in it ('2x a100'), a GPU name
that fits several cards ('a100'), and the precisions (pure bf16 against amp-bf16, pure fp16's underflow)."""

from __future__ import annotations

import pytest
import torch

from advisor.cli.main import main
from advisor.gpus import GpuError, find_gpu, gpu_name_note, lookup_gpu, split_count


# --- a count in a GPU name --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, count, card", [
    ("2x a100", 2, "a100"), ("2 x H100", 2, "H100"), ("8xH100", 8, "H100"), ("a100 x2", 2, "a100"),
    ("h100x8", 8, "h100"), ("a100 x 4", 4, "a100"), ("4*a100", 4, "a100"), ("2×h100", 2, "h100"),
    ("a100 (x8)", 8, "a100"), ("8 gpus a100", 8, "a100"), ("a100 8 gpus", 8, "a100"), ("2 rtx 4090", 2, "rtx 4090"),
    ("1x a100-40gb", 1, "a100-40gb"),
])
def test_a_count_in_the_gpu_name_is_read_and_refused_with_the_fix(name, count, card):
    assert split_count(name) == (count, card)
    with pytest.raises(GpuError) as e:
        find_gpu(name)
    message = str(e.value)
    assert f"({card})" in message and f"--gpus {count}" in message and f"hardware.gpus: {count}" in message


@pytest.mark.parametrize("name", ["rtx 3090", "3090", "4090", "rtx 6000 ada", "6000 ada", "rtx 4060 ti", "t4",
                                  "a100-80gb-sxm", "NVIDIA A100-SXM4-80GB", "RTX 4090 24GB", "mi300x", "h200"])
def test_card_names_with_digits_are_no_count(name):
    assert split_count(name) is None
    find_gpu(name)


@pytest.mark.parametrize("argv", [
    ["estimate", "Qwen/Qwen2.5-0.5B", "--gpu", "2x a100"],
    ["recommend", "Qwen/Qwen2.5-0.5B", "--gpu", "8xH100"],
])
def test_the_cli_refuses_a_counted_gpu_name_in_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "holds a count" in err and "--gpus" in err


# --- a name that fits several cards ---------------------------------------------------------------------
@pytest.mark.parametrize("name, picked, others", [
    ("a100", "a100-80gb-sxm", {"a100-40gb", "a100-80gb-pcie"}),
    ("h100", "h100-sxm", {"h100-pcie", "h100-nvl"}),
    ("v100", "v100-16gb", {"v100-32gb"}),
    ("a100 80gb", "a100-80gb-sxm", {"a100-80gb-pcie"}),
])
def test_an_ambiguous_name_says_which_card_it_picked_and_the_others(name, picked, others):
    m = lookup_gpu(name)
    assert m.gpu.id == picked and {g.id for g in m.others} == others
    note = gpu_name_note(name)
    assert note and m.gpu.name in note and all(f"({o})" in note for o in others)


@pytest.mark.parametrize("name", ["a100-80gb-sxm", "NVIDIA A100 SXM 80GB", "a100-40gb", "a100 pcie", "h100 nvl",
                                  "RTX 4090", "4090", "a10", "l40s", "t4", "h200"])
def test_a_name_of_one_card_has_no_note(name):
    assert gpu_name_note(name) is None


def test_a_name_that_fits_several_cards_and_no_alias_lists_them():
    with pytest.raises(GpuError, match=r"fits \d+ cards: .*\(rtx-3090\), .*\(rtx-4090\).*; name one of them"):
        find_gpu("rtx")
    with pytest.raises(GpuError, match="names a maker, not a card"):
        find_gpu("NVIDIA")
    assert gpu_name_note(None) is None and gpu_name_note("no such card") is None


# --- precisions -----------------------------------------------------------------------------------------
def _full(precision: str, method: str = "full"):
    from advisor.spec import build_plan

    return build_plan({"model": {"ref": "Qwen/Qwen2.5-0.5B"}, "hardware": {"gpu": None},
                       "training": {"method": method, "precision": precision, "optimizer": "adamw"}}).training


@pytest.mark.parametrize("precision, held, step", [("bf16", 8, 10), ("amp-bf16", 16, 20), ("fp32", 16, 20)])
def test_the_bytes_the_precision_words_state_are_the_memory_models(precision, held, step):
    """PRECISION_WORDS (the --help, the plan field, the notes) say what advisor.memory counts for a full
    fine-tune with AdamW: weights + gradients + the two states, then the optimizer step's temporary."""
    from advisor import memory
    from advisor.model import resolve
    from advisor.spec import PRECISION_WORDS

    shape, t = resolve("Qwen/Qwen2.5-0.5B"), _full(precision)
    n = memory.trained_params(shape, t)
    assert n == shape.params_total  # no tower: every weight is trained
    per = (memory.weights_bytes(shape, t) + memory.gradients_bytes(shape, t)
           + memory.optimizer_states_bytes(shape, t)) / n
    assert per == held
    assert per + memory.optimizer_step_transient_bytes(shape, t, "cuda") / n == step
    words = PRECISION_WORDS["amp-bf16" if precision == "fp32" else precision]
    assert f"{held} bytes per parameter, {step} during the optimizer step" in words


def test_lora_adapters_are_fp32_whatever_the_precision():
    from advisor import memory
    from advisor.model import resolve

    shape = resolve("Qwen/Qwen2.5-0.5B")
    for precision in ("bf16", "fp16", "amp-bf16"):
        t = _full(precision, "lora")
        assert memory.optimizer_states_bytes(shape, t) == 8 * memory.trained_params(shape, t)


def test_precision_notes():
    from advisor.policy import precision_note

    fp16 = precision_note("full", "fp16", "adamw")
    assert "amp-fp16" in fp16 and "underflows" in fp16 and "GradScaler" in fp16
    bf16 = precision_note("full", "bf16", "adamw")
    assert "pure bf16" in bf16 and "8 bytes per parameter" in bf16 and "amp-bf16" in bf16
    assert "fp32" in precision_note("lora", "amp-bf16", "adamw")
    for quiet in (("full", "amp-bf16", "adamw"), ("full", "amp-fp16", "adamw"), ("lora", "bf16", "adamw"),
                  ("qlora", "bf16", "adamw"), ("lora", "fp16", "adamw"), ("full", "fp32", "adamw")):
        assert precision_note(*quiet) is None, quiet


def test_what_the_fp16_and_bf16_notes_say_is_what_torch_does():
    """The real stack, as the notes word it: AdamW on fp16 weights with gradients of 1e-4 keeps a second moment
    of 0 (g² underflows fp16) and turns weights to NaN; on bf16 weights of 1.0 an lr of 1e-5 changes none of
    them (the update is below bf16's resolution); fp32 changes every one. GradScaler refuses fp16 gradients."""
    torch.manual_seed(0)
    grad = torch.randn(1000) * 1e-4
    changed, state = {}, {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p = torch.nn.Parameter(torch.ones(1000, dtype=dtype))
        opt = torch.optim.AdamW([p], lr=1e-5, foreach=False)
        for _ in range(3):
            p.grad = grad.to(dtype)
            opt.step()
        changed[dtype] = int((p.detach() != 1).sum())
        state[dtype] = opt.state[p]["exp_avg_sq"]
        if dtype == torch.float16:
            assert torch.isnan(p.detach()).any() or torch.isinf(p.detach()).any()
    assert int((state[torch.float16] == 0).sum()) == 1000
    assert changed[torch.bfloat16] == 0 and changed[torch.float32] == 1000
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = torch.optim.AdamW([p])
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((p.float() * 2).sum()).backward()
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_(opt)


def test_the_precision_help_says_which_is_which(capsys):
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "bf16 = pure bf16" in text and "amp-bf16 = mixed: fp32 master weights" in text
    assert "use amp-fp16" in text
    from advisor.spec import TrainSpec

    described = TrainSpec.model_fields["precision"].description
    assert "pure bf16" in described and "16 bytes per parameter" in described
