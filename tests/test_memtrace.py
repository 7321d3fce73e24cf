"""Fast checks of the ground-truth harness (runner.memtrace) and the shared builder (advisor.stack)."""

from __future__ import annotations

import warnings

import pytest
import torch

from runner import memtrace

MB = 1 << 20


def _f32(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes // 4, dtype=torch.float32)


@pytest.mark.slow
def test_phase_peaks_are_exact_on_a_synthetic_step():
    def work():
        keep = _f32(4 * MB)  # "weights", allocated inside the profile
        for _ in range(2):
            with memtrace.phase("step"):
                with memtrace.phase("forward"):
                    a = _f32(2 * MB)
                    b = _f32(3 * MB)
                    del a  # peak 4 + 2 + 3 = 9
                with memtrace.phase("backward"):
                    g = _f32(1 * MB)  # 4 + 3 + 1 = 8
                    del b
                with memtrace.phase("optimizer"):
                    t = _f32(6 * MB)  # 4 + 1 + 6 = 11
                    del t
                with memtrace.phase("zero_grad"):
                    del g
        return keep.numel()

    tr = memtrace.measure(work)
    assert len(tr.steps) == 2
    last = tr.last
    assert last.start_bytes == 4 * MB
    assert last.end_bytes == 4 * MB
    assert last.phase_peaks == {"forward": 9 * MB, "backward": 8 * MB, "optimizer": 11 * MB, "zero_grad": 5 * MB}
    assert last.peak_bytes == 11 * MB and last.peak_phase == "optimizer"
    assert tr.peak_bytes == 11 * MB
    assert tr.final_bytes == 0 and tr.result == MB  # `keep` died when work() returned


@pytest.mark.slow
def test_tensors_from_before_the_profile_are_invisible():
    before = _f32(8 * MB)

    def work():
        nonlocal before
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            del before  # its free is not reported: the running sum stays absolute from 0
        x = _f32(1 * MB)
        with memtrace.phase("step"):
            with memtrace.phase("forward"):
                y = x.clone()
        return float(y[0])

    tr = memtrace.measure(work)
    assert tr.last.start_bytes == 1 * MB
    assert tr.last.peak_bytes == 2 * MB
    assert min(tr.peak_bytes, tr.final_bytes) >= 0


@pytest.mark.slow
def test_gc_count_sees_live_tensors():
    base = memtrace.gc_live_tensor_bytes()
    x = _f32(3 * MB)
    assert memtrace.gc_live_tensor_bytes() - base >= 3 * MB
    del x


@pytest.mark.slow
def test_real_step_tiny_llama(tmp_path):
    """A real transformers model, full fp32 + plain SGD: between steps only the weights and the
    batch are alive (no optimizer state, gradients set to None), and nothing escapes the trace."""
    pytest.importorskip("transformers")
    from advisor import stack as build
    from advisor.spec import TrainSpec
    from benchmarks.tiny_models import build_tiny

    model_dir = build_tiny("llama", cache_dir=tmp_path, num_hidden_layers=1, vocab_size=512,
                           hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    spec = TrainSpec(method="full", precision="fp32", optimizer="sgd", micro_batch=2, seq_len=32,
                     grad_checkpointing=False)
    info = {}

    def work():
        model = build.load_for_training(model_dir, spec)
        opt = build.make_optimizer(model, spec.optimizer, 1e-3)
        batch = build.make_batch(model.config.vocab_size, 2, 32)
        for _ in range(2):
            build.train_step(model, batch, opt, spec)
        info["weights"] = build.weight_bytes(model)["total"]
        info["batch"] = sum(t.untyped_storage().nbytes() for t in batch.values())
        with memtrace.phase("gc_check"):
            info["gc"] = memtrace.gc_live_tensor_bytes()

    base = memtrace.gc_live_tensor_bytes()
    tr = memtrace.measure(work)
    last = tr.last
    assert set(last.phase_peaks) == set(memtrace.PHASES)
    # weights + batch, plus a few small tensors: the previous step's loss, RoPE's original_inv_freq,
    # and on the CPU the loaded weights share one buffer slightly larger than their sum
    assert 0 <= last.start_bytes - (info["weights"] + info["batch"]) <= 4096
    assert last.peak_phase in ("forward", "backward")
    assert last.phase_peaks["backward"] > info["weights"] * 2  # gradients + activations on top of weights
    # the independent gc count agrees with the trace (nothing allocated unseen)
    assert abs(info["gc"] - base - tr.marks["gc_check"]["start"]) <= 4096
