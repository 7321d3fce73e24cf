"""Small random-weight models of real architectures, built from a config, saved locally.

No hub access is needed: each family is a real ``transformers`` config class with tiny
dimensions (hidden 128, 2 layers, vocab 1000-8000), instantiated with random weights and saved
with ``save_pretrained`` under ``.tuneplan-cache/tiny/<name>/`` (git-ignored). The models are the
real modelling code of each family (attention layout, MLP shape, norms, tied embeddings, MoE
experts), so a training step on them allocates exactly what that architecture allocates, just
smaller.

Dims are multiples of 64 where bitsandbytes 4-bit blocks (64 values per absmax) care; vocab
sizes are deliberately varied (some not multiples of 64) because logits scale with vocab.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / ".tuneplan-cache" / "tiny"

_COMMON = dict(num_hidden_layers=2, max_position_embeddings=1024)

# family -> (config model_type, kwargs). Ratios follow the real models loosely:
# llama 3.5x SwiGLU, GQA 4:1 or 2:1; qwen2 qkv bias + tied embeddings; gemma2 big vocab,
# head_dim independent of hidden, soft-capping; phi3 fused qkv/gate_up; gpt_neox fused qkv,
# parallel residual, 4x GELU; gpt2 Conv1D, learned positions, dropout 0.1; falcon multi-query,
# parallel attention; mixtral 4 experts top-2.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(hidden_size=128, intermediate_size=448, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False, **_COMMON)),
    "mistral": ("mistral", dict(hidden_size=128, intermediate_size=448, num_attention_heads=4,
                                num_key_value_heads=1, vocab_size=2048, tie_word_embeddings=False, **_COMMON)),
    "qwen2": ("qwen2", dict(hidden_size=128, intermediate_size=384, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=6144, tie_word_embeddings=True, **_COMMON)),
    "gemma2": ("gemma2", dict(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, vocab_size=8000, sliding_window=128,
                              tie_word_embeddings=True, **_COMMON)),
    "phi3": ("phi3", dict(hidden_size=128, intermediate_size=384, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=3072, tie_word_embeddings=False,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0, **_COMMON)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                                  vocab_size=5000, rotary_pct=0.25, use_parallel_residual=True,
                                  tie_word_embeddings=False, **_COMMON)),
    "gpt2": ("gpt2", dict(n_embd=128, n_head=4, n_layer=2, n_positions=1024, vocab_size=1000,
                        bos_token_id=999, eos_token_id=999)),
    "falcon": ("falcon", dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=3000,
                              multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                              alibi=False, bias=False, max_position_embeddings=1024)),
    "mixtral": ("mixtral", dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                vocab_size=2048, tie_word_embeddings=False, **_COMMON)),
}


# each family as a config.json states it (model_type inside): what count_on_meta and a config file take
TINY: dict[str, dict] = {family: {"model_type": model_type, **kwargs}
                         for family, (model_type, kwargs) in FAMILIES.items()}


def make_config(family: str, **overrides):
    """A ``PretrainedConfig`` of the real class for ``family`` with tiny dims (plus overrides)."""
    from transformers import AutoConfig

    model_type, kwargs = FAMILIES[family]
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})


def build_tiny(family: str, cache_dir: str | Path | None = None, seed: int = 0, **overrides) -> Path:
    """Build (once) and save a random-weight model of ``family``; return its directory.

    The directory name carries a hash of the config so that changed overrides never reuse a
    stale model. Weights are saved in fp32; loading picks the training dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = make_config(family, **overrides)
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
    out = Path(cache_dir or DEFAULT_CACHE) / f"{family}-{digest}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    del model
    return out


def build(family: str, dtype=None, attn: str | None = None, **overrides):
    """A random-weight model of ``family`` in memory (not saved), in ``dtype`` (fp32 by default), with sdpa
    attention (eager for gemma2, whose soft-capping sdpa does not do)."""
    import torch
    from transformers import AutoModelForCausalLM

    attn = attn or ("eager" if family == "gemma2" else "sdpa")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config(family, **overrides), dtype=dtype or torch.float32,
                                            attn_implementation=attn)


def build_all(cache_dir: str | Path | None = None) -> dict[str, Path]:
    return {f: build_tiny(f, cache_dir) for f in FAMILIES}


if __name__ == "__main__":
    for fam, path in build_all().items():
        print(f"{fam:10s} {path}")
