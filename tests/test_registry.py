"""The registry as the test: every decoder-only causal LM the installed transformers registers.

benchmarks/registry.py builds a tiny config of each model type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (2
layers or one of each layer kind, hidden 64, vocab 320, the family's MoE / MLA / sliding windows / hybrid
layers / softcapping left at its class defaults) and holds it to one rule:

* the parameter count of the shape equals the real model's, and the LoRA (all-linear) count equals what
  real peft adds -- or, where peft refuses the targets, the estimate refuses them too (families.lora_problem);
* the analytic peak is within 3% of simulate's (the real transformers / peft code on fake tensors) for LoRA,
  full fine-tuning and inference -- or the family is routed: families.analytic_coverage names why it is
  not modelled analytically, and the estimate says so (and the app runs simulate instead).

A model type the tiny builder cannot build, or that is not a decoder-only LM (encoder-decoder halves, BERT-style
encoders), is never covered by the analytic rules. Building and simulating a family takes seconds, so the live
checks are slow tests: one family of each kind, then every family the analytic rules cover (what CI runs); the
fast tier checks that every covered family passed the recorded sweeps of the releases measured (the whole registry,
benchmarks/results/registry_transformers-*.json). `TUNEPLAN_REGISTRY=all` runs the whole registry live (about 200
types, ten minutes or more on two cores), as `make newest` does against the newest transformers, peft,
bitsandbytes and torch.
"""

from __future__ import annotations

import os
import sys

import pytest
from conftest import ROOT

pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, str(ROOT / "benchmarks"))

import registry  # noqa: E402

from advisor.families import family_of  # noqa: E402

# one family of each kind: dense (Llama), sliding windows (Mistral), a multimodal wrapper with sliding and full
# layers (Gemma 3), MoE (Qwen3-MoE), fused qkv + parallel attention (Falcon: its attention changed in 5.25),
# Conv1D + learned positions + dropout (GPT-2), and a hybrid state-space model peft refuses (Falcon-H1)
FAST = ("llama", "mistral", "gemma3", "qwen3_moe", "falcon", "gpt2", "falcon_h1")
MODES = ("lora", "full", "inference")


def _all_types() -> list[str]:
    try:
        return registry.causal_lm_types()
    except Exception:  # noqa: BLE001 - collection must not fail; the fast tier reports it
        return []


def assert_row(row: registry.Row) -> None:
    if row.status == "excluded":
        assert row.why, row
        return
    if row.status == "error":
        # a family that cannot be checked here is never estimated analytically without saying so
        assert not family_of(row.model_type)[1], f"{row.model_type} is in the checked families but: {row.why}"
        return
    name = row.model_type
    assert row.params == row.params_real, f"{name}: shape counts {row.params:,}, the model has {row.params_real:,}"
    if row.lora_refused:
        assert row.lora_problem, f"{name}: peft refuses all-linear ({row.lora_refused}); the estimate must too"
    else:
        assert row.lora == row.lora_real, f"{row.model_type}: LoRA {row.lora:,} predicted, peft adds {row.lora_real:,}"
        assert not row.lora_problem, row.lora_problem
    if row.why:  # routed: the estimate says why and the app simulates instead
        assert "not modelled analytically" in row.why and "--mode simulate" in row.why, row.why
        return
    expected = {m for m in MODES if not (m == "lora" and row.lora_refused)}
    assert not row.sim_problem, f"{row.model_type}: simulate cannot run a checked family: {row.sim_problem}"
    assert set(row.errors) == expected, (row.errors, row.analytic)
    off = {m: f"{e:+.1%}" for m, e in row.errors.items() if abs(e) > registry.TOL}
    assert not off, f"{name}: analytic vs simulate {off} (more than {registry.TOL:.0%}); fix the rule or route it"


RECORDED = sorted((ROOT / "benchmarks" / "results").glob("registry_transformers-*.json"))


def test_the_covered_families_are_the_ones_the_recorded_sweeps_checked():
    """The fast tier's check (no model is built): every family the analytic rules cover was checked by a recorded
    sweep of the whole registry (`python benchmarks/registry.py --json benchmarks/results/registry_transformers-
    VERSION.json`, one per release measured), with exact counts and within 3% of simulate in every mode."""
    import json

    from advisor.families import FAMILIES

    assert len(RECORDED) >= 2, "a recorded sweep per release measured (benchmarks/results/registry_*.json)"
    for path in RECORDED:
        sweep = json.loads(path.read_text())
        rows = {r["model_type"]: r for r in sweep["rows"]}
        for model_type in FAMILIES:
            row = rows.get(model_type)
            assert row is not None and row["status"] == "checked", f"{model_type} not checked in {path.name}"
            assert row["params"] == row["params_real"] and (row["lora_refused"] or row["lora"] == row["lora_real"])
            assert set(row["errors"]) == set(MODES) and not row["sim_problem"], (path.name, model_type, row)
            off = {m: e for m, e in row["errors"].items() if abs(e) > registry.TOL}
            assert not off, f"{model_type} in {path.name}: {off}"


@pytest.mark.parametrize("model_type", FAST)
@pytest.mark.slow
def test_registry_one_family_of_each_kind(model_type):
    assert model_type in _all_types()
    assert_row(registry.check(model_type))


def _live_types() -> list[str]:
    """The registry's types to check live beyond FAST: the covered families (CI), or every type with
    TUNEPLAN_REGISTRY=all (make newest; the routed and excluded ones are in the recorded sweeps)."""
    from advisor.families import FAMILIES

    every = os.environ.get("TUNEPLAN_REGISTRY") == "all"
    return [t for t in _all_types() if t not in FAST and (every or t in FAMILIES)]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _live_types())
def test_registry(model_type):
    assert_row(registry.check(model_type))


@pytest.mark.slow
def test_unknown_architectures_are_routed_with_a_reason():
    """A model type without a checked profile (a new family in a newer transformers) is routed, and the
    reason names what sets it apart where it can tell (here: Falcon-H1's Mamba layers)."""
    import json

    from advisor.families import analytic_coverage, lora_problem
    from advisor.model import count_on_meta

    shape = count_on_meta("tiny-falcon_h1", registry.tiny_config("falcon_h1"))
    why = analytic_coverage(shape)
    assert why and "state-space" in why and "--mode simulate" in why
    assert "incompatible with Mamba" in lora_problem(shape)
    assert lora_problem(shape, ["q_proj", "v_proj"]) is None
    assert analytic_coverage(count_on_meta("tiny-llama", registry.tiny_config("llama"))) is None
    json.dumps(registry.Row("x").__dict__)  # rows are plain data (the sweep writes them as JSON)
