"""Every run checks the time model: a real tiny CPU run measures its speed after warm-up and says, in its
step events, report.json and on the console, what it measured and that the GPU model does not apply there;
on a GPU the check compares like with like and re-projects the job (runner.speed.check with
advisor.speedcheck's prediction; no GPU needed for the arithmetic)."""

import json

import pytest
from conftest import cpu_plan_file

from advisor.gpus import find_gpu
from advisor.model import resolve
from advisor.planfile import load_plan
from advisor.spec import Plan
from advisor.speedcheck import find_card, speed_prediction
from runner.events import read_events
from runner.speed import SpeedMeter, check, words


@pytest.fixture(scope="module")
def cpu_run(tiny_model_dir, eight_examples, tmp_path_factory):
    from runner.recipe import Recipe

    d = tmp_path_factory.mktemp("speed")
    plan = load_plan(cpu_plan_file(d / "plan.yaml", tiny_model_dir, eight_examples, max_steps=6,
                                   training={"micro_batch": 2}))
    r = Recipe(plan, d / "run", log=lambda m: None)
    assert r.run() == 0
    events, _ = read_events(d / "run")
    return r, [e for e in events if e["type"] == "step"], json.loads((d / "run" / "report.json").read_text())


@pytest.mark.slow
def test_warm_up_steps_are_not_measured(cpu_run):
    _, steps, _ = cpu_run
    assert [e["speed"] is None for e in steps] == [True, True, False, False, False, False]
    assert [e["speed"]["measured"]["steps_measured"] for e in steps[2:]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_the_cpu_run_reports_what_it_measured_and_says_the_gpu_model_does_not_apply(cpu_run):
    r, steps, rep = cpu_run
    s = rep["speed"]
    assert s == steps[-1]["speed"]  # report.json carries the last check
    m = s["measured"]
    assert s["device"] == "cpu" and s["predicted"] is None and s["ratio"] is None
    assert m["step_s"] > 0 and m["tokens_per_s_per_gpu"] > 0 and m["warmup_steps"] == 2
    # padded to each batch's longest: positions >= real tokens, and tokens/s counts the real ones
    assert 0 <= m["padding_share"] < 1
    assert m["positions_per_s_per_gpu"] >= m["tokens_per_s_per_gpu"]
    assert s["job"]["total_steps"] == 6
    assert s["job"]["hours_measured"] == pytest.approx(6 * m["step_s"] / 3600, rel=1e-3, abs=1e-6)  # 6 decimals
    assert s["job"]["cost_measured_usd"] is None
    w = s["words"]
    assert w.startswith(f"measured {m['tokens_per_s_per_gpu']:,.0f} tokens/s (")
    assert "on the CPU: the job (6 steps) takes about" in w and "does not apply on the CPU" in w


def test_the_console_prints_the_speed_line(cpu_run, capsys):
    from runner.console import print_report

    _, _, rep = cpu_run
    print_report(rep)
    out = capsys.readouterr().out
    assert "speed: measured" in out and "GPU time model does not apply" in out


def test_the_app_state_keeps_the_latest_check(cpu_run):
    from advisor.tui.runs import RunState

    _, steps, rep = cpu_run
    st = RunState("x")
    st.apply(steps[:2])
    assert st.speed is None  # warm-up
    st.apply(steps[2:3])
    assert st.speed == steps[2]["speed"]
    st.apply([{"type": "end", "status": "completed", "report": rep}])
    assert st.speed == rep["speed"]
    st.apply([{"type": "step", "step": 7, "speed": "not a mapping"}])  # a hand-edited file: dropped
    assert st.speed == rep["speed"]


def _plan(**training) -> Plan:
    return Plan.model_validate({"training": {"method": "lora", "micro_batch": 4, "seq_len": 2048, **training},
                                "hardware": {"gpu": "A100 80GB SXM"}})


A100 = "NVIDIA A100-SXM4-80GB"


def test_on_a_gpu_the_check_predicts_the_shape_that_ran_and_reprojects_the_job():
    from advisor import throughput as tp

    plan, shape, gpu = _plan(), resolve("meta-llama/Llama-3.1-8B"), find_gpu("a100-80gb-sxm")
    predicted = tp.step_time(plan, shape, gpu).step_s
    pred = speed_prediction(plan, shape, A100, 2048, 1)
    assert pred["gpu"] == gpu.name and pred["step_s"] == pytest.approx(predicted) and pred["note"] is None
    # the run was 10% faster than predicted, packed full sequences
    s = check(predicted / 1.1, 4 * 2048, 4 * 2048, steps_measured=5, warmup_steps=2, total_steps=1000,
              device="cuda", prediction=pred)
    assert s["ratio"] == pytest.approx(1.1, abs=1e-3)
    assert s["predicted"]["seq_len"] == 2048
    assert s["predicted"]["tokens_per_s_per_gpu"] == pytest.approx(4 * 2048 / predicted, rel=1e-3)
    assert s["job"]["hours_predicted"] == pytest.approx(1000 * predicted / 3600, rel=1e-3)
    assert s["job"]["cost_measured_usd"] == pytest.approx(s["job"]["hours_measured"] * gpu.price_usd_hour, abs=0.01)
    w = s["words"]
    p, m = s["predicted"]["tokens_per_s_per_gpu"], s["measured"]["tokens_per_s_per_gpu"]
    assert w.startswith(f"predicted {p:,.0f} tokens/s, measured {m:,.0f}, x1.10: the job (1,000 steps) takes ")
    assert ", not " in w and "($" in w


def test_padded_batches_are_predicted_at_their_real_length_and_counted_without_padding():
    plan, shape = _plan(), resolve("meta-llama/Llama-3.1-8B")
    # batches padded to their longest: 4 x 600 positions computed for 1,800 real tokens
    pred = speed_prediction(plan, shape, A100, 600, 1)
    assert pred["seq_len"] == 600  # not the plan's 2048
    s = check(1.0, 1800, 2400, steps_measured=3, warmup_steps=2, total_steps=10, device="cuda", prediction=pred)
    assert s["measured"]["tokens_per_s_per_gpu"] == 1800 and s["measured"]["padding_share"] == 0.25
    assert s["predicted"]["tokens_per_s_per_gpu"] == pytest.approx(1800 / s["predicted"]["step_s"], rel=1e-3)


def test_several_gpus_are_per_gpu_and_say_so():
    plan = _plan().model_copy(update={"hardware": _plan().hardware.model_copy(update={"gpus": 4, "zero": 3})})
    shape, gpu = resolve("meta-llama/Llama-3.1-8B"), find_gpu("a100-80gb-sxm")
    pred = speed_prediction(plan, shape, A100, 2048, 4)
    s = check(2.0, 4 * 4 * 2048, 4 * 4 * 2048, steps_measured=3, warmup_steps=2, total_steps=10, world=4,
              device="cuda", prediction=pred)
    assert s["measured"]["tokens_per_s_per_gpu"] == 4 * 2048 / 2.0
    assert "tokens/s per GPU" in s["words"]
    assert s["job"]["cost_measured_usd"] == pytest.approx(10 * 2.0 / 3600 * 4 * gpu.price_usd_hour, abs=0.01)


def test_the_card_is_found_by_its_cuda_name_or_the_plan_says_which():
    assert find_card(A100, None)[0].id.startswith("a100")
    g, note = find_card("NVIDIA Nonexistent 9000", "RTX 4090")
    assert g.id == "rtx-4090" and "no GPU profile" in note
    g, note = find_card("NVIDIA Nonexistent 9000", None)
    assert g is None and "measured only" in note
    plan = _plan().model_copy(update={"hardware": _plan().hardware.model_copy(update={"gpu": None})})
    pred = speed_prediction(plan, resolve("meta-llama/Llama-3.1-8B"), "NVIDIA Nonexistent 9000", 2048)
    s = check(1.0, 100, 100, steps_measured=1, warmup_steps=2, total_steps=3600, device="cuda", prediction=pred)
    assert s["predicted"] is None and "measured only" in s["words"] and "takes about 1.0 h" in s["words"]


def test_the_meter_asks_the_service_for_the_prediction(monkeypatch):
    """On a GPU the meter reaches the time model through advisor.service (speed_prediction, which is
    advisor.speedcheck's)."""
    plan, shape = _plan(), resolve("meta-llama/Llama-3.1-8B")
    meter = SpeedMeter(plan, shape, "cuda:0", A100, 1, 100)
    assert meter.add(9.0, 8192, 8192) is None and meter.add(9.0, 8192, 8192) is None  # warm-up
    s = meter.add(3.0, 8192, 8192)
    assert s["predicted"]["seq_len"] == 2048 and s["gpu"].startswith("NVIDIA A100") and s["measured"]["step_s"] == 3.0
    from advisor import service

    assert service.speed_prediction(plan, shape, A100, 2048, 1)["seq_len"] == s["predicted"]["seq_len"]


def test_words_round_the_job_like_the_rest_of_the_app():
    s = {"device": "cuda", "gpus": 1, "measured": {"tokens_per_s_per_gpu": 1020.4, "step_s": 8.0},
         "predicted": {"tokens_per_s_per_gpu": 953.2}, "ratio": 1.07, "note": None,
         "job": {"total_steps": 190, "hours_measured": 25 / 60, "hours_predicted": 27 / 60,
                 "cost_measured_usd": None}}
    assert words(s) == "predicted 953 tokens/s, measured 1,020, x1.07: the job (190 steps) takes 25 min, not 27 min"
