"""LoRA and QLoRA under FSDP, for real: two gloo processes on the CPU load the model as advisor.stack
loads it for FSDP, wrap it with torch's FSDP and the runner's settings (FULL_SHARD, use_orig_params,
BACKWARD_PRE, advisor.stack.fsdp_wrap_policy: each adapter a unit of its own, as transformers' Trainer
sets it) and train (benchmarks/fsdp_cpu.py). Both ranks train, no frozen weight gets a gradient, and
the analytic estimate for 2 GPUs with ZeRO-3 (FSDP full shard) matches each rank's peak of live tensor
bytes: the shards, the unsharded units (the one in backward and the prefetched one) and the root's
unsharded embeddings and head, which FSDP keeps from forward to the end of backward. With the decoder
layer as the only unit (the launch config alone) FSDP refuses fp32 adapters beside bf16 weights.
(accelerate's own FSDP path needs a GPU.)"""

from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[1]

from benchmarks import fsdp_cpu  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in fsdp_cpu.CASES if c[0] == "mistral" and c[2] == 2 and c[1] != "full"],
                         ids=fsdp_cpu.case_id)
def test_fsdp_rank_peak_matches_the_estimate(case):
    row = fsdp_cpu.measure(case)
    ours, _ = fsdp_cpu.estimate_of(row)
    for rank in row["ranks"]:
        assert "error" not in rank and rank["losses"][-1] < rank["losses"][0]  # it trains
        assert rank["frozen_grads"] == 0 and rank["units"] > 2 * 2  # root, layers, every LoRA A and B
        assert abs(ours / rank["peak_bytes"] - 1) < 0.03, (rank, ours)


@pytest.mark.slow
def test_every_rank_keeps_the_whole_4bit_quant_state():
    """FSDP shards parameters only; bitsandbytes' quant state (absmax, nested absmax, code book) is an
    attribute of the 4-bit layer, so each rank holds all of it: as much as the unsharded model, and what
    the estimate keeps whole per GPU (advisor.memory.fsdp_qlora_weights)."""
    from advisor.memory import fsdp_qlora_weights
    from advisor.model import count_on_meta
    from advisor.stack import load_for_training
    from benchmarks.tiny_models import build_tiny

    case = next(c for c in fsdp_cpu.CASES if c[1] == "qlora")
    row = fsdp_cpu.measure(case)
    spec = fsdp_cpu.spec_of(*case[1:])
    whole = fsdp_cpu.quant_state_bytes(load_for_training(build_tiny(case[0]), spec, fsdp=True))
    _, replicated = fsdp_qlora_weights(count_on_meta(row["family"], row["config"]), spec)
    assert whole > 0
    assert [rank["quant_state_bytes"] for rank in row["ranks"]] == [whole, whole]
    assert abs(replicated / whole - 1) < 0.02, (replicated, whole)


@pytest.mark.slow
def test_full_fine_tune_measures_the_same_every_run():
    """gloo's worker thread once let go of a collective's tensors last, on a thread the profiler does not
    see: identical full fine-tuning runs differed by whole gradient buffers (10.54 to 11.66 MiB). With the
    caller outliving gloo (fsdp_cpu._caller_outlives_gloo) every run, and both ranks, measure the same."""
    case = next(c for c in fsdp_cpu.CASES if c[1] == "full" and c[2] == 2)
    row = fsdp_cpu.measure(case, repeats=3)
    ours, _ = fsdp_cpu.estimate_of(row)
    assert all(run == row["peaks"][0] for run in row["peaks"]), row["peaks"]  # to the byte, run to run
    assert abs(row["peaks"][0][0] - row["peaks"][0][1]) < 1024  # the ranks alike
    assert abs(ours / row["ranks"][0]["peak_bytes"] - 1) < 0.01


@pytest.mark.slow
def test_the_layer_policy_alone_cannot_flatten_fp32_adapters_on_a_bf16_base():
    row = fsdp_cpu.measure(fsdp_cpu.CASES[0], policy="layers")
    assert all("uniform dtype" in rank["error"] for rank in row["ranks"])


def test_the_stored_measurements_are_the_cases():
    import json

    rows = json.loads(fsdp_cpu.RESULTS.read_text())
    assert [r["id"] for r in rows] == [fsdp_cpu.case_id(c) for c in fsdp_cpu.CASES]
    assert all(len(r["ranks"]) == 2 for r in rows)


def test_docs_show_what_the_script_computes():
    import json

    md = fsdp_cpu.markdown(json.loads(fsdp_cpu.RESULTS.read_text()))
    doc = (ROOT / "docs" / "accuracy.md").read_text()
    block = doc.split("<!-- fsdpcpu:begin -->\n", 1)[1].split("\n<!-- fsdpcpu:end -->", 1)[0]
    assert block == md, "run: python benchmarks/fsdp_cpu.py --table --write docs/accuracy.md"


def test_docs_show_the_transformers4_fsdp_table():
    import json

    rows = json.loads(fsdp_cpu.RESULTS4.read_text())
    assert {r.get("transformers") for r in rows} == {"4.48"}
    assert [r["id"] for r in rows] == [fsdp_cpu.case_id(c) for c in fsdp_cpu.CASES4]
    md = fsdp_cpu.markdown(rows, four=True)
    doc = (ROOT / "docs" / "accuracy.md").read_text()
    block = doc.split("<!-- fsdpcpu4:begin -->\n", 1)[1].split("\n<!-- fsdpcpu4:end -->", 1)[0]
    assert block == md, "run: python benchmarks/fsdp_cpu.py --table --tf4 --write docs/accuracy.md"


@pytest.mark.slow
def test_full_shard_on_one_rank_costs_nothing_more_per_sequence_on_the_cpu():
    """benchmarks/fsdp_one_device.py lifts torch's clamp of FULL_SHARD to NO_SHARD at world size 1, so
    that a single GPU can show what FULL_SHARD's own machinery holds per token. Its CPU path: the clamp is
    really lifted (FSDP reports FULL_SHARD, and the unsharded buffers beside the shards cost more), the
    step is the same math (the same losses, to rounding), and one more sequence costs exactly what it costs under
    NO_SHARD."""
    from benchmarks import fsdp_one_device as one

    rows = [one.measure(c, "cpu") for c in one.cases("cpu") if c[0] == "lora"]
    assert {(r["asked"], r["strategy"]) for r in rows} == {("no_shard", "NO_SHARD"), ("full_shard", "FULL_SHARD")}
    by = {(r["asked"], r["batch"]): r for r in rows}
    for b in (1, 2):
        assert by[("full_shard", b)]["losses"] == pytest.approx(by[("no_shard", b)]["losses"], rel=1e-4)
        assert by[("full_shard", b)]["peak_bytes"] > by[("no_shard", b)]["peak_bytes"]
        assert by[("no_shard", b)]["losses"][-1] < by[("no_shard", b)]["losses"][0]
    sl = one.slopes(rows)
    assert abs(sl[("lora", "full_shard")] / sl[("lora", "no_shard")] - 1) < 0.01, sl


def test_docs_show_the_one_device_table():
    import json

    from benchmarks import fsdp_one_device as one

    rows = json.loads(one.results_path("cpu").read_text())
    doc = (ROOT / "docs" / "accuracy.md").read_text()
    block = doc.split("<!-- fsdpone:begin -->\n", 1)[1].split("\n<!-- fsdpone:end -->", 1)[0]
    hint = "run: python benchmarks/fsdp_one_device.py --device cpu --table --write docs/accuracy.md"
    assert block == one.markdown(rows, "cpu"), hint
    sl = one.slopes(rows)
    assert all(sl[(m, "full_shard")] == sl[(m, "no_shard")] for m in ("lora", "qlora")), sl
