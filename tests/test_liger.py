"""Liger kernels (training.liger, --liger): the plan, the estimate, the advice, the runner's refusal off CUDA.
liger-kernel is an optional extra (tuneplan[liger]) that CI does not install: nothing here imports it."""

import json
import subprocess
import sys

import pytest

from advisor import liger, service
from advisor.cli.main import main
from advisor.problems import Problems

LLAMA = "meta-llama/Llama-3.1-8B"  # 128,256-token vocabulary, bundled


def _phases(ctx):
    from advisor.memory import training_phases

    return training_phases(ctx.shape, ctx.plan.training, ctx.plan.hardware)


def _ctx(ref=LLAMA, **training):
    t = {"method": "qlora", "seq_len": 4096, "micro_batch": 1, **training}
    return service.build({"model": {"ref": ref}, "training": t, "hardware": {"gpu": "rtx-3060", "gpus": 1}})


def test_the_family_list_is_liger_kernels_own():
    assert liger.supported("llama") and liger.supported("mistral") and liger.supported("qwen2")
    assert liger.supported("gemma2") and liger.supported("phi3")
    assert not liger.supported("gpt2") and not liger.supported("falcon")
    assert len(liger.MODEL_TYPES) == len(set(liger.MODEL_TYPES)) == 50
    assert "ead96b618e5c67bddc6a6e9bcb99bfe6b5ab661c" in liger.SOURCE


def test_a_family_liger_does_not_patch_is_refused_on_its_field():
    with pytest.raises(Problems) as e:
        service.build({"model": {"ref": "openai-community/gpt2"},
                       "training": {"method": "lora", "seq_len": 512, "liger": True}})
    (p,) = [p for p in e.value.items if p.field == "training.liger"]
    assert "no patch for model_type 'gpt2'" in p.what and "training.liger=false" in p.message


def test_the_cli_refuses_it_in_one_line(capsys):
    assert main(["estimate", "openai-community/gpt2", "--seq", "512", "--method", "lora", "--liger"]) == 2
    err = capsys.readouterr().err
    assert "Liger kernels have no patch for model_type 'gpt2'" in err and "Traceback" not in err


def test_the_fused_loss_never_materializes_the_logits():
    """Llama-3.1-8B QLoRA at 4k: the plain loss holds bf16/fp32 logits (128k vocabulary), the fused one only the
    hidden states' gradient, the fp32 loss per token and one chunk of logits (advisor/liger.py)."""
    plain = service.estimate(_ctx()).breakdown
    fused = service.estimate(_ctx(liger=True)).breakdown
    assert _phases(_ctx())["forward_end"]["logits_and_loss"] > 3.5 * 2**30  # 4096 x 128,256 x (4 + 4 + ...)
    lf = _phases(_ctx(liger=True))["forward_end"]["logits_and_loss"]
    tokens, v, h = 4096, 128_256, 4096
    rows = liger.chunk_rows(tokens, v, h)
    assert rows == 128  # next_power_of_2(cdiv(4096, cdiv(128256, 4096)))
    # QLoRA: fp32 residual stream and fp32 head (prepare_model_for_kbit_training): a fp32 chunk, no head gradient
    assert lf == tokens * h * 4 + tokens * 4 + rows * v * 4 + rows * h * 4
    assert fused.peak_allocated_bytes < plain.peak_allocated_bytes - 3 * 2**30
    assert any(n.startswith("Liger kernels: the fused linear cross-entropy") for n in fused.notes)


def test_a_full_fine_tune_keeps_the_heads_gradient_from_the_forward():
    t = {"method": "full", "precision": "bf16", "seq_len": 1024}
    ph = _phases(_ctx(liger=True, **t))
    v, h = 128_256, 4096
    # the head's bf16 gradient made in the forward, plus the hidden states' gradient, at the start of backward
    assert ph["backward_start"]["logits_and_loss"] == 1024 * h * 2 + v * h * 2
    # the forward's widest chunk moment: mm(grad_logits.t(), input) in bf16 and its fp32 copy (.float())
    fwd = ph["forward_end"]["logits_and_loss"]
    assert fwd >= 1024 * h * 2 + v * h * 2 + v * h * 6


def test_without_checkpointing_every_layer_keeps_less():
    """SwiGLU keeps gate and up only, RMSNorm its input: less per layer, all layers without checkpointing."""
    off = _phases(_ctx(seq_len=512, grad_checkpointing=False))
    on = _phases(_ctx(seq_len=512, grad_checkpointing=False, liger=True))
    assert on["forward_end"]["activations"] < off["forward_end"]["activations"]


def test_a_weighted_prompt_loss_says_the_logits_come_back():
    """The runner's prompt_loss_weight loss comes from the logits (Liger's forward returns them without labels)."""
    ctx = service.build({"model": {"ref": LLAMA}, "training": {"liger": True}, "data": {"prompt_loss_weight": 0.1}})
    assert any("prompt_loss_weight" in n for n in service.estimate(ctx).plan_notes)
    assert not any("prompt_loss_weight" in n for n in service.estimate(_ctx(liger=True)).plan_notes)


def test_validation_uses_the_fused_loss_and_the_advice_counts_every_moment():
    """Liger's forward makes the logits whenever the model is not training; the runner's validation passes
    skip_logits=True (advisor.stack.compute_loss), so evaluation holds no logits either (advisor.liger.eval_loss_bytes).
    With a weighted prompt loss the logits come back, evaluation becomes the run's peak, and the advice, which
    counts every moment of the run, calls that plan out of memory on a 12 GB card."""
    from advisor.gpus import find_gpu
    from advisor.lifecycle import evaluation
    from advisor.recommend import advice_fit

    savers = {"liger": True, "optimizer": "paged_adamw_8bit", "offload_activations": True}
    ctx = _ctx(**savers)
    t = ctx.plan.training
    tokens, v = 4096, ctx.shape.vocab_size
    assert liger.eval_loss_bytes(ctx.shape, t) == tokens * 4096 * 4 + tokens * 4 + 128 * v * 4  # fp32 head: QLoRA
    plain = evaluation(_ctx().plan, ctx.shape)
    assert evaluation(ctx.plan, ctx.shape).tensor_bytes < plain.tensor_bytes - 3 * 2**30  # 3.9 GiB of fp32 logits
    card = find_gpu("rtx-3060")
    assert advice_fit(ctx.plan, ctx.shape, card).status != "oom"
    weighted = service.build({"model": {"ref": LLAMA}, "hardware": {"gpu": "rtx-3060"},
                              "data": {"prompt_loss_weight": 0.5},
                              "training": {"method": "qlora", "seq_len": 4096, **savers}})
    fit = advice_fit(weighted.plan, weighted.shape, card)
    assert fit.status == "oom" and "evaluation" in (fit.margin or "")


def test_the_fused_loss_is_asked_for_through_a_ddp_wrapper():
    import torch

    from advisor.stack import _liger_patched

    model = torch.nn.Linear(2, 2)
    assert not _liger_patched(model)
    model.tuneplan_liger = True
    wrapper = torch.nn.Module()
    wrapper.module = model  # DDP keeps the model as .module and forwards no attribute
    assert _liger_patched(wrapper) and _liger_patched(model)


def test_simulate_says_it_cannot_run_triton(capsys):
    assert main(["estimate", LLAMA, "--seq", "512", "--liger", "--mode", "simulate"]) == 2
    err = capsys.readouterr().err
    assert "fake tensors cannot run" in err and "--mode analytic" in err


def test_the_flag_round_trips_through_the_plan_command(capsys):
    assert main(["estimate", LLAMA, "--seq", "2048", "--liger", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["training"]["liger"] is True
    from advisor.cli.common import plan_command
    from advisor.spec import build_plan

    plan = build_plan({"model": {"ref": LLAMA}, "training": {"liger": True}})
    assert "--liger" in plan_command(plan)


def test_the_ladder_offers_liger_with_its_time():
    """Llama-3.1-8B QLoRA at 4k on a 12 GB card does not fit as it is; a nearest plan that fits uses Liger."""
    ctx = _ctx()
    opts = service.nearest_plans(ctx)
    with_liger = [o for o in opts if getattr(o, "plan", None) is not None and o.plan.training.liger]
    assert with_liger, [getattr(o, "what", o) for o in opts]
    assert all(o.hours is not None for o in with_liger)


def test_the_time_model_counts_liger_faster():
    from advisor import throughput
    from advisor.gpus import gpu_table

    ctx = _ctx(seq_len=2048)
    gpu = gpu_table()["a100-80gb-sxm"]
    plain = throughput.step_time(ctx.plan, ctx.shape, gpu)
    fused = throughput.step_time(_ctx(seq_len=2048, liger=True).plan, ctx.shape, gpu)
    assert fused.step_s < plain.step_s
    assert fused.parts["loss_s"] < plain.parts["loss_s"] / 5
    assert fused.parts["elementwise_s"] < plain.parts["elementwise_s"]


def test_the_runner_refuses_liger_off_cuda_before_loading_anything(tmp_path, tiny_model_dir):
    """A real `python -m runner` on the CPU: one line, exit 2, no run directory left behind; --dry-run still
    prepares the command for a rented machine (the demo's tiny Llama, a family Liger patches)."""
    from runner.demo import DEMO_DATA
    from tests.conftest import cpu_plan_file, runner_env

    model = tiny_model_dir
    plan = cpu_plan_file(tmp_path / "plan.yaml", model, DEMO_DATA, training={"liger": True})
    r = subprocess.run([sys.executable, "-m", "runner", str(plan)], capture_output=True, text=True,
                       env=runner_env(), timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Liger kernels run on an NVIDIA GPU with Triton" in r.stderr and "Traceback" not in r.stderr
    assert "tuneplan[liger]" in r.stderr and "train without Liger" in r.stderr
    assert not (tmp_path / "runs").exists()
    d = subprocess.run([sys.executable, "-m", "runner", str(plan), "--dry-run"], capture_output=True, text=True,
                       env=runner_env(), timeout=300)
    assert d.returncode == 0, d.stderr


def test_loading_refuses_before_reading_the_weights(tmp_path):
    from advisor.spec import TrainSpec
    from advisor.stack import load_for_training

    with pytest.raises(ValueError, match="Liger kernels run on an NVIDIA GPU with Triton"):
        load_for_training(tmp_path / "no-such-model", TrainSpec(method="lora", liger=True), device="cpu")


@pytest.mark.slow  # 16 plans estimated and timed: about a second
def test_the_accuracy_tables_are_current():
    """docs/accuracy.md's Liger block is what benchmarks/liger_memory.py computes now; the calibration rows were
    fixed by source before anything was computed, and the step floor holds them."""
    import benchmarks.liger_memory as lm
    from advisor.units import MIB
    from tests.conftest import ROOT

    rows = lm.csv_rows()
    assert {r["pair"] for r in rows if r["role"] == "calibration"} == {"llama-b32", "llama-b48", "mistral-b32"}
    assert all("github.com/linkedin/Liger-Kernel" in r["source"] and " @ " in r["source"] for r in rows)
    predicted = lm.predict(rows)
    text = (ROOT / "docs" / "accuracy.md").read_text()
    block = text.split("<!-- liger:begin -->\n", 1)[1].split("\n<!-- liger:end -->", 1)[0]
    assert block == lm.markdown(predicted), "stale: run python benchmarks/liger_memory.py --write docs/accuracy.md"
    for r in predicted:  # with Liger the published peak is the step floor on every calibration row
        if r["role"] == "calibration" and r["liger"] == "true":
            assert abs(r["floor"] - r["measured"]) < 0.01 * r["measured"], r["id"]
            assert r["pred_max"] >= r["measured"] - 64 * MIB, r["id"]  # the expected peak is not below it


def test_after_an_out_of_memory_the_runner_suggests_liger_too():
    """service.smaller_plan (the runner's answer to a CUDA out-of-memory error) climbs the same savers, Liger among
    them on CUDA for a family it patches: Llama-3.1-8B QLoRA at 3,072 tokens on a 12 GB card."""
    from advisor.service import expected_peak, smaller_plan

    ctx = _ctx(seq_len=3072)
    got = smaller_plan(ctx.plan, ctx.shape, 12 * 2**30, expected_peak(ctx.plan, ctx.shape))
    assert got is not None and got["changes"]["training.liger"] is True and got["need_bytes"] < 12 * 2**30
    cpu = service.build({"model": {"ref": LLAMA}, "training": {"method": "qlora", "seq_len": 3072},
                         "hardware": {"device": "cpu", "gpu": None}})
    got = smaller_plan(cpu.plan, cpu.shape, None, expected_peak(cpu.plan, cpu.shape))
    assert got is None or "training.liger" not in got["changes"]
