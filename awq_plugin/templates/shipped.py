"""Template JSON: reading a user's file or dict, and looking up the templates shipped beside this module."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from awq_plugin.errors import TemplateError
from awq_plugin.templates.schema import validate_template_data


def _templates_dir() -> Any:
    return resources.files("awq_plugin.templates")


def load_shipped_templates() -> dict[str, dict[str, Any]]:
    """All templates shipped with the package, validated, keyed by name (a fresh copy each call)."""
    return copy.deepcopy(_load_shipped_templates())


@functools.cache
def _load_shipped_templates() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for entry in sorted(_templates_dir().iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        source = f"'{entry.name}' (shipped)"
        data = validate_template_data(_parse_json(entry.read_text(encoding="utf-8"), source), source)
        data.setdefault("name", None)
        data["name"] = data["name"] or entry.name[: -len(".json")]
        if data["name"] in found:
            raise TemplateError(f"two shipped templates are named '{data['name']}'")
        found[data["name"]] = data
    _check_unique_keys(found)
    return found


def _check_unique_keys(templates: Mapping[str, Mapping[str, Any]]) -> None:
    for field in ("architectures", "model_types"):
        owner: dict[str, str] = {}
        for name, data in templates.items():
            for key in data[field]:
                if key in owner:
                    raise TemplateError(
                        f"shipped templates '{owner[key]}' and '{name}' both claim {field} '{key}'"
                    )
                owner[key] = name


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"architecture template {source} is not valid JSON: {exc}") from None


def load_template(template: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Read a user template (a dict, a JSON file path, or a shipped template's name).

    Returns the validated dict and a description of where it came from.
    """
    if isinstance(template, Mapping):
        source = "<dict>"
        data = validate_template_data(template, source)
        data["name"] = data["name"] or "custom"
        return data, source
    shipped = load_shipped_templates()
    if isinstance(template, str) and template in shipped:
        return shipped[template], f"'{template}.json' (shipped)"
    path = Path(template)
    if not path.is_file():
        raise TemplateError(
            f"architecture template {str(template)!r} is neither a JSON file nor a shipped template; "
            f"shipped: {sorted(shipped)}"
        )
    source = f"'{path}'"
    data = validate_template_data(_parse_json(path.read_text(encoding="utf-8"), source), source)
    data["name"] = data["name"] or path.stem
    return data, source


def find_shipped_template(architecture: str | None, model_type: str | None) -> tuple[dict[str, Any], str]:
    """The shipped template for an architecture (first) or model type (second)."""
    shipped = load_shipped_templates()
    for field, key in (("architectures", architecture), ("model_types", model_type)):
        if key is None:
            continue
        for name, data in shipped.items():
            if key in data[field]:
                return data, f"'{name}.json' (shipped, matched {field[:-1]} '{key}')"
    known = sorted(a for data in shipped.values() for a in data["architectures"])
    raise TemplateError(
        f"no shipped architecture template for architecture {architecture!r} / model_type {model_type!r}; "
        f"shipped architectures: {known}. Write a template JSON (schema in awq_plugin/templates/schema.py) "
        "and pass it as template=PATH (CLI: --template FILE)"
    )
