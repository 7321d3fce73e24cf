"""Serving as a question of its own, on the command line and in the app: `estimate --task inference` names
its engine (vLLM by default on a GPU) and its numbers are advisor.serving's; `recommend --serving` ranks
cards and counts without --gpu and answers for one card with it; bad input is one message, exit 2."""

from __future__ import annotations

import json

import pytest

from advisor.cli.main import main
from advisor.gpus import find_gpu, gpu_table
from advisor.model import resolve
from advisor.serving import cuda_total_bytes, rank_serving_setups, serving_estimate

LLAMA8 = "meta-llama/Llama-3.1-8B"
LLAMA70 = "meta-llama/Llama-3.1-70B"


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def vllm(ref=LLAMA8, gpu="h100", **kw):
    g = find_gpu(gpu)
    return serving_estimate(resolve(ref), cuda_total_bytes(g), gpu_name=g.name, **kw)


# --- estimate --task inference ------------------------------------------------------------------

def test_estimate_defaults_to_vllm_on_a_gpu_and_its_numbers_are_advisor_serving(capsys):
    code, out, _ = run(capsys, "estimate", LLAMA8, "--task", "inference", "--gpu", "h100", "--seq", "8192",
                       "--gpu-memory-utilization", "0.95", "--json")
    assert code == 0
    res = json.loads(out)
    est = vllm(max_model_len=8192, gpu_memory_utilization=0.95)
    assert res["engine"] == "vllm"
    assert res["kv_cache_bytes"] == est.kv_cache_bytes
    assert res["kv_cache_tokens"] == est.kv_cache_tokens == 475_968  # vLLM 0.19 printed 476,016 (docs/serving.md)
    assert res["max_concurrency"] == est.max_concurrency
    assert res["max_model_len"] == 8192 and res["fits"] and res["problem"] is None
    assert res["vllm"] == json.loads(json.dumps(est.as_json()))
    # the estimate contract still holds: the parts add up, nvidia-smi = vLLM's budget + the CUDA context
    assert sum(res["breakdown"].values()) == res["peak_allocated_bytes"] == est.budget_bytes
    assert res["peak_reserved_bytes"] == res["peak_allocated_bytes"] + sum(res["overhead"].values())
    assert res["model"]["params_total"] == 8_030_261_248
    assert res["command"] == ["vllm", "serve", LLAMA8, "--max-model-len", "8192", "--gpu-memory-utilization",
                              "0.95", "--tensor-parallel-size", "1"]


def test_estimate_vllm_flags_reach_the_engine(capsys):
    code, out, _ = run(capsys, "estimate", LLAMA8, "--task", "inference", "--gpu", "h100", "--gpus", "2",
                       "--seq", "4096", "--max-model-len", "16384", "--kv-cache-dtype", "fp8", "--max-num-seqs",
                       "64", "--enable-lora", "--max-lora-rank", "32", "--weight-quant", "nf4", "--json")
    assert code == 0
    res = json.loads(out)
    est = vllm(max_model_len=16384, tensor_parallel=2, kv_cache_dtype="fp8", max_num_seqs=64, enable_lora=True,
               max_lora_rank=32, weight_quant="bnb-nf4")
    assert (res["kv_cache_bytes"], res["kv_cache_tokens"], res["max_concurrency"]) == \
        (est.kv_cache_bytes, est.kv_cache_tokens, est.max_concurrency)
    assert res["gpu"]["count"] == 2 and res["breakdown"]["lora_adapters"] == est.lora_bytes > 0
    assert res["plan"]["inference"]["kv_cache_dtype"] == "fp8"  # --kv-cache-dtype is the plan's field
    cmd = " ".join(res["command"])
    for words in ("--max-model-len 16384", "--tensor-parallel-size 2", "--kv-cache-dtype fp8", "--max-num-seqs 64",
                  "--enable-lora --max-lora-rank 32", "--quantization bitsandbytes"):
        assert words in cmd
    # --tensor-parallel-size (vLLM's own name) is the same flag as --tensor-parallel
    code, out, _ = run(capsys, "estimate", LLAMA8, "--task", "inference", "--gpu", "h100", "--tensor-parallel-size",
                       "4", "--json")
    assert code == 0 and json.loads(out)["vllm"]["tensor_parallel"] == 4


def test_estimate_vllm_table_output(capsys):
    code, out, _ = run(capsys, "estimate", LLAMA8, "--task", "inference", "--gpu", "h100", "--seq", "8192")
    est = vllm(max_model_len=8192)
    assert code == 0
    out = " ".join(out.split())  # as read, whatever rich wrapped at 80 columns
    for words in ("budget (0.9 × 79.19 GiB)", "weights", "activation peak", "non-torch", "KV cache",
                  f"{est.kv_cache_tokens:,} tokens in {est.num_blocks:,} blocks of 16",
                  f"{int(est.max_concurrency)} requests of 8,192 tokens at once",
                  f"vllm serve {LLAMA8} --max-model-len 8192 --gpu-memory-utilization 0.9 --tensor-parallel-size 1"):
        assert words in out, words
    assert f"{est.kv_cache_bytes / 2**30:.2f}" in out


def test_without_a_gpu_the_engine_is_transformers(capsys):
    code, out, _ = run(capsys, "estimate", LLAMA8, "--task", "inference", "--seq", "8192", "--json")
    res = json.loads(out)
    assert code == 0 and res["engine"] == "transformers"
    assert res["breakdown"]["kv_cache"] == 2 * 32 * 8 * 128 * 8192 * 2  # generate's cache of --seq tokens
    code, out, _ = run(capsys, "estimate", LLAMA8, "--task", "inference", "--gpu", "h100", "--engine",
                       "transformers", "--json")
    assert code == 0 and json.loads(out)["engine"] == "transformers" and "kv_cache_tokens" not in json.loads(out)
    code, out, _ = run(capsys, "estimate", LLAMA8, "--task", "inference")
    assert code == 0 and "engine: transformers" in out
    code, out, _ = run(capsys, "estimate", LLAMA8, "--task", "inference", "--gpu", "m3 max 128gb", "--json")
    assert code == 0 and json.loads(out)["engine"] == "transformers"  # vLLM does not serve on Apple GPUs
    code, out, _ = run(capsys, "estimate", LLAMA8, "--json")  # training: no engine
    assert code == 0 and "engine" not in json.loads(out)


# --- recommend --serving -------------------------------------------------------------------------

def test_recommend_serving_without_a_gpu_ranks_cards_and_counts(capsys):
    code, out, _ = run(capsys, "recommend", LLAMA8, "--serving", "--context", "32768", "--concurrency", "8", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["question"]["context"] == 32768 and res["question"]["concurrency"] == 8 and res["engine"] == "vllm"
    expected = rank_serving_setups(resolve(LLAMA8), max_model_len=32768, concurrency=8, limit=10)
    assert [(o["gpu"], o["count"]) for o in res["options"]] == [(o.gpu.id, o.count) for o in expected]
    prices = [o["usd_per_hour"] for o in res["options"]]
    assert prices == sorted(prices) and all(o["serves"] for o in res["options"])
    c = res["choice"]
    assert (c["gpu"], c["count"]) == (expected[0].gpu.id, expected[0].count)
    est = serving_estimate(resolve(LLAMA8), cuda_total_bytes(expected[0].gpu), max_model_len=32768,
                           tensor_parallel=expected[0].count, gpu_name=expected[0].gpu.name)
    assert c["estimate"]["kv_cache_tokens"] == est.kv_cache_tokens and est.max_concurrency >= 8
    assert c["command"][:4] == ["vllm", "serve", LLAMA8, "--max-model-len"]


def test_recommend_serving_on_one_card_tries_counts(capsys):
    code, out, _ = run(capsys, "recommend", LLAMA8, "--serving", "--gpu", "RTX 4090", "--context", "32768",
                       "--concurrency", "8", "--json")
    assert code == 0
    res = json.loads(out)
    gpu = find_gpu("RTX 4090")
    counts = [o["count"] for o in res["options"]]
    assert counts == sorted(counts) and all(o["gpu"] == gpu.id for o in res["options"])
    for o in res["options"]:
        est = serving_estimate(resolve(LLAMA8), cuda_total_bytes(gpu), max_model_len=32768,
                               tensor_parallel=o["count"], gpu_name=gpu.name)
        assert o["serves"] == (est.fits and est.max_concurrency >= 8)
    assert [o["serves"] for o in res["options"]] == [False] * (len(counts) - 1) + [True]
    assert res["choice"]["count"] == counts[-1]
    code, out, _ = run(capsys, "recommend", LLAMA8, "--serving", "--gpu", "RTX 4090", "--gpus", "2", "--json")
    assert code == 0 and [o["count"] for o in json.loads(out)["options"]] == [2]


def test_recommend_serving_table_reads_at_80_columns(capsys):
    code, out, _ = run(capsys, "recommend", LLAMA70, "--serving", "--gpu", "a100-80gb", "--context", "32768",
                       "--concurrency", "8")
    assert code == 0
    assert "Recommended:" in out and "vllm serve" in out and "too long" in out and "weights" in out
    assert all(len(line) <= 80 for line in out.splitlines() if "vllm serve" not in line), out
    code, out, _ = run(capsys, "recommend", LLAMA8, "--serving")
    out = " ".join(out.split())
    assert code == 0 and "1 request of 8,192 tokens at once" in out  # the defaults: --context 8192, --concurrency 1


def test_recommend_serving_nothing_serves_exits_1(capsys):
    code, out, _ = run(capsys, "recommend", "meta-llama/Llama-3.1-405B", "--serving", "--context", "131072",
                       "--concurrency", "64")
    assert code == 1 and "Nothing serves it" in out


# --- bad input: one clear message each, exit 2, no traceback ----------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["estimate", LLAMA8, "--task", "inference", "--gpu", "h100", "--gpu-memory-utilization", "1.5"],
     "--gpu-memory-utilization: gpu_memory_utilization must be in (0, 1] (got 1.5)"),
    (["estimate", LLAMA8, "--task", "inference", "--gpu", "h100", "--tensor-parallel", "3"],
     "--tensor-parallel: 32 attention heads do not divide over 3 GPUs"),
    (["estimate", LLAMA8, "--task", "inference", "--gpu", "h100", "--gpus", "3"],
     "--gpus (hardware.gpus): 32 attention heads do not divide over 3 GPUs"),
    (["estimate", LLAMA70, "--task", "inference", "--gpu", "RTX 4090"],
     "the weights take 131.45 GiB per GPU"),
    (["estimate", LLAMA8, "--task", "inference", "--gpu", "RTX 4090", "--seq", "131072"],
     "--seq (inference.seq_len): one request of max_model_len 131,072 needs 16.00 GiB of KV cache"),
    (["estimate", LLAMA8, "--task", "inference", "--engine", "vllm"], "vLLM sizes its KV cache from the GPU"),
    (["estimate", LLAMA8, "--task", "inference", "--engine", "vllm", "--gpu", "m3 max 128gb"],
     "vLLM does not serve on Apple M3 Max 128GB"),
    (["estimate", LLAMA8, "--gpu", "h100", "--max-model-len", "4096"], "for serving, not training"),
    (["estimate", LLAMA8, "--task", "inference", "--gpu", "h100", "--engine", "transformers", "--max-num-seqs",
      "8"], "--max-num-seqs: vLLM's settings"),
    (["recommend", LLAMA8, "--serving", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization: "),
    (["recommend", LLAMA8, "--serving", "--gpu", "h100", "--gpus", "3"], "--gpus: 32 attention heads"),
    (["recommend", LLAMA8, "--serving", "--seq", "4096", "--batch", "8"], "--seq, --batch: the training job's"),
    (["recommend", LLAMA8, "--serving", "--context", "200000"], "--context: max_model_len 200,000 is beyond"),
    (["recommend", LLAMA8, "--serving", "--concurrency", "0"], "--concurrency must be a positive number"),
    (["recommend", LLAMA8, "--context", "32768"], "--context: serving flags"),
])
def test_bad_serving_input_is_one_clear_message(capsys, argv, words):
    code, out, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("tuneplan: ") and len(err.strip().splitlines()) == 1, err
    assert words in err, err


def test_bad_serving_input_with_json_is_one_object(capsys):
    code, out, _ = run(capsys, "estimate", LLAMA70, "--task", "inference", "--gpu", "RTX 4090", "--json")
    assert code == 2
    (p,) = json.loads(out)["problems"]
    assert p["field"] == "hardware.gpus" and "weights" in p["what"] and p["flag"] == "--gpus"


def test_every_card_in_a_ranking_is_priced_nvidia():
    ids = {g.id for g in gpu_table().values() if g.vendor == "nvidia" and g.price_usd_hour is not None}
    assert {o.gpu.id for o in rank_serving_setups(resolve(LLAMA8), max_model_len=8192, concurrency=1,
                                                  limit=50)} <= ids


# --- the app ---------------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.slow
async def test_the_plan_screen_shows_vllm_for_an_inference_plan():
    pytest.importorskip("textual")
    import io

    from rich.console import Console

    from advisor import service
    from advisor.forms import FORM_DEFAULTS, plan_dict
    from advisor.tui.app import make_app

    app = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        app.screen.query_one("#task").value = "inference"
        await pilot.pause(0.3)
        await pilot.pause()
        ev = app.evaluation
        assert ev.plan.task == "inference" and ev.serving is not None
        want = service.serve(service.build(plan_dict({**FORM_DEFAULTS, "task": "inference"}))).estimate
        assert ev.serving.estimate == want
        con = Console(width=200, record=True, file=io.StringIO())
        con.print(app.screen.query_one("#time").content)
        shown = con.export_text()
        assert f"{want.kv_cache_tokens:,} tokens" in shown and f"{want.kv_cache_bytes / 2**30:.2f} GiB" in shown
        assert f"{int(want.max_concurrency)} requests of {want.max_model_len:,} tokens at once" in shown
        assert (f"vllm serve {FORM_DEFAULTS['model']} --max-model-len {want.max_model_len} "
                "--gpu-memory-utilization 0.9 --tensor-parallel-size 1") in shown
        # a model vLLM cannot hold on the card: said in the panel, the rest of the screen still works
        app.screen.query_one("#model").value = LLAMA70
        await pilot.pause(0.3)
        await pilot.pause()
        con = Console(width=200, record=True, file=io.StringIO())
        con.print(app.screen.query_one("#time").content)
        shown = con.export_text()
        assert "cannot start" in shown and "the weights take" in shown and "vllm serve" not in shown
        assert app.evaluation.result is not None
