"""GPU profiles: a data table (profiles/gpus.yaml) plus the user's own YAML, matched forgivingly.

Users add or override GPUs with a YAML file of the same shape, named by ``TUNEPLAN_GPUS`` or
placed at ``~/.config/tuneplan/gpus.yaml``; an entry with an existing ``id`` replaces it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from advisor.model import PROFILES_DIR
from advisor.problems import Problems
from advisor.units import GIB


class GpuError(Problems, ValueError):
    """Unknown GPU or a malformed GPU file: a user mistake every front end shows as one clear message."""


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
    # GB/s per direction between the GPU and its host's memory (offloaded activations cross it): the card's PCIe
    # link (link_gbs for a PCIe card), PCIe 4.0 x16 when unstated, 0 with unified memory (no separate host memory)
    host_link_gbs: float = 32.0
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


INTERCONNECTS = ("nvlink", "pcie", "infinity-fabric", "none")  # between the GPUs of one node


def _interconnect(e: dict) -> str:
    v = str(e.get("interconnect") or "pcie").strip().lower()
    if v not in INTERCONNECTS:
        raise ValueError(f"interconnect must be one of {', '.join(INTERCONNECTS)}, not {v[:40]!r}")
    return v


def _number(e: dict, key: str, what: str, *, default: float | None = None, positive: bool = False) -> float | None:
    """e[key] as a finite float (None/default when absent); ValueError saying what is wrong."""
    v = e.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"{key} must be a number ({what}), not {type(v).__name__}")
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"{key} must be a number ({what}), not {str(v)[:40]!r}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{key} must be a {'positive' if positive else 'non-negative'} finite number ({what}), "
                         f"not {v}")
    return x


def _parse(data: object, where: str) -> list[Gpu]:
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise GpuError(f"{where}: expected a mapping with a 'gpus' list (gpus: [{{id: ..., name: ..., "
                       "memory_gib: ...}]), as in tuneplan's profiles/gpus.yaml")
    out = []
    for n, e in enumerate(data["gpus"], 1):
        if not isinstance(e, dict):
            raise GpuError(f"{where}: gpus entry {n} is not a mapping")
        missing = [k for k in ("id", "name", "memory_gib") if e.get(k) in (None, "")]
        label = str(e.get("name", "?"))[:60]
        if missing:
            raise GpuError(f"{where}: gpus entry {n} ({label}) lacks {', '.join(missing)}")
        aliases = e.get("aliases") or []
        try:
            if not isinstance(aliases, list) or not all(isinstance(a, (str, int)) for a in aliases):
                raise ValueError("aliases must be a list of names")
            memory = _number(e, "memory_gib", "GiB of memory", positive=True) or 0.0
            bf16_tflops = _number(e, "bf16_tflops", "TFLOPS")
            price = _number(e, "price_usd_hour", "US$ per hour")
            out.append(Gpu(
                id=str(e["id"]), name=str(e["name"]),
                aliases=tuple(str(a).lower() for a in aliases),
                vendor=str(e.get("vendor", "nvidia")), memory_gib=memory,
                bf16=bool(e.get("bf16", True)), fp16_tflops=_number(e, "fp16_tflops", "TFLOPS", default=0.0) or 0.0,
                bf16_tflops=bf16_tflops or None,
                bandwidth_gbs=_number(e, "bandwidth_gbs", "GB/s", default=0.0) or 0.0,
                price_usd_hour=price,
                price_source=str(e.get("price_source", "")), unified_memory=bool(e.get("unified_memory", False)),
                interconnect=_interconnect(e),
                link_gbs=_number(e, "link_gbs", "GB/s per direction", default=32.0) or 0.0,
                gpus_per_node=int(_number(e, "gpus_per_node", "GPUs per node", default=8.0, positive=True) or 8),
                internode_gbs=_number(e, "internode_gbs", "GB/s between nodes", default=25.0) or 0.0,
                host_link_gbs=_number(e, "host_link_gbs", "GB/s per direction to the host", default=(
                    0.0 if e.get("unified_memory") else _number(e, "link_gbs", "GB/s per direction", default=32.0)
                    if _interconnect(e) == "pcie" else 32.0)) or 0.0,
                interconnect_source=str(e.get("interconnect_source", "")),
            ))
        except (TypeError, ValueError) as err:
            raise GpuError(f"{where}: gpus entry {n} ({label}): {err}") from None
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
        if path.exists() and not path.is_file():
            raise GpuError(f"the GPU file {path} (TUNEPLAN_GPUS) is not a regular file; give a YAML file")
        try:
            extra = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))
        except OSError as e:
            raise GpuError(f"cannot read the GPU file {path} (TUNEPLAN_GPUS): {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise GpuError(f"the GPU file {path} (TUNEPLAN_GPUS) is not UTF-8 text; save it as UTF-8 YAML") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise GpuError(f"the GPU file {path} (TUNEPLAN_GPUS) is not valid YAML{at}: "
                           f"{getattr(e, 'problem', None) or 'syntax error'}") from None
        if extra is None:
            raise GpuError(f"the GPU file {path} (TUNEPLAN_GPUS) is empty; give it a 'gpus' list, as in "
                           "tuneplan's profiles/gpus.yaml, or unset TUNEPLAN_GPUS")
        for g in _parse(extra, str(path)):
            table[g.id] = g
    return table, str(data.get("prices_as_of", "unknown"))


def gpu_table() -> dict[str, Gpu]:
    user = _user_file()
    return _load(str(user) if user else None)[0]


def prices_as_of() -> str:
    user = _user_file()
    return _load(str(user) if user else None)[1]


# Words that name a maker or a product line, not a card: "nvidia a100" is the A100
_MAKER_WORDS = frozenset({"nvidia", "geforce", "tesla", "amd", "instinct", "apple"})
# A count written into the name: "2x a100", "8xH100", "2 x H100", "4*a100", "2 a100" / "a100 x2", "h100x8",
# "a100 x 2", "a100 (x8)", "a100 8 gpus". Read only when the whole name is no card and the rest is one.
_COUNT_FIRST = re.compile(r"^\s*(?P<n>\d+)\s*(?:[x×*]|gpus?|cards?|\s)\s*(?P<card>.+)$", re.IGNORECASE)
_COUNT_LAST = re.compile(r"^(?P<card>.+?)\s*(?:[x×*]\s*(?P<n>\d+)|\(\s*[x×*]?\s*(?P<p>\d+)\s*\)"
                         r"|\s(?P<g>\d+)\s*(?:gpus?|cards?))\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class GpuMatch:
    """What a GPU name was read as: the card, and the other cards the same name also fits (the forgiving
    match picked the first: 'a100' is the 80 GB SXM, and also fits the 40 GB SXM and the 80 GB PCIe)."""

    name: str
    gpu: Gpu
    others: tuple[Gpu, ...] = ()

    @property
    def note(self) -> str | None:
        """'the GPU name 'a100' is read as NVIDIA A100 SXM 80GB (a100-80gb-sxm); it also fits ...'; None
        when the name fits one card only."""
        if not self.others:
            return None
        rest = [f"{g.name} ({g.id})" for g in self.others]
        also = rest[0] if len(rest) == 1 else ", ".join(rest[:-1]) + " and " + rest[-1]
        return (f"the GPU name {self.name!r} is read as {self.gpu.name} ({self.gpu.id}); it also fits {also}: "
                "name the card you mean to size on another")


def _tokens(text: str) -> frozenset[str]:
    """The words of a GPU name that tell cards apart: 'NVIDIA A100-SXM4 80 GB' -> {a100, sxm4, 80gb}."""
    words = (re.sub(r"\s+", "", w) for w in re.findall(r"\d+\s*gb\b|[a-z0-9]+", text.lower()))
    return frozenset(w for w in words if w not in _MAKER_WORDS)


def _fits(name: str, table: dict[str, Gpu]) -> list[Gpu]:
    """Every card whose own name or id holds all the words of ``name`` ('a100' -> the three A100s)."""
    words = _tokens(name)
    if not words:
        return []
    return [g for g in table.values() if words <= (_tokens(g.name) | _tokens(g.id))]


def _match(name: str, table: dict[str, Gpu]) -> Gpu | None:
    """The card a name means: an exact id, name or alias first, then the most specific alias it contains."""
    key = _key(name)
    if not key:
        return None
    for g in table.values():
        if key == _key(g.id) or key == _key(g.name) or any(key == _key(a) for a in g.aliases):
            return g
    # a unique containment match ("rtx4090 24gb" contains "rtx4090")
    hits = [g for g in table.values() if any(_key(a) and _key(a) in key for a in (g.id, *g.aliases))]
    if hits:
        return max(hits, key=lambda g: max(len(_key(a)) for a in (g.id, *g.aliases) if _key(a) in key))
    return None


def split_count(name: str) -> tuple[int, str] | None:
    """(count, card) when ``name`` writes a GPU count into a card's name ('2x a100' -> (2, 'a100'),
    'h100 x8' -> (8, 'h100')); None when it does not (or the name itself is a card: 'rtx 3090', '6000 ada')."""
    table = gpu_table()
    key = _key(name)
    if any(key in (_key(g.id), _key(g.name), *map(_key, g.aliases)) for g in table.values()):
        return None
    for pattern in (_COUNT_FIRST, _COUNT_LAST):
        m = pattern.match(name)
        if not m:
            continue
        parts = m.groupdict()
        count = int(next(parts[k] for k in ("n", "p", "g") if parts.get(k)))
        card = parts["card"].strip(" -_,:")
        if _match(card, table) is not None:  # any count: hardware.gpus says what it allows
            return count, card
    return None


def lookup_gpu(name: str) -> GpuMatch:
    """The card a GPU name means, with the other cards it also fits. A name carrying a count ('2x a100') is
    refused with the card and the count apart: the count is hardware.gpus, a field of its own on every front
    end, so one reading holds for the CLI, the app and a plan file alike."""
    table = gpu_table()
    if not _key(name):
        raise GpuError("empty GPU name" if not name.strip() else f"the GPU name {name!r} names a maker, not a card; "
                       "see `tuneplan profiles --gpus`")
    counted = split_count(name)
    if counted:
        n, card = counted
        raise GpuError(f"the GPU name {name!r} holds a count: give the card alone ({card}) and the number of GPUs "
                       f"apart (--gpu {card!r} --gpus {n}; in a plan hardware.gpu: {card}, hardware.gpus: {n})")
    g = _match(name, table)
    if g is not None:
        exact = _key(name) in (_key(g.id), _key(g.name))
        others = () if exact else tuple(o for o in _fits(name, table) if o.id != g.id)
        return GpuMatch(name, g, others)
    several = _fits(name, table)
    if len(several) > 1:
        raise GpuError(f"the GPU name {name!r} fits {len(several)} cards: "
                       f"{', '.join(f'{o.name} ({o.id})' for o in several)}; name one of them")
    names = {_key(a): g.name for g in table.values() for a in (g.id, g.name, *g.aliases)}
    near = []
    for k in difflib.get_close_matches(_key(name), list(names), n=8, cutoff=0.5):
        if names[k] not in near:
            near.append(names[k])
    hint = f" Did you mean: {', '.join(near[:4])}?" if near else ""
    raise GpuError(f"unknown GPU {name!r}.{hint} See `tuneplan profiles --gpus`, or add it in a YAML "
                   "file named by TUNEPLAN_GPUS.")


def find_gpu(name: str) -> Gpu:
    """'RTX 4090', 'rtx-4090', '4090', 'H100 80GB', 'h100' all match; most specific name first. A name with a
    count in it ('2x a100') or that fits several cards and none best ('m3 max') is a GpuError."""
    return lookup_gpu(name).gpu


def gpu_name_note(name: str | None) -> str | None:
    """The note to show when a GPU name fits several cards ('a100': which one it was read as, and the
    others); None for a name that fits one card, no name, or a name that is no card (its problem is raised
    where the plan is built)."""
    if not name:
        return None
    try:
        return lookup_gpu(name).note
    except GpuError:
        return None
