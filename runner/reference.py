"""docs/runner.md's plan reference, generated from the pydantic models' field descriptions."""

from __future__ import annotations

import json
from pathlib import Path

DOC_BEGIN = "<!-- BEGIN GENERATED PLAN REFERENCE (runner.reference.render_plan_reference) -->"


DOC_END = "<!-- END GENERATED PLAN REFERENCE -->"


def render_plan_reference() -> str:
    """The plan.yaml reference, from the pydantic models' field descriptions."""
    from pydantic import BaseModel

    from advisor.spec import Plan

    lines: list[str] = []

    def typename(ann) -> str:
        import types
        import typing

        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if origin is typing.Literal:
            return ", ".join(f"`{json.dumps(a)}`" for a in args)
        if origin in (typing.Union, types.UnionType):
            return " or ".join("null" if a is type(None) else typename(a) for a in args)
        if origin is list:
            return f"list of {typename(args[0])}"
        return getattr(ann, "__name__", str(ann))

    def bounds(field) -> str:
        out = []
        for m in field.metadata:
            for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                if getattr(m, attr, None) is not None:
                    out.append(f"{sym} {getattr(m, attr)}")
        return f" ({', '.join(out)})" if out else ""

    def default(field) -> str:
        if field.default_factory is not None:
            return "(section)"
        v = field.default
        return "null" if v is None else json.dumps(v)

    def section(model: type[BaseModel], prefix: str) -> None:
        rows = []
        subs = []
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subs.append((name, ann, f))
                continue
            desc = (f.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {typename(f.annotation)}{bounds(f)} | `{default(f)}` | {desc} |")
        if rows:
            lines.append(f"### `{prefix.rstrip('.') or 'top level'}`\n")
            lines.append("| key | type | default | meaning |")
            lines.append("|---|---|---|---|")
            lines.extend(rows)
            lines.append("")
        for name, ann, f in subs:
            if f.description:
                lines.append(f"<!-- {prefix}{name}: {f.description} -->")
            section(ann, f"{prefix}{name}.")

    section(Plan, "")
    return "\n".join(lines).rstrip() + "\n"


def update_docs(path: str | Path = Path(__file__).resolve().parent.parent / "docs" / "runner.md") -> bool:
    """Rewrite the generated block of docs/runner.md; True if it changed."""
    path = Path(path)
    text = path.read_text()
    head, _, rest = text.partition(DOC_BEGIN)
    _, _, tail = rest.partition(DOC_END)
    new = f"{head}{DOC_BEGIN}\n{render_plan_reference()}{DOC_END}{tail}"
    if new != text:
        path.write_text(new)
        return True
    return False


if __name__ == "__main__":  # python -m runner.reference: refresh docs/runner.md
    print("updated" if update_docs() else "up to date")
