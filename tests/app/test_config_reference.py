"""Every config field is documented, and the generated reference page lists every field."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bissl.config import RunConfig
from pydantic import BaseModel

HOOK = Path(__file__).resolve().parents[2] / "docs" / "_hooks" / "config_reference.py"


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        out[prefix + name] = field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(_fields(field.annotation, prefix + name + "."))
    return out


def test_every_config_field_has_a_description() -> None:
    missing = [name for name, field in _fields(RunConfig).items()
               if not (field.description or "").strip()]  # type: ignore[attr-defined]
    assert not missing, f"add description= to these fields in apps/bissl/config.py: {missing}"


def test_generated_reference_lists_every_leaf_field_with_its_description() -> None:
    spec = importlib.util.spec_from_file_location("config_reference", HOOK)
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = hook.config_reference_markdown()
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines()
            if line.startswith("| `")}
    leaves = {name: field for name, field in _fields(RunConfig).items()
              if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))}  # type: ignore[attr-defined]
    assert set(rows) == set(leaves)
    for name, field in leaves.items():
        assert field.description.replace("|", "\\|") in rows[name], name  # type: ignore[attr-defined]
