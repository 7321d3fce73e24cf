"""Memory sampler: torch allocator (CUDA), NVML (per device and per process) and process RSS.

:func:`gpu_snapshot` and :func:`system_memory` import neither torch nor anything heavy (the TUI's
watch screen calls them); :class:`MemoryMonitor` reads the torch allocator only when torch is
already imported and CUDA is initialised, so it never starts CUDA itself.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from runner.events import MEMORY_KEYS

_nvml_ok: bool | None = None


def _nvml():
    """The initialised pynvml module, or None (no library, no driver, no GPU)."""
    global _nvml_ok
    if _nvml_ok is False:
        return None
    try:
        import pynvml

        if not _nvml_ok:
            pynvml.nvmlInit()
            _nvml_ok = True
        return pynvml
    except Exception:
        _nvml_ok = False
        return None


def _name(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def gpu_snapshot() -> list[dict] | None:
    """Every NVIDIA GPU: {index, name, used, total, utilization, processes: [{pid, used, name}]};
    bytes. None without NVML or without a GPU."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        count = nv.nvmlDeviceGetCount()
    except Exception:
        return None
    if count == 0:
        return None
    out = []
    for i in range(count):
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            dev: dict[str, Any] = {"index": i, "name": _name(nv.nvmlDeviceGetName(h)), "used": int(mem.used),
                                   "total": int(mem.total), "utilization": None, "processes": []}
            try:
                dev["utilization"] = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:
                pass
            try:
                procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:
                procs = []
            for p in procs:
                used = getattr(p, "usedGpuMemory", None)
                dev["processes"].append({"pid": int(p.pid), "used": int(used) if used else None,
                                         "name": _proc_name(int(p.pid))})
            out.append(dev)
        except Exception:
            continue
    return out or None


def _proc_name(pid: int) -> str | None:
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:
        return None


def system_memory() -> dict:
    """Host RAM: {total, available, used, rss} in bytes (rss: this process)."""
    import psutil

    vm = psutil.virtual_memory()
    return {"total": int(vm.total), "available": int(vm.available), "used": int(vm.total - vm.available),
            "rss": int(psutil.Process().memory_info().rss)}


def nvml_used_by(pid: int) -> int | None:
    """GPU bytes NVML attributes to process ``pid`` on all devices (None: no NVML/GPU or not listed)."""
    snap = gpu_snapshot()
    if snap is None:
        return None
    used = [p["used"] for d in snap for p in d["processes"] if p["pid"] == pid and p["used"] is not None]
    return sum(used) if used else None


def _cuda_ready():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:
        return None


def sample() -> dict[str, int | None]:
    """One reading, keys as in events.jsonl's ``memory`` objects (bytes, None when unavailable)."""
    import psutil

    out: dict[str, int | None] = dict.fromkeys(MEMORY_KEYS)
    out["rss"] = int(psutil.Process().memory_info().rss)
    torch = _cuda_ready()
    if torch is not None:
        out["torch_allocated"] = int(torch.cuda.memory_allocated())
        out["torch_reserved"] = int(torch.cuda.memory_reserved())
        out["torch_peak"] = int(torch.cuda.max_memory_allocated())
        out["nvml_used"] = nvml_used_by(os.getpid())
    return out


class MemoryMonitor(threading.Thread):
    """Samples memory every ``interval`` seconds on a daemon thread and keeps the peaks.

    ``on_sample(memory_dict)`` is called with each reading (the recipe writes a ``memory`` event).
    Without a GPU only RSS is sampled, and :attr:`note` says so.
    """

    def __init__(self, interval: float = 0.5, on_sample: Callable[[dict], None] | None = None):
        super().__init__(name="tuneplan-memory", daemon=True)
        self.interval = interval
        self.on_sample = on_sample
        self._stop_event = threading.Event()
        self.peak: dict[str, int | None] = dict.fromkeys(MEMORY_KEYS)
        self.samples = 0
        self.note = None if gpu_snapshot() else "no NVIDIA GPU/NVML here: sampling process RSS only"

    def read(self) -> dict[str, int | None]:
        """Sample now, update the peaks, return the reading."""
        m = sample()
        for k, v in m.items():
            if v is not None and (self.peak[k] is None or v > self.peak[k]):
                self.peak[k] = v
        self.samples += 1
        return m

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                m = self.read()
                if self.on_sample is not None:
                    self.on_sample(m)
            except Exception:  # a sampler must never kill the run
                continue

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=2 * self.interval + 1)
