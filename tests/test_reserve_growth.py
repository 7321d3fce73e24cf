"""Reserved memory over a run of varying batch shapes (advisor/fragmentation.py): the mechanism replayed through
the caching allocator's rules (advisor/allocator.py), the model's arithmetic, its one constant fitted on the
calibration log alone, and docs/accuracy.md showing what benchmarks/reserve_growth.py computes now."""

import random
from pathlib import Path

import pytest

from advisor.fragmentation import G_GROWTH, grow, over_run
from benchmarks import reserve_growth as rg

ROOT = Path(__file__).resolve().parents[1]


def _new_longest(lengths):
    best, out = 0, []
    for n in lengths:
        out.append(n > best)
        best = max(best, n)
    return out


def test_the_allocator_grows_only_at_a_new_longest_batch_and_not_at_all_when_it_comes_first():
    """PyTorch's caching allocator, rule for rule, on a checkpointed step at shuffled lengths: the reserve
    rises exactly at the steps whose batch is longer than every earlier one and stays put otherwise; with
    the longest batch first (the runner's fail-fast probe) it is at its final value after step 1."""
    rng = random.Random(11)
    lengths = [16 * rng.randint(8, 24) for _ in range(24)]
    reserved, _ = rg.replay(lengths)
    for k in range(1, len(lengths)):
        grew = reserved[k] > reserved[k - 1]
        assert grew == _new_longest(lengths)[k], (k, lengths[: k + 1], reserved[k - 1], reserved[k])
    first, _ = rg.replay([max(lengths), *lengths])
    assert len(set(first)) == 1  # settled from step 1
    assert first[-1] < reserved[-1] * 0.8  # and far below the shuffled order's reserve


def test_the_replayed_share_is_near_the_fitted_one():
    share = rg.replay_share()
    assert 0.85 <= share <= 1.0
    assert abs(share - G_GROWTH) < 0.1


def test_grow_adds_g_times_d_at_each_new_longest_and_stops_at_the_card():
    g = grow(100, [0, 5, 50, 20, 80, 80, 10], start=10, capacity=None, g=0.5)
    assert [s for s, _ in g.records] == [1, 3, 5] and g.settled == 100 + 25 + 40 and g.settle_step == 5
    capped = grow(100, [0, 5, 50, 20, 80], start=10, capacity=130, g=0.5)
    assert capped.settled == 130 and capped.at_limit and capped.records[-1] == (5, 130)


def test_over_run_the_probe_settles_at_step_one():
    shapes = [(4, n) for n in (50, 30, 70, 20, 90, 60, 90, 10)]
    res = over_run(shapes, 1, lambda r, n: 1000 + 10 * r * n, lambda r, n: 10 * r * n, None, True, (4, 90))
    assert res.probe.settle_step == 1 and res.probe.settled == 1000 + 3600 and len(res.probe.records) == 1
    assert [s for s, _ in res.no_probe.records] == [1, 3, 5]  # 50, then 70, then 90
    assert res.no_probe.settled == 1000 + 2000 + int(G_GROWTH * 2800) + int(G_GROWTH * 3600)
    assert res.expected is res.probe
    accum = over_run(shapes, 2, lambda r, n: 10 * n, lambda r, n: n, None, False, (4, 90))
    # steps of 2 micro-batches: (50, 30), (70, 20), (90, 60), (90, 10)
    assert [s for s, _ in accum.no_probe.records] == [1, 2, 3] and accum.expected is accum.no_probe


def test_a_plan_without_the_probe_grows(tiny_model_dir):
    from advisor import service
    from advisor.fragmentation import plan_over_run
    from advisor.spec import build_plan

    for run, zero, gpus, probes in (({}, 0, 1, True), ({"fail_fast": False}, 0, 1, False), ({}, 2, 2, False),
                                    ({}, 3, 2, True)):
        plan = build_plan({"model": {"ref": "meta-llama/Llama-3.1-8B"}, "training": {"method": "lora",
                           "micro_batch": 4, "seq_len": 2048}, "hardware": {"gpu": "h100", "gpus": gpus, "zero": zero},
                           "run": run})
        ctx = service.build(plan.model_dump(mode="json"))
        shapes = [(4, n) for n in (600, 900, 400, 1500, 2048, 700)]
        res = plan_over_run(plan, ctx.shape, ctx.gpu.memory_bytes, shapes, (4, 2048))
        assert res.probe_runs is probes
        fixed = service.estimate(service.with_changes(ctx, "training", seq_len=2048)).peak_reserved_bytes
        assert res.probe.settled == res.probe.first == fixed  # the longest batch's fixed-shape estimate
        assert res.no_probe.settled > fixed and [s for s, _ in res.no_probe.records] == [1, 2, 4, 5]


@pytest.fixture(scope="module")
def runs():
    return rg.with_still(rg.runs())


def test_the_rows_are_the_logs_and_only_one_run_calibrates(runs):
    assert [r.id for r in runs if r.set == "calibration"] == ["llama3-8b-b32"]
    assert len([r for r in runs if r.set == "validation"]) == 7
    for r in runs:
        assert "Liger-Kernel examples/huggingface/results/" in r.source and " @ " in r.source
        assert [s.step for s in r.steps] == list(range(1, len(r.steps) + 1))
        assert r.steps[0].reserved is None  # the callback logs from step 2 on
    llama = next(r for r in runs if r.set == "calibration")
    assert [s.reserved for s in llama.logged] == [58710.0] + [73712.0] * 8  # the log, as printed


def test_g_is_the_calibration_fit_and_the_validation_rows_do_not_move_it(runs):
    assert round(rg.fit(runs), 4) == G_GROWTH
    runs = rg.with_still(rg.runs())  # a copy to change
    for r in runs:
        if r.set == "validation":
            for s in r.logged:
                s.reserved *= 1.5
    assert round(rg.fit(runs), 4) == G_GROWTH


def test_doc_shows_what_the_script_computes_now(runs):
    text = (ROOT / "docs" / "accuracy.md").read_text()
    block = text.split("<!-- reservegrowth:begin -->\n", 1)[1].split("\n<!-- reservegrowth:end -->", 1)[0]
    stale = "stale: run python -m benchmarks.reserve_growth --write docs/accuracy.md"
    assert block == rg.markdown(runs, G_GROWTH), stale
    assert text.index("## GPU memory") < text.index(rg.HEADING) < text.index("<!-- reservegrowth:begin -->") \
        < text.index("## Throughput")
