"""--max seq / --max batch: the value's expected peak (the allocator's cache included) is on the card
and one step beyond is not; beyond it, launchable_value is the last the one fit policy still calls
launchable (only the cache over the card) and one more is out of memory; over several models and
GPUs; fast; bad input gets one clear message."""

from __future__ import annotations

import time

import pytest

from advisor.gpus import find_gpu
from advisor.limits import limit, max_batch, max_seq
from advisor.memory import estimate
from advisor.model import resolve
from advisor.policy import breakdown_verdict
from advisor.problems import Problems
from advisor.spec import Plan

CASES = [
    ("meta-llama/Llama-3.1-8B", "rtx-4090", "qlora"),
    ("meta-llama/Llama-3.1-8B", "a100-80gb-sxm", "lora"),
    ("Qwen/Qwen2.5-0.5B", "t4", "full"),
    ("Qwen/Qwen2.5-7B", "l4", "qlora"),
    ("mistralai/Mistral-7B-v0.1", "h100-sxm", "lora"),
    ("Qwen/Qwen2.5-1.5B", "h100-sxm", "full"),
    ("google/gemma-2-2b", "rtx-3060", "lora"),
]


def plan(method: str, gpu, **training) -> Plan:
    precision = "bf16" if gpu.bf16 else ("amp-fp16" if method == "full" else "fp16")
    return Plan.model_validate({"training": {"method": method, "precision": precision, **training},
                                "hardware": {"gpu": None}})


def fits(p: Plan, shape, gpu) -> bool:
    return breakdown_verdict(estimate(p, shape), gpu.memory_bytes).fits


def on_card(p: Plan, shape, gpu) -> bool:
    v = breakdown_verdict(estimate(p, shape), gpu.memory_bytes)
    return v.fits and not v.cache_limited


def check_edges(lim, p: Plan, shape, g, knob: str) -> None:
    at = lambda v: changed(p, **{knob: v})  # noqa: E731
    if lim.value:
        assert on_card(at(lim.value), shape, g)
    if lim.next_value is not None:
        assert lim.next_value == lim.value + 1 and not on_card(at(lim.next_value), shape, g)
        assert lim.next_need_bytes > lim.capacity_bytes
    last = lim.launchable_value
    if last is None:  # nothing between: one past the value is out of memory
        assert lim.next_value is None or not fits(at(lim.next_value), shape, g)
    else:
        assert last > lim.value and fits(at(last), shape, g) and breakdown_verdict(
            estimate(at(last), shape), g.memory_bytes).cache_limited
        assert last == lim.cap or not fits(at(last + 1), shape, g)


def changed(p: Plan, **kw) -> Plan:
    return p.model_copy(update={"training": p.training.model_copy(update=kw)})


@pytest.mark.parametrize("model, gpu, method", CASES)
@pytest.mark.slow
def test_max_seq_fits_and_one_more_does_not(model, gpu, method):
    shape, g = resolve(model), find_gpu(gpu)
    p = plan(method, g, micro_batch=1)
    lim = max_seq(p, shape, g)
    assert lim.knob == "seq_len" and 1 <= lim.value <= shape.max_position
    assert lim.status in ("fits", "tight")
    if lim.next_value is None:
        assert lim.value == shape.max_position and lim.capped_by == "max_position"
    check_edges(lim, p, shape, g, "seq_len")
    assert lim.need_bytes == estimate(changed(p, seq_len=lim.value), shape).peak_reserved_bytes
    assert lim.tokens_per_s_per_gpu > 0 and lim.step_s > 0


@pytest.mark.parametrize("model, gpu, method", CASES)
def test_max_batch_fits_and_one_more_does_not(model, gpu, method):
    shape, g = resolve(model), find_gpu(gpu)
    p = plan(method, g, seq_len=1024)
    lim = max_batch(p, shape, g)
    if lim.value == 0:
        assert not on_card(changed(p, micro_batch=1), shape, g) and lim.next_value == 1
    check_edges(lim, p, shape, g, "micro_batch")


def test_seq_is_capped_by_max_position():
    shape, g = resolve("openai-community/gpt2"), find_gpu("h200")
    lim = max_seq(plan("lora", g), shape, g)
    assert lim.value == shape.max_position == 1024 and lim.next_value is None and lim.capped_by == "max_position"


def test_nothing_fits_is_zero_with_the_need_at_one():
    shape, g = resolve("meta-llama/Llama-3.1-70B"), find_gpu("t4")
    lim = max_batch(plan("full", g), shape, g)
    assert lim.value == 0 and lim.status == "oom" and lim.need_bytes > g.memory_bytes
    assert lim.tokens_per_s_per_gpu is None
    assert lim.as_json()["value"] == 0


def test_limits_are_fast():
    shape, g = resolve("meta-llama/Llama-3.1-8B"), find_gpu("a100")
    p = plan("qlora", g)
    t = time.perf_counter()
    max_seq(p, shape, g)
    max_batch(p, shape, g)
    assert time.perf_counter() - t < 0.5  # well under a second for both


def test_bad_input_messages():
    shape, g = resolve("Qwen/Qwen2.5-0.5B"), find_gpu("a100")
    with pytest.raises(Problems) as e:
        limit(plan("lora", g), shape, g, "width")
    assert e.value.items[0].field == "max" and "seq or --max batch" in e.value.items[0].fix
    with pytest.raises(Problems) as e:
        max_seq(plan("lora", g), shape, None)
    assert e.value.items[0].field == "hardware.gpu"
    inference = Plan.model_validate({"task": "inference", "hardware": {"gpu": None}})
    with pytest.raises(Problems) as e:
        max_batch(inference, shape, g)
    assert e.value.items[0].field == "task"


def test_on_card_expectation_never_passes_the_card():
    from advisor.policy import fit_verdict

    gib = 1024**3
    cached = fit_verdict(98 * gib, 80 * gib, 102 * gib, floor=70 * gib)  # only the cache is over the card
    assert cached.status == "tight" and cached.cache_limited and cached.on_card_bytes == 80 * gib
    assert cached.as_json()["on_card_bytes"] == 80 * gib
    plain = fit_verdict(60 * gib, 80 * gib, 63 * gib, floor=50 * gib)
    assert not plain.cache_limited and plain.on_card_bytes == 60 * gib
    oom = fit_verdict(98 * gib, 80 * gib, floor=85 * gib)
    assert oom.status == "oom" and oom.on_card_bytes == 98 * gib  # what it would need
