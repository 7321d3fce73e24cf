"""The band of the harness you run (training.harness): benchmarks/harness_band.py's fit is the one
advisor/gpu_memory.py holds, docs/accuracy.md shows what the script computes now, and every front end
carries the band (the estimate, --json, the modelled line, the verdict, the form).

No coverage thresholds on the validation rows (a threshold would invite tuning on them): the table builds,
every row has a plan, the calibration rows are the named sources and no others.
"""

import csv
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness_band as hb  # noqa: E402

from advisor import gpu_memory as gm  # noqa: E402
from advisor import service  # noqa: E402
from advisor.spec import HARNESSES, Plan  # noqa: E402


@pytest.fixture(scope="module")
def predicted():
    return hb.predict(hb.rows())


@pytest.mark.slow
def test_every_row_has_a_plan_and_a_prediction(predicted):
    ids = [r["id"] for r in predicted]
    assert len(ids) == len(set(ids)) == len(hb.csv_rows()) + 36
    for r in predicted:
        assert r["role"] in ("calibration", "validation", "left-out") and r["harness"] in HARNESSES
        assert r["counter"] in ("nvidia-smi", "reserved", "allocated", "active", "oom")
        assert r["source"] and r["assumed"], r["id"]
        assert r["ours_alloc"] > 0 and r["ours_high"] >= r["ours_reserved"] >= r["ours_low"] > 0
        assert r["band"]["harness"] == r["harness"]
        if not r["oom"]:
            assert r["where"] in ("below", "low", "high", "above") and r["measured"] > 0


def test_the_calibration_rows_are_the_named_sources_and_no_others(predicted):
    """Decided by source before any width was computed (docs/accuracy.md): gpu_fit.py's fit rows and
    Liger-Kernel's Llama-3-8B baselines for the HF Trainer, torchtune's published.csv rows for another harness."""
    cal = {r["id"] for r in predicted if r["role"] == "calibration"}
    fms_fit = {"FMS-G-lora-1gpu-b4", "FMS-G-lora-1gpu-b8", "FMS-G-qlora-1gpu-b4", "FMS-G-qlora-1gpu-b8",
               "FMS-G-lora-2gpu-b2", "FMS-G-full-2gpu-b2"}
    assert cal == fms_fit | {"M-LIG-3", "M-LIG-14"} | {"TT-4090-lora", "TT-4090-qlora", "TT-4090-full",
                                                          "TT-A100-lora", "TT-A100-qlora"}
    import gpu_fit

    for r in predicted:  # the PowerLM-3b split is gpu_fit.py's own
        if r["id"].startswith("FMS-G"):
            fit = gpu_fit.is_fit_row(r["method"], int(r["gpus"]), int(r["micro_batch"]))
            assert (r["role"] == "calibration") == fit
    assert all(r["harness"] == "other" for r in predicted if r["id"].startswith("TT-"))
    assert all(r["role"] == "validation" for r in predicted if r["id"].startswith(("FMS-R", "M-RT", "M-LAD", "M-TTN")))


def test_advisor_holds_what_the_fit_says(predicted):
    bands = hb.fit(predicted)
    assert hb.check_constants(bands) == [], "run python benchmarks/harness_band.py --fit and copy the widths"
    lo = [gm.HARNESS_BANDS[h] for h in ("tuneplan", "hf-trainer", "other")]
    assert lo[0] <= lo[1] and lo[1][0] <= lo[2][0] and lo[1][1] <= lo[2][1]  # never narrower than the tighter
    assert gm.HARNESS_BANDS["tuneplan"] == (gm.BAND_MIN, max(gm.BAND_P90, gm.BAND_MIN))  # gpu_fit.py's band


def test_quantiles_are_conservative_order_statistics():
    assert hb.quantiles([0.1, -0.2, 0.3]) == (-0.2, 0.3)  # few rows: the extremes
    rs = [i / 100 for i in range(20)]
    assert hb.quantiles(rs) == (0.02, 0.17)  # 20 rows: the 3rd and the 18th


def test_doc_shows_what_the_script_computes_now(predicted):
    text = (ROOT / "docs" / "accuracy.md").read_text()
    block = text.split("<!-- harnessband:begin -->\n", 1)[1].split("\n<!-- harnessband:end -->", 1)[0]
    assert block == hb.markdown(predicted), "stale: run python benchmarks/harness_band.py --write docs/accuracy.md"
    for line in hb.CALIBRATED_ON.values():
        assert line in block


def test_left_out_rows_are_below_what_their_settings_hold(predicted):
    out = [r for r in predicted if r["role"] == "left-out"]
    assert {r["id"] for r in out} == {"M-LG-1", "M-LG-2", "M-LG-8"}
    for r in out:
        assert r["measured"] < r["held"], r["id"]


def test_granite_rows_are_the_calibration_file():
    """The PowerLM-3b rows copied into benchmarks/data are ../shared/calibration's (when it is on this machine)."""
    path = next((p / "fms_a100_80gb_granite.csv" for p in (ROOT.parent / "shared" / "calibration",
                                                            Path("/work/shared/calibration")) if p.is_dir()), None)
    if path is None:
        pytest.skip("../shared/calibration not on this machine")
    with open(path) as f:
        src = {(r["peft_method"] or "full", r["framework_config"], r["num_gpus"], r["per_device_train_batch_size"]):
               float(r["mem_nvidia_mem_reserved"]) for r in csv.DictReader(f)
               if r["framework_config"] in ("none", "baseline-peft-bnb")}
    ours = [r for r in hb.csv_rows() if r["id"].startswith("FMS-G")]
    assert len(ours) == len(src) == 12
    for r in ours:
        key = ("full" if r["method"] == "full" else "lora", "baseline-peft-bnb" if r["method"] == "qlora" else "none",
               r["gpus"], r["micro_batch"])
        assert float(r["published"]) == src[key]


# --- the band on every front end ------------------------------------------------------------------------------
def _estimate(harness: str | None, gpu: str = "a100-80gb-sxm", seq: int = 2048, device: str = "cuda"):
    t = {"method": "qlora", "seq_len": seq}
    if harness:
        t["harness"] = harness
    data = {"model": {"ref": "meta-llama/Llama-3.1-8B"}, "training": t,
            "hardware": {"gpu": gpu if device == "cuda" else None, "device": device}}
    return service.estimate(service.build(data))


def test_the_default_is_tuneplans_own_band():
    assert Plan().training.harness == "tuneplan"
    default, named = _estimate(None), _estimate("tuneplan")
    assert default.peak_reserved_high_bytes == named.peak_reserved_high_bytes
    assert default.breakdown.overhead_high == int(gm.band("ampere") * default.peak_reserved_bytes)


@pytest.mark.parametrize("gpu, arch", [("a100-80gb-sxm", "ampere"), ("h100-sxm", "hopper")])
def test_one_expected_peak_three_bands(gpu, arch):
    res = {h: _estimate(h, gpu) for h in HARNESSES}
    expected = {r.peak_reserved_bytes for r in res.values()}
    assert len(expected) == 1  # the memory model does not change with the harness
    peak = expected.pop()
    for h, r in res.items():
        low, high = gm.HARNESS_BANDS[h]
        widen = 0 if arch in gm.CALIBRATED_ARCHS else gm.BAND_UNCALIBRATED
        assert r.breakdown.band == {"harness": h, "low": round(low + widen, 4), "high": round(high + widen, 4)}
        assert r.peak_reserved_high_bytes == peak + int((high + widen) * peak)
        assert r.breakdown.peak_reserved_low_bytes == peak - int((low + widen) * peak)
        assert f"training.harness={h}" in r.breakdown.reserved_model
        assert gm.HARNESS_WORDS[h] in r.breakdown.reserved_model
    assert res["tuneplan"].peak_reserved_high_bytes <= res["hf-trainer"].peak_reserved_high_bytes \
        <= res["other"].peak_reserved_high_bytes


def test_cpu_has_no_band():
    r = _estimate("other", device="cpu")
    assert r.breakdown.band == {} and r.peak_reserved_high_bytes == r.peak_reserved_bytes \
        == r.breakdown.peak_reserved_low_bytes


def test_a_wider_band_calls_a_plan_tight_sooner():
    """The verdict uses the high end: a plan at 70-80% of its card fits with tuneplan's band and is tight
    with another harness's (its high end is over the card)."""
    for seq in (2048, 4096, 8192, 16384, 32768):
        t = _estimate("tuneplan", "rtx-4090", seq)
        if 0.66 < t.verdict.share < 0.85:
            break
    else:
        pytest.fail("no plan at 66-85% of the card")
    assert t.status == "fits"
    o = _estimate("other", "rtx-4090", seq)
    assert o.peak_reserved_bytes == t.peak_reserved_bytes and o.status == "tight"


def test_cli_flag_json_and_modelled_line(capsys):
    from advisor.cli.main import main

    args = ["estimate", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "a100-80gb-sxm", "--harness", "hf-trainer"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["training"]["harness"] == "hf-trainer"
    low, high = gm.HARNESS_BANDS["hf-trainer"]
    assert out["band"] == {"harness": "hf-trainer", "low": low, "high": high}
    assert out["peak_reserved_low_bytes"] < out["peak_reserved_bytes"] < out["peak_reserved_high_bytes"]
    assert out["gpu"]["need_high_bytes"] == out["peak_reserved_high_bytes"]
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "band for the HF Trainer / TRL path (training.harness=hf-trainer)" in text
    with pytest.raises(SystemExit) as e:
        main([*args[:-1], "axolotl"])
    assert e.value.code == 2
    assert "--harness" in capsys.readouterr().err


def test_the_form_carries_the_harness():
    from advisor.forms import FORM_DEFAULTS, HARNESS_CHOICES, LOC_FIELD, evaluate, form_from_plan, plan_dict

    assert {v for _, v in HARNESS_CHOICES} == set(HARNESSES)
    assert FORM_DEFAULTS["harness"] == "tuneplan" and LOC_FIELD["training.harness"] == "harness"
    form = {**FORM_DEFAULTS, "harness": "other"}
    assert plan_dict(form)["training"]["harness"] == "other"
    ev = evaluate(form)
    assert ev.ok and ev.plan.training.harness == "other"
    assert form_from_plan(ev.plan)["harness"] == "other"


def test_a_run_is_compared_with_the_runners_band_whatever_the_plan_was_sized_for():
    """`tuneplan run` runs tuneplan's own runner: a plan sized for another harness's band is compared with the
    runner's (the expected peak is the same; the band and the note say whose)."""
    from advisor.service import prediction
    from advisor.spec import build_plan

    plan = build_plan({"model": {"ref": "meta-llama/Llama-3.1-8B"}, "training": {"method": "qlora", "harness": "other"},
                       "hardware": {"gpu": "RTX 4090"}})
    own = prediction(plan.model_copy(update={"training": plan.training.model_copy(update={"harness": "tuneplan"})}),
                     "meta-llama/Llama-3.1-8B")
    res = prediction(plan, "meta-llama/Llama-3.1-8B")
    assert res.breakdown.band["harness"] == "tuneplan" and res.breakdown.band == own.breakdown.band
    assert res.peak_reserved_bytes == own.peak_reserved_bytes
    assert any("sized for other's band" in n for n in res.plan_notes)


def test_recommend_takes_the_harness_and_its_band(capsys, tmp_path):
    """recommend --harness: the same search with that harness's band (a plan tuneplan's runner fits is tight
    under another harness's wider band), and the saved plan keeps the harness."""
    import json

    from advisor.cli.main import main
    from advisor.planfile import load_plan

    status = {}
    for h in ("tuneplan", "other"):
        assert main(["recommend", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--methods", "lora", "--harness", h,
                     "--json", "--save", str(tmp_path / f"{h}.yaml")]) == 0
        status[h] = json.loads(capsys.readouterr().out)["choice"]["status"]
    assert status == {"tuneplan": "fits", "other": "tight"}
    assert load_plan(tmp_path / "other.yaml").training.harness == "other"
