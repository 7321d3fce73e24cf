"""Resolve a model reference to a ModelShape: dimensions and exact parameter counts.

A reference is a bundled profile name, a local config.json, a local model directory, or a hub
id (config.json only). Parameter counts come from building the real transformers architecture
on the meta device (no weights, no memory) and counting, as accelerate's ``estimate-memory``
does. Shapes are cached by the config's hash: bundled profiles ship theirs in
``profiles/shapes/``, everything else is cached under the user cache directory, so a repeated
estimate never imports torch.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# an installed wheel carries profiles/ as advisor/profiles (pyproject.toml); a checkout has it at the top
PROFILES_DIR = _HERE / "profiles" if (_HERE / "profiles").is_dir() else _HERE.parent / "profiles"
MODELS_DIR = PROFILES_DIR / "models"
SHAPES_DIR = PROFILES_DIR / "shapes"
SHAPE_VERSION = 6  # bump when ModelShape gains fields; stale cache entries are recomputed
# Config values (with the architecture's defaults filled in) that change what training keeps.
FEATURE_KEYS = ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                "attn_logit_softcapping", "final_logit_softcapping", "sliding_window")

# Config fields every causal LM needs, under the names the families use for them.
_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size",),
}


class ModelError(ValueError):
    """A model reference that cannot be resolved, with what to do about it."""


class ConfigError(ModelError):
    """A config.json that no model can be built from (a missing or mistyped field, heads that do not divide)."""


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers that share a path pattern across decoder layers (e.g. model.layers.*.self_attn.q_proj)."""

    path: str
    in_features: int
    out_features: int
    bias: bool
    count: int
    experts: int = 1  # fused MoE expert tensors hold `experts` matrices
    rank_mult: int = 1  # peft gives fused experts rank r*experts (x2 for gate_up)
    quantized: bool = True  # bitsandbytes 4-bit replaces it (nn.Linear / Conv1D only)

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def params(self) -> int:
        return self.count * self.experts * (self.in_features * self.out_features) + \
            self.count * (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """Everything the estimators need about an architecture, counted from the real model."""

    name: str
    model_type: str
    architecture: str
    config_sha256: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int | None
    tie_word_embeddings: bool
    hidden_act: str
    num_experts: int  # 0 for dense models
    experts_per_token: int
    params_total: int  # unique parameters (tied weights once)
    params_embedding: int  # input token embeddings (+ learned position embeddings)
    params_lm_head: int  # output head, 0 when tied to the embeddings
    params_linear: int  # nn.Linear / Conv1D weights+biases outside the output head
    params_other: int  # norms, fused expert tensors, router, anything else (kept in compute dtype)
    linears: tuple[LinearGroup, ...] = field(default_factory=tuple)
    features: dict = field(default_factory=dict)  # FEATURE_KEYS as the built config has them
    config: dict = field(default_factory=dict, compare=False, repr=False)
    version: int = SHAPE_VERSION

    def __post_init__(self) -> None:
        parts = self.params_embedding + self.params_lm_head + self.params_linear + self.params_other
        if parts != self.params_total:
            raise AssertionError(f"parameter parts {parts} != total {self.params_total} for {self.name}")

    # --- LoRA -------------------------------------------------------------------------------
    def lora_groups(self, targets: str | list[str]) -> list[LinearGroup]:
        """The linear groups peft would wrap: 'all-linear' = every linear but the output head."""
        if targets == "all-linear":
            return list(self.linears)
        wanted = list(targets)
        return [g for g in self.linears if any(g.path == t or g.path.endswith("." + t) or g.leaf == t
                                               for t in wanted)]

    def unknown_targets(self, targets: str | list[str]) -> list[str]:
        if targets == "all-linear":
            return []
        return [t for t in targets if not any(g.path == t or g.path.endswith("." + t) or g.leaf == t
                                              for g in self.linears)]

    def lora_params(self, targets: str | list[str], r: int) -> int:
        """r * (in + out) per wrapped module (A: in x r, B: r x out), peft's LoRA without bias."""
        return sum(g.count * r * g.rank_mult * (g.in_features + g.out_features) for g in self.lora_groups(targets))

    @property
    def params_quantized(self) -> int:
        """Weights bitsandbytes 4-bit replaces (biases stay unquantized)."""
        return sum(g.count * g.in_features * g.out_features for g in self.linears if g.quantized)

    def to_json(self) -> dict:
        d = asdict(self)
        d["linears"] = [asdict(g) for g in self.linears]
        return d

    @classmethod
    def from_json(cls, d: dict) -> ModelShape:
        d = dict(d)
        d["linears"] = tuple(LinearGroup(**g) for g in d.get("linears", []))
        return cls(**d)


# --- references --------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@lru_cache(maxsize=1)
def bundled_profiles() -> dict[str, Path]:
    """Hub id ('org/name') -> bundled config.json copy."""
    out = {}
    for p in sorted(MODELS_DIR.glob("*.json")):
        out[p.stem.replace("--", "/", 1)] = p
    return out


def _bundled_lookup(ref: str) -> str | None:
    profiles = bundled_profiles()
    if ref in profiles:
        return ref
    key = _norm(ref)
    for hub_id in profiles:
        if key in (_norm(hub_id), _norm(hub_id.split("/", 1)[-1])):
            return hub_id
    return None


def closest_profiles(ref: str, n: int = 5) -> list[str]:
    names = list(bundled_profiles())
    short = {_norm(h.split("/", 1)[-1]): h for h in names}
    hits = difflib.get_close_matches(_norm(ref.split("/")[-1]), list(short), n=n, cutoff=0.4)
    found = [short[h] for h in hits]
    # substring matches ("llama" -> every Llama) after the fuzzy ones
    for h in names:
        if len(found) >= n:
            break
        if _norm(ref.split("/")[-1]) in _norm(h) and h not in found:
            found.append(h)
    return found[:n]


def _unknown(ref: str, why: str) -> ModelError:
    near = closest_profiles(ref)
    hint = f" Closest bundled profiles: {', '.join(near)}." if near else ""
    return ModelError(f"unknown model {ref!r}: {why}.{hint} See `tuneplan profiles` for the full list.")


def load_config(ref: str, revision: str | None = None) -> tuple[str, dict]:
    """Find the config.json for a reference; returns (display name, config dict)."""
    path = Path(ref).expanduser()
    if not path.exists() and ref.startswith((".", "/", "~")):
        raise ModelError(f"no such file or directory: {ref} (a local path; a hub id looks like org/name)")
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{path} is a directory without a config.json; point --model at a model "
                             "directory saved with save_pretrained, or at a config.json file.")
        return str(path), _read_json(cfg_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ModelError(f"no such file: {path}")
        return str(path), _read_json(path)
    hub_id = _bundled_lookup(ref)
    if hub_id is not None:
        return hub_id, _read_json(bundled_profiles()[hub_id])
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", ref):
        return ref, _hub_config(ref, revision)
    raise _unknown(ref, "not a bundled profile, a local file or directory, or a hub id (org/name)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{path} is not UTF-8 text (byte {e.start}); a config.json is UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object (a model config), not {type(data).__name__}")
    return data


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_config(repo_id: str, revision: str | None) -> dict:
    """Fetch config.json only (cached by huggingface_hub; HF_HUB_OFFLINE=1 uses the cache alone)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise _unknown(repo_id, "huggingface_hub is not installed, so hub ids cannot be fetched") from None
    try:
        # the token, if any, comes from HF_TOKEN / the hub login; it is never logged or saved by tuneplan
        path = hf_hub_download(repo_id, "config.json", revision=revision, etag_timeout=5)
    except GatedRepoError:
        raise ModelError(f"{repo_id} is gated on the hub: accept its licence there and set HF_TOKEN, "
                         "or pass a local config.json") from None
    except RepositoryNotFoundError:
        raise _unknown(repo_id, "no such repository on the hub (or it is private)") from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        if _offline():
            raise _unknown(repo_id, "the hub is off (HF_HUB_OFFLINE=1) and its config.json is not cached") from None
        raise ModelError(f"{repo_id} has no config.json on the hub") from None
    except LocalEntryNotFoundError:
        raise _unknown(repo_id, "the hub cannot be reached (offline) and its config.json is not cached") from None
    except Exception as e:  # network errors of all kinds
        raise _unknown(repo_id, f"the hub could not be reached ({type(e).__name__})") from None
    return _read_json(Path(path))


# --- shapes ------------------------------------------------------------------------------

def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _cache_dir() -> Path:
    base = os.environ.get("TUNEPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tuneplan")
    return Path(base) / "shapes"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _first(config: dict, key: str) -> int | None:
    for name in _ALIASES[key]:
        if _is_int(config.get(name)):
            return config[name]
    text = config.get("text_config")
    if isinstance(text, dict):
        for name in _ALIASES[key]:
            if _is_int(text.get(name)):
                return text[name]
    return None


# Far above any real model (the largest have ~200 layers, hidden sizes ~30k, vocabularies ~1M, a few
# hundred experts): a config beyond these is a typo, and building it on the meta device would take forever.
_LIMITS = {"hidden_size": 1_000_000, "num_layers": 10_000, "num_heads": 100_000, "vocab_size": 100_000_000,
           "num_key_value_heads": 100_000, "num_kv_heads": 100_000, "intermediate_size": 10_000_000,
           "head_dim": 100_000, "num_local_experts": 100_000, "num_experts": 100_000, "num_experts_per_tok": 100_000}


def check_config(config: dict, where: str) -> None:
    """Say which required field is missing or wrong before transformers fails obscurely."""
    problems = []
    if not isinstance(config.get("model_type"), str) or not config.get("model_type"):
        problems.append("'model_type' is missing (which architecture: llama, mistral, qwen2, gpt2...)")
    for key, names in _ALIASES.items():
        v = _first(config, key)
        if v is None:
            problems.append(f"'{names[0]}' is missing or not an integer")
        elif v <= 0:
            problems.append(f"'{names[0]}' must be positive (got {v})")
        elif v > _LIMITS[key]:
            problems.append(f"'{names[0]}' is {v}, beyond any real model (at most {_LIMITS[key]:,})")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    heads = _first(config, "num_heads")
    for name in ("num_key_value_heads", "num_kv_heads", "intermediate_size", "head_dim", "max_position_embeddings",
                 "num_local_experts", "num_experts", "num_experts_per_tok"):
        v = text.get(name, config.get(name))
        if v is None:
            continue
        if not _is_int(v):
            problems.append(f"'{name}' must be an integer (got {json.dumps(v, default=str)[:40]})")
        elif v <= 0 and not (name.startswith("num_experts") or name == "num_local_experts"):
            problems.append(f"'{name}' must be positive (got {v})")
        elif v < 0:
            problems.append(f"'{name}' must not be negative (got {v})")
        elif v > _LIMITS.get(name, 10**9):
            problems.append(f"'{name}' is {v}, beyond any real model (at most {_LIMITS.get(name, 10**9):,})")
        elif name in ("num_key_value_heads", "num_kv_heads") and heads and heads > 0 and heads % v:
            problems.append(f"'{name}' ({v}) must divide the number of attention heads ({heads}): each "
                            "key/value head serves an equal group of query heads")
    if problems:
        raise ConfigError(f"malformed config {where}: " + "; ".join(problems))


@lru_cache(maxsize=64)
def _resolve_cached(ref: str, revision: str | None, trust_remote_code: bool) -> ModelShape:
    name, config = load_config(ref, revision)
    check_config(config, f"for {name}")
    digest = config_sha256(config)
    for candidate in (SHAPES_DIR / f"{name.replace('/', '--')}.json", _cache_dir() / f"{digest}.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if data.get("config_sha256") == digest and data.get("version") == SHAPE_VERSION:
                data["config"] = config
                data["name"] = name
                return ModelShape.from_json(data)
    shape = count_on_meta(name, config, trust_remote_code=trust_remote_code)
    try:
        path = _cache_dir() / f"{digest}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in shape.to_json().items() if k != "config"}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs speed
    return shape


def resolve(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """Reference -> ModelShape (cached in memory and on disk)."""
    return _resolve_cached(ref, revision, trust_remote_code)


def build_meta_model(config: dict, trust_remote_code: bool = False):
    """The real transformers causal-LM architecture on the meta device (no memory used)."""
    import torch
    import transformers

    cfg_dict = copy.deepcopy(config)  # transformers normalizes nested fields (rope) in place
    model_type = cfg_dict.pop("model_type")
    known = transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES
    if model_type not in known:
        if "auto_map" in config and not trust_remote_code:
            raise ModelError(f"model_type {model_type!r} needs custom code from its repository; pass "
                             "--trust-remote-code only if you trust it") from None
        if not trust_remote_code:
            near = difflib.get_close_matches(model_type, list(known), n=5, cutoff=0.5)
            hint = f" Close names: {', '.join(near)}." if near else ""
            raise ConfigError(f"transformers {transformers.__version__} does not know model_type "
                              f"{model_type[:60]!r}.{hint}") from None
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    except Exception as e:  # noqa: BLE001 - transformers' validators raise many kinds; all mean a bad config
        raise ConfigError(f"config for {model_type!r} is not valid: {_last_line(e)}") from None
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise ModelError(f"{model_type!r} is not a causal language model transformers can build: "
                             f"{_last_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - a field transformers accepted but cannot build from
            raise ConfigError(f"cannot build {model_type!r} from this config: {type(e).__name__}: "
                              f"{_last_line(e)}") from None
    return model


def _last_line(e: BaseException) -> str:
    """The telling line of an exception message (transformers' validators put it last), shortened."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def moe_groups(mod_name: str, module, groups: dict) -> None:
    """Mixture-of-experts modules that peft's all-linear wraps but bitsandbytes leaves alone
    (transformers 5 fuses experts into 3-D tensors): the router, and the fused gate_up / down
    expert tensors, which peft adapts with rank r*experts (gate_up: 2*r*experts)."""
    path = re.sub(r"\.\d+\.", ".*.", mod_name)
    own = dict(module.named_parameters(recurse=False))
    if type(module).__name__.endswith("Router") and "weight" in own and own["weight"].dim() == 2:
        out_f, in_f = own["weight"].shape
        key = (path, int(in_f), int(out_f), False, 1, 1, False)
        groups[key] = groups.get(key, 0) + 1
    for pname, mult in (("gate_up_proj", 2), ("down_proj", 1)):
        p = own.get(pname)
        if p is not None and p.dim() == 3:
            e, out_f, in_f = p.shape
            key = (f"{path}.{pname}", int(in_f), int(out_f), False, int(e), int(e) * mult, False)
            groups[key] = groups.get(key, 0) + 1


def count_on_meta(name: str, config: dict, trust_remote_code: bool = False) -> ModelShape:
    """Build on the meta device and count every parameter by the kind of module that owns it."""
    import torch

    digest = config_sha256(config)
    model = build_meta_model(config, trust_remote_code)
    try:
        from transformers.pytorch_utils import Conv1D
        linear_types: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        linear_types = (torch.nn.Linear,)

    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    seen: set[int] = set()
    owner_kind: dict[int, str] = {}
    groups: dict[tuple, int] = {}
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if module is out_emb:
            kind = "lm_head"
        elif isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif isinstance(module, linear_types):
            kind = "linear"
            w = module.weight
            if isinstance(module, torch.nn.Linear):
                fin, fout = module.in_features, module.out_features
            else:  # GPT-2's Conv1D stores weight as (in, out)
                fin, fout = w.shape[0], w.shape[1]
            # transformers' bitsandbytes swap replaces exact nn.Linear / Conv1D only, not subclasses
            # such as Falcon's FalconLinear (measured: Falcon stays unquantized under load_in_4bit)
            quantized = type(module) in linear_types
            key = (re.sub(r"\.\d+\.", ".*.", mod_name), fin, fout, module.bias is not None, 1, 1, quantized)
            groups[key] = groups.get(key, 0) + 1
        else:
            kind = "other"
            moe_groups(mod_name, module, groups)
        for _, p in own:
            if id(p) not in owner_kind:
                owner_kind[id(p)] = kind
    counts = {"embedding": 0, "lm_head": 0, "linear": 0, "other": 0}
    for p in model.parameters():  # parameters() yields tied weights once
        if id(p) in seen:
            continue
        seen.add(id(p))
        counts[owner_kind.get(id(p), "other")] += p.numel()
    total = sum(p.numel() for p in model.parameters())
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = _first(config, "hidden_size") or 0
    heads = _first(config, "num_heads") or 1
    kv = getattr(text_cfg, "num_key_value_heads", None) or getattr(text_cfg, "num_kv_heads", None)
    if getattr(text_cfg, "multi_query", False) and not getattr(text_cfg, "new_decoder_architecture", False):
        kv = 1
    head_dim = getattr(text_cfg, "head_dim", None) or hidden // heads
    inter = (getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "n_inner", None)
             or getattr(text_cfg, "ffn_hidden_size", None) or 4 * hidden)
    act = (getattr(text_cfg, "hidden_act", None) or getattr(text_cfg, "hidden_activation", None)
           or getattr(text_cfg, "activation_function", None) or getattr(text_cfg, "activation", None) or "gelu")
    experts = getattr(text_cfg, "num_local_experts", None) or getattr(text_cfg, "num_experts", None) or 0
    topk = getattr(text_cfg, "num_experts_per_tok", None) or (1 if experts else 0)
    max_pos = (getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None))
    linears = tuple(LinearGroup(key[0], key[1], key[2], key[3], c, *key[4:])
                    for key, c in sorted(groups.items()))
    return ModelShape(
        name=name,
        model_type=cfg.model_type,
        architecture=type(model).__name__,
        config_sha256=digest,
        hidden_size=hidden,
        num_layers=_first(config, "num_layers") or 0,
        num_heads=heads,
        num_kv_heads=int(kv or heads),
        head_dim=int(head_dim),
        intermediate_size=int(inter),
        vocab_size=_first(config, "vocab_size") or 0,
        max_position=int(max_pos) if max_pos else None,
        tie_word_embeddings=bool(tied),
        hidden_act=str(act),
        num_experts=int(experts),
        experts_per_token=int(topk),
        params_total=total,
        params_embedding=counts["embedding"],
        params_lm_head=counts["lm_head"],
        params_linear=counts["linear"],
        params_other=counts["other"],
        linears=linears,
        features={k: getattr(text_cfg, k) for k in FEATURE_KEYS
                  if isinstance(getattr(text_cfg, k, None), (int, float))},
        config=config,
    )


def write_bundled_shapes() -> list[str]:
    """Count every bundled profile on the meta device and store its shape in profiles/shapes/."""
    SHAPES_DIR.mkdir(exist_ok=True)
    written = []
    for name, path in bundled_profiles().items():
        config = _read_json(path)
        shape = count_on_meta(name, config)
        data = {k: v for k, v in shape.to_json().items() if k != "config"}
        (SHAPES_DIR / f"{path.stem}.json").write_text(json.dumps(data, indent=1) + "\n")
        written.append(f"{name}: {shape.params_total:,}")
    return written


if __name__ == "__main__":  # python -m advisor.model: regenerate profiles/shapes/
    for line in write_bundled_shapes():
        print(line)
