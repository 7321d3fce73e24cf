"""plan.yaml: the one file the TUI/CLI saves and the runner reads.

Saved with a comment above each field (its description), so a plan explains itself; loaded
strictly (unknown keys are errors, every problem reported at once, YAML errors with their line).
Secrets never go in a plan: there is no token field, and keys that look like one are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from advisor.problems import Problem
from advisor.spec import Plan, SpecError, build_plan

# a key that names a secret: token, hf_token, access-token, password, api_key... (not avg_tokens, a count)
_SECRET_KEY = re.compile(r"(?:^|[_\-.])(?:token|password|passwd|secret|api[_\-]?key)$", re.IGNORECASE)


def _emit(model: BaseModel, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, indent + 1, lines)
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")


def _scalar(v: Any) -> str:
    import json

    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid YAML string


def dump_plan(plan: Plan) -> str:
    lines = ["# tuneplan plan: `tuneplan estimate --plan FILE`, `tuneplan run FILE`", ""]
    _emit(plan, 0, lines)
    return "\n".join(lines) + "\n"


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan atomically (a temporary file beside it, then a rename); SpecError when it cannot
    be written there, and no temporary file left behind."""
    path = Path(path)
    if path.is_dir():
        raise SpecError([f"cannot save the plan to {path}: it is a directory; give a file name such as "
                         f"{path / 'plan.yaml'}"])
    if path.exists() and not path.is_file():
        raise SpecError([f"cannot save the plan to {path}: it is not a regular file (a device or a pipe)"])
    from advisor.safefile import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, dump_plan(plan))
    except OSError as e:
        raise SpecError([f"cannot save the plan to {path}: {e.strerror or e}"]) from None
    return path


def _find_secrets(data: Any, where: str = "") -> list[str]:
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{where}.{k}" if where else str(k)
            if _SECRET_KEY.search(str(k)):
                found.append(f"{key}: plans never hold secrets; set HF_TOKEN in the environment instead")
            found += _find_secrets(v, key)
    return found


def parse_plan(text: str, where: str = "plan") -> Plan:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([f"{where} is not valid YAML{at}: {getattr(e, 'problem', e)}"]) from None
    if data is None:
        raise SpecError([f"{where} is empty (no settings in it); write a plan there, e.g. with "
                         "`tuneplan recommend --save FILE` or the app's save"])
    if not isinstance(data, dict):
        raise SpecError([f"{where} must be a mapping of sections (model, training, ...)"])
    secrets = _find_secrets(data)
    if secrets:
        raise SpecError(secrets)
    return build_plan(data)


def load_plan(path: str | Path, trust_remote_code: bool = False) -> Plan:
    """The plan in ``path``, validated. A plan that allows custom model code (model.trust_remote_code:
    true) is refused unless the command itself consents (``trust_remote_code``, the --trust-remote-code
    flag): plans are shared, and a file alone must never make tuneplan run code. With consent the
    plan's flag is set."""
    return consent(_read_plan(Path(path)), trust_remote_code, f"plan {path}")


def consent(plan: Plan, trust_remote_code: bool, where: str = "the plan") -> Plan:
    """The plan with model.trust_remote_code as the command decides it: refused (SpecError) when the plan
    asks for custom code without the command's consent, set when the command consents."""
    if plan.model.trust_remote_code and not trust_remote_code:
        raise SpecError([Problem(f"{where} allows custom model code (model.trust_remote_code: true), which runs "
                                 "with your permissions when the model loads", "model.trust_remote_code",
                                 "if you trust that model's code, consent on the command with --trust-remote-code; "
                                 "otherwise set model.trust_remote_code: false")])
    if trust_remote_code and not plan.model.trust_remote_code:
        plan = plan.model_copy(update={"model": plan.model.model_copy(update={"trust_remote_code": True})})
    return plan


def _read_plan(path: Path) -> Plan:
    if path.exists() and not path.is_file() and not path.is_dir():  # a device or a pipe: reading may never end
        raise SpecError([f"plan {path} is not a regular file; give a YAML plan file"])
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError([f"cannot read plan {path}: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark some editors write is fine
    except UnicodeDecodeError as e:
        raise SpecError([f"plan {path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                         "save it as UTF-8 YAML"]) from None
    if "\x00" in text:
        raise SpecError([f"plan {path} is not a text file (it holds NUL bytes); give a YAML plan"])
    return parse_plan(text, str(path))


def apply_overrides(plan: Plan, overrides: list[str]) -> Plan:
    """key=value overrides with dotted keys (training.micro_batch=2); unknown keys are errors."""
    import yaml

    data = plan.model_dump(mode="json")
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value (e.g. training.micro_batch=2)")
            continue
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                node = None
                break
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            problems.append(f"unknown key {key!r}")
            continue
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw
    if problems:
        raise SpecError(problems)
    return build_plan(data)
