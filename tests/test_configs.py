"""Real config.json files resolve as transformers reads them: the model type's config class fills in
what a file leaves out, a multimodal wrapper's text_config is the language model, Infinity and NaN
read as Python's json module (and transformers) read them. Counts come from the meta-device build of
the real architecture. The files in tests/fixtures/configs/ are published configs (sources below)."""

import json
import math
from pathlib import Path

import pytest
from tiny import TINY

from advisor.model import ConfigError, ModelError, count_notice, read_config, resolve

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "configs"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A fresh shape cache per test, so a count happens where the test expects one."""
    monkeypatch.setenv("TUNEPLAN_CACHE", str(tmp_path / "cache"))


# file: (meta-device count, published size, model_type, architecture). Sources:
# - deepseek-ai--DeepSeek-V2-Lite-Chat.json: the config as transformers 5.7 saves it (rope_parameters,
#   dtype), quoted in a model report found by code search, whose checkpoint holds 15,706,484,224
#   parameters (its safetensors, counted): MLA (kv_lora_rank 512, no q compression), 64 routed experts.
# - tiiuae--Falcon-H1-0.5B-Instruct.json: NVIDIA Megatron-Bridge's test copy of Falcon-H1-0.5B
#   (hybrid attention + Mamba-2), with mamba_d_ssm (24 heads x 64, transformers' falcon_h1 docs table)
#   and time_step_limit [0.0, Infinity] as the hub files write it (json.dumps of an inf).
# - mosaicml--mpt-7b-instruct.json: "the original config for the model" quoted in an MPT-7b-instruct
#   README found by code search (d_model / n_layers / n_heads spellings, attn_config sub-config).
FILES = {
    "deepseek-ai--DeepSeek-V2-Lite-Chat.json": (15_706_484_224, 15_706_484_224, "deepseek_v2", "DeepseekV2ForCausalLM"),
    "tiiuae--Falcon-H1-0.5B-Instruct.json": (521_411_104, 0.52e9, "falcon_h1", "FalconH1ForCausalLM"),
    "mosaicml--mpt-7b-instruct.json": (6_649_286_656, 6.7e9, "mpt", "MptForCausalLM"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_published_configs_resolve_and_count(name):
    count, published, model_type, arch = FILES[name]
    shape = resolve(str(FIXTURES / name))
    assert (shape.params_total, shape.model_type, shape.architecture) == (count, model_type, arch)
    assert abs(count / published - 1) < 0.02


def test_mpt_sizes_are_read_under_their_own_names():
    s = resolve(str(FIXTURES / "mosaicml--mpt-7b-instruct.json"))
    assert (s.hidden_size, s.num_layers, s.num_heads, s.vocab_size, s.max_position) == (4096, 32, 32, 50432, 2048)


def test_mla_dimensions():
    s = resolve(str(FIXTURES / "deepseek-ai--DeepSeek-V2-Lite-Chat.json"))
    assert (s.num_experts, s.experts_per_token) == (64, 6)
    assert s.text_config["kv_lora_rank"] == 512 and s.text_config["q_lora_rank"] is None


def test_infinity_reads_as_python_and_transformers_read_it(tmp_path):
    """Bare Infinity (json.dumps of an inf, transformers 4) and {"__float__": "Infinity"} (transformers 5's
    spelling) both become float('inf'); the second was a raw type error before."""
    text = (FIXTURES / "tiiuae--Falcon-H1-0.5B-Instruct.json").read_text()
    assert "Infinity" in text and math.isinf(read_config(FIXTURES / "tiiuae--Falcon-H1-0.5B-Instruct.json")
                                             ["time_step_limit"][1])
    tagged = tmp_path / "config.json"
    tagged.write_text(text.replace("Infinity", '{"__float__": "Infinity"}'))
    assert read_config(tagged)["time_step_limit"] == [0.0, math.inf]
    s = resolve(str(tagged))
    assert s.params_total == 521_411_104 and math.isinf(s.text_config["time_step_limit"][1])


def test_gemma3_multimodal_from_a_file_leaves_sizes_to_the_class_defaults(tmp_path):
    """The hub's gemma-3-4b-it names neither vocab_size nor the heads (refused as 'malformed' before)."""
    from advisor.model import bundled_profiles

    cfg = json.loads(bundled_profiles()["google/gemma-3-4b-it"].read_text())
    assert "vocab_size" not in cfg and "num_attention_heads" not in cfg["text_config"]
    path = tmp_path / "gemma.json"
    path.write_text(json.dumps(cfg))
    notices = []
    s = resolve(str(path), on_count=notices.append)
    assert s.params_total == 4_300_079_472 and s.vocab_size == 262208 and len(notices) == 1


def test_a_wrapper_without_its_language_model_is_one_clear_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gemma3", "vision_config": {"model_type": "siglip_vision_model"}}))
    with pytest.raises(ConfigError, match="'text_config' is missing"):
        resolve(str(path))


def test_a_text_only_config_must_state_its_sizes(tmp_path):
    """Every config.json transformers saves states its own sizes; a hand-made one without them would be
    counted as the class's default model (LlamaConfig(): 32 layers), a guess, so it is refused."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError) as e:
        resolve(str(path))
    assert "'num_hidden_layers' is missing" in str(e.value) and "LlamaConfig default, 32" in str(e.value)
    path.write_text(json.dumps({"model_type": "mpt", "d_model": 64, "n_heads": 4, "vocab_size": 100}))
    with pytest.raises(ConfigError, match="'n_layers' is missing"):  # the family's own spelling
        resolve(str(path))


def test_a_config_transformers_rejects_is_one_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads((FIXTURES / "tiiuae--Falcon-H1-0.5B-Instruct.json").read_text()
                                             .replace("Infinity", "1e30")), "mamba_d_ssm": None}))
    with pytest.raises(ConfigError, match="not valid: .*mamba_n_heads must divide"):
        resolve(str(path))


def test_on_count_is_called_once_before_a_new_config_is_counted(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY["llama"]))
    notices: list[str] = []
    first = resolve(str(path), on_count=notices.append)
    assert notices == [count_notice(str(path))] and "meta device" in notices[0]
    again = resolve(str(path), on_count=notices.append)  # memory
    copy = tmp_path / "copy.json"
    copy.write_text(path.read_text())
    from_disk = resolve(str(copy), on_count=notices.append)  # the disk cache: same config hash
    bundled = resolve("Qwen/Qwen3-0.6B", on_count=notices.append)  # a shipped shape
    assert len(notices) == 1 and again is first and from_disk.params_total == first.params_total
    assert bundled.params_total == 596_049_920


def test_a_model_directory_saved_by_transformers_resolves(tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300)
    cfg.save_pretrained(tmp_path)
    s = resolve(str(tmp_path))
    assert (s.model_type, s.num_layers, s.head_dim, s.vocab_size) == ("qwen3", 2, 16, 300)


def test_not_json_is_a_model_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{" * 100_000)
    with pytest.raises(ModelError, match="nested too deeply|not valid JSON"):
        resolve(str(path))


# Tiny configs of the new families (random weights): the meta-device count equals the real model's, and
# the LoRA parameters the shape predicts for all-linear equal what peft adds (gpt-oss: attention only,
# its fused experts and router are not reached; Qwen3-MoE / DeepSeek-V2: router and experts too).
NEW_FAMILIES = {
    "gemma3": {"model_type": "gemma3", "mm_tokens_per_image": 4,
               "text_config": {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "head_dim": 16, "vocab_size": 300},
               "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14}},
    "gpt_oss": {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
                "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                  "vocab_size": 300, "num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v2": {"model_type": "deepseek_v2", "hidden_size": 64, "intermediate_size": 128,
                    "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "vocab_size": 300, "n_routed_experts": 4, "num_experts_per_tok": 2,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": None,
                    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16},
    "mpt": {"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 300, "max_seq_len": 128},
    "smollm3": {"model_type": "smollm3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "pad_token_id": 0},
    "olmo2": {"model_type": "olmo2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300},
    "granite": {"model_type": "granite", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "pad_token_id": 0},
    "falcon_h1": {"model_type": "falcon_h1", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
                  "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8,
                  "mamba_n_groups": 1, "mamba_chunk_size": 16},
}


@pytest.mark.parametrize("family", sorted(NEW_FAMILIES))
@pytest.mark.slow
def test_meta_count_and_lora_equal_the_real_model_and_peft(family):
    import peft
    import transformers

    from advisor.model import count_on_meta, resolve_config

    config = NEW_FAMILIES[family]
    shape = count_on_meta(family, config)
    cfg, _ = resolve_config(config, family)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert shape.params_total == sum(p.numel() for p in model.parameters())
    if family == "falcon_h1":  # peft refuses all-linear on its Mamba mixer (out_proj, conv1d): nothing to compare
        with pytest.raises(ValueError, match="incompatible with Mamba"):
            peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        return
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert shape.lora_params("all-linear", 8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
