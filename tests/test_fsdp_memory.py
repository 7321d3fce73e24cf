"""FSDP's per-rank memory, measured: two real gloo processes train tiny Mistral LoRA and QLoRA models
under torch's FSDP with the runner's settings (benchmarks/fsdp_cpu.py) and the analytic estimate for
2 GPUs with ZeRO-3 (FSDP full shard) matches each rank's peak of live tensor bytes: the shards, the
unsharded units (the one in backward and the prefetched one) and the root's unsharded embeddings and
head, which FSDP keeps from forward to the end of backward."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fsdp_cpu  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in fsdp_cpu.CASES if c[0] == "mistral" and c[2] == 2 and c[1] != "full"],
                         ids=fsdp_cpu.case_id)
def test_fsdp_rank_peak_matches_the_estimate(case):
    row = fsdp_cpu.measure(case)
    ours, _ = fsdp_cpu.estimate_of(row)
    for rank in row["ranks"]:
        assert abs(ours / rank["peak_bytes"] - 1) < 0.03, (rank, ours)


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
