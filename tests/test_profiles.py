"""The bundled profiles of the models people fine-tune now, their architecture-identical variants,
and what an unknown model is told. Counts are pinned from the meta-device build (transformers 5.24)
and compared with the published size; sources in profiles/models/SOURCES.md."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from advisor.catalog import FAMILIES, bundled_profiles, family, variants
from advisor.model import ModelError, resolve

# name: (meta-device count, published size). Where a listing gave the exact count (the hub's
# safetensors total, llama.cpp / ollama general.parameter_count) the published size is that count.
PUBLISHED = {
    "google/gemma-3-1b-it": (999_885_952, 1.0e9),
    "google/gemma-3-4b-it": (4_300_079_472, 4_300_079_472),
    "google/gemma-3-12b-it": (12_187_325_040, 12_187_325_040),
    "google/gemma-3-27b-it": (27_432_406_640, 27_432_406_640),
    "openai/gpt-oss-20b": (20_914_757_184, 20_914_757_184),
    "openai/gpt-oss-120b": (116_829_156_672, 116_829_156_672),
    "Qwen/Qwen3-0.6B": (596_049_920, 596_049_920),
    "Qwen/Qwen3-1.7B": (1_720_574_976, 1_720_574_976),
    "Qwen/Qwen3-4B": (4_022_468_096, 4_022_468_096),
    "Qwen/Qwen3-14B": (14_768_307_200, 14_768_307_200),
    "Qwen/Qwen3-32B": (32_762_123_264, 32_762_123_264),
    "Qwen/Qwen3-30B-A3B": (30_532_122_624, 30_532_122_624),
    "Qwen/Qwen3-235B-A22B": (235_093_634_560, 235_093_634_560),
    "meta-llama/Llama-3.3-70B-Instruct": (70_553_706_496, 70.6e9),
    "mistralai/Mistral-Small-24B-Instruct-2501": (23_572_403_200, 23_572_403_200),
    "mistralai/Mistral-Nemo-Instruct-2407": (12_247_782_400, 12_247_782_400),
    "microsoft/Phi-4-mini-instruct": (3_836_021_760, 3_836_021_760),
    "HuggingFaceTB/SmolLM3-3B": (3_075_098_624, 3_075_098_624),
    "allenai/OLMo-2-1124-7B": (7_298_617_344, 7_298_617_344),
    "allenai/OLMo-2-1124-13B": (13_716_198_400, 13_716_198_400),
    "ibm-granite/granite-3.3-8b-instruct": (8_170_864_640, 8_170_864_640),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (1_777_088_000, 1_777_088_000),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_are_pinned_and_match_the_published_size(name):
    count, published = PUBLISHED[name]
    assert resolve(name).params_total == count
    assert abs(count / published - 1) < 0.02, (name, count, published)


def test_the_models_people_use_now_are_bundled():
    assert set(PUBLISHED) <= set(bundled_profiles())
    assert len(bundled_profiles()) >= 59


def test_a_multimodal_gemma_counts_its_vision_tower_and_reads_its_text_config():
    """gemma-3-4b-it names few text fields (transformers' Gemma3TextConfig fills the rest: vocab
    262208, 8/4 heads, head_dim 256); AutoModelForCausalLM builds the whole multimodal model."""
    s = resolve("google/gemma-3-4b-it")
    assert s.architecture == "Gemma3ForConditionalGeneration" and s.model_type == "gemma3"
    assert (s.vocab_size, s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == \
        (262208, 2560, 34, 8, 4, 256)
    assert "vocab_size" not in s.config["text_config"] and s.text_config["vocab_size"] == 262208
    assert s.params_language == 3_880_263_168  # the vision tower and projector are the other 419,816,304
    assert any(g.path.startswith("model.vision_tower.") for g in s.linears)  # peft's all-linear wraps them too
    assert sum(t == "sliding_attention" for t in s.text_config["layer_types"]) == 29  # 5 of every 6


def test_moe_and_sliding_fields_come_from_the_resolved_config():
    oss = resolve("openai/gpt-oss-20b")
    assert (oss.num_experts, oss.experts_per_token, oss.head_dim) == (32, 4, 64)
    assert oss.features["sliding_window"] == 128
    qwen = resolve("Qwen/Qwen3-30B-A3B")
    assert (qwen.num_experts, qwen.experts_per_token, qwen.num_kv_heads) == (128, 8, 4)


def test_every_bundled_profile_has_a_family_so_unknown_names_find_their_kin():
    assert all(family(name) for name in bundled_profiles()), [n for n in bundled_profiles() if not family(n)]
    assert {f for f, _ in FAMILIES} >= {family(n) for n in bundled_profiles()}


@pytest.mark.parametrize("hub_id", sorted({v.hub_id for v in variants().values()}))
def test_variants_resolve_offline_to_their_bundled_twin_and_say_so(hub_id):
    v = next(x for x in variants().values() if x.hub_id == hub_id)
    assert v.profile in bundled_profiles() and hub_id not in bundled_profiles()
    assert family(hub_id) == family(v.profile)
    notices = []
    shape = resolve(hub_id, on_count=notices.append)
    twin = resolve(v.profile)
    assert shape.name == hub_id and shape.params_total == twin.params_total and not notices
    assert v.profile in shape.note and "architecture" in shape.note


def test_a_variant_is_found_by_its_short_name_too():
    assert resolve("DeepSeek-R1-Distill-Llama-8B").params_total == 8_030_261_248
    assert resolve("deepseek-r1-distill-qwen-14b").name == "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"


@pytest.mark.parametrize("ref,kin,never", [
    ("openai/gpt-oss-7b", "openai/gpt-oss-20b", "gpt2"),  # not GPT-2 for its letters
    ("gpt-oss-mini", "openai/gpt-oss-20b", "gpt2"),
    ("Qwen3-70B", "Qwen/Qwen3-32B", "Qwen2.5"),  # the same generation first
    ("gemma-3-2b", "google/gemma-3-1b-it", "gemma-2"),
])
def test_unknown_model_names_the_fix_and_only_its_family(ref, kin, never):
    with pytest.raises(ModelError) as e:
        resolve(ref)
    msg = str(e.value)
    assert "--model ./path/config.json" in msg and kin in msg
    assert never not in msg


def test_unknown_model_of_no_known_family_gets_no_unrelated_suggestion():
    with pytest.raises(ModelError) as e:
        resolve("acme/widget-13b")
    msg = str(e.value)
    assert "No bundled profile is of its family" in msg and not any(name in msg for name in bundled_profiles())


def test_a_newly_bundled_profile_estimates_without_torch():
    code = ("from advisor.model import resolve\n"
            "for m in ('google/gemma-3-4b-it', 'openai/gpt-oss-20b', 'deepseek-ai/DeepSeek-R1-Distill-Llama-8B'):\n"
            "    resolve(m)\n"
            "import sys; print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_shipped_shapes_carry_the_resolved_text_config():
    for name, path in bundled_profiles().items():
        shipped = json.loads((path.parent.parent / "shapes" / path.name).read_text())
        assert shipped["text_config"]["model_type"], name
        assert 0 < shipped["params_language"] <= shipped["params_total"], name
