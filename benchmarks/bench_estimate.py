"""Speed goals of the analytic estimate (a benchmark, not a timed test).

- one estimate in-process, shape cached: goal < 5 ms
- `tuneplan estimate --model <bundled profile> --json` cold, as a new process: goal < 1 s
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def in_process(n: int = 2000) -> float:
    from advisor.memory import estimate
    from advisor.model import resolve
    from advisor.spec import Plan

    shape = resolve("meta-llama/Llama-3.1-8B")
    plans = [Plan.model_validate({"training": {"method": m, "micro_batch": b}})
             for m in ("full", "lora", "qlora") for b in (1, 2, 4, 8)]
    t0 = time.perf_counter()
    for k in range(n):
        estimate(plans[k % len(plans)], shape)
    return (time.perf_counter() - t0) / n


def cold_cli(runs: int = 5) -> list[float]:
    exe = [sys.executable, "-m", "advisor.launcher", "estimate", "--model", "meta-llama/Llama-3.1-8B", "--json"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(exe, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    per = in_process()
    print(f"estimate in-process (shape cached): {per * 1e3:.3f} ms per call   goal < 5 ms   "
          f"{'OK' if per < 5e-3 else 'SLOW'}")
    times = cold_cli()
    med = statistics.median(times)
    print(f"tuneplan estimate --json, cold process: median {med:.2f} s of {len(times)} "
          f"(min {min(times):.2f}, max {max(times):.2f})   goal < 1 s   {'OK' if med < 1 else 'SLOW'}")
