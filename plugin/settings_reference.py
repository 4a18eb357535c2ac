"""The configuration reference: every setting with its environment name, type and default,
generated from the settings model (docs/deploy.md embeds it; a test keeps them equal)."""

from __future__ import annotations

import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from plugin.settings import Settings


def settings_reference() -> str:
    """Every setting as a Markdown table: name, environment variable, type, default, meaning.

    Built from the settings model, so the deployment docs cannot drift from it.
    """
    prefix = Settings.model_config.get("env_prefix", "")
    rows = [
        "| setting | environment variable | type | default | description |",
        "|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        cells = (
            f"`{name}`",
            f"`{prefix}{name.upper()}`",
            f"`{_type_name(field.annotation)}`",
            _default_text(field),
            field.description or "",
        )
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    if annotation is type(None):
        return "None"
    return str(getattr(annotation, "__name__", annotation))


def _default_text(field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        return "required"
    if value is None:
        return "unset"
    if SecretStr in get_args(field.annotation) or field.annotation is SecretStr:
        return "`***`"
    return f"`{json.dumps(to_jsonable_python(value))}`"
