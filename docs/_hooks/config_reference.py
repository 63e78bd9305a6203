"""mkdocs hook: writes the BiSSL configuration reference from the pydantic models at build time.

``config_reference_markdown()`` walks :class:`bissl.config.RunConfig` (sections recursively) and
renders one table per section: field (as used with ``--set``), type, default, description.
``on_files`` adds the result as the generated page ``bissl-config.md``, so the page cannot drift
from the code. tests/app/test_config_reference.py checks it covers every field.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAGE = "bissl-config.md"


def _import_run_config() -> type:
    for path in (ROOT, ROOT / "apps"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from bissl.config import RunConfig

    return RunConfig


def _is_section(annotation: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def type_name(annotation: Any) -> str:
    """A short readable name for a field's type annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is typing.Literal:
        return " \\| ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"tuple[{', '.join(type_name(a) for a in args)}]"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field: Any) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for meta in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return f" ({', '.join(parts)})" if parts else ""


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return "(section)" if _is_section(field.annotation) else "(computed)"
    value = field.default
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"  # YAML spelling


def _section(model: type, prefix: str, out: list[str]) -> None:
    rows = []
    nested = []
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            nested.append((prefix + name, field.annotation))
            continue
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {type_name(field.annotation)}{_constraints(field)} | "
                    f"{_default(field)} | {description} |")
    title = prefix.rstrip(".") or "top level"
    doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    if rows:
        out += [f"## `{title}`" if prefix else "## Top level", "", doc, "",
                "| field | type | default | description |", "|---|---|---|---|", *rows, ""]
    for path, sub in nested:
        _section(sub, path + ".", out)


def config_reference_markdown() -> str:
    """The whole reference page as markdown."""
    run_config = _import_run_config()
    out = [
        "# BiSSL configuration reference",
        "",
        "Generated from the pydantic models in `apps/bissl/config.py` when the docs are built, so "
        "it always matches the code. Each field can be set in a YAML preset or on the command line "
        "with `--set FIELD=VALUE` (the value is parsed as YAML, e.g. `--set augment.crop_scale=[0.2,1.0]`). "
        "Defaults are the models' defaults; the presets (`digits`, `fashion-mnist`, `stl10-paper`) "
        "override many of them — `bissl validate -c PRESET` prints the resolved values.",
        "",
    ]
    _section(run_config, "", out)
    return "\n".join(out)


def on_files(files: Any, config: Any) -> Any:
    """mkdocs event: add the generated page to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=config_reference_markdown()))
    return files
