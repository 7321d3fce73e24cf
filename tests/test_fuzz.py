"""Property-based tests (hypothesis): whatever a user feeds tuneplan -- a mutated plan file, a
config.json, a GPU file, a dataset, a command line -- it ends in an exit code (0, 1 or 2) with its
messages, never a traceback, never a crash by a signal.

Most cases run in-process (``advisor.cli.main.main``, output captured) to stay fast; a few run as
real processes (``python -m advisor.cli.main``) to check the exit status itself. Derandomized, so
CI sees the same cases every time; no example database is written.
"""

import contextlib
import io
import itertools
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from advisor.cli.main import main  # noqa: E402
from runner.demo import DEMO_DATA  # noqa: E402

# TUNEPLAN_FUZZ_SCALE=N runs N times the examples (a deeper run, once in a while; CI runs 1)
SCALE = max(1, int(os.environ.get("TUNEPLAN_FUZZ_SCALE", "1") or 1))
FUZZ = settings(max_examples=25 * SCALE, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_n = itertools.count()

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.sampled_from([0, -1, 1, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(["", "big", "1e999"]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(-2, 2), max_size=2),
)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Shapes of fuzzed configs go to a throw-away cache, not the user's."""
    old = os.environ.get("TUNEPLAN_CACHE")
    os.environ["TUNEPLAN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("TUNEPLAN_CACHE", None)
    else:
        os.environ["TUNEPLAN_CACHE"] = old


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def call(argv: list[str]) -> tuple[int, str]:
    """Run one tuneplan command in-process: (exit code, stdout + stderr). Any exception other than
    argparse's SystemExit escapes and fails the test: that is what a user would see as a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: usage errors (2), --help (0)
            code = e.code if isinstance(e.code, int) else 2
    text = out.getvalue() + err.getvalue()
    assert code in (0, 1, 2), (argv, code, text[-2000:])
    assert "Traceback" not in text, (argv, text[-2000:])
    return code, text


def _fresh(work, name: str):
    """A new path per example: resolved shapes and GPU tables are cached by path."""
    d = work / f"{next(_n)}"
    d.mkdir()
    return d / name


# --- plan files ------------------------------------------------------------------------------------

def _plan_keys():
    from advisor.spec import Plan

    def walk(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}{k}"
            yield key
            if isinstance(v, dict):
                yield from walk(v, key + ".")

    return sorted(walk(Plan().model_dump(mode="json")))


PLAN_KEYS = _plan_keys()


def _set(d: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[leaf] = value


def _delete(d: dict, key: str) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.get(p) if isinstance(d.get(p), dict) else {}
    d.pop(leaf, None)


@st.composite
def plan_texts(draw):
    from advisor.spec import Plan

    if draw(st.integers(0, 9)) == 0:  # raw bytes: not YAML, not UTF-8, empty
        return draw(st.binary(max_size=60))
    data = Plan().model_dump(mode="json")
    data["model"]["ref"] = "meta-llama/Llama-3.1-8B"
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(PLAN_KEYS + ["model.colour", "training.lora.rank", "extra"]))
        if draw(st.booleans()):
            _set(data, key, draw(JUNK))
        else:
            _delete(data, key)
    return yaml.safe_dump(data, allow_unicode=True).encode()


@FUZZ
@given(text=plan_texts(), command=st.sampled_from(["estimate", "run"]))
@pytest.mark.slow
def test_mutated_plan_files(work, text, command):
    path = _fresh(work, "plan.yaml")
    path.write_bytes(text)
    argv = ["estimate", "--plan", str(path), "--json"] if command == "estimate" else \
        ["run", str(path), "--dry-run", "--run-dir", str(path.parent / "run")]
    call(argv)


# --- config.json -----------------------------------------------------------------------------------

CONFIG_KEYS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim", "hidden_act",
               "tie_word_embeddings", "rope_scaling", "rms_norm_eps", "num_local_experts", "text_config"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JUNK, min_size=1, max_size=3),
       drop=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2),
       method=st.sampled_from(["full", "lora", "qlora"]), raw=st.one_of(st.none(), st.none(), st.binary(max_size=40)))
@pytest.mark.slow
def test_mutated_config_json(work, changes, drop, method, raw):
    from tiny import TINY

    config = {**dict(TINY["llama"]), **changes}
    for k in drop:
        config.pop(k, None)
    path = _fresh(work, "config.json")
    path.write_bytes(raw if raw is not None else json.dumps(config, default=str).encode())
    call(["estimate", "--model", str(path), "--method", method, "--device", "cpu", "--json"])


# --- GPU files -------------------------------------------------------------------------------------

GPU_KEYS = ["id", "name", "memory_gib", "bf16", "fp16_tflops", "bf16_tflops", "bandwidth_gbs", "price_usd_hour",
            "aliases", "vendor", "unified_memory"]


@st.composite
def gpu_files(draw):
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return yaml.safe_dump(draw(JUNK)).encode()
    entry = {"id": "my-gpu", "name": "My GPU", "memory_gib": 24, "bf16": True, "fp16_tflops": 100}
    for k, v in draw(st.dictionaries(st.sampled_from(GPU_KEYS), JUNK, max_size=3)).items():
        entry[k] = v
    gpus = draw(st.sampled_from([[entry], [entry, "x"], entry, [None], []]))
    return yaml.safe_dump({"gpus": gpus}).encode()


@FUZZ
@given(content=gpu_files(), command=st.sampled_from(["estimate", "profiles", "recommend"]))
@pytest.mark.slow
def test_mutated_gpu_files(work, content, command):
    path = _fresh(work, "gpus.yaml")
    path.write_bytes(content)
    argv = {"estimate": ["estimate", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "My GPU", "--json"],
            "profiles": ["profiles", "--gpus"],
            "recommend": ["recommend", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "RTX 4090"]}[command]
    old = os.environ.get("TUNEPLAN_GPUS")
    os.environ["TUNEPLAN_GPUS"] = str(path)
    try:
        call(argv)
    finally:
        if old is None:
            os.environ.pop("TUNEPLAN_GPUS", None)
        else:
            os.environ["TUNEPLAN_GPUS"] = old


# --- datasets --------------------------------------------------------------------------------------

RECORD_KEYS = ["instruction", "input", "output", "prompt", "completion", "question", "answer", "text",
               "messages", "role", "content", "x"]
TEXTS = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "\u2028", "\x00", "</s>", "\ufeffhi"]))
MESSAGES = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "robot", ""]),
                           "content": st.one_of(TEXTS, JUNK)}),
    JUNK), max_size=4)


@st.composite
def datasets(draw):
    suffix = draw(st.sampled_from([".jsonl", ".jsonl", ".json", ".csv"]))
    if draw(st.integers(0, 7)) == 0:
        return suffix, draw(st.binary(max_size=80))
    if draw(st.booleans()):  # real records, a few fields changed: gets past the checks more often
        demo = [json.loads(x) for x in DEMO_DATA.read_text().splitlines()[:draw(st.integers(1, 6))]]
        records = [{**r, **draw(st.dictionaries(st.sampled_from(RECORD_KEYS), st.one_of(TEXTS, MESSAGES),
                                                max_size=2))} for r in demo]
    else:
        records = draw(st.lists(st.dictionaries(st.sampled_from(RECORD_KEYS),
                                                st.one_of(TEXTS, JUNK, MESSAGES), max_size=4), max_size=5))
    if suffix == ".json":
        body = json.dumps(draw(st.sampled_from([records, {"data": records}, {"a": records, "b": records}])),
                          default=str)
    elif suffix == ".csv":
        keys = sorted({k for r in records for k in r})
        body = "\n".join([",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in records])
    else:
        lines = [json.dumps(r, default=str) for r in records]
        if lines and draw(st.booleans()):
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]  # a cut line
        body = "\n".join(lines)
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return suffix, bom + body.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from runner.demo import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("m"), DEMO_DATA)


@FUZZ
@given(data=datasets(), fmt=st.sampled_from(["auto", "auto", "alpaca", "messages", "text"]),
       tokenize=st.integers(0, 3), seq=st.sampled_from(["2048", "8", "1"]))
@pytest.mark.slow
def test_mutated_datasets(work, tiny_model, data, fmt, tokenize, seq):
    suffix, content = data
    path = _fresh(work, "data" + suffix)
    path.write_bytes(content)
    argv = ["data", "check", str(path), "--format", fmt, "--seq", seq, "--json"]
    if tokenize == 0:  # a quarter with the tiny model's tokenizer (token counts, the label mask)
        argv += ["--model", str(tiny_model)]
    call(argv)


# --- command lines ---------------------------------------------------------------------------------

def _commands():
    """{command: [its options]} from the real parser (nothing that trains, opens the app or waits)."""
    from advisor.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    out = {}
    for name, p in sub.choices.items():
        if name in ("demo", "tui", "watch", "data"):
            continue
        out[name] = sorted(o for a in p._actions for o in a.option_strings
                           if o.startswith("--") and o not in ("--help",))
    out["data check"] = ["--model", "--format", "--template", "--seq", "--prompt-loss-weight", "--json"]
    return out


COMMANDS = _commands()
VALUES = st.one_of(
    st.sampled_from(["-1", "0", "1", "3", "1e999", "inf", "nan", "-inf", "abc", "", "RTX 4090", "h100", "cpu",
                     "meta-llama/Llama-3.1-8B", "./missing-dir", "/", "/dev/zero", "q_proj,nonsense", "all-linear",
                     "qlora", "bf16", "eager", "training.micro_batch=2", "run.max_steps=-1", "x=y", "--json"]),
    st.text(max_size=8),
)


@st.composite
def command_lines(draw, work):
    name = draw(st.sampled_from(sorted(COMMANDS)))
    argv = name.split()
    for _ in range(draw(st.integers(0, 4))):
        flag = draw(st.sampled_from(COMMANDS[name])) if COMMANDS[name] else "--json"
        argv.append(flag)
        if draw(st.integers(0, 3)):
            value = draw(VALUES)
            if flag == "--save":  # only ever inside the scratch folder
                value = draw(st.sampled_from([str(work), str(work / "new" / "p.yaml"), str(work / "afile")]))
            argv.append(value)
    if name in ("estimate", "recommend") and "--model" not in argv and draw(st.booleans()):
        argv += ["--model", draw(st.sampled_from(["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-0.5B", "nope"]))]
    if name == "run":  # never trains here: --dry-run checks everything, then prints the command
        (work / "afile").write_text("x")
        target = draw(st.sampled_from([str(work / "cl-run"), str(work / "afile"), str(work), "/"]))
        if draw(st.booleans()):
            argv += ["--run-dir", target]
        else:
            argv = [w for w in argv if w != "--resume"] + ["--resume", target]
        argv.append("--dry-run")
    if name == "data check":
        argv.insert(2, draw(st.sampled_from([str(DEMO_DATA), str(work / "absent.jsonl"), str(work), "/dev/zero"])))
    if "--mode" in argv:  # the exact estimate takes seconds per case: analytic only here
        i = argv.index("--mode")
        argv[i + 1:i + 2] = ["analytic"]
    return argv


@settings(FUZZ, max_examples=60 * SCALE)
@given(data=st.data())
@pytest.mark.slow
def test_random_command_lines(work, data):
    call(data.draw(command_lines(work)))


# --- real processes: the exit status itself ---------------------------------------------------------

@settings(FUZZ, max_examples=4 * SCALE)
@given(data=st.data())
@pytest.mark.slow
def test_command_lines_in_a_real_process(work, data):
    argv = data.draw(command_lines(work))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "advisor.cli.main", *argv], capture_output=True, text=True,
                         env=env, cwd=work, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode in (0, 1, 2), (argv, out.returncode, out.stderr[-2000:])  # negative: a signal
    assert "Traceback" not in out.stderr + out.stdout, (argv, out.stderr[-2000:])


@settings(FUZZ, max_examples=5 * SCALE)
@given(data=datasets(), fmt=st.sampled_from(["auto", "messages", "text", "alpaca"]),
       packing=st.booleans(), plw=st.sampled_from([0.0, 0.1, 1.0]))
@pytest.mark.slow
def test_training_on_mutated_datasets(work, tiny_model, data, fmt, packing, plw):
    """One real step on whatever data passes the checks: a clear refusal (2) or a run (0), never a crash."""
    from advisor.planfile import save_plan
    from advisor.spec import build_plan

    suffix, content = data
    path = _fresh(work, "train" + suffix)
    path.write_bytes(content)
    plan = save_plan(build_plan({
        "model": {"ref": str(tiny_model)},
        "training": {"method": "lora", "precision": "fp32", "micro_batch": 2, "seq_len": 32,
                     "grad_checkpointing": False, "lora": {"r": 2, "alpha": 4}},
        "hardware": {"gpu": None, "device": "cpu"},
        "data": {"path": str(path), "format": fmt, "val_split": 0.0, "packing": packing, "prompt_loss_weight": plw},
        "run": {"max_steps": 1, "save_every": 100, "eval_every": 100},
    }), path.parent / "plan.yaml")
    code, text = call(["run", str(plan), "--run-dir", str(path.parent / "run"), "--no-progress"])
    assert code in (0, 2), text[-2000:]
