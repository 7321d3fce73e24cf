"""Speed goal of the estimate with time (a benchmark, not a timed test).

    python benchmarks/bench_time.py

- analytic memory estimate + fit verdict + job time (advisor.throughput.job_time), in-process,
  shape cached: goal < 5 ms
- --max seq and --max batch (advisor.limits): goal well under a second
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from advisor.gpus import find_gpu
    from advisor.limits import max_batch, max_seq
    from advisor.memory import estimate
    from advisor.model import resolve
    from advisor.policy import fit_verdict
    from advisor.spec import Plan
    from advisor.throughput import job_time

    shape, gpu = resolve("meta-llama/Llama-3.1-8B"), find_gpu("a100-80gb-sxm")
    plans = [Plan.model_validate({"training": {"method": m, "micro_batch": b}, "hardware": {"gpu": None}})
             for m in ("full", "lora", "qlora") for b in (1, 2, 4, 8)]
    times = []
    for k in range(2000):
        p = plans[k % len(plans)]
        t0 = time.perf_counter()
        bd = estimate(p, shape)
        fit_verdict(bd.peak_reserved_bytes, gpu.memory_bytes)
        job_time(p, shape, gpu, 1000, 512, 3)
        times.append(time.perf_counter() - t0)
    med, p99 = statistics.median(times), sorted(times)[int(0.99 * len(times))]
    print(f"estimate + verdict + job time: median {med * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms (goal < 5 ms)")
    lim = []
    for p in plans[::4]:
        t0 = time.perf_counter()
        max_seq(p, shape, gpu)
        max_batch(p, shape, gpu)
        lim.append(time.perf_counter() - t0)
    print(f"--max seq + --max batch: worst {max(lim) * 1e3:.1f} ms over {len(lim)} plans (goal well under 1 s)")
    ok = p99 < 0.005 and max(lim) < 1.0
    print("OK" if ok else "GOAL MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
