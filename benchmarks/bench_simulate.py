"""Time ``--mode simulate`` on a real-size model and print the result.

    python benchmarks/bench_simulate.py [--model meta-llama/Llama-3.1-8B] [--method lora]
        [--precision bf16] [--seq 2048] [--batch 1] [--no-grad-checkpointing] [--task training|inference]
        [--full]   (simulate every layer instead of extrapolating from 2, 3 and 4)

Target: Llama-3.1-8B, LoRA, seq 2048, batch 1 in under 20 s on a 2-core machine (imports included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from advisor.units import GIB  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="meta-llama/Llama-3.1-8B")
    ap.add_argument("--task", default="training", choices=["training", "inference"])
    ap.add_argument("--method", default="lora")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-grad-checkpointing", dest="gc", action="store_false")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--full", action="store_true", help="simulate every layer (no extrapolation)")
    ap.add_argument("--compare", action="store_true", help="also print the analytic estimate")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    from advisor.model import resolve
    from advisor.spec import Plan

    shape = resolve(args.model)
    if args.task == "training":
        plan = Plan(model={"ref": args.model}, task="training", hardware={"device": args.device},
                    training={"method": args.method, "precision": args.precision, "optimizer": args.optimizer,
                              "micro_batch": args.batch, "seq_len": args.seq, "grad_checkpointing": args.gc})
    else:
        plan = Plan(model={"ref": args.model}, task="inference", hardware={"device": args.device},
                    inference={"batch": args.batch, "seq_len": args.seq, "precision": args.precision})
    t1 = time.perf_counter()
    from advisor.simulate import simulate

    last = [0.0]

    def progress(frac: float, msg: str) -> None:
        now = time.perf_counter() - t0
        if now - last[0] > 1.0 or frac >= 1.0:
            print(f"  [{now:5.1f}s] {frac:4.0%} {msg}", flush=True)
            last[0] = now

    b = simulate(plan, shape, progress=progress, extrapolate=not args.full)
    t2 = time.perf_counter()
    print(f"{args.model} {args.task} {args.method if args.task == 'training' else ''} {args.precision} "
          f"seq {args.seq} batch {args.batch} gc={args.gc} device={args.device}")
    print(f"peak allocated {b.peak_allocated_bytes / GIB:.3f} GiB ({b.peak_allocated_bytes} B) in {b.peak_phase}; "
          f"reserved {b.peak_reserved_bytes / GIB:.3f} GiB")
    for k, v in sorted(b.components.items(), key=lambda kv: -kv[1]):
        print(f"  {k:20s} {v / GIB:9.3f} GiB")
    print("phases: " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in b.phases.items()))
    for n in b.notes:
        print(f"note: {n}")
    if args.compare:
        from advisor.memory import estimate

        a = estimate(plan, shape)
        print(f"analytic: {a.peak_allocated_bytes / GIB:.3f} GiB in {a.peak_phase}")
    print(f"time: {t2 - t0:.1f}s total ({t1 - t0:.1f}s resolve, {t2 - t1:.1f}s simulate incl. torch/transformers "
          "imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
