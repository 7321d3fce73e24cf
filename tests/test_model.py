import json

import pytest
from tiny import TINY, build

from advisor.model import ModelError, bundled_profiles, count_on_meta, load_config, resolve, write_bundled_shapes

PUBLISHED = {  # exact counts; cross-checked in profiles/models/SOURCES.md against published sizes
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "EleutherAI/pythia-70m": 70_426_624,
    "openai-community/gpt2": 124_439_808,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
}


def test_at_least_30_bundled_profiles():
    assert len(bundled_profiles()) >= 30


@pytest.mark.parametrize("name,count", sorted(PUBLISHED.items()))
def test_bundled_counts_are_pinned(name, count):
    assert resolve(name).params_total == count


@pytest.mark.slow
def test_shipped_shapes_equal_a_fresh_meta_count(tmp_path, monkeypatch):
    """profiles/shapes/ must never drift from the real architectures."""
    for name, path in bundled_profiles().items():
        shipped = resolve(name)
        fresh = count_on_meta(name, json.loads(path.read_text()))
        assert shipped.to_json() | {"config": None} == fresh.to_json() | {"config": None}, name
    assert callable(write_bundled_shapes)


@pytest.mark.parametrize("family", sorted(TINY))
def test_meta_count_equals_the_real_model(family):
    model = build(family)
    real = sum(p.numel() for p in model.parameters())
    shape = count_on_meta(family, TINY[family])
    assert shape.params_total == real
    assert shape.params_embedding + shape.params_lm_head + shape.params_linear + shape.params_other == real


@pytest.mark.parametrize("family,targets", [(f, "all-linear") for f in sorted(TINY)]
                         + [("llama", ["q_proj", "v_proj"]), ("gpt_neox", ["query_key_value"])])
def test_lora_trainable_count_equals_peft(family, targets):
    import peft

    model = peft.get_peft_model(build(family), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_on_meta(family, TINY[family]).lora_params(targets, 8) == real


def test_forgiving_profile_names():
    assert resolve("llama-3.1-8b").name == resolve("meta-llama/Llama-3.1-8B").name == "meta-llama/Llama-3.1-8B"
    assert resolve("Llama3.1-8B").params_total == 8_030_261_248


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError) as e:
        resolve("llama-3.1-9b")
    assert "meta-llama/Llama-3.1-8B" in str(e.value)


def test_hub_id_offline_says_so():
    with pytest.raises(ModelError, match="offline|hub is off|could not be reached|no such repository"):
        resolve("no-such-org-xyz/no-such-model-abc")


def test_malformed_configs(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "vocab_size": 100,
                               "num_attention_heads": 2}))
    with pytest.raises(ModelError, match="'hidden_size' is missing"):
        resolve(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON: .* line 1"):
        load_config(str(bad))
    with pytest.raises(ModelError, match="without a config.json"):
        load_config(str(tmp_path / ".."))


def test_local_model_directory(tmp_path):
    build("qwen2").save_pretrained(tmp_path)
    shape = resolve(str(tmp_path))
    assert shape.model_type == "qwen2" and shape.tie_word_embeddings
