"""advisor.serving against published vLLM start-up logs (benchmarks/results/vllm_startup_logs.json).

    python benchmarks/vllm_startup.py            # the table: predicted vs printed, every row
    python benchmarks/vllm_startup.py --fit      # the calibrated constants, from the calibration rows only
    python benchmarks/vllm_startup.py --write docs/accuracy.md   # the generated block of the docs
    python benchmarks/vllm_startup.py --json

Each row is a `vllm serve` start-up with its model, GPU, vLLM version and flags; its printed numbers are
"Model loading took" (weights), "torch peak memory increase" (activation), "non-torch forward increase
memory", "Available KV cache memory", "GPU KV cache size" (tokens) and "Maximum concurrency". The
estimate gets the row's settings and the total memory the log printed, nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from advisor.model import resolve  # noqa: E402
from advisor.serving import (  # noqa: E402
    VOCAB_PADDING,
    VllmEstimate,
    serving_estimate,
)
from advisor.units import GIB  # noqa: E402
from benchmarks.docblock import write_between  # noqa: E402

DATA = ROOT / "benchmarks" / "results" / "vllm_startup_logs.json"
TARGET = 0.05  # predicted KV cache size within 5% of what vLLM printed


def load_rows() -> list[dict]:
    return json.loads(DATA.read_text())["rows"]


def shape_of(row: dict):
    ref = row["profile"]
    path = ROOT / ref
    return resolve(str(path) if path.suffix == ".json" else ref)


def predict(row: dict) -> VllmEstimate:
    s = row["settings"]
    return serving_estimate(
        shape_of(row), int(row["printed"]["total_memory_gib"] * GIB),
        gpu_memory_utilization=s["gpu_memory_utilization"], max_model_len=s["max_model_len"],
        tensor_parallel=s["tensor_parallel"], weight_quant=s["weight_quant"], kv_cache_dtype=s["kv_cache_dtype"],
        dtype=s["dtype"], max_num_seqs=s["max_num_seqs"], max_num_batched_tokens=s["max_num_batched_tokens"],
        block_size=s["block_size"], gpu_name=row["gpu"])


def compare(row: dict) -> dict:
    """Predicted and printed side by side; errors as (predicted - printed) / printed."""
    e = predict(row)
    p = row["printed"]
    out = {"id": row["id"], "role": row["role"], "model": row["model"], "vllm": row["vllm_version"],
           "tp": row["settings"]["tensor_parallel"], "quant": row["settings"]["weight_quant"],
           "kv_dtype": row["settings"]["kv_cache_dtype"], "dtype": row["settings"]["dtype"],
           "max_model_len": row["settings"]["max_model_len"]}
    for key, pred in (("weights", e.weights_bytes / GIB), ("activation", e.activation_bytes / GIB),
                      ("non_torch", e.non_torch_bytes / GIB), ("kv_cache", e.kv_cache_bytes / GIB)):
        out[f"{key}_gib"] = round(pred, 3)
        out[f"{key}_printed_gib"] = p[f"{key}_gib"]
    out["kv_tokens"] = e.kv_cache_tokens
    out["kv_tokens_printed"] = p["kv_cache_tokens"]
    out["concurrency"] = round(e.max_concurrency, 2)
    out["concurrency_printed"] = p["max_concurrency"]
    if p["kv_cache_tokens"]:
        out["kv_error"] = (e.kv_cache_tokens - p["kv_cache_tokens"]) / p["kv_cache_tokens"]
    else:  # the log printed the memory only
        out["kv_error"] = (e.kv_cache_bytes / GIB - p["kv_cache_gib"]) / p["kv_cache_gib"]
    out["status"] = e.status
    return out


def fit() -> dict:
    """The constants, from the calibration rows alone:
    - SAMPLER_FP32_COPIES: the single-GPU row's activation, less its forward (smaller here), per
      max_num_seqs x padded vocab, less the logits' own dtype bytes, over 4;
    - NON_TORCH_BYTES_ONE_GPU / _TP and CONTEXT_BYTES_ONE_GPU / _TP: the rows' printed values."""
    rows = [r for r in load_rows() if r["role"] == "calibration"]
    one = next(r for r in rows if r["settings"]["tensor_parallel"] == 1)
    tps = [r for r in rows if r["settings"]["tensor_parallel"] > 1]
    shape = shape_of(one)
    s = one["settings"]
    reqs = min(s["max_num_seqs"], s["max_num_batched_tokens"])
    vocab = -(-shape.vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    per_logit = one["printed"]["activation_gib"] * GIB / (reqs * vocab)
    dtype_bytes = 4 if s["dtype"] == "float32" else 2
    return {
        "SAMPLER_FP32_COPIES": round((per_logit - dtype_bytes) / 4, 2),
        "NON_TORCH_GIB_ONE_GPU": one["printed"]["non_torch_gib"],
        "NON_TORCH_GIB_TP": sum(r["printed"]["non_torch_gib"] for r in tps) / len(tps),
        "CONTEXT_GIB_ONE_GPU": one["printed"]["init_non_torch_gib"],
        "CONTEXT_GIB_TP": sum(r["printed"]["init_non_torch_gib"] for r in tps) / len(tps),
        "from_rows": [r["id"] for r in rows],
    }


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _table(results: list[dict], title: str) -> list[str]:
    lines = [f"**{title}**", "",
             "| row | model | tp | weights GiB (printed) | activation GiB (printed) | KV GiB (printed) "
             "| KV tokens (printed) | concurrency (printed) | KV error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tokens = (f"{r['kv_tokens']:,} ({r['kv_tokens_printed']:,})" if r["kv_tokens_printed"]
                  else f"{r['kv_tokens']:,} (-)")
        conc = (f"{r['concurrency']:.2f} ({r['concurrency_printed']:.2f})" if r["concurrency_printed"]
                else f"{r['concurrency']:.2f} (-)")
        extra = [x for x in (r["quant"] if r["quant"] != "none" else "", f"kv {r['kv_dtype']}"
                             if r["kv_dtype"] != "auto" else "", r["dtype"] if r["dtype"] != "bfloat16" else "",
                             f"len {r['max_model_len']:,}") if x]
        lines.append(
            f"| {r['id']} | {r['model']} ({', '.join(extra)}) | {r['tp']} "
            f"| {r['weights_gib']:.2f} ({r['weights_printed_gib']:.2f}) "
            f"| {r['activation_gib']:.2f} ({r['activation_printed_gib']:.2f}) "
            f"| {r['kv_cache_gib']:.2f} ({r['kv_cache_printed_gib']:.2f}) | {tokens} | {conc} "
            f"| {_pct(r['kv_error'])} |")
    return lines


def summary(results: list[dict]) -> dict:
    val = [r for r in results if r["role"] == "validation"]
    errs = sorted(abs(r["kv_error"]) for r in val)
    return {"validation_rows": len(val), "within_target": sum(e <= TARGET for e in errs),
            "median_abs_error": errs[len(errs) // 2] if errs else None, "max_abs_error": errs[-1] if errs else None}


def markdown(results: list[dict]) -> str:
    cal = [r for r in results if r["role"] == "calibration"]
    val = [r for r in results if r["role"] == "validation"]
    other = [r for r in results if r["role"] == "other_version"]
    s = summary(results)
    c = fit()
    lines = [
        "Generated by `python benchmarks/vllm_startup.py --write docs/accuracy.md` from "
        "`benchmarks/results/vllm_startup_logs.json` (every row's source: repository, commit, file). "
        "Predicted (printed); KV error = (predicted - printed) / printed of the KV cache size in tokens "
        "(memory where the log printed no tokens).",
        "",
        f"Constants fitted on the calibration rows ({', '.join(c['from_rows'])}): "
        f"SAMPLER_FP32_COPIES = {c['SAMPLER_FP32_COPIES']}, non-torch {c['NON_TORCH_GIB_ONE_GPU']:.2f} GiB "
        f"(1 GPU) / {c['NON_TORCH_GIB_TP']:.2f} GiB (tensor parallel), CUDA context before the snapshot "
        f"{c['CONTEXT_GIB_ONE_GPU']:.2f} / {c['CONTEXT_GIB_TP']:.2f} GiB.",
        "",
        *_table(cal, "Calibration rows (fitted)"),
        "",
        *_table(val, "Validation rows (never fitted)"),
        "",
        f"Validation: {s['within_target']} of {s['validation_rows']} rows within {TARGET:.0%} of the printed KV "
        f"cache size; median |error| {_pct(s['median_abs_error'])[1:]}, largest {_pct(s['max_abs_error'])[1:]}.",
    ]
    if other:
        lines += ["", *_table(other, "Other vLLM versions (not modelled: the constants are vLLM 0.19's)")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="print the constants fitted on the calibration rows")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    ap.add_argument("--write", metavar="MARKDOWN", help="rewrite the vllm_startup block of this file")
    args = ap.parse_args()
    if args.fit:
        print(json.dumps(fit(), indent=1))
        return
    results = [compare(r) for r in load_rows()]
    if args.json:
        print(json.dumps({"rows": results, "summary": summary(results)}, indent=1))
    elif args.write:
        write_between(args.write, "vllm_startup", markdown(results))
    else:
        print(markdown(results))


if __name__ == "__main__":
    main()
