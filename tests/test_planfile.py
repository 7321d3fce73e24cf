import dataclasses

import pytest

from advisor.model import resolve
from advisor.planfile import apply_overrides, load_plan, parse_plan, save_plan
from advisor.spec import Plan, SpecError, build_plan, check_against_shape


def test_round_trip_with_comments(tmp_path):
    plan = build_plan({"model": {"ref": "Qwen/Qwen2.5-0.5B"}, "training": {"method": "lora", "micro_batch": 4,
                                                                          "lora": {"targets": "q_proj,v_proj"}}})
    path = save_plan(plan, tmp_path / "plan.yaml")
    text = path.read_text()
    assert "# Sequences per forward/backward pass" in text  # every field explains itself
    assert load_plan(path) == plan


def test_unknown_keys_and_bad_values_reported_together():
    with pytest.raises(SpecError) as e:
        parse_plan("training:\n  micro_batch: 0\n  colour: blue\nhardware:\n  gpus: -1\n")
    text = "\n".join(e.value.problems)
    assert "training.micro_batch" in text and "training.colour: unknown key" in text and "hardware.gpus" in text


def test_yaml_error_names_the_line():
    with pytest.raises(SpecError, match="line 3"):
        parse_plan("model:\n  ref: x\n training: [\n")


def test_secrets_are_refused():
    with pytest.raises(SpecError, match="never hold secrets"):
        parse_plan("model:\n  ref: x\n  hf_token: hf_abc\n")
    def keys(d):
        for k, v in d.items():
            yield k
            if isinstance(v, dict):
                yield from keys(v)

    from advisor.planfile import _SECRET_KEY

    assert not [k for k in keys(Plan().model_dump()) if _SECRET_KEY.search(k)]  # no plan field names a secret
    assert parse_plan("job:\n  avg_tokens: 300\n").job.avg_tokens == 300  # a count of tokens is no secret
    for key in ("token", "access_token", "HF-Token", "password", "api_key", "apikey", "secret"):
        with pytest.raises(SpecError, match="never hold secrets"):
            parse_plan(f"model:\n  {key}: x\n")


def test_overrides():
    plan = apply_overrides(Plan(), ["training.micro_batch=8", "training.grad_checkpointing=false"])
    assert plan.training.micro_batch == 8 and plan.training.grad_checkpointing is False
    with pytest.raises(SpecError, match="unknown key 'training.nope'"):
        apply_overrides(Plan(), ["training.nope=1"])


def test_qlora_on_a_model_without_linear_layers_is_refused():
    shape = dataclasses.replace(resolve("openai-community/gpt2"), linears=())
    problems = check_against_shape(build_plan({"training": {"method": "qlora", "seq_len": 512}}), shape)
    from advisor.cli.common import render
    from advisor.forms import place
    from advisor.problems import Change

    (p,) = [p for p in problems if "no linear layers" in p.what]
    assert p.field == "training.method" and p.change == Change("training.method", ("full",))
    # the core names no flag: each front end words the fix in its own terms
    assert "use --method full" in render(p) and "--" not in place([p])[0]["method"]
    assert place([p])[0]["method"].endswith("use full")


def test_estimate_reads_a_plan_file(tmp_path, capsys):
    import json

    from advisor.cli.main import main

    save_plan(build_plan({"model": {"ref": "Qwen/Qwen2.5-0.5B"}, "training": {"method": "full"}}), tmp_path / "p.yaml")
    assert main(["estimate", "--plan", str(tmp_path / "p.yaml"), "--batch", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["plan"]["training"]["method"] == "full" and res["plan"]["training"]["micro_batch"] == 2


def test_plan_files_that_cannot_be_plans(tmp_path):
    """Not UTF-8, empty, a device: one message each; a failed save leaves no temporary file."""
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  ref: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        load_plan(bad)
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(SpecError, match="is empty"):
        load_plan(tmp_path / "empty.yaml")
    with pytest.raises(SpecError, match="not a regular file"):
        load_plan("/dev/zero")
    plan = build_plan({})
    with pytest.raises(SpecError, match="is a directory"):
        save_plan(plan, tmp_path)
    with pytest.raises(SpecError, match="not a regular file"):
        save_plan(plan, "/dev/null")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SpecError, match="cannot save"):
        save_plan(plan, tmp_path / "afile" / "p.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty.yaml", "latin1.yaml"]
