"""GPU-only terms of the estimate: the calibrated model, its band, the fit it comes from."""

import subprocess
import sys
from pathlib import Path

import pytest

from advisor import gpu_memory as gm
from advisor.memory import estimate
from advisor.model import resolve
from advisor.spec import Plan

ROOT = Path(__file__).resolve().parents[1]


def _plan(device="cuda", gpu="A100 80GB", **t):
    t = {"method": "lora", "precision": "bf16", "micro_batch": 2, "seq_len": 1024, **t}
    return Plan.model_validate({"model": {"ref": "meta-llama/Llama-3.1-8B"}, "training": t,
                                "hardware": {"gpu": gpu, "device": device}})


def test_cpu_has_no_gpu_terms():
    bd = estimate(_plan(device="cpu"), resolve("meta-llama/Llama-3.1-8B"))
    assert bd.overhead == {} and bd.peak_reserved_bytes == bd.peak_allocated_bytes == bd.peak_reserved_high_bytes
    assert "tensors only" in bd.reserved_model


def test_cuda_terms_and_band():
    shape = resolve("meta-llama/Llama-3.1-8B")
    bd = estimate(_plan(), shape)
    assert {"cuda_context", "cublas_workspace", "attention_workspace", "allocator_cache"} <= set(bd.overhead)
    assert "nccl_buffers" not in bd.overhead
    assert bd.peak_reserved_high_bytes > bd.peak_reserved_bytes > bd.peak_allocated_bytes
    assert "calibrated" in bd.reserved_model
    # an uncalibrated generation gets the wider band and says so
    h100 = estimate(_plan(gpu="H100 SXM"), shape)
    assert h100.overhead["cublas_workspace"] > bd.overhead["cublas_workspace"]  # 32 MiB on sm90
    assert (h100.overhead_high / h100.peak_reserved_bytes) > (bd.overhead_high / bd.peak_reserved_bytes)
    assert "no calibration data" in h100.reserved_model
    multi = estimate(Plan.model_validate({**_plan().model_dump(), "hardware": {"gpu": "A100 80GB", "gpus": 2,
                                                                               "zero": 3}}), shape)
    assert multi.overhead["nccl_buffers"] == gm.NCCL_BYTES


def test_arch_table():
    assert gm.arch_of("A100 80GB") == "ampere" and gm.arch_of("h100") == "hopper"
    assert gm.arch_of("RTX 4090") == "ada" and gm.arch_of("T4") == "turing" and gm.arch_of("V100") == "volta"
    assert gm.arch_of("no such card") is None and gm.arch_of(None) is None


def test_allocator_cache_term():
    # activation-dominated: a share of the transient; first step dominated: gradient-sized blocks
    assert gm.allocator_cache_bytes(100, 40, 0) == int(gm.K_FRAG * 60)
    assert gm.allocator_cache_bytes(100, 90, 30) == int(90 + gm.M_FIRST_STEP * 30 - 100)


@pytest.mark.slow
def test_constants_are_the_fit_and_validation_holds():
    from benchmarks import gpu_fit

    rows = gpu_fit.fms_rows()
    p = gpu_fit.fit(rows)
    assert p["ctx"] == gm.CUDA_CONTEXT_BYTES["ampere"] and p["nccl"] == gm.NCCL_BYTES
    assert p["k"] == pytest.approx(gm.K_FRAG) and p["m"] == pytest.approx(gm.M_FIRST_STEP)
    assert p["p90"] == pytest.approx(gm.BAND_P90, abs=5e-4)
    out = gpu_fit.end_to_end(rows)
    assert all(r["verdict"] != "oom" for r in out)  # every published run fitted its 80 GB card
    val = sorted(abs(r["ours_nvidia"] / r["nvidia"] - 1) for r in out if not r["fit"])
    assert val[len(val) // 2] < 0.07  # median within 7% on rows never fitted


def test_modelled_stack_imports_nothing_heavy():
    code = ("import sys; from advisor.gpu_memory import modelled_stack; s = modelled_stack(); "
            "print(sorted(s), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "'bitsandbytes', 'peft', 'torch', 'transformers'" in out.stdout and out.stdout.strip().endswith("False")


def test_moe_qlora_note_and_sharding_terms():
    shape = resolve("mistralai/Mixtral-8x7B-v0.1")
    bd = estimate(_plan(method="qlora", micro_batch=1, seq_len=1024).model_copy(
        update={"model": Plan().model.model_copy(update={"ref": "mistralai/Mixtral-8x7B-v0.1"})}), shape)
    note = next(n for n in bd.notes if n.startswith("mixture of experts"))
    assert "#1849" in note and "fp32" in note and "LoRA in bf16" in note
    dense = estimate(_plan(method="qlora"), resolve("meta-llama/Llama-3.1-8B"))
    assert not any(n.startswith("mixture of experts") for n in dense.notes)
    # DeepSpeed ZeRO-1/2: the IPG bucket during backward; FSDP QLoRA: compute-dtype storage, noted
    ref = "meta-llama/Llama-3.1-8B"
    base = _plan(method="lora").model_dump()
    z2 = estimate(Plan.model_validate({**base, "hardware": {"gpu": "A100 80GB", "gpus": 2, "zero": 2}}), resolve(ref))
    assert z2.phases["backward_start"] >= 500_000_000 * 2
    assert "zero_buckets" in z2.components or z2.peak_phase == "forward_end"
    q = {**_plan(method="qlora").model_dump(), "hardware": {"gpu": "A100 80GB", "gpus": 2, "zero": 3}}
    fq = estimate(Plan.model_validate(q), resolve(ref))
    assert any("bnb_4bit_quant_storage" in n for n in fq.notes)


@pytest.mark.slow
def test_gpu_measure_cpu_path(tmp_path):
    """benchmarks/gpu_measure.py's plumbing on the CPU: a real tiny training run in a subprocess,
    measured by the CPU profiler, written to JSON beside the estimate for the same plan."""
    import json

    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_measure.py"), "--device", "cpu",
                           "--quick", "--limit", "1", "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert case["measured"]["max_allocated"] > 0 and case["predicted"]["allocated"] > 0
    assert abs(case["error_vs_measured"]["allocated"]) < 0.03  # analytic within 3% on the CPU
