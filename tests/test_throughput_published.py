"""benchmarks/throughput.py on benchmarks/data/throughput_published.csv: the split, the fit on calibration rows
only, and docs/accuracy.md showing what the script computes now.

No accuracy threshold on the validation rows here (a threshold there would invite tuning on them; the plain
stack's held-out rows keep theirs in tests/test_throughput.py)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from advisor import throughput as tp  # noqa: E402
from advisor import throughput_cards as cards  # noqa: E402
from benchmarks import throughput as bench  # noqa: E402


@pytest.fixture(scope="module")
def stages():
    return bench.stage_rows()


@pytest.fixture(scope="module")
def val():
    return bench.validation_rows()


def test_every_row_is_sourced_and_in_one_set():
    rows = bench.load()
    assert {r["set"] for r in rows} == {"calibration", "validation", "excluded"}
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["source"] and float(r["measured_tok_s_gpu"]) > 0, r["id"]
        assert r["tokens_counted"] in ("all", "real", ""), r["id"]
        if r["set"] == "excluded":
            assert r["note"], f"{r['id']}: an excluded row says why"


@pytest.mark.slow
def test_calibration_is_three_families_written_down_before_the_fit(stages):
    cal = [r for r in bench.load() if r["set"] == "calibration"]
    assert {r["family"] for r in cal} == {"fms", "qwen", "llm_foundry"}
    assert [len(stages[k]) for k in "ABC"] == [18, 12, 14]
    assert {r.generation for r in stages["C"]} == {"ampere", "hopper"}


def test_validation_spans_three_harnesses_and_three_generations(val):
    assert len({r.family for r in val}) >= 3
    assert len({r.generation for r in val} - {"ampere-ga10x"}) >= 3  # Ampere, Ada, Hopper
    for r in val:
        assert r.predicted() > 0 and 0 < r.implied_mfu() < 2, r.id


@pytest.mark.slow
def test_shipped_constants_are_the_fit_of_the_calibration_rows(stages):
    """The fit sees the calibration rows only; refitting them reproduces the shipped constants."""
    keep = dict(tp.CALIBRATION)
    try:
        fitted = bench.fit_all(stages)
    finally:
        tp.CALIBRATION.clear()
        tp.CALIBRATION.update(keep)
    for k, v in fitted.items():
        assert v == pytest.approx(keep[k], rel=0.02), k
    assert set(fitted) == set(keep)


def test_uncalibrated_generations_are_named():
    from advisor.gpus import gpu_table

    gens = {g.id: cards.generation(g) for g in gpu_table().values()}
    assert gens["a100-80gb-sxm"] == "ampere" and gens["h100-sxm"] == "hopper" and gens["rtx-4090"] == "ada"
    assert gens["t4"] == "turing" and gens["b200"] == "blackwell" and gens["rtx-a6000"] == "ampere-ga10x"
    assert "unknown" not in gens.values(), [k for k, v in gens.items() if v == "unknown"]


def test_doc_shows_what_the_script_computes_now(stages, val):
    text = (ROOT / "docs" / "accuracy.md").read_text()
    block = text.split("<!-- throughput:begin -->\n", 1)[1].split("\n<!-- throughput:end -->", 1)[0]
    assert block == bench.section(stages, val), "stale: run python benchmarks/throughput.py --write docs/accuracy.md"
    assert text.index("### Which published rows calibrate") < text.index("<!-- throughput:begin -->")
