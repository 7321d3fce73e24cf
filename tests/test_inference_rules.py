"""Inference rules learned from the calibration, each pinned by a real ``generate`` of a tiny
random-weight model measured with the CPU profiler (benchmarks/calibrate.py), compared with the
analytic estimate (3%) and the simulate estimate (2%)."""

import dataclasses

import pytest

from advisor.inference import math_attention_bytes  # noqa: E402
from advisor.model import ModelShape, count_on_meta  # noqa: E402
from benchmarks import (
    accuracy,  # noqa: E402
    calibrate,  # noqa: E402
)

I = calibrate.I

CASES = [
    # Falcon passes its one multi-query key/value head to sdpa as is: torch's math path, whose fp32
    # copies and the key broadcast over the query heads set the decode peak ...
    I("falcon", 2, 256, 16, precision="bf16"),
    # ... and whose two fp32 score matrices and bool -inf mask set the prefill peak
    I("falcon", 2, 256, 252, precision="bf16"),
    # generate keeps the previous step's fp32 logits and scores through the next forward, and
    # min_new_tokens runs two length processors (min_length is derived from it)
    I("llama", 2, 256, 8, precision="bf16"),
    # no EOS token: generate adds no length processor, the scores are the logits
    I("qwen2", 2, 256, 16, precision="bf16"),
    # Gemma 2: the sliding layer's cache holds the window only; eager attention's repeat_kv copies
    # the full layer's keys and values to every query head
    I("gemma2", 2, 256, 16, precision="bf16"),
    # Gemma 2 prefill (eager): F.softmax(dtype=float32) copies the scores to fp32 beside its fp32
    # output; the softcapping chain replaces the scores; two materialized masks (full and sliding);
    # the sliding layer's prefill cache holds every prompt token
    I("gemma2", 2, 256, 252, precision="bf16"),
    I("gemma2", 2, 256, precision="fp32"),
]


@pytest.fixture(scope="module")
def measured():
    return {calibrate.case_id(c): calibrate.run_case(c, steps=1) for c in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=calibrate.case_id)
def test_analytic_within_3_percent(case, measured):
    row = accuracy.compare(measured[calibrate.case_id(case)])
    assert row["phase"] == row["measured_phase"], row
    assert abs(row["error"]) <= 0.03, row


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4], CASES[5]], ids=calibrate.case_id)
def test_simulate_within_2_percent(case, measured):
    m = measured[calibrate.case_id(case)]
    sim = accuracy.simulate_bytes(m, fresh=True)
    assert sim is not None
    assert abs(sim / m["measured"]["peak_bytes"] - 1) <= 0.02, (sim, m["measured"]["peak_bytes"])


def _shape(kv_heads: int) -> ModelShape:
    from benchmarks.tiny_models import make_config

    shape = count_on_meta("falcon", make_config("falcon").to_dict())
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (4, 1, 32)
    return dataclasses.replace(shape, num_kv_heads=kv_heads)


def test_math_attention_decode_counts_the_broadcast_key():
    # one query token over 255 cached: fp32 q (1k) and scaled q (1k), fp32 k and v (2 x 65280),
    # scaled k (65280), k broadcast to 4 heads and copied (261120), scores (8160): the profiler's
    # sequence in aten::_scaled_dot_product_attention_math for the tiny Falcon
    assert math_attention_bytes(_shape(1), 2, 1, 255, 2) == 1024 * 2 + 3 * 65280 + 261120 + 8160
    # as many key/value heads as query heads: no broadcast copy; fp32 inputs are not upcast
    assert math_attention_bytes(_shape(4), 2, 1, 255, 4) == 1024 + 4 * 65280 + 8160


def test_a_multimodal_gemma3s_sliding_layers_come_from_its_text_config():
    """Gemma 3 4B-27B keep layer_types under text_config: read from the resolved text config, 29 of the 4B's 34
    layers are sliding (5 local : 1 global); the raw config has none at the top level, which counted all 34."""
    from advisor.inference import layer_windows, sliding_layers
    from advisor.model import resolve

    shape = resolve("google/gemma-3-4b-it")
    assert "layer_types" not in shape.config and sliding_layers(shape) == (29, 1024)
    assert layer_windows(shape)[:6] == [1024] * 5 + [None]
