"""`tuneplan run / data check / demo` as a user meets them: dry-run, overrides, clear errors
(exit code 2, no traceback), the fit check, launch commands and configs, the generated docs."""

import json
import sys

import pytest

from advisor.cli.main import main
from runner.demo import DEMO_DATA


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from runner.demo import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model"), DEMO_DATA)


def plan_file(tmp_path, model_ref, data=DEMO_DATA, **hw):
    from advisor.planfile import save_plan
    from advisor.spec import build_plan

    plan = build_plan({"model": {"ref": str(model_ref)},
                       "training": {"method": "lora", "precision": "fp32", "seq_len": 128},
                       "hardware": {"gpu": None, "device": "cpu", **hw},
                       "data": {"path": str(data)},
                       "run": {"output_dir": str(tmp_path / "runs"), "name": "r", "max_steps": 2}})
    return str(save_plan(plan, tmp_path / "plan.yaml"))


def test_dry_run_prints_the_command(tmp_path, model_dir, capsys):
    p = plan_file(tmp_path, model_dir)
    assert main(["run", p, "training.micro_batch=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{sys.executable} -m runner {p} --run-dir {tmp_path / 'runs' / 'r'} training.micro_batch=2" in out
    assert not (tmp_path / "runs").exists()


def test_overrides_after_an_option_are_overrides_too(tmp_path, model_dir, capsys):
    """The order build_command writes: PLAN --run-dir D key=value (python -m runner, as launched)."""
    from runner.__main__ import main as runner_main

    p = plan_file(tmp_path, model_dir)
    run_dir = tmp_path / "elsewhere"
    assert runner_main([p, "--run-dir", str(run_dir), "training.micro_batch=2", "--dry-run"]) == 0
    assert main(["run", p, "--run-dir", str(run_dir), "training.micro_batch=2", "--dry-run"]) == 0
    assert "training.micro_batch=2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", p, "--run-dir", str(run_dir), "--bogus"])


def test_unknown_override_key_is_an_error(tmp_path, model_dir, capsys):
    p = plan_file(tmp_path, model_dir)
    assert main(["run", p, "training.micro_bach=2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'training.micro_bach'" in err and "Traceback" not in err


@pytest.mark.parametrize("case,needle", [
    ("no_data", "does not exist"),
    ("bad_line", "line 2: not valid JSON"),
    ("missing_field", "line 1: missing 'output' (alpaca records need instruction and output)"),
    ("no_weights", "no weights"),
    ("no_model_dir", "does not exist"),
    ("no_plan", "give a plan file"),
    ("plan_missing", "cannot read plan"),
])
def test_bad_input_is_a_clear_message(case, needle, tmp_path, model_dir, capsys):
    data = DEMO_DATA
    model = model_dir
    if case == "no_data":
        data = tmp_path / "nope.jsonl"
    elif case == "bad_line":
        data = tmp_path / "d.jsonl"
        data.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    elif case == "missing_field":
        data = tmp_path / "d.jsonl"
        data.write_text('{"instruction": "a"}\n')
    elif case == "no_weights":
        model = tmp_path / "m"
        model.mkdir()
        (model / "config.json").write_text("{}")
    elif case == "no_model_dir":
        model = tmp_path / "absent"
    args = {"no_plan": ["run"], "plan_missing": ["run", str(tmp_path / "x.yaml")]}.get(
        case, ["run", plan_file(tmp_path, model, data)])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_plan_without_a_gpu(tmp_path, model_dir, capsys):
    p = plan_file(tmp_path, model_dir)
    assert main(["run", p, "hardware.device=cuda"]) == 2
    assert "hardware.device=cpu" in capsys.readouterr().err


def test_a_plan_that_does_not_fit_needs_force():
    from advisor.problems import UserError
    from advisor.spec import build_plan
    from runner.preflight import fit_check as _fit_check

    plan = build_plan({"model": {"ref": "meta-llama/Llama-3.1-8B"}, "training": {"method": "full"},
                       "hardware": {"gpu": "RTX 4090"}})
    with pytest.raises(UserError) as e:
        _fit_check(plan, force=False, log=print)
    assert "will not fit" in e.value.problems[0] and "--force" in e.value.problems[1]
    said = []
    _fit_check(plan, force=True, log=said.append)
    assert said and "--force" in said[0]


def test_launch_commands_and_accelerate_configs(tmp_path, model_dir):
    from advisor.planfile import load_plan
    from runner.launch import accelerate_config, build_command

    p = plan_file(tmp_path, model_dir, gpus=4, device="cuda")
    cmd = build_command(p, tmp_path / "rd")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(tmp_path / "rd" / "accelerate_config.yaml")
    assert cmd[-1] == "--worker" and "-m" in cmd[3:] and "runner" in cmd
    plan = load_plan(p)
    kinds = {}
    for z in (0, 1, 2, 3):
        cfg = accelerate_config(plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"zero": z})}))
        assert cfg["num_processes"] == 4
        kinds[z] = cfg["distributed_type"]
        if z in (1, 2):
            assert cfg["deepspeed_config"]["zero_stage"] == z
    assert kinds == {0: "MULTI_GPU", 1: "DEEPSPEED", 2: "DEEPSPEED", 3: "FSDP"}
    cpu = build_command(plan_file(tmp_path, model_dir, gpus=2), tmp_path / "rd2")
    assert cpu[2:6] == ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    resume = build_command(None, resume=tmp_path / "rd2") if (tmp_path / "rd2" / "plan.yaml").exists() else None
    assert resume is None


def test_next_plan_after_oom_fits():
    from advisor.memory import estimate
    from advisor.model import resolve
    from advisor.spec import build_plan
    from runner.launch import next_plan

    plan = build_plan({"model": {"ref": "meta-llama/Llama-3.1-8B"},
                       "training": {"method": "lora", "micro_batch": 8, "seq_len": 4096, "grad_checkpointing": False},
                       "hardware": {"gpu": "A100 80GB"}})
    s = next_plan(plan, "runs/x")
    assert s["command"].startswith("tuneplan run runs/x/plan.yaml ")
    assert s["changes"]["training.grad_checkpointing"] is True
    from advisor.service import _with_fields as _apply

    fixed = build_plan(_apply(plan.model_dump(mode="json"), s["changes"]))
    from advisor import service

    bd = estimate(fixed, resolve(plan.model.ref))
    assert service.verdict_for(bd, service.find_gpu("A100 80GB")).status == "fits"  # the one verdict, not "tight"


def test_data_check_reports_line_numbers(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{bad\n{"instruction": "c"}\n')
    assert main(["data", "check", str(f)]) == 2
    cap = capsys.readouterr()
    assert "line 2: not valid JSON" in cap.err and "line 3: missing 'output'" in cap.err
    assert "1 valid records" in " ".join(cap.out.split())


def test_data_check_with_a_tokenizer_shows_the_mask(model_dir, capsys):
    assert main(["data", "check", str(DEMO_DATA), "--model", str(model_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "alpaca" and out["valid_records"] > 60 and out["problems"] == []
    toks = out["example"]["tokens"]
    assert not toks[0]["trained"] and toks[-1]["trained"] and toks[-1]["text"] == "</s>"
    assert out["tokens"]["max"] < 200
    assert main(["data", "check", str(DEMO_DATA), "--model", str(model_dir)]) == 0
    assert "trained on" in capsys.readouterr().out


def test_docs_plan_reference_is_up_to_date():
    from pathlib import Path

    from runner.reference import DOC_BEGIN, DOC_END, render_plan_reference

    text = (Path(__file__).resolve().parent.parent / "docs" / "runner.md").read_text()
    block = text.split(DOC_BEGIN)[1].split(DOC_END)[0]
    assert block == "\n" + render_plan_reference(), "run `python -m runner.reference`"
    for name in ("training.micro_batch", "data.prompt_loss_weight", "run.keep_checkpoints", "hardware.zero"):
        assert f"`{name}`" in block


def test_start_run_refuses_bad_input_before_starting(tmp_path, model_dir):
    from advisor.problems import UserError
    from runner.launch import start_run

    bad = tmp_path / "d.jsonl"
    bad.write_text('{"instruction": "a"}\n')
    with pytest.raises(UserError, match="line 1: missing 'output'"):
        start_run(plan_file(tmp_path, model_dir, bad))
    assert not (tmp_path / "runs").exists()


def test_run_checks_the_plan_against_the_model_before_loading(tmp_path, model_dir, capsys):
    """The same checks as `tuneplan estimate` (advisor.service), before anything is loaded."""
    p = plan_file(tmp_path, model_dir)
    assert main(["run", p, "training.seq_len=4096", "training.lora.targets=[q_proj,nonsense]"]) == 2
    err = capsys.readouterr().err
    assert "longer than" in err and "maximum of 512 positions" in err
    assert "nonsense match no linear layer" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_run_says_when_remote_code_is_trusted(tmp_path, model_dir, capsys):
    """Only the command's --trust-remote-code consents (a plan's flag or an override alone is refused:
    tests/test_hardening.py), and the run says so."""
    p = plan_file(tmp_path, model_dir)
    assert main(["run", p, "--trust-remote-code", "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "notice: --trust-remote-code" in cap.err and "--trust-remote-code" in cap.out


@pytest.mark.parametrize("args,needle", [
    (["--seq", "-1"], "--seq (training.seq_len)"),
    (["--seq", "0"], "--seq (training.seq_len)"),
    (["--prompt-loss-weight", "5"], "--prompt-loss-weight (data.prompt_loss_weight)"),
    (["--prompt-loss-weight", "-1"], "--prompt-loss-weight (data.prompt_loss_weight)"),
])
def test_data_check_refuses_impossible_options(args, needle, capsys):
    assert main(["data", "check", str(DEMO_DATA), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_data_check_reads_a_byte_order_mark(tmp_path, capsys):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + DEMO_DATA.read_bytes())
    assert main(["data", "check", str(f), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []


def test_demo_refuses_a_bad_out_before_building(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "plan.yaml").write_text("model:\n  ref: mine\n")
    for args, needle in ((["--out", str(tmp_path / "afile")], "is a file"),
                         (["--out", str(tmp_path / "d"), "--steps", "0"], "--steps must be at least 1"),
                         (["--out", str(tmp_path / "project")], "not a demo's")):
        assert main(["demo", *args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert (tmp_path / "project" / "plan.yaml").read_text() == "model:\n  ref: mine\n"
    assert not (tmp_path / "d").exists()


def test_a_plan_for_another_transformers_release_is_refused(tmp_path, model_dir, capsys):
    # the live memory follows the installed release, not the plan's training.transformers
    p = plan_file(tmp_path, model_dir)
    assert main(["run", p, "training.transformers=4.48"]) == 2
    err = capsys.readouterr().err
    assert "training.transformers" in err and "installed" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was created
