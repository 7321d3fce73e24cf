"""Time ``--mode simulate`` on a real-size model and print the result.

    python benchmarks/bench_simulate.py [--model meta-llama/Llama-3.1-8B] [--method lora]
        [--precision bf16] [--seq 2048] [--batch 1] [--no-grad-checkpointing] [--task training|inference]
        [--full]   (simulate every layer instead of extrapolating from 2, 3 and 4)
        [--check-full]  (also simulate every layer and check that the fast answer is the same, byte for byte)

Prints wall and CPU time (the process's own: the machine's 2 cores are shared, so wall time varies with the
load; CPU time much less). Deep models simulate 2, 3 and 4 layers and extrapolate, on the GPU too: the
allocator replay gets the allocation sequence of every layer built from theirs (advisor/simulate/events.py).

Measured on this 2-core machine (shared with other work), Llama-3.1-8B LoRA seq 2048 batch 1, gradient
checkpointing, device cuda, `python benchmarks/bench_simulate.py`, the process's user + system CPU time with
the imports (about 4.5 s of it):

- before (commit a9fb1bb: every one of the 32 layers simulated for the allocator replay, weights initialized
  on fake tensors): 19.2 s CPU (22.8 s wall);
- after (2, 3 and 4 layers; the 32-layer allocation sequence built from theirs; no weight init): 10.4 s CPU
  (13.7 s wall);

the same answer, byte for byte: peak allocated 20,287,408,392 B in backward, replay 20.29 GiB reserved
(`--check-full` runs every layer too and compares).
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
    ap.add_argument("--check-full", action="store_true",
                    help="also simulate every layer and check the fast answer is the same")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    c0 = time.process_time()
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
    c2 = time.process_time()
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
          f"imports); CPU {c2 - c0:.1f}s")
    if args.check_full:
        t3, c3 = time.perf_counter(), time.process_time()
        full = simulate(plan, shape, extrapolate=False)
        same = (full.phases == b.phases and full.components == b.components
                and full.peak_reserved_bytes == b.peak_reserved_bytes and full.overhead == b.overhead)
        print(f"every layer: {time.perf_counter() - t3:.1f}s, CPU {time.process_time() - c3:.1f}s (imports done); "
              f"same answer: {same}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
