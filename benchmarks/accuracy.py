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
from benchmarks.docblock import write_between  # noqa: E402

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
    # the harness trains full-length batches (advisor.stack.make_batch): no padding
    return Plan.model_validate({"task": "training", "training": case["spec"], "hardware": hw,
                                "data": {"padded": False}})


def simulate_bytes(case: dict, fresh: bool = False) -> int | None:
    """The simulate estimator for the same plan, or None where it declines (LLM.int8, an fp8 cache, ...).
    A failure after many simulations in one process is retried in a fresh process (the
    simulation patches process-wide state; the CLI runs one per process)."""
    from advisor.simulate import SimulateError, simulate

    try:
        return simulate(plan_for(case), shape_for(case)).peak_allocated_bytes
    except SimulateError:
        return None
    except Exception:
        if fresh:
            raise
        import subprocess
        out = subprocess.run([sys.executable, __file__, "--one", case["id"], "--measured", _MEASURED[0]],
                             capture_output=True, text=True)
        last = (out.stdout.strip().splitlines() or ["None"])[-1]
        return int(last) if last.isdigit() else None


_MEASURED = [str(ROOT / "benchmarks/results/measured_cpu.json")]


def compare(case: dict, with_simulate: bool = False) -> dict:
    shape = shape_for(case)
    bd = estimate(plan_for(case), shape)
    measured = case["measured"]["peak_bytes"]
    sim = simulate_bytes(case) if with_simulate else None
    return {
        "id": case["id"], "measured": measured, "analytic": bd.peak_allocated_bytes,
        "error": bd.peak_allocated_bytes / measured - 1, "phase": bd.peak_phase,
        "measured_phase": case["measured"].get("peak_phase", "?"),
        "simulate": sim, "sim_error": (sim / measured - 1) if sim else None,
    }


def table(rows: list[dict]) -> str:
    sim = any(r["simulate"] for r in rows)
    head = "| case | measured MiB | analytic MiB | error |" + (" simulate MiB | error |" if sim else "")
    lines = [head + " analytic peak at | measured peak in |",
             "|---|---:|---:|---:|" + ("---:|---:|" if sim else "") + "---|---|"]
    for r in rows:
        cells = (f"| `{r['id']}` | {r['measured'] / 2**20:.2f} | {r['analytic'] / 2**20:.2f} | "
                 f"{100 * r['error']:+.1f}% |")
        if sim:
            cells += (f" {r['simulate'] / 2**20:.2f} | {100 * r['sim_error']:+.2f}% |" if r["simulate"]
                      else " - | - |")
        lines.append(cells + f" {r['phase'].replace('_', ' ')} | {r['measured_phase']} |")
    return "\n".join(lines)


def _stats(name: str, errs: list[float]) -> str:
    if not errs:
        return ""
    errs = [abs(e) for e in errs]
    return (f"{name}: {len(errs)} cases, mean |error| {100 * sum(errs) / len(errs):.2f}%, max "
            f"{100 * max(errs):.2f}%; {sum(e <= 0.02 for e in errs)} within 2%, {sum(e <= 0.03 for e in errs)} "
            f"within 3%, {sum(e <= 0.10 for e in errs)} within 10%.")


def summary(rows: list[dict]) -> str:
    lines = [_stats("analytic", [r["error"] for r in rows])]
    sims = [r["sim_error"] for r in rows if r["sim_error"] is not None]
    if sims:
        lines.append(_stats("simulate", sims))
    return "\n\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", default=str(ROOT / "benchmarks/results/measured_cpu.json"))
    ap.add_argument("--write", help="write the markdown table into this file between the markers")
    ap.add_argument("--simulate", action="store_true", help="also run the simulate estimator (minutes)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # simulate one case id in this process, print bytes
    args = ap.parse_args()
    _MEASURED[0] = args.measured
    cases = [c for c in json.loads(Path(args.measured).read_text()) if "measured" in c]
    if args.one:
        print(simulate_bytes(next(c for c in cases if c["id"] == args.one), fresh=True))
        return 0
    rows = []
    for k, c in enumerate(cases, 1):
        rows.append(compare(c, args.simulate))
        if args.simulate:
            print(f"[{k}/{len(cases)}] {c['id']}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: -abs(r["error"]))
    md = summary(rows) + "\n\n" + table(rows)
    print(md)
    if args.write:
        write_between(args.write, "accuracy", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
