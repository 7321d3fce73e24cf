"""The bundled model profiles by name: exact and forgiving look-ups, architecture-identical
variants, and the same-family profiles an unknown name is pointed at.

Pure data handling (json, yaml): importing it never imports torch or transformers, so a bundled
or cached estimate stays fast. ``advisor.model`` turns what is found here into a ModelShape.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# an installed wheel carries profiles/ as advisor/profiles (pyproject.toml); a checkout has it at the top
PROFILES_DIR = _HERE / "profiles" if (_HERE / "profiles").is_dir() else _HERE.parent / "profiles"
MODELS_DIR = PROFILES_DIR / "models"
SHAPES_DIR = PROFILES_DIR / "shapes"
VARIANTS_FILE = PROFILES_DIR / "variants.yaml"


def norm(name: str) -> str:
    """Lower case, letters and digits only: 'Llama-3.1-8B' and 'llama3.1 8b' compare equal."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@lru_cache(maxsize=1)
def bundled_profiles() -> dict[str, Path]:
    """Hub id ('org/name') -> bundled config.json copy."""
    return {p.stem.replace("--", "/", 1): p for p in sorted(MODELS_DIR.glob("*.json"))}


def bundled_lookup(ref: str) -> str | None:
    """The bundled hub id a reference names: exactly, or by its normalized full or short name."""
    profiles = bundled_profiles()
    if ref in profiles:
        return ref
    key = norm(ref)
    for hub_id in profiles:
        if key in (norm(hub_id), norm(hub_id.split("/", 1)[-1])):
            return hub_id
    return None


# --- architecture-identical variants ----------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A model that is not bundled but whose config.json has the architecture of one that is."""

    hub_id: str  # the variant as named on the hub
    profile: str  # the bundled profile whose shape it shares
    why: str  # what the two share and the evidence


@lru_cache(maxsize=1)
def variants() -> dict[str, Variant]:
    """profiles/variants.yaml: normalized full and short name -> Variant."""
    import yaml

    try:
        data = yaml.safe_load(VARIANTS_FILE.read_text()) or {}
    except OSError:
        return {}
    out: dict[str, Variant] = {}
    for hub_id, entry in (data.get("variants") or {}).items():
        v = Variant(hub_id, entry["profile"], entry.get("why", ""))
        out.setdefault(norm(hub_id), v)
        out.setdefault(norm(hub_id.split("/", 1)[-1]), v)
    return out


def variant_lookup(ref: str) -> Variant | None:
    """The known variant a reference names (full hub id or short name, forgiving spelling)."""
    return variants().get(norm(ref)) or variants().get(norm(ref.split("/", 1)[-1]))


# --- families: what an unknown name is pointed at ---------------------------------------------

# Architecture families by the words their names carry, most specific first: 'gpt-oss' before
# 'gpt', a distilled model by the architecture it was distilled into. A name that carries none of
# them gets no suggestion (a wrong family is worse than none: gpt-oss is not GPT-2).
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gpt-oss", ("gptoss",)),
    ("llama", ("distillllama", "tinyllama", "llama")),
    ("qwen", ("distillqwen", "qwen")),
    ("gemma", ("gemma",)),
    ("mistral", ("mixtral", "mistral", "ministral", "nemo", "codestral", "magistral", "devstral")),
    ("phi", ("phi",)),
    ("falcon", ("falcon",)),
    ("pythia", ("pythia",)),
    ("gpt2", ("gpt2", "distilgpt2")),
    ("smollm", ("smollm",)),
    ("olmo", ("olmo",)),
    ("granite", ("granite",)),
    ("deepseek", ("deepseek",)),
    ("mpt", ("mpt",)),
)


def family(name: str) -> str | None:
    """The family a model name belongs to, or None when no family word is in it. A word of five
    letters or more may sit anywhere in the name; a shorter one must begin a word ('mpt' is not
    'prompt', 'phi' not 'sophia')."""
    key = norm(name)
    words_in = re.split(r"[^a-z0-9]+", name.lower())
    for fam, words in FAMILIES:
        if any(w in key if len(w) >= 5 else any(t.startswith(w) for t in words_in) for w in words):
            return fam
    return None


_SIZE = re.compile(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?![a-z])")


def size_billions(name: str) -> float | None:
    """The parameter count a name states ('Llama-3.1-70B' -> 70, 'Mixtral-8x7B' -> 56,
    'SmolLM2-135M' -> 0.135, 'Qwen3-30B-A3B' -> 30), or None."""
    for m in _SIZE.finditer(name.lower().replace("_", "-")):
        mult, num, unit = m.groups()
        value = float(num) * (int(mult) if mult else 1)
        return value / 1000 if unit == "m" else value
    return None


_GENERATION = re.compile(r"(llama|qwen|gemma|phi|olmo|granite|smollm|falcon|mixtral|mistral)[-_ ]?"
                         r"(\d+(?:\.\d+)?)(?=$|[-_ ])")


def generation(name: str) -> str | None:
    """The family word with its version ('Qwen2.5-7B' -> 'qwen2.5', 'Llama-3.1-8B' -> 'llama3.1'), if named."""
    m = _GENERATION.search(name.split("/")[-1].lower())
    return m.group(1) + m.group(2) if m else None


def closest_profiles(ref: str, n: int = 3) -> list[str]:
    """Bundled profiles of the reference's family: the same generation first (Qwen3 before
    Qwen2.5), then the nearest in size, then in spelling; none when its name names no family we ship."""
    fam = family(ref)
    if fam is None:
        return []
    pool = [h for h in bundled_profiles() if family(h) == fam]
    want = size_billions(ref.split("/")[-1])
    gen = generation(ref)
    short = norm(ref.split("/")[-1])

    def rank(hub_id: str) -> tuple[bool, float, float]:
        have = size_billions(hub_id.split("/")[-1])
        gap = abs(math.log(want / have)) if want and have else math.inf
        other_gen = gen is not None and generation(hub_id) != gen
        return other_gen, gap, -difflib.SequenceMatcher(None, short, norm(hub_id.split("/")[-1])).ratio()

    return sorted(pool, key=rank)[:n]
