"""Compare the analytic estimate with the measured peaks of benchmarks/calibrate.py.

    python benchmarks/accuracy.py [--measured benchmarks/results/measured_cpu.json] [--write docs/accuracy.md]

Each measured case names the tiny model it trained (config) and the exact TrainSpec/InferSpec;
the estimate is made for the same plan with ``--device cpu`` (tensors only) and compared with the
profiler's peak of live tensor bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from advisor.memory import estimate  # noqa: E402
from advisor.model import ModelShape, count_on_meta  # noqa: E402
from advisor.spec import Plan  # noqa: E402

_shapes: dict[str, ModelShape] = {}


def shape_for(case: dict) -> ModelShape:
    cfg = dict(case["config"])
    key = json.dumps(cfg, sort_keys=True)
    if key not in _shapes:
        _shapes[key] = count_on_meta(case["family"], cfg)
    return _shapes[key]


def plan_for(case: dict) -> Plan:
    hw = {"gpu": None, "device": "cpu"}
    if case["task"] == "inference":
        spec = dict(case["spec"], prompt_len=case.get("prompt_len"))
        return Plan.model_validate({"task": "inference", "inference": spec, "hardware": hw})
    return Plan.model_validate({"task": "training", "training": case["spec"], "hardware": hw})


def compare(case: dict) -> dict:
    shape = shape_for(case)
    bd = estimate(plan_for(case), shape)
    measured = case["measured"]["peak_bytes"]
    return {
        "id": case["id"], "measured": measured, "analytic": bd.peak_allocated_bytes,
        "error": bd.peak_allocated_bytes / measured - 1, "phase": bd.peak_phase,
        "measured_phase": case["measured"].get("peak_phase", "?"),
        "simulate": case.get("simulate_bytes"),
    }


def table(rows: list[dict]) -> str:
    lines = ["| case | measured MiB | analytic MiB | error | analytic peak at | measured peak in |",
             "|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| `{r['id']}` | {r['measured'] / 2**20:.2f} | {r['analytic'] / 2**20:.2f} | "
                     f"{100 * r['error']:+.1f}% | {r['phase'].replace('_', ' ')} | {r['measured_phase']} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    errs = [abs(r["error"]) for r in rows]
    within3 = sum(e <= 0.03 for e in errs)
    within10 = sum(e <= 0.10 for e in errs)
    return (f"{len(rows)} cases: mean |error| {100 * sum(errs) / len(errs):.1f}%, max {100 * max(errs):.1f}%; "
            f"{within3} within 3%, {within10} within 10%.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", default=str(ROOT / "benchmarks/results/measured_cpu.json"))
    ap.add_argument("--write", help="write the markdown table into this file between the markers")
    args = ap.parse_args()
    cases = [c for c in json.loads(Path(args.measured).read_text()) if "measured" in c]
    rows = [compare(c) for c in cases]
    rows.sort(key=lambda r: -abs(r["error"]))
    md = summary(rows) + "\n\n" + table(rows)
    print(md)
    if args.write:
        path = Path(args.write)
        text = path.read_text()
        start, end = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        path.write_text(f"{head}{start}\n{md}\n{end}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
