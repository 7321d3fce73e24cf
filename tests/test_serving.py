"""advisor.serving: vLLM's start-up KV cache sizing, term by term, its verdicts, its input checks, the GPU
ranking, and the published-log comparison the docs report (benchmarks/vllm_startup.py)."""

import dataclasses

import pytest
from conftest import ROOT

from advisor.model import resolve
from advisor.problems import Problems
from advisor.serving import (
    BLOCK_SIZE,
    CONTEXT_BYTES_ONE_GPU,
    NON_TORCH_BYTES_ONE_GPU,
    NON_TORCH_BYTES_TP,
    SAMPLER_FP32_COPIES,
    activation_peak_bytes,
    blocks_per_request,
    cuda_total_bytes,
    default_batch_limits,
    kv_bytes_per_token_layer,
    kv_groups,
    kv_heads_per_gpu,
    layer_attention,
    lora_buffer_bytes,
    moe_workspace_bytes,
    quant_weight_bytes,
    rank_serving_setups,
    requested_bytes,
    rope_cache_bytes,
    sampler_bytes,
    serving_estimate,
    weights_bytes,
)
from advisor.units import GIB

H100 = int(79.19 * GIB)  # what torch.cuda.mem_get_info reports on an H100 80GB HBM3 (the logs' total_memory)
LLAMA8 = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def llama():
    return resolve(LLAMA8)


# --- the terms, exactly ------------------------------------------------------------------------------

def test_llama_8b_weights_are_its_parameters_and_the_rotary_cache(llama):
    # 8,030,261,248 bf16 parameters + the 131,072 x 128 bf16 cos/sin cache: the 14.99 GiB vLLM prints
    assert llama.params_total == 8_030_261_248
    assert rope_cache_bytes(llama, 2) == 131_072 * 128 * 2
    assert weights_bytes(llama) == 8_030_261_248 * 2 + 131_072 * 128 * 2 == 16_094_076_928
    assert round(weights_bytes(llama) / GIB, 2) == 14.99


def test_tensor_parallel_splits_weights_but_not_norms_or_the_rotary_cache(llama):
    norms = llama.params_total - llama.params_embedding - llama.params_lm_head - sum(g.params for g in llama.linears)
    split = (llama.params_total - norms) * 2
    assert weights_bytes(llama, tensor_parallel=2) == split // 2 + norms * 2 + rope_cache_bytes(llama, 2)
    assert weights_bytes(llama, tensor_parallel=4) == split // 4 + norms * 2 + rope_cache_bytes(llama, 2)


def test_quantized_weights_keep_embeddings_and_head_in_the_model_dtype(llama):
    emb_head = (llama.params_embedding + llama.params_lm_head) * 2
    lin = sum(g.count * quant_weight_bytes(g.in_features * g.out_features, g.out_features, "fp8")
              for g in llama.linears)
    norms = llama.params_total - llama.params_embedding - llama.params_lm_head - sum(g.params for g in llama.linears)
    assert weights_bytes(llama, weight_quant="fp8") == emb_head + lin + norms * 2 + rope_cache_bytes(llama, 2)
    assert quant_weight_bytes(4096 * 1024, 1024, "fp8") == 4096 * 1024 + 4 * 1024
    assert quant_weight_bytes(4096 * 1024, 1024, "int8") == 4096 * 1024 + 4 * 1024
    groups = 4096 * 1024 // 128
    assert quant_weight_bytes(4096 * 1024, 1024, "gptq") == 4096 * 1024 // 2 + 2 * groups + groups // 2
    assert quant_weight_bytes(4096 * 1024, 1024, "bnb-nf4") < 4096 * 1024 * 0.6


def test_kv_bytes_per_token_full_attention_and_fp8(llama):
    # 2 (K, V) x 8 KV heads x 128 x 2 bytes, per layer; 32 layers
    assert kv_bytes_per_token_layer(llama) == 2 * 8 * 128 * 2 == 4096
    assert kv_bytes_per_token_layer(llama, kv_cache_dtype="fp8") == 2048
    assert kv_bytes_per_token_layer(llama, tensor_parallel=2) == 2048
    assert kv_bytes_per_token_layer(llama, dtype_bytes=4) == 8192


def test_kv_heads_split_over_gpus_or_replicated():
    qwen = resolve("Qwen/Qwen2.5-7B-Instruct")  # 4 KV heads
    assert [kv_heads_per_gpu(qwen, tp) for tp in (1, 2, 4, 8)] == [4, 2, 1, 1]


def test_mla_caches_one_latent_per_token_whole_on_every_gpu(llama):
    cfg = {**llama.config, "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    mla = dataclasses.replace(llama, config=cfg)
    assert kv_bytes_per_token_layer(mla) == (512 + 64) * 2
    assert kv_bytes_per_token_layer(mla, tensor_parallel=4) == (512 + 64) * 2
    assert kv_bytes_per_token_layer(mla, kv_cache_dtype="fp8") == 576


def test_budget_blocks_tokens_and_concurrency_for_llama_8b_on_an_80gb_card(llama):
    e = serving_estimate(llama, H100, gpu_memory_utilization=0.9, max_model_len=8192, gpu_name="NVIDIA H100")
    assert e.budget_bytes == requested_bytes(H100, 0.9) == int(H100 * 0.9)
    assert (e.max_num_batched_tokens, e.max_num_seqs) == (8192, 1024)
    assert e.weights_bytes == 16_094_076_928
    assert e.non_torch_bytes == NON_TORCH_BYTES_ONE_GPU
    reqs, vocab = 1024, 128_256
    assert e.activation_bytes == int(reqs * vocab * (2 + 4 * SAMPLER_FP32_COPIES))  # the sampler, not the forward
    assert e.available_bytes == e.budget_bytes - e.weights_bytes - e.activation_bytes - e.non_torch_bytes
    page = BLOCK_SIZE * 4096
    assert e.num_blocks == e.available_bytes // page // 32
    assert e.kv_cache_tokens == e.num_blocks * BLOCK_SIZE
    assert e.blocks_per_request == 8192 // BLOCK_SIZE
    assert e.max_concurrency == e.num_blocks / 512
    assert e.kv_bytes_per_token == 131_072
    assert e.fits and e.problem is None
    j = e.as_json()
    assert j["kv_cache_bytes"] == e.available_bytes and j["kv_cache_tokens"] == e.kv_cache_tokens
    assert j["max_concurrency"] == e.max_concurrency and j["status"] == "fits"


def test_vllm_batch_defaults_follow_the_card():
    assert default_batch_limits(H100, "NVIDIA H100 80GB HBM3") == (8192, 1024)
    assert default_batch_limits(int(79.2 * GIB), "NVIDIA A100-SXM4-80GB") == (2048, 256)
    assert default_batch_limits(int(23.6 * GIB), "NVIDIA GeForce RTX 4090") == (2048, 256)


def test_activation_is_the_larger_of_forward_and_sampler_plus_moe_workspaces(llama):
    small = activation_peak_bytes(llama, max_num_seqs=256, max_num_batched_tokens=2048)
    assert small == sampler_bytes(llama, 256, 2048)
    mixtral = resolve("mistralai/Mixtral-8x7B-v0.1")
    ws = moe_workspace_bytes(mixtral, 8192, 2)
    # tokens x top-2 x (max(2 x 7168, 4096) + 7168) x 2 bytes
    assert ws == 8192 * 2 * (14336 + 7168) * 2
    assert activation_peak_bytes(mixtral, max_num_seqs=1024, max_num_batched_tokens=8192, tensor_parallel=2) == (
        max(sampler_bytes(mixtral, 1024, 8192), 8192 * 4 * 4096 * 2) + ws)


def test_lora_buffers_are_max_loras_slots_of_peft_sized_adapters(llama):
    # one GPU: max_loras x r x (in + out) over every linear, in the model dtype
    assert lora_buffer_bytes(llama, max_loras=1, max_lora_rank=16) == llama.lora_params("all-linear", 16) * 2
    assert lora_buffer_bytes(llama, max_loras=4, max_lora_rank=64) == 4 * llama.lora_params("all-linear", 64) * 2
    assert lora_buffer_bytes(llama, max_loras=1, max_lora_rank=16, tensor_parallel=2) < \
        lora_buffer_bytes(llama, max_loras=1, max_lora_rank=16)
    on = serving_estimate(llama, H100, max_model_len=8192, enable_lora=True, max_loras=4, max_lora_rank=64)
    off = serving_estimate(llama, H100, max_model_len=8192)
    assert on.lora_bytes == 4 * llama.lora_params("all-linear", 64) * 2
    assert off.available_bytes - on.available_bytes == on.lora_bytes
    assert any("LoRA" in n for n in on.notes)


# --- hybrid sliding-window layers ------------------------------------------------------------------------

def test_gemma2_alternates_sliding_and_full_layers_in_two_groups():
    g = resolve("google/gemma-2-9b")
    types = layer_attention(g)
    assert types[:3] == [4096, None, 4096] and types.count(None) == 21
    groups = kv_groups(g)
    assert groups.group_size == 21 and sorted(groups.windows, key=str) == [4096, None]
    # full: 8192 / 16 blocks; sliding: cdiv(4095 + 8192 capped at 8192, 16) + 1
    assert blocks_per_request(groups, max_model_len=8192, max_num_batched_tokens=8192) == 512 + 513


def test_gemma3_pads_its_sliding_layers_into_groups_of_the_full_ones():
    g = resolve("google/gemma-3-1b-it")  # 26 layers: 22 sliding (512), 4 full
    groups = kv_groups(g)
    assert groups.group_size == 4 and len(groups.windows) == 6 + 1
    assert blocks_per_request(groups, max_model_len=32768, max_num_batched_tokens=2048) == (
        6 * (-(-(511 + 2048) // 16) + 1) + 32768 // 16)


def test_a_sliding_window_without_layer_types_is_full_attention():
    assert set(layer_attention(resolve("mistralai/Mistral-7B-v0.1"))) == {None}
    assert set(layer_attention(resolve("Qwen/Qwen2.5-7B-Instruct"))) == {None}


# --- verdicts --------------------------------------------------------------------------------------------

def test_weights_above_the_card_is_one_clear_problem():
    e = serving_estimate(resolve("meta-llama/Llama-3.1-70B"), H100, max_model_len=8192)
    assert e.status == "weights_too_big" and not e.fits
    assert e.problem.field == "tensor_parallel" and "tensor-parallel-size" in e.problem.fix
    assert e.kv_cache_bytes == 0 and e.kv_cache_tokens == 0


def test_no_room_left_for_the_cache_says_what_to_raise():
    e = serving_estimate(resolve("Qwen/Qwen2.5-72B"), H100, gpu_memory_utilization=0.9, max_model_len=8192,
                         tensor_parallel=2)
    assert e.status == "no_kv_room" and e.available_bytes <= 0
    assert "gpu-memory-utilization" in e.problem.fix


def test_max_model_len_beyond_the_cache_names_the_length_that_fits(llama):
    e = serving_estimate(llama, int(23.6 * GIB), max_model_len=131_072)
    assert e.status == "max_model_len_too_long"
    assert 0 < e.max_model_len_fit < 131_072
    assert f"{e.max_model_len_fit:,}" in e.problem.fix
    ok = serving_estimate(llama, int(23.6 * GIB), max_model_len=e.max_model_len_fit)
    assert ok.fits and ok.max_concurrency >= 1
    over = serving_estimate(llama, int(23.6 * GIB), max_model_len=e.max_model_len_fit + BLOCK_SIZE)
    assert not over.fits


def test_utilization_above_what_the_context_leaves_is_noted(llama):
    e = serving_estimate(llama, H100, gpu_memory_utilization=0.999, max_model_len=8192)
    assert any("free memory" in n for n in e.notes)
    assert CONTEXT_BYTES_ONE_GPU > 0


def test_the_budget_adds_up_in_every_case(llama):
    for util in (0.3, 0.9):
        for tp in (1, 2, 8):
            e = serving_estimate(llama, H100, gpu_memory_utilization=util, max_model_len=4096, tensor_parallel=tp)
            assert e.weights_bytes + e.lora_bytes + e.activation_bytes + e.non_torch_bytes + e.cuda_graph_bytes \
                + e.available_bytes == e.budget_bytes
            assert e.non_torch_bytes == (NON_TORCH_BYTES_ONE_GPU if tp == 1 else NON_TORCH_BYTES_TP)


# --- bad inputs: every mistake at once, each with its fix -------------------------------------------------

def test_bad_inputs_are_reported_together(llama):
    with pytest.raises(Problems) as err:
        serving_estimate(llama, H100, gpu_memory_utilization=1.5, max_model_len=0, tensor_parallel=3,
                         weight_quant="int3", kv_cache_dtype="fp4", max_num_seqs=0)
    fields = {p.field for p in err.value.items}
    assert {"gpu_memory_utilization", "max_model_len", "tensor_parallel", "weight_quant", "kv_cache_dtype",
            "max_num_seqs"} <= fields
    assert any("one of: none, fp8" in (p.fix or "") for p in err.value.items)


@pytest.mark.parametrize("kwargs, field", [
    ({"gpu_memory_utilization": 0}, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": True}, "gpu_memory_utilization"),
    ({"max_model_len": 200_000}, "max_model_len"),
    ({"tensor_parallel": 0}, "tensor_parallel"),
    ({"tensor_parallel": 3}, "tensor_parallel"),
    ({"enable_lora": True, "max_lora_rank": 0}, "max_lora_rank"),
    ({"dtype": "int8"}, "dtype"),
    ({"block_size": 0}, "block_size"),
])
def test_one_bad_input(llama, kwargs, field):
    with pytest.raises(Problems) as err:
        serving_estimate(llama, H100, **{"max_model_len": 8192, **kwargs})
    assert [p.field for p in err.value.items] == [field]


def test_bad_gpu_memory(llama):
    with pytest.raises(Problems):
        serving_estimate(llama, 0, max_model_len=8192)
    with pytest.raises(Problems):
        serving_estimate(llama, 80.5 * GIB, max_model_len=8192)


def test_kv_heads_that_do_not_split_are_refused():
    qwen = resolve("Qwen/Qwen2.5-7B-Instruct")  # 28 heads, 4 KV heads: tp 7 divides the heads, not the KV heads
    with pytest.raises(Problems) as err:
        serving_estimate(qwen, H100, max_model_len=8192, tensor_parallel=7)
    assert "KV heads" in err.value.items[0].what


# --- which GPUs for a serving question --------------------------------------------------------------------

def test_ranking_returns_the_cheapest_setups_that_hold_the_concurrency(llama):
    opts = rank_serving_setups(llama, max_model_len=8192, concurrency=32, limit=4)
    assert opts, "an 8B model at 8k context for 32 requests fits some rented card"
    prices = [o.usd_per_hour for o in opts]
    assert prices == sorted(prices)
    for o in opts:
        assert o.estimate.fits and o.estimate.max_concurrency >= 32
        assert o.estimate.tensor_parallel == o.count
        assert o.estimate.gpu_memory_bytes == cuda_total_bytes(o.gpu)
        assert o.as_json()["estimate"]["max_concurrency"] >= 32
    assert rank_serving_setups(llama, max_model_len=8192, concurrency=10**7) == []


def test_ranking_rejects_bad_questions(llama):
    with pytest.raises(Problems):
        rank_serving_setups(llama, max_model_len=8192, concurrency=0)


def test_measured_cuda_totals_are_used_for_the_cards_logs_printed():
    from advisor.gpus import find_gpu

    assert cuda_total_bytes(find_gpu("h100-sxm")) == int(79.19 * GIB)
    l4 = find_gpu("l4")
    assert cuda_total_bytes(l4) < l4.memory_bytes


# --- the published logs: what the docs report -----------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    from benchmarks import vllm_startup
    return vllm_startup


def test_the_constants_are_the_calibration_rows_fit(bench):
    c = bench.fit()
    assert c["SAMPLER_FP32_COPIES"] == SAMPLER_FP32_COPIES
    assert round(c["NON_TORCH_GIB_ONE_GPU"] * GIB) == NON_TORCH_BYTES_ONE_GPU
    assert round(c["NON_TORCH_GIB_TP"] * GIB) == NON_TORCH_BYTES_TP
    assert round(c["CONTEXT_GIB_ONE_GPU"] * GIB) == CONTEXT_BYTES_ONE_GPU
    roles = {r["role"] for r in bench.load_rows()}
    assert roles == {"calibration", "validation", "other_version"}


def test_validation_rows_are_within_five_percent_and_the_docs_say_so(bench):
    results = [bench.compare(r) for r in bench.load_rows()]
    val = [r for r in results if r["role"] == "validation"]
    assert len(val) >= 15
    assert all(abs(r["kv_error"]) <= bench.TARGET for r in val), [(r["id"], r["kv_error"]) for r in val]
    doc = (ROOT / "docs" / "accuracy.md").read_text()
    block = doc.split("<!-- vllm_startup:begin -->\n", 1)[1].split("\n<!-- vllm_startup:end -->", 1)[0]
    assert block == bench.markdown(results)
