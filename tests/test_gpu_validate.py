"""benchmarks/gpu_validate.py: the validation-only GPU-memory table on fms-acceleration's a100_80gb.csv.

No accuracy thresholds here (the rows are out of sample; a threshold would invite tuning on them): the
table builds, every row has a prediction, and docs/accuracy.md shows what the script computes now.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import gpu_validate as gv  # noqa: E402


@pytest.fixture(scope="module")
def predicted():
    return gv.predict(gv.rows())


def test_every_row_has_a_plan_and_a_prediction(predicted):
    assert len(predicted) == len(gv.PUBLISHED) == 36
    assert {r["model"] for r in predicted} == set(gv.PROFILES)
    assert {(r["method"], r["gpus"]) for r in predicted} == {(m, n) for m in ("full", "lora", "qlora") for n in (1, 2)}
    for r in predicted:
        assert r["ours_alloc"] > 0 and r["ours_nvidia"] >= r["ours_alloc"] and r["ours_high"] >= r["ours_nvidia"]
        assert r["verdict"] in ("fits", "tight", "oom")
        assert r["oom"] == (r["allocated"] is None)
        plan = gv.plan_data(r)
        assert plan["training"]["seq_len"] == 4096 and plan["training"]["attn_impl"] == "flash_attention_2"
        assert plan["training"]["transformers"] == "4.48"  # refs/requirements.txt: transformers 4.48.1
        assert plan["hardware"]["zero"] == (3 if r["gpus"] > 1 else 0)
        assert ("lora" in plan["training"]) == (r["method"] != "full")


def test_table_builds(predicted):
    md = gv.markdown(predicted)
    assert sum(line.startswith("|") for line in md.splitlines()) == 2 + len(predicted)  # header, rule, rows
    assert gv.summary_line(gv.summary(predicted)) in md


def test_rows_are_the_published_file():
    mirrored = gv.published_from_mirror()
    if mirrored is None:
        pytest.skip("fms-acceleration mirror not on this machine")
    assert mirrored == gv.PUBLISHED


def test_doc_shows_what_the_script_computes_now(predicted):
    text = (ROOT / "docs" / "accuracy.md").read_text()
    block = text.split("<!-- gpuval:begin -->\n", 1)[1].split("\n<!-- gpuval:end -->", 1)[0]
    as5 = gv.predict(gv.rows(), "5")
    assert block == gv.markdown(predicted, as5), "stale: run python benchmarks/gpu_validate.py --write docs/accuracy.md"
    gpu = text.index("## GPU memory")
    assert gpu < text.index("<!-- gpu:end -->") < text.index(gv.HEADING) < text.index("<!-- gpuval:begin -->") \
        < text.index(gv.NEXT)


def test_the_known_error_note_says_what_the_rows_show(predicted):
    """advisor.gpu_memory's validation note (what a user planning such a run is told) quotes these rows:
    the dense 2-GPU LoRA / QLoRA tensor shortfall and the mixture of experts' nvidia-smi shortfall."""
    from advisor import gpu_memory as g

    sharded = [r for r in predicted if r["gpus"] == 2 and r["method"] != "full" and not r["oom"]]
    moe = [r for r in sharded if "Mixtral" in r["model"]]
    dense = [r for r in sharded if r not in moe]
    short = [1 - r["ours_alloc"] / r["allocated"] for r in dense]
    assert (round(min(short), 2), round(max(short), 2)) == g.SHARDED_ADAPTER_TENSOR_SHORT
    assert round(max(1 - r["ours_nvidia"] / r["nvidia"] for r in moe), 2) == g.SHARDED_MOE_NVSMI_SHORT
    note = g.validation_note("qlora", False, 2, 3, "cuda")
    assert "6%-19%" in note and "docs/accuracy.md" in note
    assert "20%" in g.validation_note("lora", True, 2, 3, "cuda")
    assert g.validation_note("qlora", False, 1, 0, "cuda") is None  # one GPU: the rows agree
    assert g.validation_note("full", False, 2, 3, "cuda") is None
    assert g.validation_note("lora", False, 2, 3, "cpu") is None
