"""A table of bad inputs as users type them: each ends in exit code 2 with one message that says
what is wrong (the needle), never a traceback, and nothing is left half-written. In-process
(``advisor.cli.main.main``); the fuzz tests (test_fuzz.py) cover the space between these."""

import contextlib
import io
import json
import shutil

import pytest

from advisor.cli.main import main
from runner.demo import DEMO_DATA

LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A folder of broken things: configs, data files, plans, GPU files, model directories."""
    from advisor.planfile import save_plan
    from advisor.spec import build_plan
    from runner.demo import build_model_dir

    d = tmp_path_factory.mktemp("bad")
    model = build_model_dir(d / "model", DEMO_DATA)
    configs = {"big": {"intermediate_size": "big"}, "kv3": {"num_key_value_heads": 3}, "mt": {"model_type": "lamma"},
               "nomt": {"model_type": None}, "neg": {"num_hidden_layers": -2}, "huge": {"num_hidden_layers": 10**9},
               "float": {"hidden_size": 128.5}, "bool": {"num_attention_heads": True}, "hd": {"hidden_size": 130},
               "act": {"hidden_act": "nope"}, "tie": {"tie_word_embeddings": "yes"}, "rope": {"rope_scaling": "x"}}
    for name, change in configs.items():
        (d / f"{name}.json").write_text(json.dumps({**LLAMA, **change}))
    (d / "list.json").write_text("[1, 2]")
    (d / "broken.json").write_text('{"model_type": "llama",')
    (d / "latin1.json").write_bytes(b'{"model_type": "caf\xe9"}')
    (d / "nocfg").mkdir()
    (d / "noweights").mkdir()
    (d / "noweights" / "config.json").write_text(json.dumps(LLAMA))
    shutil.copytree(model, d / "badweights")
    (d / "badweights" / "model.safetensors").write_bytes(b"\x00" * 64)
    data = {"bad_line.jsonl": '{"instruction": "a", "output": "b"}\n{oops\n',
            "missing.jsonl": '{"instruction": "a"}\n', "array.jsonl": "[1, 2]\n", "empty.jsonl": "",
            "blank.jsonl": "\n\n", "unknown.jsonl": '{"colour": "blue"}\n', "obj.json": '{"a": [], "b": []}',
            "scalar.json": "5", "bad.json": "[{", "mixed.jsonl": '{"text": "a"}\n{"instruction": "b", "output": "c"}\n',
            "roles.jsonl": '{"messages": [{"role": "robot", "content": "hi"}]}\n',
            "msgtype.jsonl": '{"messages": "hello"}\n', "nums.jsonl": '{"instruction": 5, "output": [1]}\n',
            "ragged.csv": "instruction,output\na,b,c\n", "nohead.csv": "", "data.txt": "hello\n"}
    for name, text in data.items():
        (d / name).write_text(text)
    (d / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    plans = {"empty.yaml": "", "comments.yaml": "# only a comment\n", "list.yaml": "- a\n- b\n",
             "badyaml.yaml": "model:\n  ref: x\n training: [\n", "unknown.yaml": "training:\n  colour: blue\n",
             "secret.yaml": "model:\n  hf_token: hf_x\n", "types.yaml": "training:\n  micro_batch: lots\n",
             "section.yaml": "model: 5\n", "neg.yaml": "training:\n  seq_len: -1\n"}
    for name, text in plans.items():
        (d / name).write_text(text)
    (d / "latin1.yaml").write_bytes(b"model:\n  ref: caf\xe9\n")
    base = {"model": {"ref": str(model)}, "training": {"method": "lora", "precision": "fp32", "seq_len": 64},
            "hardware": {"gpu": None, "device": "cpu"}, "data": {"path": str(DEMO_DATA)},
            "run": {"output_dir": str(d / "runs"), "name": "r", "max_steps": 2}}
    save_plan(build_plan(base), d / "plan.yaml")
    (d / "afile").write_text("x")
    (d / "proj").mkdir()
    (d / "proj" / "plan.yaml").write_text("model:\n  ref: mine\n")
    gpus = {"gempty.yaml": "", "gscalar.yaml": "5\n", "gnolist.yaml": "gpus: 5\n", "gentry.yaml": "gpus: [5]\n",
            "gmissing.yaml": "gpus: [{id: x}]\n", "gmem.yaml": "gpus: [{id: x, name: X, memory_gib: lots}]\n",
            "ginf.yaml": "gpus: [{id: x, name: X, memory_gib: .inf}]\n",
            "gneg.yaml": "gpus: [{id: x, name: X, memory_gib: -4}]\n",
            "galias.yaml": "gpus: [{id: x, name: X, memory_gib: 8, aliases: 3}]\n", "gyaml.yaml": "gpus: [\n"}
    for name, text in gpus.items():
        (d / name).write_text(text)
    (d / "glatin1.yaml").write_bytes(b"gpus: [{id: caf\xe9}]\n")
    return d


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue() + err.getvalue()


CASES = [
    # config.json (advisor/model.py)
    ("estimate --model {w}/big.json", "'intermediate_size' must be an integer"),
    ("estimate --model {w}/kv3.json", "must divide the number of attention heads"),
    ("estimate --model {w}/mt.json", "does not know model_type 'lamma'. Close names: llama"),
    ("estimate --model {w}/nomt.json", "'model_type' is missing"),
    ("estimate --model {w}/neg.json", "must be positive"),
    ("estimate --model {w}/huge.json", "beyond any real model"),
    ("estimate --model {w}/float.json", "'hidden_size' is missing or not an integer"),
    ("estimate --model {w}/bool.json", "'num_attention_heads' is missing or not an integer"),
    ("estimate --model {w}/hd.json", "not a multiple of the number of attention heads"),
    ("estimate --model {w}/act.json", "cannot build 'llama'"),
    ("estimate --model {w}/tie.json", "tie_word_embeddings"),
    ("estimate --model {w}/rope.json", "rope"),
    ("estimate --model {w}/list.json", "must hold a JSON object"),
    ("estimate --model {w}/broken.json", "is not valid JSON"),
    ("estimate --model {w}/latin1.json", "is not UTF-8 text"),
    ("estimate --model {w}/nocfg", "without a config.json"),
    ("estimate --model {w}/absent.json", "no such file"),
    ("estimate --model ./missing-dir", "no such file or directory: ./missing-dir"),
    ("estimate --model ~/no/such/model", "no such file or directory"),
    ("estimate --model lamma-8b", "unknown model 'lamma-8b'"),
    # the transformers release (advisor/software.py)
    ("estimate --model gpt2 --seq 128 --transformers 4.30", "transformers 4.30 is not modelled"),
    ("estimate --model gpt2 --seq 128 --transformers latest", "'latest' is not a transformers version"),
    ("estimate --model gpt2 --seq 128 --transformers 4.48 --mode simulate --device cpu",
     "simulate runs the installed transformers"),
    ("run {w}/plan.yaml training.transformers=4.5", "write the version in quotes"),
    # plan files (advisor/planfile.py)
    ("estimate --plan {w}/empty.yaml", "is empty"),
    ("estimate --plan {w}/comments.yaml", "is empty"),
    ("estimate --plan {w}/list.yaml", "must be a mapping of sections"),
    ("estimate --plan {w}/badyaml.yaml", "not valid YAML at line 3"),
    ("estimate --plan {w}/unknown.yaml", "training.colour: unknown key"),
    ("estimate --plan {w}/secret.yaml", "never hold secrets"),
    ("estimate --plan {w}/types.yaml", "training.micro_batch"),
    ("estimate --plan {w}/section.yaml", "model"),
    ("estimate --plan {w}/neg.yaml", "must be at least 1"),
    ("estimate --plan {w}/latin1.yaml", "is not UTF-8 text"),
    ("estimate --plan {w}/absent.yaml", "cannot read plan"),
    ("estimate --plan {w}", "Is a directory"),
    ("estimate --plan /dev/zero", "not a regular file"),
    ("run {w}/empty.yaml", "is empty"),
    ("run {w}/latin1.yaml", "is not UTF-8 text"),
    # run: the plan, the data, the model (runner/preflight.py)
    ("run", "give a plan file"),
    ("run {w}/plan.yaml training.micro_bach=2", "unknown key 'training.micro_bach'"),
    ("run {w}/plan.yaml training.micro_batch=0", "must be at least 1"),
    ("run {w}/plan.yaml bogus", "is not key=value"),
    ("run {w}/plan.yaml task=inference", "`tuneplan run` fine-tunes"),
    ("run {w}/plan.yaml data.path=null", "data.path is not set"),
    ("run {w}/plan.yaml data.path={w}/absent.jsonl", "does not exist"),
    ("run {w}/plan.yaml data.path={w}", "is a directory"),
    ("run {w}/plan.yaml data.path=/dev/zero", "not a regular file"),
    ("run {w}/plan.yaml data.path={w}/bad_line.jsonl", "line 2: not valid JSON"),
    ("run {w}/plan.yaml data.path={w}/missing.jsonl", "line 1: missing 'output'"),
    ("run {w}/plan.yaml data.path={w}/latin1.jsonl", "is not UTF-8 text"),
    ("run {w}/plan.yaml data.path={w}/empty.jsonl", "holds no records"),
    ("run {w}/plan.yaml model.ref={w}/noweights", "no weights"),
    ("run {w}/plan.yaml model.ref={w}/nocfg", "has no config.json"),
    ("run {w}/plan.yaml model.ref={w}/absent", "does not exist"),
    ("run {w}/plan.yaml model.ref={w}/afile", "is a file"),
    ("run {w}/plan.yaml model.ref=lamma", "neither a local model directory nor a hub id"),
    ("run {w}/plan.yaml training.seq_len=4096", "maximum of 512 positions"),
    ("run {w}/plan.yaml training.lora.targets=[nonsense]", "nonsense match no linear layer"),
    ("run {w}/plan.yaml training.lora.r=4096", "above the hidden size"),
    ("run {w}/plan.yaml hardware.device=cuda", "no CUDA GPU is visible"),
    ("run {w}/plan.yaml model.trust_remote_code=maybe", "must be true or false"),
    # run: the run directory (runner/rundir.py)
    ("run {w}/plan.yaml --run-dir {w}/afile", "is a file"),
    ("run {w}/plan.yaml --run-dir {w}/afile/sub", "cannot write the run directory"),
    ("run {w}/plan.yaml --run-dir {w}", "contains the model directory"),
    ("run {w}/plan.yaml --run-dir {w}/model/runs", "is inside the model directory"),
    ("run {w}/plan.yaml --run-dir {w}/nocfg/..", "contains the model directory"),
    ("run --resume {w}/absent", "it does not exist"),
    ("run --resume {w}/afile", "it is a file"),
    ("run --resume {w}/nocfg", "not a run directory (no plan.yaml)"),
    ("run {w}/plan.yaml --resume {w}", "give either PLAN or --resume"),
    # data check (runner/commands.py, runner/data.py)
    ("data check {w}/absent.jsonl", "does not exist"),
    ("data check {w}", "is a directory"),
    ("data check /dev/zero", "not a regular file"),
    ("data check {w}/data.txt", "unknown data file type"),
    ("data check {w}/bad_line.jsonl", "line 2: not valid JSON"),
    ("data check {w}/array.jsonl", "expected a JSON object"),
    ("data check {w}/empty.jsonl", "holds no records"),
    ("data check {w}/blank.jsonl", "holds no records"),
    ("data check {w}/unknown.jsonl", "cannot tell the record shape"),
    ("data check {w}/obj.json", "expected a list of records"),
    ("data check {w}/scalar.json", "expected a list of records"),
    ("data check {w}/bad.json", "not valid JSON"),
    ("data check {w}/mixed.jsonl", "line 2"),
    ("data check {w}/roles.jsonl", "robot"),
    ("data check {w}/msgtype.jsonl", "messages"),
    ("data check {w}/nums.jsonl", "line 1"),
    ("data check {w}/ragged.csv", "more values than the header"),
    ("data check {w}/latin1.jsonl", "is not UTF-8 text"),
    ("data check " + str(DEMO_DATA) + " --seq -1", "--seq (training.seq_len)"),
    ("data check " + str(DEMO_DATA) + " --seq 0", "--seq (training.seq_len)"),
    ("data check " + str(DEMO_DATA) + " --prompt-loss-weight 5", "--prompt-loss-weight"),
    ("data check " + str(DEMO_DATA) + " --prompt-loss-weight -1", "--prompt-loss-weight"),
    ("data check " + str(DEMO_DATA) + " --prompt-loss-weight nan", "--prompt-loss-weight"),
    ("data check " + str(DEMO_DATA) + " --model {w}/nocfg", "cannot load a tokenizer"),
    # demo
    ("demo --out {w}/afile", "is a file"),
    ("demo --out {w} --steps 0", "--steps must be at least 1"),
    ("demo --out {w}/proj", "not a demo's"),
]
GPU_CASES = [
    ("gempty.yaml", "is empty"), ("gscalar.yaml", "expected a mapping with a 'gpus' list"),
    ("gnolist.yaml", "expected a mapping with a 'gpus' list"), ("gentry.yaml", "gpus entry 1 is not a mapping"),
    ("gmissing.yaml", "lacks name, memory_gib"), ("gmem.yaml", "memory_gib must be a number"),
    ("ginf.yaml", "positive finite number"), ("gneg.yaml", "positive finite number"),
    ("galias.yaml", "aliases must be a list"), ("gyaml.yaml", "not valid YAML"), ("glatin1.yaml", "not UTF-8"),
    ("absent.yaml", "cannot read the GPU file"),
]


@pytest.mark.parametrize("command,needle", CASES, ids=[c for c, _ in CASES])
@pytest.mark.slow
def test_bad_input_is_one_clear_message(w, command, needle):
    import shlex

    code, text = run_cli([x.replace("{w}", str(w)) for x in shlex.split(command)])
    assert code == 2, text[-1500:]
    assert needle in " ".join(text.split()), text[-1500:]
    assert "Traceback" not in text
    assert not (w / "runs").exists() and not (w / "model" / "runs").exists()  # nothing started


@pytest.mark.parametrize("name,needle", GPU_CASES)
@pytest.mark.slow
def test_bad_gpu_file_is_one_clear_message(w, name, needle, monkeypatch):
    monkeypatch.setenv("TUNEPLAN_GPUS", str(w / name))
    for argv in (["profiles", "--gpus"], ["estimate", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090"]):
        code, text = run_cli(argv)
        assert code == 2 and needle in text and "Traceback" not in text, text[-1500:]


def test_damaged_weights_are_refused_with_the_file(w):
    code, text = run_cli(["run", str(w / "plan.yaml"), f"model.ref={w / 'badweights'}", "--run-dir",
                          str(w / "dmg"), "--no-progress"])
    assert code == 2 and "cannot load" in text and "badweights" in text and "Traceback" not in text
    assert not (w / "dmg" / "traceback.txt").exists()
