"""The step-time model: parts add up, physics-shaped monotonicity, the calibration's promise on held-out
rows, the job's time and cost, and one clear message for each bad input."""

from __future__ import annotations

import math
import time

import pytest

from advisor import throughput as tp
from advisor.gpus import Gpu, find_gpu
from advisor.model import resolve
from advisor.problems import Problems
from advisor.spec import Plan

LLAMA8 = "meta-llama/Llama-3.1-8B"


def plan(**training) -> Plan:
    hw = training.pop("hardware", {})
    return Plan.model_validate({"training": training, "hardware": {"gpu": None, **hw}})


def tps(p: Plan, model: str = LLAMA8, gpu: str = "a100-80gb-sxm") -> float:
    return tp.step_time(p, resolve(model), find_gpu(gpu)).tokens_per_s


def test_parts_add_up_and_are_non_negative():
    st = tp.step_time(plan(method="lora", micro_batch=4, seq_len=2048), resolve(LLAMA8), find_gpu("a100"))
    assert st.step_s == pytest.approx(sum(st.parts.values()))
    assert all(v >= 0 for v in st.parts.values())
    assert st.tokens_per_step == 4 * 2048


@pytest.mark.parametrize("gpu", ["a100-80gb-sxm", "h100-sxm", "rtx-4090", "l4"])
def test_bigger_micro_steps_are_never_slower_per_token(gpu):
    rates = [tps(plan(method="lora", micro_batch=b, seq_len=1024), gpu=gpu) for b in (1, 2, 4, 8)]
    assert rates == sorted(rates)


def test_method_and_checkpointing_order():
    full, lora, qlora = (tps(plan(method=m, micro_batch=4, seq_len=2048)) for m in ("full", "lora", "qlora"))
    assert lora > qlora  # dequantization and the fp32 head
    # no weight gradients for the frozen weights; with adapters on every linear layer peft's fp32
    # wrappers cost about as much again, so LoRA on q,v is the one that must beat full fine-tuning
    qv = tps(plan(method="lora", micro_batch=4, seq_len=2048, lora={"targets": ["q_proj", "v_proj"]}))
    assert qv > full and qv > lora
    assert tps(plan(method="lora", micro_batch=4, seq_len=2048, grad_checkpointing=False)) > lora


def test_attention_grows_with_the_sequence_and_eager_costs_more():
    shape, gpu = resolve(LLAMA8), find_gpu("a100")
    short = tp.step_time(plan(method="lora", micro_batch=1, seq_len=2048), shape, gpu).parts["attention_s"]
    long = tp.step_time(plan(method="lora", micro_batch=1, seq_len=8192), shape, gpu).parts["attention_s"]
    assert long == pytest.approx(16 * short, rel=1e-6)  # 4x tokens x 4x context per token
    eager = tp.step_time(plan(method="lora", micro_batch=1, seq_len=8192, attn_impl="eager"), shape, gpu)
    assert eager.parts["attention_s"] > long


def test_faster_card_is_faster_and_more_gpus_add_throughput():
    p = plan(method="lora", micro_batch=4, seq_len=2048)
    assert tps(p, gpu="h100-sxm") > tps(p, gpu="a100-80gb-sxm") > tps(p, gpu="a10")
    one = tps(p)
    p8 = plan(method="lora", micro_batch=4, seq_len=2048, hardware={"gpus": 8, "zero": 3})
    per_gpu = tps(p8)
    assert per_gpu <= 1.01 * one  # communication costs; only the sharded optimizer step gets cheaper
    assert 8 * per_gpu > 4 * one  # ...but eight GPUs still beat one by a lot over NVLink


def test_pcie_is_slower_than_nvlink_for_zero3():
    shape = resolve(LLAMA8)
    p = plan(method="full", micro_batch=2, seq_len=2048, hardware={"gpus": 4, "zero": 3})
    nv = tp.step_time(p, shape, find_gpu("a100-80gb-sxm")).parts["comm_exposed_s"]
    pcie = tp.step_time(p, shape, find_gpu("a100-80gb-pcie")).parts["comm_exposed_s"]
    assert pcie > nv


def test_held_out_plain_stack_rows_meet_the_goal():
    """The issue's goal on the held-out fms a100_80gb rows (never fitted): median within 15%, none over 30%."""
    from benchmarks import throughput as bench

    errs = [abs(r.predicted() / r.measured - 1) for r in bench.rows(("validation",), "fms")]
    errs.sort()
    assert errs[len(errs) // 2] <= 0.15 and errs[-1] <= 0.30, errs


def test_job_time_and_cost():
    p, shape, gpu = plan(method="qlora", micro_batch=2, seq_len=2048), resolve(LLAMA8), find_gpu("a100")
    j = tp.job_time(p, shape, gpu, examples=1000, avg_tokens=512, epochs=3)
    assert j.tokens == 1000 * 512 * 3
    assert j.hours == pytest.approx(j.tokens / j.tokens_per_s_per_gpu / 3600)
    assert j.hours_low < j.hours < j.hours_high
    assert j.cost_usd == pytest.approx(j.hours * gpu.price_usd_hour)
    assert j.cost_low < j.cost_usd < j.cost_high and j.cost_note is None
    assert "range" in j.assumptions and "\n" not in j.assumptions
    d = j.as_json()
    assert {"step_s", "tokens_per_s_per_gpu", "tokens", "hours", "hours_low", "hours_high", "cost_usd",
            "cost_low", "cost_high", "cost_note", "assumptions"} <= set(d)
    twice = tp.job_time(p, shape, gpu, examples=1000, avg_tokens=512, epochs=6)
    assert twice.hours == pytest.approx(2 * j.hours)


def test_recommend_gpu_table_and_job_time_share_one_model():
    from advisor.recommend import train_hours

    p, shape, gpu = plan(method="lora", micro_batch=2, seq_len=1024), resolve(LLAMA8), find_gpu("rtx-4090")
    j = tp.job_time(p, shape, gpu, examples=500, avg_tokens=300, epochs=2)
    assert train_hours(shape, p, gpu, 1, 0, j.tokens) == pytest.approx(j.hours)


def test_gpu_without_a_price_still_gets_time_and_says_why_no_cost():
    gpu = find_gpu("v100-32gb")
    assert gpu.price_usd_hour is None
    j = tp.job_time(plan(method="lora", precision="fp16"), resolve(LLAMA8), gpu, 100, 256, 1)
    assert j.hours > 0 and j.cost_usd is None and j.cost_low is None
    assert "no hourly price" in j.cost_note


@pytest.mark.parametrize("kw, field, words", [
    ({"examples": 0}, "job.examples", "at least 1"),
    ({"epochs": -1.0}, "run.epochs", "above 0"),
    ({"epochs": math.inf}, "run.epochs", "finite"),
    ({"epochs": math.nan}, "run.epochs", "finite"),
    ({"avg_tokens": 0}, "job.avg_tokens", "at least 1"),
])
def test_bad_job_inputs_get_one_clear_message(kw, field, words):
    args = {"examples": 100, "avg_tokens": 256, "epochs": 1.0, **kw}
    with pytest.raises(Problems) as e:
        tp.job_time(plan(), resolve(LLAMA8), find_gpu("a100"), **args)
    assert len(e.value.items) == 1
    p = e.value.items[0]
    assert p.field == field and words in p.what and p.fix


def test_every_bad_job_input_is_reported_at_once():
    with pytest.raises(Problems) as e:
        tp.job_time(plan(), resolve(LLAMA8), find_gpu("a100"), examples=0, avg_tokens=0, epochs=-1)
    assert {p.field for p in e.value.items} == {"job.examples", "job.avg_tokens", "run.epochs"}


def _gpu(**changes) -> Gpu:
    from dataclasses import replace

    return replace(find_gpu("a100"), **changes)


def test_unknown_interconnect_is_a_clear_message():
    p = plan(method="lora", hardware={"gpus": 2, "zero": 3})
    with pytest.raises(Problems) as e:
        tp.step_time(p, resolve(LLAMA8), _gpu(interconnect="carrier-pigeon"))
    assert e.value.items[0].field == "hardware.gpu" and "unknown interconnect" in e.value.items[0].what
    assert "nvlink" in e.value.items[0].fix


def test_several_gpus_without_an_interconnect_is_a_clear_message():
    p = plan(method="lora", hardware={"gpus": 2, "zero": 3})
    with pytest.raises(Problems) as e:
        tp.step_time(p, resolve(LLAMA8), find_gpu("apple-m3-max-128gb"))
    assert e.value.items[0].field == "hardware.gpus"


def test_every_profile_gets_a_time_on_one_gpu():
    from advisor.gpus import gpu_table

    shape = resolve("Qwen/Qwen2.5-0.5B")
    for g in gpu_table().values():
        p = plan(method="lora", precision="bf16" if g.bf16 else "fp16")
        assert tp.step_time(p, shape, g).step_s > 0, g.id
        assert g.interconnect in tp.INTERCONNECTS, g.id


def test_user_gpu_file_interconnect_fields(tmp_path, monkeypatch):
    from advisor import gpus

    f = tmp_path / "gpus.yaml"
    f.write_text("gpus:\n  - {id: mycard, name: My Card, memory_gib: 24, fp16_tflops: 100, bandwidth_gbs: 900,\n"
                 "     interconnect: NVLink, link_gbs: 200, gpus_per_node: 4, internode_gbs: 50}\n"
                 "  - {id: plain, name: Plain Card, memory_gib: 24, fp16_tflops: 100, bandwidth_gbs: 900}\n")
    monkeypatch.setenv("TUNEPLAN_GPUS", str(f))
    gpus._load.cache_clear()
    try:
        g = gpus.find_gpu("mycard")
        assert (g.interconnect, g.link_gbs, g.gpus_per_node, g.internode_gbs) == ("nvlink", 200, 4, 50)
        plain = gpus.find_gpu("plain")
        assert (plain.interconnect, plain.link_gbs) == ("pcie", 32.0)  # the stated defaults
        # beyond one node the ring crosses the slower network
        assert tp.link_bandwidth(g, 8) == 50e9 and tp.link_bandwidth(g, 4) == 200e9
    finally:
        gpus._load.cache_clear()


def test_time_is_fast():
    p, shape, gpu = plan(method="qlora"), resolve(LLAMA8), find_gpu("a100")
    tp.job_time(p, shape, gpu, 1000, 512, 3)
    t = time.perf_counter()
    for _ in range(200):
        tp.job_time(p, shape, gpu, 1000, 512, 3)
    assert (time.perf_counter() - t) / 200 < 0.002  # the whole estimate with time must stay under 5 ms


def test_throughput_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, advisor.throughput, advisor.limits; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_recommend_choice_time_equals_job_time_of_its_plan():
    """The estimate's time fields (job_time) and recommend's option agree for the same plan."""
    from advisor.recommend import recommend

    shape, gpu = resolve(LLAMA8), find_gpu("rtx-4090")
    base = Plan.model_validate({"hardware": {"gpu": None}})
    adv = recommend(shape, base, gpu, gpus=None, examples=1000, avg_tokens=512, epochs=3)
    c = adv.choice
    t = base.training.model_copy(update={"method": c.method, "precision": c.precision, "micro_batch": c.micro_batch,
                                         "grad_accum": c.grad_accum, "grad_checkpointing": c.gradient_checkpointing})
    hw = base.hardware.model_copy(update={"gpus": c.num_gpus, "zero": c.zero})
    j = tp.job_time(base.model_copy(update={"training": t, "hardware": hw}), shape, gpu, 1000, 512, 3)
    assert j.hours == pytest.approx(c.hours) and j.cost_usd == pytest.approx(c.cost_usd)
    assert j.tokens_per_s_per_gpu == pytest.approx(c.tokens_per_s_per_gpu)


def test_unknown_interconnect_in_a_gpu_file_names_the_entry(tmp_path, monkeypatch):
    from advisor import gpus

    f = tmp_path / "gpus.yaml"
    f.write_text("gpus:\n  - {id: odd, name: Odd Card, memory_gib: 24, interconnect: infiniband-ish}\n")
    monkeypatch.setenv("TUNEPLAN_GPUS", str(f))
    gpus._load.cache_clear()
    try:
        with pytest.raises(Problems) as e:
            gpus.find_gpu("odd")
        text = str(e.value)
        assert "Odd Card" in text and "interconnect must be one of nvlink, pcie" in text
    finally:
        gpus._load.cache_clear()
