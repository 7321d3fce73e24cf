"""Measure what a GPU shows for ~20 real cases of this stack and compare with the estimate.

    python benchmarks/gpu_measure.py [--quick] [--device cuda|cpu] [--out benchmarks/results/gpu_<card>.json]

Each case builds a small model of a real architecture from its config (random weights, no download:
benchmarks/tiny_models.py with GPU-sized dimensions, about 1.1B parameters for the llama-style ones),
loads it as the runner does (advisor/stack.py: bf16 / peft LoRA / bitsandbytes NF4 +
prepare_model_for_kbit_training, non-reentrant checkpointing) and trains 3 Trainer-style steps. On
CUDA every case runs in its own process (PYTORCH_CUDA_ALLOC_CONF, e.g. expandable_segments, is read
when CUDA starts) and records

* ``torch.cuda.max_memory_allocated()`` and ``max_memory_reserved()`` over the whole run (loading
  included), and the reserve after loading;
* the process's NVML used memory (what nvidia-smi shows), sampled every 10 ms, peak;
* the step time of the last step;

beside the analytic estimate for the same plan (``--mode analytic``: peak_allocated_bytes,
peak_reserved_bytes, peak_reserved_high_bytes) and, with ``--simulate``, the simulate estimate.
Cases: full / LoRA / QLoRA, checkpointing on and off, sdpa and flash-attention 2 (when installed),
8-bit AdamW, one long-context case, expandable_segments on and off, five families. Budget: under 8
minutes on one H100 / H200.

``--device cpu`` runs the same plumbing on two tiny cases on the CPU (live tensor bytes from the CPU
profiler, runner.memtrace) so that CI can test the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from advisor.units import MIB

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

STEPS = 3
# GPU-sized dimensions of real architectures (TinyLlama-1.1B's shape for llama-style)
GPU_DIMS = {
    "llama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=16384),
    "mistral": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                    num_key_value_heads=8, vocab_size=32768, max_position_embeddings=16384),
    "qwen2": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=16384),
    "phi3": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32064, max_position_embeddings=16384),
    "gemma2": dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=10, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=192, vocab_size=256000, sliding_window=4096,
                   max_position_embeddings=16384),
}


def C(family: str, method: str, batch: int = 2, seq: int = 1024, gc: bool = True, attn: str = "sdpa",
      optimizer: str = "adamw", alloc_conf: str = "", precision: str = "bf16") -> dict:
    return {"family": family, "method": method, "batch": batch, "seq": seq, "gc": gc, "attn": attn,
            "optimizer": optimizer, "alloc_conf": alloc_conf, "precision": precision}


def gpu_cases(flash: bool) -> list[dict]:
    exp = "expandable_segments:True"
    cases = [C("llama", m, gc=g) for m in ("full", "lora", "qlora") for g in (True, False)]
    cases += [C("llama", m, alloc_conf=exp) for m in ("full", "lora", "qlora")]
    if flash:
        cases += [C("llama", m, attn="flash_attention_2") for m in ("full", "lora", "qlora")]
    cases += [C("llama", "lora", batch=1, seq=8192),  # long context
              C("llama", "full", optimizer="adamw_8bit"),
              C("llama", "lora", batch=4),
              C("mistral", "full"), C("qwen2", "lora"), C("phi3", "lora"), C("gemma2", "lora", attn="eager"),
              C("llama", "qlora", batch=4, alloc_conf=exp)]
    return cases


def cpu_cases() -> list[dict]:
    return [C("llama", "lora", batch=2, seq=64), C("qwen2", "full", batch=1, seq=64, gc=False, precision="fp32")]


def case_id(c: dict) -> str:
    parts = [c["family"], c["method"], c["precision"], c["optimizer"], "gc" if c["gc"] else "nogc", c["attn"],
             f"b{c['batch']}s{c['seq']}"]
    if c["alloc_conf"]:
        parts.append(c["alloc_conf"].replace(":", "=").replace(",", "+"))
    return "/".join(parts)


def train_spec(c: dict):
    from advisor.spec import LoraSpec, TrainSpec

    return TrainSpec(method=c["method"], precision=c["precision"], optimizer=c["optimizer"], micro_batch=c["batch"],
                     seq_len=c["seq"], grad_checkpointing=c["gc"], attn_impl=c["attn"], lora=LoraSpec(r=16, alpha=16))


def model_dir(c: dict, device: str) -> tuple[Path, dict]:
    from benchmarks.tiny_models import build_tiny, make_config

    over = GPU_DIMS[c["family"]] if device == "cuda" else {}
    return build_tiny(c["family"], **over), make_config(c["family"], **over).to_dict()


def predict(c: dict, cfg: dict, device: str, gpu_name: str | None, simulate: bool) -> dict:
    from advisor.memory import estimate
    from advisor.model import count_on_meta
    from advisor.spec import Plan

    plan = Plan.model_validate({"task": "training", "training": train_spec(c).model_dump(),
                                "hardware": {"gpu": gpu_name, "device": device},
                                "data": {"padded": False}})  # stack.make_batch: full-length batches
    shape = count_on_meta(c["family"], cfg)
    bd = estimate(plan, shape)
    out = {"allocated": bd.peak_allocated_bytes, "reserved": bd.peak_reserved_bytes,
           "reserved_high": bd.peak_reserved_high_bytes, "overhead": bd.overhead, "peak_phase": bd.peak_phase,
           "reserved_model": bd.reserved_model}
    if simulate:
        from advisor.simulate import SimulateError
        from advisor.simulate import simulate as sim

        try:
            sb = sim(plan, shape)
            out["simulate"] = {"allocated": sb.peak_allocated_bytes, "reserved": sb.peak_reserved_bytes}
        except SimulateError as e:
            out["simulate"] = {"declined": str(e)}
    return out


class _Nvml:
    """Peak NVML used memory of this process, sampled in a thread (None without pynvml)."""

    def __init__(self, index: int = 0):
        self.peak: int | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv, self._h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001 - no NVML: the field stays None
            self._nv = None

    def _used(self) -> int | None:
        for fn in ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses"):
            f = getattr(self._nv, fn, None)
            if f is None:
                continue
            try:
                for p in f(self._h):
                    if p.pid == os.getpid() and p.usedGpuMemory is not None:
                        return int(p.usedGpuMemory)
                return None
            except Exception:  # noqa: BLE001
                continue
        return None

    def __enter__(self):
        if self._nv is not None:
            def loop():
                while not self._stop.is_set():
                    u = self._used()
                    if u is not None:
                        self.peak = max(self.peak or 0, u)
                    time.sleep(0.01)
            self._t = threading.Thread(target=loop, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._nv is not None:
            self._t.join(timeout=1)
            u = self._used()
            if u is not None:
                self.peak = max(self.peak or 0, u)
        return False


def run_one(c: dict, device: str) -> dict:
    """Load, train STEPS steps, measure (in this process)."""
    import warnings

    import torch

    from advisor import stack

    warnings.filterwarnings("ignore")
    spec = train_spec(c)
    path, _ = model_dir(c, device)
    out: dict = {"id": case_id(c), "case": c}

    def work():
        model = stack.load_for_training(path, spec, device=device)
        opt = stack.make_optimizer(model, spec.optimizer, spec.learning_rate)
        if device == "cuda":
            torch.cuda.synchronize()
            out["reserved_after_load"] = torch.cuda.max_memory_reserved()
        batch = stack.make_batch(model.config.get_text_config().vocab_size, c["batch"], c["seq"], 0, device)
        for _ in range(STEPS):
            t0 = time.perf_counter()
            stack.train_step(model, batch, opt, spec)
            if device == "cuda":
                torch.cuda.synchronize()
            out["step_seconds"] = round(time.perf_counter() - t0, 4)

    if device == "cuda":
        torch.cuda.init()
        with _Nvml(torch.cuda.current_device()) as nv:
            work()
            torch.cuda.synchronize()
        out["measured"] = {"max_allocated": torch.cuda.max_memory_allocated(),
                           "max_reserved": torch.cuda.max_memory_reserved(), "nvml_peak": nv.peak,
                           "reserved_after_load": out.pop("reserved_after_load")}
        out["gpu"] = torch.cuda.get_device_name()
        out["torch_cuda"] = torch.version.cuda
    else:
        from runner import memtrace

        torch.set_num_threads(1)
        trace = memtrace.measure(work)
        out["measured"] = {"max_allocated": trace.last.peak_bytes, "max_reserved": trace.last.peak_bytes,
                           "nvml_peak": None}
    return out


def flash_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def compare(r: dict) -> dict:
    m, p = r["measured"], r["predicted"]
    err = {"allocated": p["allocated"] / m["max_allocated"] - 1}
    if r.get("device") == "cuda":
        err["reserved_torch"] = (p["reserved"] - p["overhead"].get("cuda_context", 0)
                                 - p["overhead"].get("nccl_buffers", 0)) / m["max_reserved"] - 1
        if m.get("nvml_peak"):
            err["nvidia_smi"] = p["reserved"] / m["nvml_peak"] - 1
            err["within_band"] = m["nvml_peak"] <= p["reserved_high"]
    return err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="the first 4 cases (CPU: the 2 tiny cases)")
    ap.add_argument("--simulate", action="store_true", help="also the simulate estimate (adds seconds per case)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="run only the first N cases")
    ap.add_argument("--budget", type=float, default=450.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a case as JSON: run it in this process, print the result
    a = ap.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(run_one(json.loads(a.one), a.device)), flush=True)
        return 0
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: use --device cpu to test the plumbing", file=sys.stderr)
            return 2
        gpu_name = torch.cuda.get_device_name()
        cases = gpu_cases(flash_installed())
    else:
        gpu_name, cases = None, cpu_cases()
    if a.quick:
        cases = cases[:4] if a.device == "cuda" else cases[:2]
    if a.limit:
        cases = cases[:a.limit]
    from advisor.gpus import GpuError, find_gpu

    try:
        profile = find_gpu(gpu_name).name if gpu_name else None
    except GpuError:
        profile = None
    results, t0 = [], time.perf_counter()
    for i, c in enumerate(cases, 1):
        if time.perf_counter() - t0 > a.budget:
            print(f"budget of {a.budget:.0f}s spent: {len(cases) - i + 1} cases not run", flush=True)
            break
        env = dict(os.environ)
        if c["alloc_conf"]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = c["alloc_conf"]
        else:
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        proc = subprocess.run([sys.executable, __file__, "--device", a.device, "--one", json.dumps(c)],
                              capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            r = {"id": case_id(c), "case": c, "error": (proc.stderr or proc.stdout)[-2000:]}
            print(f"[{i:2d}/{len(cases)}] {case_id(c):60s} ERROR {r['error'][-200:]}", flush=True)
            results.append(r)
            continue
        r = json.loads(line[len("RESULT "):])
        r["device"] = a.device
        _, cfg = model_dir(c, a.device)
        r["predicted"] = predict(c, cfg, a.device, profile, a.simulate)
        r["error_vs_measured"] = compare(r)
        m = r["measured"]
        e = r["error_vs_measured"]
        nv = f"nvml {m['nvml_peak'] / MIB:8.0f} MiB ({100 * e['nvidia_smi']:+.1f}%)" if "nvidia_smi" in e else ""
        print(f"[{i:2d}/{len(cases)}] {r['id']:60s} alloc {m['max_allocated'] / MIB:8.1f} MiB "
              f"({100 * e['allocated']:+.1f}%) reserved {m['max_reserved'] / MIB:8.1f} MiB {nv}", flush=True)
        results.append(r)
    card = (gpu_name or "cpu").lower().replace(" ", "-")
    out = a.out or REPO_ROOT / "benchmarks" / "results" / f"gpu_measure_{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": a.device, "gpu": gpu_name, "profile": profile,
                               "seconds": round(time.perf_counter() - t0, 1), "cases": results}, indent=1) + "\n")
    errors = sum("error" in r for r in results)
    print(f"{len(results)} cases, {errors} errors, {time.perf_counter() - t0:.0f}s -> {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
