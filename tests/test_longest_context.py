"""benchmarks/longest_context.py: the validation-only table of the longest context that fits (Unsloth's
HF + FA2 runs, 8-80 GB cards). No accuracy thresholds (the rows are out of sample; a threshold would
invite tuning on them): every row gets the stated plan and a prediction, the table builds, and
docs/accuracy.md shows what the script computes now."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import longest_context as lc  # noqa: E402


@pytest.fixture(scope="module")
def predicted():
    return lc.predict()


@pytest.mark.slow
def test_every_row_has_the_stated_plan_and_a_prediction(predicted):
    assert len(predicted) == len(lc.PUBLISHED) == 18
    for r in predicted:
        t = lc.plan_data(r["model"], r["at"])["training"]
        assert (t["method"], t["micro_batch"], t["lora"]["r"], t["lora"]["targets"]) == ("qlora", 1, 32, "all-linear")
        assert t["attn_impl"] == "flash_attention_2" and t["grad_checkpointing"]
        assert 0 < r["alloc"] < r["nvidia"] <= r["high"]
        assert r["verdict"] in ("fits", "tight", "oom")
        assert r["launchable"] is None or r["launchable"] > r["max"]


def test_the_card_is_the_rows_size():
    assert lc.card(12).memory_bytes == 12 * 1024**3
    assert lc.card(12).bf16 and "12 GiB" in lc.card(12).name


@pytest.mark.slow
def test_docs_show_what_the_script_computes(predicted):
    md = lc.markdown(predicted)
    assert sum(line.startswith("|") for line in md.splitlines()) == 2 + len(predicted)
    doc = (ROOT / "docs" / "accuracy.md").read_text()
    block = doc.split("<!-- longctx:begin -->\n", 1)[1].split("\n<!-- longctx:end -->", 1)[0]
    assert block == md, "run: python benchmarks/longest_context.py --write docs/accuracy.md"
