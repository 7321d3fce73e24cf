"""report.json: what a run measured next to what the advisor predicted for it.

``measured_memory`` reads the counters (CUDA's peak allocated/reserved, NVML, process RSS, the
CPU's profiled tensor peak), ``comparison`` picks the measurement that means the same as the
prediction on this device, and ``write_json`` replaces the file atomically, so a reader never sees
half a report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.events import clean_number


def measured_memory(monitor, device: str | None, rss_before_model: int | None,
                    tensor_peak_cpu: int | None) -> dict[str, Any]:
    """Peak memory as every counter saw it (None where a counter does not exist here)."""
    import sys

    torch = sys.modules.get("torch")
    m: dict[str, Any] = {"torch_peak_allocated": None, "torch_peak_reserved": None, "nvml_peak": None,
                         "rss_peak": None, "rss_before_model": rss_before_model}
    if monitor is not None:
        monitor.read()
        m["rss_peak"] = monitor.peak["rss"]
        m["nvml_peak"] = monitor.peak["nvml_used"]
    if torch is not None and str(device or "cpu").startswith("cuda") and torch.cuda.is_available():
        m["torch_peak_allocated"] = int(torch.cuda.max_memory_allocated())
        m["torch_peak_reserved"] = int(torch.cuda.max_memory_reserved())
    if m["rss_peak"] is not None and m["rss_before_model"] is not None:
        m["rss_growth"] = m["rss_peak"] - m["rss_before_model"]
    m["tensor_peak_cpu"] = tensor_peak_cpu
    return m


def comparison(measured: dict[str, Any], predicted: dict[str, Any]) -> dict[str, Any]:
    """The one measured number that means what ``predicted['peak_allocated_bytes']`` means, and their ratio."""
    if measured["torch_peak_allocated"] is not None:
        out = {"what": "torch.cuda.max_memory_allocated vs predicted peak_allocated_bytes",
               "measured": measured["torch_peak_allocated"]}
    elif measured.get("tensor_peak_cpu"):
        out = {"what": "live tensor bytes at the peak of one profiled step (torch.profiler CPU memory "
                       "events) vs predicted peak_allocated_bytes",
               "measured": measured["tensor_peak_cpu"]}
    else:
        out = {"what": "process RSS growth from before the model was loaded to its peak vs predicted "
                       "peak_allocated_bytes (RSS also holds non-tensor memory: library code, allocator "
                       "caches; on a tiny model that dominates)",
               "measured": measured.get("rss_growth")}
    out["predicted"] = predicted.get("peak_allocated_bytes")
    if out["measured"] and out["predicted"]:
        out["ratio"] = round(out["measured"] / out["predicted"], 3)
    return out


def loss_summary(first: float | None, history: list[dict], val: float | None) -> dict[str, float | None]:
    """First and last step's loss, the mean of the last five (less noisy), the last validation loss."""
    tail = [h["loss"] for h in history[-5:] if h.get("loss") is not None]
    return {"first": clean_number(first),
            "last": clean_number(history[-1]["loss"]) if history else None,
            "final_train": clean_number(sum(tail) / len(tail)) if tail else None,
            "final_val": clean_number(val)}


def write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` atomically and durably, never through a link (advisor.safefile.write_atomic)."""
    from advisor.safefile import write_atomic

    write_atomic(path, json.dumps(obj, indent=2, default=str))
