"""Resolve a model reference to a ModelShape: dimensions and exact parameter counts.

A reference is a bundled profile name (or a known architecture-identical variant of one), a local
config.json, a local model directory, or a hub id (config.json only). The config is read as
transformers reads it: through the model type's own config class, with that class's defaults for
every field the file leaves out (a multimodal model's text_config names only what differs from
them), and the language model's sub-config of a multimodal wrapper. Parameter counts come from
building the real transformers architecture on the meta device (no weights, no memory) and
counting, as accelerate's ``estimate-memory`` does. Shapes are cached by the config's hash:
bundled profiles ship theirs in ``profiles/shapes/``, everything else is cached under the user
cache directory, so a repeated estimate never imports torch or transformers.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeGuard

from advisor.catalog import (  # noqa: F401 - re-exported: the profiles' home and look-ups live in catalog
    MODELS_DIR,
    PROFILES_DIR,
    SHAPES_DIR,
    bundled_lookup,
    bundled_profiles,
    closest_profiles,
    family,
    variant_lookup,
)

SHAPE_VERSION = 7  # bump when ModelShape gains fields; stale cache entries are recomputed
# Config values (with the architecture's defaults filled in) that change what training keeps.
FEATURE_KEYS = ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                "attn_logit_softcapping", "final_logit_softcapping", "sliding_window")

# The sizes every causal LM has, under the names the families spell them with in config.json
# (transformers maps most through the config class's attribute_map: MPT's n_layers, GPT-2's n_embd).
_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "vocab_size": ("vocab_size",),
}
# PreTrainedConfig's own fields: not part of the architecture, left out of ModelShape.text_config.
_GENERIC_KEYS = frozenset({"_name_or_path", "architectures", "chunk_size_feed_forward", "id2label",
                           "is_encoder_decoder", "label2id", "output_attentions", "output_hidden_states",
                           "problem_type", "return_dict", "transformers_version"})


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
    """Everything the estimators need about an architecture, counted from the real model.

    The dimensions are the language model's: for a multimodal wrapper (Gemma 3 4B-27B) its
    text_config. The parameter counts are of everything ``AutoModelForCausalLM`` loads for the
    config, which for such a wrapper includes the vision tower (a causal-LM fine-tune loads it)."""

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
    # the language model's config as transformers resolved it (class defaults filled in, the
    # text_config of a multimodal wrapper), JSON values; PreTrainedConfig's generic fields left out
    text_config: dict = field(default_factory=dict, compare=False, repr=False)
    params_language: int = 0  # the parameters of the language model alone (= params_total unless multimodal)
    config: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json as written
    note: str = field(default="", compare=False)  # how the reference was resolved, when it is worth saying
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

def _bundled_lookup(ref: str) -> str | None:
    """The bundled hub id a reference names (kept for advisor.forms)."""
    return bundled_lookup(ref)


def _how_to_fix(ref: str) -> str:
    """The fix for a model tuneplan cannot find (its own config.json), and the bundled profiles of
    its family, if any: never a profile of another family (gpt-oss is not GPT-2)."""
    near = closest_profiles(ref)
    kin = (f" Bundled {family(ref)}-family profiles: {', '.join(near)}." if near
           else " No bundled profile is of its family.")
    return (" To estimate it offline, pass its config.json or downloaded model folder: "
            f"`--model ./path/config.json`.{kin} All of them: `tuneplan profiles`.")


def _unknown(ref: str, why: str) -> ModelError:
    return ModelError(f"unknown model {ref!r}: {why}.{_how_to_fix(ref)}")


@dataclass(frozen=True)
class _Found:
    name: str  # what the shape is called
    config: dict
    profile: str | None = None  # the bundled profile whose shipped shape applies
    note: str = ""


def _locate(ref: str, revision: str | None = None) -> _Found:
    path = Path(ref).expanduser()
    if not path.exists() and ref.startswith((".", "/", "~")):
        raise ModelError(f"no such file or directory: {ref} (a local path; a hub id looks like org/name)")
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{path} is a directory without a config.json; point --model at a model "
                             "directory saved with save_pretrained, or at a config.json file.")
        return _Found(str(path), read_config(cfg_path))
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ModelError(f"no such file: {path}")
        return _Found(str(path), read_config(path))
    hub_id = bundled_lookup(ref)
    if hub_id is not None:
        return _Found(hub_id, read_config(bundled_profiles()[hub_id]), hub_id)
    var = variant_lookup(ref)
    if var is not None and var.profile in bundled_profiles():
        note = (f"{var.hub_id} is not bundled; it has the architecture of the bundled {var.profile} "
                f"({var.why}), whose shape is used")
        return _Found(var.hub_id, read_config(bundled_profiles()[var.profile]), var.profile, note)
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", ref):
        return _Found(ref, _hub_config(ref, revision))
    raise _unknown(ref, "not a bundled profile, a local file or directory, or a hub id (org/name)")


def load_config(ref: str, revision: str | None = None) -> tuple[str, dict]:
    """Find the config.json for a reference; returns (display name, config dict as written)."""
    found = _locate(ref, revision)
    return found.name, found.config


_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _decode_special_floats(obj):
    """transformers 5 writes a float JSON cannot spell as {"__float__": "Infinity"}; its reader turns
    that back into the float (configuration_utils._decode_special_floats), and so does this one.
    Bare Infinity / NaN (transformers 4's json.dumps) Python's json module reads as floats already."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[obj["__float__"]]
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


def read_config(path: Path) -> dict:
    """A config.json as transformers reads it: Python's json module (Infinity and NaN allowed),
    special-float tags decoded; one clear ModelError when it is not a JSON object."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{path} is not UTF-8 text (byte {e.start}); a config.json is UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise ModelError(f"{path} is nested too deeply to be a model config") from None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object (a model config), not {type(data).__name__}")
    return _decode_special_floats(data)


_read_json = read_config  # the old name


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
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first, or a network failure reads as "no file"
        if _offline():
            raise _unknown(repo_id, "the hub is off (HF_HUB_OFFLINE=1) and its config.json is not cached") from None
        raise _unknown(repo_id, "the hub cannot be reached (offline) and its config.json is not cached") from None
    except EntryNotFoundError:
        if _offline():
            raise _unknown(repo_id, "the hub is off (HF_HUB_OFFLINE=1) and its config.json is not cached") from None
        raise ModelError(f"{repo_id} has no config.json on the hub") from None
    except Exception as e:  # network errors of all kinds
        raise _unknown(repo_id, f"the hub could not be reached ({type(e).__name__})") from None
    return read_config(Path(path))


# --- shapes ------------------------------------------------------------------------------

def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _cache_dir() -> Path:
    base = os.environ.get("TUNEPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tuneplan")
    return Path(base) / "shapes"


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


# Far above any real model (the largest have ~200 layers, hidden sizes ~30k, vocabularies ~1M, a few
# hundred experts): a config beyond these is a typo, and building it on the meta device would take forever.
_LIMITS = {"hidden_size": 1_000_000, "num_hidden_layers": 10_000, "num_attention_heads": 100_000,
           "vocab_size": 100_000_000, "num_key_value_heads": 100_000, "num_kv_heads": 100_000,
           "intermediate_size": 10_000_000, "head_dim": 100_000, "num_local_experts": 100_000,
           "num_experts": 100_000, "n_routed_experts": 100_000, "num_experts_per_tok": 100_000,
           "max_position_embeddings": 10**9}
_SIZE_FIELDS = ("num_key_value_heads", "num_kv_heads", "intermediate_size", "head_dim", "max_position_embeddings",
                "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")


def _limit(std: str) -> int:
    return _LIMITS.get(std, 10**9)


def _size_problem(name: str, std: str, v: object, zero_ok: bool = False) -> str | None:
    """What is wrong with one stated size (None when nothing is)."""
    if not _is_int(v):
        return f"'{name}' must be an integer (got {json.dumps(v, default=str)[:40]})"
    if v < 0 or (v == 0 and not zero_ok):
        return f"'{name}' must be {'non-negative' if zero_ok else 'positive'} (got {v})"
    if v > _limit(std):
        return f"'{name}' is {v}, beyond any real model (at most {_limit(std):,})"
    return None


def _sections(config: dict) -> list[dict]:
    """The config and the sub-config of its language model, where a multimodal wrapper has one."""
    text = config.get("text_config")
    return [config, text] if isinstance(text, dict) else [config]


def check_config(config: dict, where: str) -> None:
    """The sizes a config.json states, checked before transformers sees them (it would fail
    obscurely, or build for ever): integers, positive, below any real model's. What the file leaves
    out is transformers' to fill in (resolve_config); this never asks for a field."""
    problems = []
    if not isinstance(config.get("model_type"), str) or not config.get("model_type"):
        problems.append("'model_type' is missing (which architecture: llama, mistral, qwen2, gpt2...)")
    for section in _sections(config):
        for std, names in _ALIASES.items():
            for name in names:
                v = section.get(name)
                if v is None:
                    continue
                if not _is_int(v):
                    got = json.dumps(v, default=str)[:40]
                    problems.append(f"'{name}' is missing or not an integer (got {got})")
                elif (p := _size_problem(name, std, v)) is not None:
                    problems.append(p)
        for name in _SIZE_FIELDS:
            v = section.get(name)
            if v is None or isinstance(v, list):  # a per-layer list is some families' way: transformers judges it
                continue
            zero_ok = name in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")
            if (p := _size_problem(name, name, v, zero_ok)) is not None:
                problems.append(p)
    if problems:
        raise ConfigError(f"malformed config {where}: " + "; ".join(dict.fromkeys(problems)))


def _stated(section: dict, std: str, cfg_cls) -> bool:
    names = set(_ALIASES.get(std, (std,))) | {getattr(cfg_cls, "attribute_map", {}).get(std, std)}
    return any(section.get(n) is not None for n in names)


def _family_name(text_cfg, std: str) -> str:
    """A size's name as this family's config.json spells it (MPT: n_layers; GPT-2: n_embd)."""
    return getattr(type(text_cfg), "attribute_map", {}).get(std, std)


def resolve_config(config: dict, where: str, trust_remote_code: bool = False):
    """config.json -> (transformers config, its language model's config), as from_pretrained reads
    it: the model type's own config class fills in every field the file leaves out. A multimodal
    wrapper (gemma3) gives its text_config as the language model. One ConfigError when it cannot."""
    check_config(config, where)
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    cfg_dict = copy.deepcopy(config)  # transformers normalizes nested fields (rope) in place
    model_type = cfg_dict.pop("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        if "auto_map" in config and not trust_remote_code:
            raise ModelError(f"model_type {model_type!r} needs custom code from its repository; pass "
                             "--trust-remote-code only if you trust it") from None
        near = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(near)}." if near else ""
        raise ConfigError(f"transformers {transformers.__version__} does not know model_type "
                          f"{model_type[:60]!r}.{hint}") from None
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
        text = cfg.get_text_config(decoder=True)
    except Exception as e:  # noqa: BLE001 - transformers' validators raise many kinds; all mean a bad config
        raise ConfigError(f"config for {model_type!r} is not valid: {_last_line(e)}") from None
    problems = []
    if text is cfg:
        raw_text: dict | None = config
    else:  # the wrapper's sub-config that holds the language model (gemma3: text_config)
        key = next((k for k in getattr(cfg, "sub_configs", {}) if getattr(cfg, k, None) is text), "text_config")
        raw_text = config.get(key) if isinstance(config.get(key), dict) else None
        if raw_text is None:
            problems.append(f"'{key}' is missing: a {model_type} config holds its language model there")
    for std in _ALIASES:
        if not hasattr(text, std):
            continue  # not part of this architecture (a state-space model has no attention heads)
        name = _family_name(text, std)
        v = getattr(text, std)
        # Every config.json save_pretrained writes states these (to_diff_dict keeps all fields the
        # base PreTrainedConfig lacks); only a wrapper's text_config leaves its class defaults out.
        # A text-only file without one is hand-made, and the class default would be a guess.
        if text is cfg and not _stated(config, std, type(text)):
            problems.append(f"'{name}' is missing (transformers' {type(text).__name__} default, {v!r}, "
                            "would be a guess; a config.json saved by transformers states it)")
        elif (p := _size_problem(name, std, v)) is not None:
            problems.append(p)
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None)
    if _is_int(heads) and _is_int(kv) and heads > 0 and kv > 0 and heads % kv:
        problems.append(f"'num_key_value_heads' ({kv}) must divide the number of attention heads ({heads}): each "
                        "key/value head serves an equal group of query heads")
    if problems:
        raise ConfigError(f"malformed config {where}: " + "; ".join(problems))
    return cfg, text


def count_notice(name: str) -> str:
    """What a caller shows while a new config is counted (build on the meta device, ~10 s)."""
    return (f"counting the parameters of {name} on the meta device (a config not seen before: "
            "about 10-15 s, once; cached after)")


def _cached_shape(found: _Found, digest: str) -> ModelShape | None:
    candidates = [_cache_dir() / f"{digest}.json"]
    if found.profile is not None:
        candidates.insert(0, SHAPES_DIR / f"{found.profile.replace('/', '--')}.json")
    for candidate in candidates:
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError, RecursionError):
                continue
            if data.get("config_sha256") == digest and data.get("version") == SHAPE_VERSION:
                data["config"] = found.config
                data["name"] = found.name
                data["note"] = found.note
                try:
                    return ModelShape.from_json(data)
                except (TypeError, AssertionError):
                    continue  # a damaged cache entry only costs a recount
    return None


def _resolve_uncached(ref: str, revision: str | None, trust_remote_code: bool,
                      on_count: Callable[[str], None] | None) -> ModelShape:
    found = _locate(ref, revision)
    check_config(found.config, f"for {found.name}")
    digest = config_sha256(found.config)
    shape = _cached_shape(found, digest)
    if shape is not None:
        return shape
    if on_count is not None:
        on_count(count_notice(found.name))
    shape = count_on_meta(found.name, found.config, trust_remote_code=trust_remote_code)
    try:
        path = _cache_dir() / f"{digest}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_shape_record(shape)))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs speed
    if found.note:
        shape = _with(shape, note=found.note)
    return shape


def _with(shape: ModelShape, **changes) -> ModelShape:
    from dataclasses import replace

    return replace(shape, **changes)


_MEMO: OrderedDict[tuple, ModelShape] = OrderedDict()
_MEMO_LOCK = threading.Lock()


def resolve(ref: str, revision: str | None = None, trust_remote_code: bool = False,
            on_count: Callable[[str], None] | None = None) -> ModelShape:
    """Reference -> ModelShape (cached in memory and on disk).

    ``on_count(notice)`` is called once, before the only slow step: a config whose shape is in no
    cache is built on the meta device and counted (10-15 s, imports torch). It is not called when
    the shape comes from a bundled profile, the disk cache or memory."""
    key = (ref, revision, bool(trust_remote_code))
    with _MEMO_LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
    shape = _resolve_uncached(ref, revision, trust_remote_code, on_count)
    with _MEMO_LOCK:
        _MEMO[key] = shape
        while len(_MEMO) > 64:
            _MEMO.popitem(last=False)
    return shape


def build_meta_model(config: dict, trust_remote_code: bool = False, where: str = "for this config"):
    """The real transformers causal-LM architecture on the meta device (no memory used)."""
    import torch
    import transformers

    cfg, _ = resolve_config(config, where, trust_remote_code)
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise ModelError(f"{cfg.model_type!r} is not a causal language model transformers can build: "
                             f"{_last_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - a field transformers accepted but cannot build from
            raise ConfigError(f"cannot build {cfg.model_type!r} from this config: {type(e).__name__}: "
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


def _json_safe(d: dict) -> dict:
    """Plain JSON values (tuples as lists, dtypes and other objects as text; inf and nan stay floats)."""
    return json.loads(json.dumps(d, default=str))


def _language_params(model) -> int:
    """Parameters of the language model alone: everything but a multimodal wrapper's vision or
    audio tower and its projector (transformers names them *_tower / multi_modal_projector)."""
    other = sum(p.numel() for n, p in model.named_parameters()
                if re.search(r"(^|\.)(vision_tower|audio_tower|vision_model|multi_modal_projector|"
                             r"embed_vision|embed_audio)(\.|$)", n))
    return sum(p.numel() for p in model.parameters()) - other


def peft_adapts_experts(model_type: str) -> bool:
    """Whether peft's all-linear reaches a mixture-of-experts model's router and fused expert tensors.
    peft does so only for the architectures whose transformers-4 checkpoints (one nn.Linear per
    expert) it converts to transformers 5's fused layout (peft.utils.transformers_weight_conversion:
    Mixtral, the Qwen2-MoE pattern that Qwen3-MoE, DeepSeek-V2/V3 and OLMoE share). Elsewhere
    (gpt-oss: fused in its checkpoint, a router that is no nn.Linear) all-linear adapts the
    attention alone: measured with peft 0.22 on tiny real models (tests/test_configs.py)."""
    try:
        from peft.utils import transformers_weight_conversion as twc
    except Exception:  # noqa: BLE001 - an older peft without the conversion: the experts are wrapped as before
        return True
    base = twc._MODEL_TO_CONVERSION_PATTERN.get(model_type)
    return bool(base and twc._MOE_TARGET_MODULE_MAPPING.get(base) and twc._MOE_FUSED_TARGETS.get(base))


def count_on_meta(name: str, config: dict, trust_remote_code: bool = False) -> ModelShape:
    """Build on the meta device and count every parameter by the kind of module that owns it.
    The dimensions come from the language model's config as transformers resolved it."""
    import torch

    digest = config_sha256(config)
    model = build_meta_model(config, trust_remote_code, where=f"for {name}")
    try:
        from transformers.pytorch_utils import Conv1D
        linear_types: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        linear_types = (torch.nn.Linear,)

    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    experts_adapted = peft_adapts_experts(model.config.model_type)
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
            assert isinstance(w, torch.Tensor)
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
            if experts_adapted:
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
    text = cfg.get_text_config(decoder=True)

    def first(*names: str, default=None):
        for n in names:
            v = getattr(text, n, None)
            if v is not None and not isinstance(v, bool):
                return v
        return default

    hidden = int(first("hidden_size", default=0))
    heads = int(first("num_attention_heads", default=0))
    kv = first("num_key_value_heads", "num_kv_heads")
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv = 1
    head_dim = first("head_dim") or (hidden // heads if heads else 0)
    inter = first("intermediate_size", "n_inner", "ffn_hidden_size") or 4 * hidden
    if not _is_int(inter):  # a per-layer list (some families): the widest layer
        inter = max(inter) if isinstance(inter, (list, tuple)) and inter else 4 * hidden
    act = first("hidden_act", "hidden_activation", "activation_function", "activation", default="gelu")
    experts = first("num_local_experts", "num_experts", "n_routed_experts", default=0)
    topk = first("num_experts_per_tok", "experts_per_token") or (1 if experts else 0)
    max_pos = first("max_position_embeddings", "n_positions", "max_seq_len")
    linears = tuple(LinearGroup(key[0], key[1], key[2], key[3], c, *key[4:])
                    for key, c in sorted(groups.items()))
    text_config = _json_safe({k: v for k, v in text.to_dict().items() if k not in _GENERIC_KEYS})
    return ModelShape(
        name=name,
        model_type=cfg.model_type,
        architecture=type(model).__name__,
        config_sha256=digest,
        hidden_size=hidden,
        num_layers=int(first("num_hidden_layers", default=0)),
        num_heads=heads,
        num_kv_heads=int(kv or heads),
        head_dim=int(head_dim),
        intermediate_size=int(inter),
        vocab_size=int(first("vocab_size", default=0)),
        max_position=int(max_pos) if _is_int(max_pos) and max_pos > 0 else None,
        tie_word_embeddings=bool(tied),
        hidden_act=str(act),
        num_experts=int(experts) if _is_int(experts) else 0,
        experts_per_token=int(topk) if _is_int(topk) else 0,
        params_total=total,
        params_embedding=counts["embedding"],
        params_lm_head=counts["lm_head"],
        params_linear=counts["linear"],
        params_other=counts["other"],
        linears=linears,
        features={k: getattr(text, k) for k in FEATURE_KEYS
                  if isinstance(getattr(text, k, None), (int, float)) and not isinstance(getattr(text, k), bool)},
        text_config=text_config,
        params_language=_language_params(model),
        config=config,
    )


def _shape_record(shape: ModelShape) -> dict:
    """What a shape file holds: the shape without the config.json it came from or its note."""
    return {k: v for k, v in shape.to_json().items() if k not in ("config", "note")}


def write_bundled_shapes(names: list[str] | None = None) -> list[str]:
    """Count bundled profiles (all, or the hub ids named) on the meta device and store their
    shapes in profiles/shapes/."""
    SHAPES_DIR.mkdir(exist_ok=True)
    written = []
    for name, path in bundled_profiles().items():
        if names and name not in names:
            continue
        shape = count_on_meta(name, read_config(path))
        (SHAPES_DIR / f"{path.stem}.json").write_text(json.dumps(_shape_record(shape), indent=1) + "\n")
        written.append(f"{name}: {shape.params_total:,}")
    return written


if __name__ == "__main__":  # python -m advisor.model [HUB_ID ...]: regenerate profiles/shapes/
    import sys

    for line in write_bundled_shapes(sys.argv[1:] or None):
        print(line, flush=True)
