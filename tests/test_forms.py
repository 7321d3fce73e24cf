"""The plan form: every field's mistake comes back as a typed problem and lands on that field."""

import pytest

from advisor.forms import CHECKBOXES, FORM_DEFAULTS, LOC_FIELD, evaluate

BAD = {
    "model": "llama-9000", "gpu": "rtx 9999", "gpus": "0", "zero": "7", "task": "juggling", "method": "dora",
    "precision": "fp8", "optimizer": "lion", "batch": "0", "seq": "-5", "accum": "zero", "lora_r": "0",
    "lora_alpha": "-1", "lora_targets": "no_such_proj", "weight_quant": "int3", "transformers": "4.30",
    "harness": "axolotl",
    "device": "tpu", "job_examples": "0", "job_avg_tokens": "-3", "epochs": "0", "job_target_batch": "0",
    "job_budget": "-5",
}
INFERENCE_ONLY = {"weight_quant"}


def test_every_form_field_has_a_bad_value_here():
    assert set(BAD) == set(FORM_DEFAULTS) - set(CHECKBOXES)  # a checkbox has no bad value


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_value_is_a_typed_problem_on_its_field(field):
    form = {**FORM_DEFAULTS, field: BAD[field]}
    if field in INFERENCE_ONLY:
        form["task"] = "inference"
    ev = evaluate(form)
    assert not ev.ok
    assert field in ev.errors, (ev.errors, ev.general)
    assert set(ev.errors) == {field}, ev.errors  # nothing else is blamed
    assert any(LOC_FIELD.get(p.field) == field for p in ev.problems), ev.problems
    assert not ev.general


def test_several_bad_fields_are_all_reported():
    ev = evaluate({**FORM_DEFAULTS, "batch": "0", "gpu": "rtx 9999", "lora_r": "0"})
    assert set(ev.errors) == {"batch", "gpu", "lora_r"}
