"""What flushing a checkpoint to the disk costs: runner.checkpoint.write_checkpoint with and without fsync.

A checkpoint is written to a temporary folder and renamed; ``durable=True`` (what the runner does)
also fsyncs every file and the directories around the rename, so that a power loss leaves the old or
the new checkpoint, never a renamed folder whose files were still in the page cache. Measured here on
the real writer (safetensors weights, torch.save of a real AdamW state, JSON) for trainable weights of
a LoRA adapter up to a full model of a few hundred MB, median of several repeats.

    python benchmarks/bench_checkpoint.py [--sizes 1,64,256] [--repeat 5] [--dir PATH]

The folder decides the result (tmpfs has nothing to flush; a network file system much more): pass
--dir on the disk the run directory will use.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _model(mb: float):
    import torch

    n = max(1, int(mb * 2**20 / 4))  # fp32 values
    model = torch.nn.Linear(n // 1024 or 1, 1024, bias=False)

    class Saver:
        def save_pretrained(self, d, state_dict=None):
            from safetensors.torch import save_file

            Path(d).mkdir()
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(d) / "model.safetensors")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()  # real exp_avg and exp_avg_sq: the optimizer file is twice the weights
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Saver(), opt, sched, model.weight.numel() * 4


def measure(mb: float, repeat: int, root: Path) -> dict:
    from runner.checkpoint import write_checkpoint

    saver, opt, sched, nbytes = _model(mb)
    out = {"weights_mb": round(nbytes / 2**20, 1), "checkpoint_mb": round(3 * nbytes / 2**20, 1)}
    for durable in (False, True):
        times = []
        for i in range(repeat):
            d = root / f"{mb}-{durable}-{i}"
            t0 = time.perf_counter()
            write_checkpoint(d, 1, model=saver, optimizer=opt, scheduler=sched, state={"position": 1}, keep=1,
                             weights_name="model", durable=durable)
            times.append(time.perf_counter() - t0)
        out["fsync_s" if durable else "no_fsync_s"] = round(statistics.median(times), 4)
    out["extra_s"] = round(out["fsync_s"] - out["no_fsync_s"], 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,16,64,256", help="trainable weights in MB, comma-separated")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", help="where to write (default: a temporary folder)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        print("| trainable weights | checkpoint | write, no fsync | write + fsync | fsync adds |")
        print("|---:|---:|---:|---:|---:|")
        for mb in (float(x) for x in a.sizes.split(",")):
            r = measure(mb, a.repeat, Path(tmp))
            print(f"| {r['weights_mb']} MB | {r['checkpoint_mb']} MB | {r['no_fsync_s']:.3f} s | {r['fsync_s']:.3f} s "
                  f"| {r['extra_s']:+.3f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
