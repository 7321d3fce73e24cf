"""GPU profiles: a data table (profiles/gpus.yaml) plus the user's own YAML, matched forgivingly.

Users add or override GPUs with a YAML file of the same shape, named by ``TUNEPLAN_GPUS`` or
placed at ``~/.config/tuneplan/gpus.yaml``; an entry with an existing ``id`` replaces it.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from advisor.model import PROFILES_DIR

GIB = 1024**3


class GpuError(ValueError):
    """Unknown GPU or a malformed GPU file."""


@dataclass(frozen=True)
class Gpu:
    id: str
    name: str
    aliases: tuple[str, ...]
    vendor: str
    memory_gib: float
    bf16: bool
    fp16_tflops: float
    bf16_tflops: float | None
    bandwidth_gbs: float
    price_usd_hour: float | None
    price_source: str
    unified_memory: bool = False
    interconnect: str = "pcie"  # between GPUs of one node: nvlink | pcie | infinity-fabric | none
    link_gbs: float = 32.0  # GB/s per GPU per direction over that interconnect (PCIe 4.0 x16 when unstated)
    gpus_per_node: int = 8  # GPUs one node holds; beyond that rings cross the network
    internode_gbs: float = 25.0  # GB/s per GPU between nodes (one 200 Gb/s NIC per GPU when unstated)
    interconnect_source: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def tflops(self) -> float:
        """Dense half-precision tensor throughput used for training time."""
        return float(self.bf16_tflops or self.fp16_tflops)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", "").replace("geforce", ""))


def _parse(data: object, where: str) -> list[Gpu]:
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise GpuError(f"{where}: expected a mapping with a 'gpus' list")
    out = []
    for n, e in enumerate(data["gpus"], 1):
        if not isinstance(e, dict):
            raise GpuError(f"{where}: gpus entry {n} is not a mapping")
        missing = [k for k in ("id", "name", "memory_gib") if k not in e]
        if missing:
            raise GpuError(f"{where}: gpus entry {n} ({e.get('name', '?')}) lacks {', '.join(missing)}")
        try:
            out.append(Gpu(
                id=str(e["id"]), name=str(e["name"]),
                aliases=tuple(str(a).lower() for a in e.get("aliases", [])),
                vendor=str(e.get("vendor", "nvidia")), memory_gib=float(e["memory_gib"]),
                bf16=bool(e.get("bf16", True)), fp16_tflops=float(e.get("fp16_tflops") or 0),
                bf16_tflops=float(e["bf16_tflops"]) if e.get("bf16_tflops") else None,
                bandwidth_gbs=float(e.get("bandwidth_gbs") or 0),
                price_usd_hour=float(e["price_usd_hour"]) if e.get("price_usd_hour") is not None else None,
                price_source=str(e.get("price_source", "")), unified_memory=bool(e.get("unified_memory", False)),
                interconnect=str(e.get("interconnect", "pcie")).lower(),
                link_gbs=float(e["link_gbs"]) if e.get("link_gbs") is not None else 32.0,
                gpus_per_node=int(e.get("gpus_per_node") or 8),
                internode_gbs=float(e["internode_gbs"]) if e.get("internode_gbs") is not None else 25.0,
                interconnect_source=str(e.get("interconnect_source", "")),
            ))
        except (TypeError, ValueError) as err:
            raise GpuError(f"{where}: gpus entry {n} ({e.get('name', '?')}): {err}") from None
        if out[-1].memory_gib <= 0:
            raise GpuError(f"{where}: gpus entry {n} ({e['name']}): memory_gib must be positive")
    return out


def _user_file() -> Path | None:
    env = os.environ.get("TUNEPLAN_GPUS")
    if env:
        return Path(env).expanduser()
    p = Path(os.environ.get("XDG_CONFIG_HOME", os.path.expanduser("~/.config"))) / "tuneplan" / "gpus.yaml"
    return p if p.is_file() else None


@lru_cache(maxsize=4)
def _load(user: str | None) -> tuple[dict[str, Gpu], str]:
    import yaml

    data = yaml.safe_load((PROFILES_DIR / "gpus.yaml").read_text())
    table = {g.id: g for g in _parse(data, "profiles/gpus.yaml")}
    if user:
        path = Path(user)
        try:
            extra = yaml.safe_load(path.read_text())
        except OSError as e:
            raise GpuError(f"cannot read GPU file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise GpuError(f"GPU file {path} is not valid YAML: {e}") from None
        for g in _parse(extra, str(path)):
            table[g.id] = g
    return table, str(data.get("prices_as_of", "unknown"))


def gpu_table() -> dict[str, Gpu]:
    user = _user_file()
    return _load(str(user) if user else None)[0]


def prices_as_of() -> str:
    user = _user_file()
    return _load(str(user) if user else None)[1]


def find_gpu(name: str) -> Gpu:
    """'RTX 4090', 'rtx-4090', '4090', 'H100 80GB', 'h100' all match; most specific name first."""
    table = gpu_table()
    key = _key(name)
    if not key:
        raise GpuError("empty GPU name")
    for g in table.values():
        if key == _key(g.id) or key == _key(g.name) or any(key == _key(a) for a in g.aliases):
            return g
    # a unique containment match ("rtx4090 24gb" contains "rtx4090")
    hits = [g for g in table.values() if any(_key(a) and _key(a) in key for a in (g.id, *g.aliases))]
    if hits:
        return max(hits, key=lambda g: max(len(_key(a)) for a in (g.id, *g.aliases) if _key(a) in key))
    names = {_key(a): g.name for g in table.values() for a in (g.id, g.name, *g.aliases)}
    near = []
    for k in difflib.get_close_matches(key, list(names), n=8, cutoff=0.5):
        if names[k] not in near:
            near.append(names[k])
    hint = f" Did you mean: {', '.join(near[:4])}?" if near else ""
    raise GpuError(f"unknown GPU {name!r}.{hint} See `tuneplan profiles --gpus`, or add it in a YAML "
                   "file named by TUNEPLAN_GPUS.")
