import json

import pytest

from advisor.cli.main import main


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_contract(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "meta-llama/Llama-3.1-8B", "--method", "lora",
                       "--batch", "2", "--seq", "1024", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["model"]["params_total"] == 8_030_261_248
    assert res["model"]["params_trainable"] == 41_943_040  # r=16 on all-linear, as peft counts it
    assert sum(res["breakdown"].values()) == res["peak_allocated_bytes"]
    assert res["peak_reserved_bytes"] == res["peak_allocated_bytes"] + sum(res["overhead"].values())
    assert res["peak_reserved_bytes"] > res["peak_allocated_bytes"]


def test_cpu_has_no_gpu_overhead(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "Qwen/Qwen2.5-0.5B", "--device", "cpu", "--json")
    res = json.loads(out)
    assert code == 0 and res["peak_reserved_bytes"] == res["peak_allocated_bytes"] and not res["overhead"]


def test_inference_kv_cache(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "meta-llama/Llama-3.1-8B", "--task", "inference",
                       "--batch", "1", "--seq", "8192", "--json")
    res = json.loads(out)
    # 2 x 32 layers x 8 kv heads x 128 dims x 8192 tokens x 2 bytes = 1 GiB exactly
    assert res["breakdown"]["kv_cache"] == 2 * 32 * 8 * 128 * 8192 * 2
    assert res["breakdown"]["weights"] == 8_030_261_248 * 2


def test_table_output(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "llama-3.1-8b", "--gpu", "rtx-4090")
    import re

    # sizes are GiB, never "GB" (the card's own name, "RTX 4090 24GB", is not a size we print)
    assert code == 0 and "GiB" in out and "GeForce RTX 4090" in out and not re.search(r"\d GB\b", out)


def test_unknown_model_lists_closest(capsys):
    code, _, err = run(capsys, "estimate", "--model", "mistral-7b-v0.2")
    assert code == 2 and "Mistral-7B-v0.1" in err and "Traceback" not in err


def test_impossible_settings_reported_together(capsys):
    code, _, err = run(capsys, "estimate", "--model", "meta-llama/Llama-3.2-1B", "--batch", "0",
                       "--lora-r", "9000", "--method", "lora", "--gpu", "rtx 9999")
    assert code == 2
    assert "micro_batch" in err and "must be at least 1" in err
    assert "unknown GPU" in err


def test_shape_rules_reported_together(capsys):
    code, _, err = run(capsys, "estimate", "--model", "openai-community/gpt2", "--method", "lora",
                       "--lora-r", "1000", "--seq", "4096", "--lora-targets", "q_proj,v_proj")
    assert code == 2 and "3 problems" in err
    assert "longer than" in err and "above the hidden size 768" in err and "c_attn" in err


def test_malformed_config_names_the_field(capsys, tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    code, _, err = run(capsys, "estimate", "--model", str(p))
    assert code == 2 and "num_hidden_layers" in err and "Traceback" not in err


def test_bf16_on_a_t4_is_refused(capsys):
    code, _, err = run(capsys, "estimate", "--model", "mistralai/Mistral-7B-v0.1", "--gpu", "t4")
    assert code == 2 and "no bf16" in err and "fp16" in err


@pytest.mark.parametrize("args", [["profiles"], ["profiles", "--gpus"]])
def test_profiles_listing(capsys, args):
    code, out, _ = run(capsys, *args)
    assert code == 0 and len(out.splitlines()) > 30


def test_recommend_save_to_a_directory_or_a_missing_folder_is_refused_before_searching(tmp_path, capsys):
    assert main(["recommend", "--model", "openai-community/gpt2", "--gpu", "t4", "--save", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["recommend", "--model", "openai-community/gpt2", "--gpu", "t4", "--save",
                 str(tmp_path / "no" / "plan.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_recommend_epochs_inf_is_a_clear_error(capsys):
    assert main(["recommend", "--model", "openai-community/gpt2", "--epochs", "inf"]) == 2
    assert "--epochs must be a finite number (got inf)" in capsys.readouterr().err


def test_json_errors_are_a_list_of_typed_problems(capsys):
    import json

    assert main(["estimate", "--model", "nope-model", "--batch", "0", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    fields = {p["field"] for p in out["problems"]}
    assert fields == {"training.micro_batch", "model.ref"}
    assert all(p["message"] for p in out["problems"])


@pytest.mark.slow
def test_the_model_as_the_first_word(capsys):
    """`tuneplan estimate MODEL` and `recommend MODEL` as a new user types them; --model is the same."""
    code, out, _ = run(capsys, "estimate", "meta-llama/Llama-3.2-1B", "--json")
    code2, out2, _ = run(capsys, "estimate", "--model", "meta-llama/Llama-3.2-1B", "--json")
    assert code == code2 == 0 and json.loads(out) == json.loads(out2)
    code, _, err = run(capsys, "estimate", "meta-llama/Llama-3.2-1B", "--model", "Qwen/Qwen2.5-0.5B")
    assert code == 2 and "two models given" in err and "Traceback" not in err
    code, _, err = run(capsys, "estimate")
    assert code == 2 and "tuneplan estimate MODEL" in err
    code, _, err = run(capsys, "recommend")
    assert code == 2 and "tuneplan recommend MODEL" in err and "Traceback" not in err
    code, out, _ = run(capsys, "recommend", "meta-llama/Llama-3.2-1B", "--gpu", "a100-80gb", "--json")
    assert code == 0 and json.loads(out)
