"""advisor.lifecycle: the moments outside the training step.

Fast properties of the pure functions over bundled models, then three cases measured against the
real stack on tiny models (runner.memtrace, every CPU allocation; benchmarks/lifecycle.py runs the
full table). Tolerance of the measured cases: 3 % of the tensor bytes (the table in
docs/accuracy.md shows 0-1.5 %), 5 % for QLoRA's CPU load of a tied-embedding model (-2.9 %).
"""

import time

import pytest

from advisor import lifecycle
from advisor.memory import estimate, lora_adapter_bytes, weights_bytes
from advisor.model import resolve
from advisor.spec import build_plan

TOL = 0.03


def plan(ref="meta-llama/Llama-3.1-8B", hardware=None, run=None, **training):
    training.setdefault("method", "qlora")
    return build_plan({"model": {"ref": ref}, "training": training,
                       "hardware": hardware or {"gpu": "A100 80GB", "device": "cuda"},
                       "run": run or {"merge_export": True}})


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("ref", ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "mistralai/Mistral-7B-v0.1"])
def test_moments_are_complete_and_consistent(ref, method):
    p = plan(ref, method=method)
    shape = resolve(ref)
    ms = lifecycle.run_moments(p, shape)
    assert {"loading", "evaluation", "checkpoint"} <= set(ms)
    assert ("merge_export" in ms) == (method != "full")
    for m in ms.values():
        assert m.gpu_bytes >= m.tensor_bytes >= 0 and m.host_bytes >= 0 and m.what
    # the loading parts add up: the moment is the largest sub-moment or the end state with the adapters
    parts = lifecycle.load_parts(p, shape)
    assert ms["loading"].tensor_bytes == max(max(v for k, v in parts.items() if k != "end"),
                                             parts["end"] + lora_adapter_bytes(shape, p.training))
    assert parts["end"] == weights_bytes(shape, p.training)
    if method != "full":
        assert ms["merge_export"].host_bytes == sum(lifecycle.merge_parts(p, shape).values())
    assert lifecycle.host_ram_bytes(p, shape) == max(m.host_bytes for m in ms.values())


def test_monotonic_in_model_size():
    sizes = ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B"]
    for method in ("full", "lora", "qlora"):
        prev = None
        for ref in sizes:
            p = plan(ref, method=method)
            ms = lifecycle.run_moments(p, resolve(ref))
            cur = {k: (m.gpu_bytes, m.host_bytes) for k, m in ms.items()}
            if prev:
                for k, (g, h) in cur.items():
                    assert g > prev[k][0] and h >= prev[k][1], (method, ref, k)
            prev = cur


def test_qlora_loading_peak_above_steady_weights():
    for ref in ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "google/gemma-2-9b"):
        p, shape = plan(ref), resolve(ref)
        parts = lifecycle.load_parts(p, shape)
        steady = weights_bytes(shape, p.training)
        assert parts["quantize"] > parts["end"] - 4 * (shape.params_total - shape.params_quantized)
        assert parts["prepare"] > steady == parts["end"]
        assert lifecycle.loading(p, shape).tensor_bytes > steady + lora_adapter_bytes(shape, p.training)


def test_merge_needs_the_compute_dtype_weights_on_the_host():
    shape = resolve("meta-llama/Llama-3.1-8B")
    for method in ("lora", "qlora"):
        p = plan(method=method, precision="bf16")
        m = lifecycle.merge_export(p, shape)
        assert m.host_bytes > 2 * shape.params_total  # the whole base in bf16, in host RAM
        assert m.tensor_bytes < estimate(p, shape).peak_allocated_bytes  # the GPU only keeps the optimizer
        assert lifecycle.host_ram_bytes(p, shape) >= m.host_bytes
    assert lifecycle.merge_export(plan(method="lora", run={"merge_export": False}), shape) is None
    assert lifecycle.merge_export(plan(method="full"), shape) is None


def test_run_peak_names_the_moment():
    shape = resolve("meta-llama/Llama-3.1-8B")
    p = plan(method="qlora", micro_batch=1, seq_len=256)
    step = estimate(p, shape).peak_reserved_bytes
    name, peak = lifecycle.run_peak(p, shape, step)
    assert peak >= step and name in ("step", *lifecycle.run_moments(p, shape))
    # a step smaller than loading: loading is the run's peak
    assert lifecycle.run_peak(p, shape, 1) == ("loading", lifecycle.loading(p, shape).gpu_bytes)
    # FSDP: rank 0 loads on the host (advisor.stack.load_for_training(fsdp=True)) and each GPU gets its
    # shard, so loading is no GPU peak; the host holds the whole model
    p8 = plan(method="lora", precision="bf16", hardware={"gpu": "A100 80GB", "gpus": 8, "zero": 3})
    name, peak = lifecycle.run_peak(p8, shape, estimate(p8, shape).peak_reserved_bytes)
    load = lifecycle.loading(p8, shape)
    assert name == "step" and load.tensor_bytes < 2 * shape.params_total // 4
    assert load.host_bytes > 2 * shape.params_total


def test_fast_and_torch_free():
    import subprocess
    import sys

    code = "import advisor.lifecycle, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    p, shape = plan(), resolve("meta-llama/Llama-3.1-8B")
    lifecycle.run_moments(p, shape)
    t0 = time.perf_counter()
    for _ in range(100):
        lifecycle.run_moments(p, shape)
    assert (time.perf_counter() - t0) / 100 < 0.002


# -- measured against the real stack (CPU) ----------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from benchmarks.lifecycle import make_model

    root = tmp_path_factory.mktemp("lifecycle")
    return {f: make_model(f, root) for f in ("llama", "qwen2", "mistral")}


def _close(pred, meas, what):
    assert abs(pred - meas) <= TOL * meas, f"{what}: predicted {pred}, measured {meas}"


@pytest.mark.slow
def test_measured_llama_lora_loading_and_evaluation(models):
    from benchmarks.lifecycle import measure_case, predict

    meas, pred = measure_case(str(models["llama"]), "lora"), predict(models["llama"], "lora")
    _close(pred["load_peak"], meas["load_peak"], "loading")
    _close(pred["eval_peak"], meas["eval_peak"], "evaluation")


@pytest.mark.slow
def test_measured_qwen2_qlora_loading(models):
    """Tied embeddings, qkv biases; NF4 with double quantization and prepare_model_for_kbit_training."""
    from benchmarks.lifecycle import measure_case, predict

    meas, pred = measure_case(str(models["qwen2"]), "qlora"), predict(models["qwen2"], "qlora")
    assert abs(pred["load_peak"] - meas["load_peak"]) <= 0.05 * meas["load_peak"]
    _close(pred["prepare_peak"], meas["prepare_peak"], "prepare_model_for_kbit_training")
    _close(pred["eval_peak"], meas["eval_peak"], "evaluation")


@pytest.mark.slow
def test_measured_mistral_merge_export(models, tmp_path):
    from benchmarks.lifecycle import measure_case, measure_merge, predict

    adapter = str(tmp_path / "adapter")
    measure_case(str(models["mistral"]), "lora", adapter_dir=adapter)
    meas, pred = measure_merge(str(models["mistral"]), adapter), predict(models["mistral"], "lora")
    _close(pred["merge_peak"], meas["merge_peak"], "merge export")
