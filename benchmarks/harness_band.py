"""The band around the expected GPU peak, per harness: fitted on calibration rows, checked on validation rows.

    python benchmarks/harness_band.py [--fit] [--write docs/accuracy.md]

A plan says what runs the job (``training.harness``): tuneplan's own runner, the HF Trainer / TRL path, or
another harness. The expected nvidia-smi peak is the same for all three (the memory model does not change);
the band around it does: its low and high ends are the shares of the expected peak that published runs of
that harness fell below and above it (``advisor.gpu_memory.HARNESS_BANDS``; the fit verdict uses the high end).

Rows (``benchmarks/data/harness_memory.csv``, each with its source and what was assumed; and the fms-acceleration
refs of benchmarks/gpu_validate.py, imported from there). Which rows calibrate was fixed by source, before any
width was computed (docs/accuracy.md, "The band for the harness you run"):

* calibration, HF Trainer: the fms-acceleration PowerLM-3b rows that fit advisor/gpu_memory.py's constants
  (../shared/calibration, benchmarks/gpu_fit.py's fit rows) and Liger-Kernel's HF Trainer + FSDP baseline log of
  Llama-3-8B (batch 32 and 48: padded data of varying length), the log issue 30 names for calibration;
* calibration, another harness: torchtune's rows of ../shared/calibration/published.csv (as
  benchmarks/published.py plans them);
* validation (never fitted): every other row. HF Trainer: the PowerLM-3b rows gpu_fit.py validates on, the
  fms-acceleration refs of Mistral-7B / Mixtral-8x7B / Llama-2-70B (benchmarks/gpu_validate.py), the other
  models' Liger-Kernel baseline logs, and Liger's out-of-memory facts; another harness: litgpt, the torchtune
  README ladder, torchtitan. tuneplan's own runner has no published runs: its band (fitted on the PowerLM-3b
  fit rows, gpu_fit.py) is checked on the HF Trainer rows its constants came from.

Each row is the plan that describes the run: what it keeps and computes in tuneplan's terms (a model loaded in
bf16 that accelerate upcasts to fp32 masters under FSDP mixed precision is amp-bf16), the longest batch its data
loader can form (the truncation length of padded data, the pack length of packed data), its batch, GPUs and
sharding (FSDP full shard as ZeRO-3); what the source does not state takes tuneplan's default. The estimate is
the service's (analytic) with the row's GPU.

The residual of a row: (published - tuneplan's figure for the same counter) / tuneplan's expected nvidia-smi
peak (on the card: advisor.policy.Verdict.on_card_bytes). tuneplan's figure for the counter: nvidia-smi -> the
expected nvidia-smi peak; max_memory_reserved -> that less the CUDA context and NCCL (outside torch's
allocator); max_memory_allocated or torch's "active" peak -> the expected tensor peak. The band's bytes are its
shares of the expected peak, so a row is inside when its counter lies within the band shifted to that counter.
Rows marked ``left-out`` are kept in the file with the reason: their published peak is below what their
stated settings hold through a step on one GPU (the weights, gradients and AdamW states of a full fine-tune,
as tuneplan counts them, ``held``), so the settings are mis-stated (the script checks that arithmetic).

Width of a harness (``fit``): the 90th percentile of its calibration residuals for the high end and the 10th
for the low end (conservative order statistics: with 9 rows or fewer, the largest and the smallest), at least
``BAND_MIN``, at least the narrower harness's, rounded up to a whole percent; another harness is calibrated
on its own rows. A GPU generation without calibration data widens both ends by ``BAND_UNCALIBRATED``, as the
estimate does.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docblock import write_between  # noqa: E402

from advisor import gpu_memory as gm  # noqa: E402
from advisor.units import GIB, MIB  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "harness_memory.csv"
UNITS = {"MiB": MIB, "GiB": GIB, "GB": 1e9}
HARNESSES = ("tuneplan", "hf-trainer", "other")
NAMES = {"tuneplan": "tuneplan's own runner", "hf-trainer": "HF Trainer / TRL", "other": "another harness"}
CALIBRATED_ON = {
    "tuneplan": "the 6 fms-acceleration PowerLM-3b rows that fit the GPU terms (benchmarks/gpu_fit.py)",
    "hf-trainer": "those 6 and Liger-Kernel's Llama-3-8B HF Trainer + FSDP baselines (batch 32, 48)",
    "other": "torchtune's 5 rows of ../shared/calibration/published.csv",
}


def _int(s: str) -> int:
    return int(float(s))


def csv_rows(path: Path = DATA) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fms_ref_rows() -> list[dict]:
    """benchmarks/gpu_validate.py's fms-acceleration refs, as rows of this table (validation, HF Trainer)."""
    import gpu_validate as gv

    out = []
    for r in gv.rows():
        name = r["model"].split("/")[1]
        t = gv.plan_data(r)["training"]
        lora = t.get("lora", {})
        out.append({"id": f"FMS-R-{name}-{r['method']}-{r['gpus']}gpu-b{r['batch']}", "role": "validation",
                    "harness": "hf-trainer", "run_by": "HF Trainer (fms-hf-tuning), accelerate FSDP FULL_SHARD",
                    "model": r["model"], "profile": r["profile"], "method": r["method"], "precision": t["precision"],
                    "optimizer": t["optimizer"], "gpu": "a100-80gb-sxm", "gpus": str(r["gpus"]),
                    "zero": str(3 if r["gpus"] > 1 else 0), "micro_batch": str(r["batch"]),
                    "seq_len": str(t["seq_len"]), "grad_checkpointing": "true", "attn_impl": t["attn_impl"],
                    "lora_r": str(lora.get("r", "")), "lora_alpha": str(lora.get("alpha", "")),
                    "lora_dropout": str(lora.get("dropout", "")),
                    "lora_targets": ";".join(lora.get("targets") or []), "double_quant": "true",
                    "transformers": t["transformers"], "padded": "false",
                    "counter": "oom" if r["oom"] else "nvidia-smi",
                    "published": "OOM" if r["oom"] else str(r["nvidia"] / MIB), "unit": "" if r["oom"] else "MiB",
                    "allocated_mib": "" if r["oom"] else f"{r['allocated'] / MIB:.2f}",
                    "source": f"fms-acceleration {gv.CSV_PATH} @ {gv.COMMIT} (benchmarks/gpu_validate.py)",
                    "assumed": "the plan of benchmarks/gpu_validate.py"})
    return out


def rows() -> list[dict]:
    return csv_rows() + fms_ref_rows()


def plan_data(row: dict, harness: str | None = None) -> dict:
    """The plan of one row (the settings in its columns; ``harness``: whose band, the row's own by default)."""
    t = {"method": row["method"], "precision": row["precision"], "optimizer": row["optimizer"],
         "micro_batch": _int(row["micro_batch"]), "seq_len": _int(row["seq_len"]),
         "grad_checkpointing": row["grad_checkpointing"] == "true", "attn_impl": row["attn_impl"],
         "transformers": row["transformers"], "harness": harness or row["harness"],
         "double_quant": row["double_quant"] != "false"}
    if row["method"] != "full" and row["lora_r"]:
        t["lora"] = {"r": _int(row["lora_r"]), "alpha": float(row["lora_alpha"]),
                     "targets": row["lora_targets"].split(";")}
        if row["lora_dropout"]:
            t["lora"]["dropout"] = float(row["lora_dropout"])
    hw = {"gpu": row["gpu"], "gpus": _int(row["gpus"]), "zero": _int(row["zero"]), "device": "cuda"}
    data = {"padded": row["padded"] == "true"} if row["padded"] else {}
    return {"model": {"ref": row["profile"]}, "training": t, "hardware": hw, "data": data}


def ends(r: dict, harness: str) -> tuple[float, float]:
    """The band of ``harness`` on row ``r``, as (low end, high end) in the row's counter."""
    arch = gm.arch_of(r["gpu"])
    shift = r["ours_counter"] - r["ours_nvidia"]  # the counter's offset from the nvidia-smi figure
    lo = r["ours_nvidia"] - gm.band_low(arch, harness) * r["ours_reserved"]
    hi = r["ours_reserved"] * (1 + gm.band(arch, harness))
    return lo + shift, max(hi, r["ours_nvidia"]) + shift


def predict(rs: list[dict]) -> list[dict]:
    """Each row estimated (with its own harness's band), its residual and where it falls in the band."""
    from advisor import service
    from advisor.memory import gradients_bytes

    out = []
    for row in rs:
        ctx = service.build(plan_data(row))
        res = service.estimate(ctx)
        bd, v = res.breakdown, res.verdict
        nvidia = v.on_card_bytes
        outside = bd.overhead.get("cuda_context", 0) + bd.overhead.get("nccl_buffers", 0)
        counter = row["counter"]
        ours = {"nvidia-smi": nvidia, "reserved": nvidia - outside, "allocated": bd.peak_allocated_bytes,
                "active": bd.peak_allocated_bytes, "oom": nvidia}[counter]
        r = {**row, "ours_alloc": bd.peak_allocated_bytes, "ours_nvidia": nvidia,
             "ours_reserved": bd.peak_reserved_bytes, "ours_high": bd.peak_reserved_high_bytes,
             "ours_low": bd.peak_reserved_low_bytes, "ours_counter": ours, "verdict": v.status,
             "oom": counter == "oom", "band": bd.band,
             "verdict_tuneplan": v.status if row["harness"] == "tuneplan" else
             service.estimate(service.build(plan_data(row, "tuneplan"))).status}
        if not r["oom"]:
            measured = float(row["published"]) * UNITS[row["unit"]]
            gpus = _int(row["gpus"])
            grads = gradients_bytes(ctx.shape, ctx.plan.training)
            held = sum(bd.components.get(k, 0) for k in ("weights", "lora_adapters", "optimizer_states")) + \
                (-(-grads // gpus) if _int(row["zero"]) >= 2 else grads)
            lo, hi = ends(r, row["harness"])
            r.update(measured=measured, held=held, misstated=row["role"] == "left-out",
                     residual=(measured - ours) / nvidia,
                     where="below" if measured < lo else "low" if measured < ours else
                     "high" if measured <= hi else "above")
        out.append(r)
    return out


def quantiles(residuals: list[float]) -> tuple[float, float]:
    """(10th, 90th) percentile, conservative order statistics (the largest and smallest with 9 rows or fewer)."""
    s = sorted(residuals)
    k = math.ceil(0.9 * len(s))
    return s[len(s) - k], s[k - 1]


def _up(x: float) -> float:
    return math.ceil(round(100 * x, 6)) / 100


def fit(predicted: list[dict]) -> dict[str, tuple[float, float]]:
    """(low, high) shares per harness from the calibration rows (see the module docstring)."""
    out = {"tuneplan": gm.HARNESS_BANDS["tuneplan"]}
    prev = out["tuneplan"]
    for h in ("hf-trainer", "other"):
        res = [r["residual"] for r in predicted if r["role"] == "calibration" and r["harness"] == h
               and not r["oom"]]
        q10, q90 = quantiles(res)
        low, high = max(gm.BAND_MIN, _up(-q10), prev[0]), max(gm.BAND_MIN, _up(q90), prev[1])
        out[h] = prev = (low, high)
    return out


def calibration_count(predicted: list[dict], harness: str) -> int:
    if harness == "tuneplan":
        return sum(r["id"].startswith("FMS-G") and r["role"] == "calibration" for r in predicted)
    return sum(r["role"] == "calibration" and r["harness"] == harness for r in predicted)


def validation_for(predicted: list[dict], harness: str) -> list[dict]:
    """The validation rows with a published peak whose band is ``harness``'s (tuneplan: the HF Trainer rows of
    the harness its constants were fitted on, the fms-acceleration ones)."""
    ok = [r for r in predicted if r["role"] == "validation" and not r["oom"] and not r["misstated"]]
    if harness == "tuneplan":
        return [r for r in ok if r["id"].startswith("FMS-")]
    return [r for r in ok if r["harness"] == harness]


def coverage(predicted: list[dict], harness: str) -> dict:
    """Where the validation rows of ``harness`` fall in its band (and in tuneplan's, for the contrast)."""
    rs = validation_for(predicted, harness)
    where = {w: 0 for w in ("below", "low", "high", "above")}
    for r in rs:
        lo, hi = ends(r, harness)
        m = r["measured"]
        where["below" if m < lo else "low" if m < r["ours_counter"] else "high" if m <= hi else "above"] += 1
    tight_above = sum(r["measured"] > ends(r, "tuneplan")[1] for r in rs)
    return {"n": len(rs), **where, "inside": where["low"] + where["high"], "covered": len(rs) - where["above"],
            "above_tuneplan_band": tight_above}


def ran_verdicts(predicted: list[dict], harness: str) -> dict[str, int]:
    """The verdicts, with the band of ``harness``, on its validation rows that ran (oom: the verdict is wrong)."""
    rs = validation_for(predicted, harness)
    out = {v: sum(r["verdict"] == v for r in rs) for v in ("fits", "tight", "oom")}
    out["tight_not_tuneplan"] = sum(r["verdict"] == "tight" and r["verdict_tuneplan"] == "fits" for r in rs)
    return out


def oom_verdicts(predicted: list[dict], harness: str) -> tuple[int, int]:
    """(out-of-memory rows the verdict calls oom, out-of-memory rows) among the validation rows of ``harness``."""
    rs = [r for r in predicted if r["role"] == "validation" and r["oom"] and r["harness"] == harness]
    return sum(r["verdict"] == "oom" for r in rs), len(rs)


# --- markdown ----------------------------------------------------------------------------------------------------
def _amount(b: float) -> str:
    return f"{b / GIB:,.1f} GiB"


def _plan(r: dict) -> str:
    lora = f" r{r['lora_r']}" if r["method"] != "full" and r["lora_r"] else ""
    return (f"{r['model'].split('/')[-1]} {r['method']}{lora} {r['precision']}, {r['gpus']}x {r['gpu']}, "
            f"b{r['micro_batch']} x {r['seq_len']}{'' if r['grad_checkpointing'] == 'true' else ', no ckpt'}")


def _pct(x: float) -> str:
    return f"{100 * x:+.0f}%"


WHERE = {"below": "below the band", "low": "in (low side)", "high": "in (high side)", "above": "ABOVE the band"}


def table(predicted: list[dict]) -> list[str]:
    lines = ["| row | role | run by | plan | counter | published | tuneplan, same counter | residual | band "
             "(low, high) | where |", "|---|---|---|---|---|---:|---:|---:|---|---|"]
    order = {"calibration": 0, "validation": 1, "left-out": 2}
    for r in sorted(predicted, key=lambda r: (order[r["role"]], HARNESSES.index(r["harness"]))):
        if r["oom"]:
            continue
        band = f"-{100 * r['band']['low']:.0f}%, +{100 * r['band']['high']:.0f}%"
        where = (f"left out: below the {_amount(r['held'])} its settings hold" if r["misstated"] else
                 WHERE[r["where"]])
        lines.append(f"| {r['id']} | {r['role']} | {r['run_by']} | {_plan(r)} | {r['counter']} | "
                     f"{_amount(r['measured'])} | {_amount(r['ours_counter'])} | {_pct(r['residual'])} | "
                     f"{r['harness']}: {band} | {where} |")
    return lines


def markdown(predicted: list[dict]) -> str:
    bands = fit(predicted)
    lines = ["Which rows calibrate and which validate was fixed by source before any width was computed "
             "(benchmarks/harness_band.py's docstring says why each row's plan is what it is; every row, its "
             "source and what was assumed are in `benchmarks/data/harness_memory.csv`, the fms-acceleration refs "
             "in benchmarks/gpu_validate.py). Residual = (published - tuneplan's figure for the same counter) / "
             "tuneplan's expected nvidia-smi peak. `python benchmarks/harness_band.py --write docs/accuracy.md` "
             "regenerates this block; `--fit` prints the widths advisor/gpu_memory.py holds.", "",
             "| harness (`training.harness`) | calibrated on | rows | low end | high end |",
             "|---|---|---:|---:|---:|"]
    for h in HARNESSES:
        low, high = bands[h]
        lines.append(f"| {h} ({NAMES[h]}) | {CALIBRATED_ON[h]} | {calibration_count(predicted, h)} | "
                     f"-{100 * low:.0f}% | +{100 * high:.0f}% |")
    lines += ["", "On a GPU generation without calibration data (all but Ampere) both ends widen by "
              f"{100 * gm.BAND_UNCALIBRATED:.0f} points.", "",
              "Coverage on the validation rows (never fitted) that ran, each with the band of its harness:", "",
              "| band | validation rows | below the low end | low end to expected | expected to high end | "
              "above the high end | inside the band | under the high end | above tuneplan's band |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for h in HARNESSES:
        c = coverage(predicted, h)
        n = c["n"]
        share = lambda k, c=c, n=n: f"{c[k]} ({100 * c[k] / n:.0f}%)" if n else "0"  # noqa: E731
        tight = "" if h == "tuneplan" else share("above_tuneplan_band")
        lines.append(f"| {h} | {n} | {share('below')} | {share('low')} | {share('high')} | {share('above')} | "
                     f"{share('inside')} | {share('covered')} | {tight} |")
    lines += [""]
    for h in ("hf-trainer", "other"):
        hit, n = oom_verdicts(predicted, h)
        v = ran_verdicts(predicted, h)
        name = NAMES[h][0].upper() + NAMES[h][1:]
        lines.append(f"{name}: of the {v['fits'] + v['tight'] + v['oom']} validation runs that ran, the verdict "
                     f"says fits in {v['fits']}, tight in {v['tight']} ({v['tight_not_tuneplan']} of them fits with "
                     f"tuneplan's band), oom in {v['oom']} (wrong); of the {n} published out of memory it says oom "
                     f"in {hit} (the others: tight, launchable with a warning).")
    mis = [r["id"] for r in predicted if not r["oom"] and r["misstated"]]
    lines += ["", f"Left out as mis-stated ({len(mis)}): {', '.join(mis)}: each published peak is below the "
              "bf16 weights, gradients and AdamW states of a full fine-tune on the one GPU the source names.", ""]
    return "\n".join(lines + table(predicted))


def check_constants(bands: dict[str, tuple[float, float]]) -> list[str]:
    """Differences between this fit and advisor/gpu_memory.py's HARNESS_BANDS."""
    return [f"{h}: fit {bands[h]} vs advisor/gpu_memory.py {gm.HARNESS_BANDS[h]}" for h in HARNESSES
            if tuple(round(x, 4) for x in bands[h]) != tuple(round(x, 4) for x in gm.HARNESS_BANDS[h])]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit", action="store_true", help="print the widths and compare with advisor/gpu_memory.py")
    ap.add_argument("--write", help="markdown file with the harnessband block (docs/accuracy.md)")
    a = ap.parse_args()
    pred = predict(rows())
    if a.fit:
        bands = fit(pred)
        print("HARNESS_BANDS =", bands)
        for line in check_constants(bands):
            print("differs:", line, file=sys.stderr)
        raise SystemExit
    md = markdown(pred)
    print(md)
    if a.write:
        write_between(a.write, "harnessband", md)
