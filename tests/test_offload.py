"""Offloaded activation checkpoints (``--offload-activations``, issue 30 item 3B): the checkpointed layers' inputs
held in host memory (torch's ``save_on_cpu`` around each checkpointed layer, advisor.stack.offload_checkpoints).

Fast tests check the plan, the estimate's terms, the time model and the advice; the slow ones check the stored CPU
measurements (benchmarks/offload_cpu.py) against today's estimate and measure one case again with real training
steps on the CPU, loaded as the runner loads a model."""

import json
from pathlib import Path

import pytest

from advisor.gpus import find_gpu
from advisor.memory import estimate
from advisor.model import resolve
from advisor.problems import Problems
from advisor.spec import build_plan
from advisor.throughput import step_time

ROOT = Path(__file__).resolve().parents[1]
LLAMA = "meta-llama/Llama-3.1-8B"
MIB = 2**20


def _plan(offload=True, gpu="rtx-3060", **training):
    return build_plan({"model": {"ref": LLAMA}, "hardware": {"gpu": gpu},
                       "training": {"method": "qlora", "seq_len": 4096, "grad_checkpointing": True,
                                    "offload_activations": offload, **training}})


def test_offloading_needs_checkpointing():
    with pytest.raises(Problems) as err:
        _plan(grad_checkpointing=False)
    assert "turn checkpointing on" in str(err.value)


def test_the_layers_inputs_leave_the_card_and_wait_in_pinned_host_memory():
    """Llama-3.1-8B QLoRA, one 4,096-token sequence: each layer's input is 4096 x 4096 x 4 bytes = 64 MiB (QLoRA's
    residual stream is fp32: prepare_model_for_kbit_training upcasts the norms). On the card, all but the first
    layer's are gone at the start of backward (with frozen embeddings the first stays: enable_input_require_grads
    makes it a leaf the graph holds); in host RAM all 32 layers' copies, each pinned block a power of two (64 MiB
    already is one)."""
    shape = resolve(LLAMA)
    plain, off = estimate(_plan(False), shape), estimate(_plan(True), shape)
    one = 4096 * 4096 * 4
    assert off.host == {"offloaded_activations": 32 * one} and plain.host == {}
    start = "backward_start"
    assert plain.phases[start] - off.phases[start] == 31 * one
    assert 0 < plain.peak_allocated_bytes - off.peak_allocated_bytes <= 31 * one
    assert any("offloaded checkpoints" in n and "pinned host memory" in n for n in off.notes)


def test_the_copies_cost_time_over_the_host_link_and_nothing_with_unified_memory():
    shape = resolve(LLAMA)
    card = find_gpu("rtx-3060")
    t = step_time(_plan(True), shape, card)
    one = 4096 * 4096 * 4  # one layer's input, fp32 (QLoRA's residual stream)
    from advisor.throughput_terms import HOST_LINK_EFF
    assert t.parts["offload_s"] == pytest.approx(2 * 32 * one / (card.host_link_gbs * 1e9 * HOST_LINK_EFF))
    assert t.step_s > step_time(_plan(False), shape, card).step_s
    mac = find_gpu("apple-m3-max-128gb")
    assert mac.host_link_gbs == 0 and "offload_s" not in step_time(_plan(True, gpu=mac.id), shape, mac).parts


def test_the_advice_offers_offloading_with_its_time():
    from advisor.recommend import nearest_plans

    shape, card = resolve(LLAMA), find_gpu("rtx-3060")
    # with the 8-bit optimizer and Liger's kernels on already (the ladder reaches for both before offloading)
    near = nearest_plans(shape, _plan(False, seq_len=2048, liger=True, optimizer="paged_adamw_8bit"), card, 1e6)
    rungs = [n for n in near if n.changes.get("training.offload_activations")]
    assert rungs and all(n.status == "fits" and n.hours is not None for n in rungs)
    assert any("offloaded to host RAM" in n.what for n in rungs)


@pytest.mark.slow  # the tiny configs' meta counts and simulate: a few seconds
def test_stored_offload_measurements_match_the_estimate_and_the_docs():
    from benchmarks import offload_cpu as f

    rows = json.loads(f.RESULTS.read_text())
    assert [r["id"] for r in rows] == [f.case_id(c) for c in f.CASES]
    for r in rows:
        assert r["offload"]["losses"][-1] < r["offload"]["losses"][0]  # it trains
        ours = f.estimate_of(r, True)
        assert ours["host_peak_bytes"] == r["offload"]["host_peak_bytes"], r["id"]  # host side exact
        assert abs(ours["peak_bytes"] / r["offload"]["peak_bytes"] - 1) < 0.035, r["id"]
        assert abs(f.simulate_of(r, True) / r["offload"]["peak_bytes"] - 1) < 0.01, r["id"]
    text = (ROOT / "docs" / "accuracy.md").read_text()
    block = text.split("<!-- offloadcpu:begin -->\n", 1)[1].split("\n<!-- offloadcpu:end -->", 1)[0]
    sims = {r["id"]: f.simulate_of(r, True) for r in rows}
    assert block == f.markdown(rows, sims), \
        "stale: run python -m benchmarks.offload_cpu --table --write docs/accuracy.md"


@pytest.mark.slow
def test_a_real_cpu_run_with_offload_matches_its_estimate():
    """Three real training steps of a tiny Llama with LoRA, loaded as the runner loads it, offload off and on: host
    memory up by every layer's input, device tensors down, as the estimate says."""
    from benchmarks import offload_cpu as f

    row = f.measure(("llama", "lora", "bf16", 2, 256, None))
    ours = f.estimate_of(row, True)
    assert row["offload"]["host_peak_bytes"] == ours["host_peak_bytes"] > 0
    assert row["offload"]["device_peak_bytes"] < row["plain"]["device_peak_bytes"]
    assert abs(ours["device_peak_bytes"] / row["offload"]["device_peak_bytes"] - 1) < 0.01
    assert abs(ours["peak_bytes"] / row["offload"]["peak_bytes"] - 1) < 0.01
