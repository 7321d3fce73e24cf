"""`tuneplan export` on the CPU: the time and host RAM it takes against what it says before it starts.

For each size, a Llama of that size (random weights, built locally, saved in fp32) and a run
directory holding a LoRA adapter for it (r=16 on every linear layer, random non-zero B, saved with
peft) are written to a temporary folder; then `tuneplan export RUN --dtype D [--4bit]` runs in a
child process. Reported per case: the predicted seconds and RAM (runner.export.plan_export: the RAM
is advisor.lifecycle.merge_parts), the measured wall time, and the child's peak RSS and peak
anonymous RSS (RssAnon, sampled every 20 ms), each minus that of a child that only imports the same
libraries (torch, transformers, peft, bitsandbytes). The anonymous part is what the export needs; the
rest of RSS is the mapped checkpoint's file pages (an fp32 file exported in bf16 is resident twice
in RSS: its pages and the bf16 copy), which the kernel can drop.

    .venv/bin/python benchmarks/bench_export.py [--sizes small,medium] [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # LlamaConfig overrides of runner.demo.TINY_LLAMA (vocabulary: the demo tokenizer's 800 tokens)
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=8),
    "large": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
                  num_key_value_heads=8),
    # held out: runner.export's time constants were fitted on the three above, never on this one
    "validation": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=10, num_attention_heads=10,
                       num_key_value_heads=5),
}
ROLE = {"validation": "validation"}  # every other size: calibration
CASES = (("bf16", False), ("fp32", False), ("bf16", True))


def make_run(root: Path, size: str) -> Path:
    """root/model (the base) and root/run (plan.yaml + adapter/), as a finished LoRA run leaves them."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from advisor.planfile import save_plan
    from advisor.spec import build_plan
    from advisor.stack import lora_config
    from runner.demo import DEMO_DATA, build_model_dir

    model_dir = build_model_dir(root / "model", **SIZES[size])
    plan = build_plan({"model": {"ref": str(model_dir)},
                       "training": {"method": "lora", "precision": "bf16", "seq_len": 128,
                                    "lora": {"r": 16, "alpha": 32, "targets": "all-linear"}},
                       "hardware": {"gpu": None, "device": "cpu"},
                       "data": {"path": str(DEMO_DATA)}, "run": {"output_dir": str(root), "name": "run"}})
    run = root / "run"
    run.mkdir()
    save_plan(plan, run / "plan.yaml")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, lora_config(plan.training))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(run / "adapter")
    return run


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def child_peak(cmd: list[str]) -> tuple[float, int, int, int]:
    """(wall seconds, exit code, peak RSS bytes, peak anonymous RSS bytes) of a child process. The anonymous
    part (RssAnon, sampled every 20 ms) is the memory the process needs; the rest of RSS is file pages
    (the mapped safetensors files), which the kernel can drop and read again."""
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # the child: exec the command (argument list, no shell)
        os.execvp(cmd[0], cmd)
    anon = 0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        anon = max(anon, _status_kib(pid, "RssAnon"))
        time.sleep(0.02)
    return time.time() - t0, os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, anon * 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,medium,large,validation")
    ap.add_argument("--save")
    a = ap.parse_args()
    py = sys.executable
    imports = [py, "-c", "import torch, transformers, peft, bitsandbytes; "
               "from transformers import AutoModelForCausalLM; import runner.export, runner.tuned"]
    _, _, baseline, anon_baseline = child_peak(imports)
    rows = []
    for size in a.sizes.split(","):
        with tempfile.TemporaryDirectory() as td:
            run = make_run(Path(td), size)
            from runner.export import plan_export
            from runner.tuned import open_run

            for dtype, nf4 in CASES:
                out = Path(td) / f"out-{dtype}{'-4bit' if nf4 else ''}"
                xp = plan_export(open_run(run), out, dtype, nf4)
                cmd = [py, "-m", "advisor.cli.main", "export", str(run), "--out", str(out), "--dtype", dtype,
                       *(["--4bit"] if nf4 else [])]
                wall, code, peak, anon = child_peak(cmd)
                rows.append({"size": size, "role": ROLE.get(size, "calibration"), "params": xp.params,
                             "dtype": dtype, "nf4": nf4, "exit": code,
                             "predicted_s": round(xp.seconds, 1), "measured_s": round(wall, 1),
                             "predicted_ram": xp.ram_bytes, "measured_rss_growth": peak - baseline,
                             "measured_anon_growth": anon - anon_baseline,
                             "ratio_anon": round((anon - anon_baseline) / xp.ram_bytes, 3),
                             "predicted_disk": xp.disk_bytes,
                             "written": sum(f.stat().st_size for d in (out, Path(str(out) + "-nf4")) if d.exists()
                                            for f in d.iterdir())})
                print(json.dumps(rows[-1]), flush=True)
    result = {"machine": f"{os.cpu_count()} CPUs", "import_baseline_rss": baseline,
              "import_baseline_anon": anon_baseline, "rows": rows,
              "ru_maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if a.save:
        Path(a.save).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
