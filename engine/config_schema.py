"""A JSON Schema of the configuration, generated from the config dataclasses of :mod:`geximpute.config`.

YAML editors that speak JSON Schema (VS Code's YAML extension, PyCharm, Neovim's yaml-language-server) then complete
keys, show each key's description and flag unknown keys and bad values as the file is typed. Write the schema with
``geximpute config-schema --out geximpute.schema.json`` and point a config at it with a first line
``# yaml-language-server: $schema=geximpute.schema.json``. The schema says what the loader accepts; checks across
keys (``__post_init__``) still run when a config is loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal

from geximpute import __version__
from geximpute.config import Config

SCHEMA_ID = "https://geximpute.invalid/config.schema.json"


def _descriptions(cls: type) -> dict[str, str]:
    """``field -> text`` from the ``Attributes:`` section of a Google-style class docstring."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    out: dict[str, str] = {}
    current: list[str] = []
    for line in doc.split("Attributes:", 1)[1].splitlines():
        match = re.match(r"^    ([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): (.*)$", line)
        if match:
            current = match.group(1).split(", ")
            for name in current:
                out[name] = match.group(2).strip()
        elif line.startswith("        ") and current:
            for name in current:
                out[name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return out


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        # a section: a mapping, or null (its keys all commented out: the loader reads its defaults); a section the
        # config requires (`inputs`) is a mapping (see _class_schema)
        return {**_class_schema(tp), "type": ["object", "null"]}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a) for a in typing.get_args(tp)]}
    if origin is tuple:
        # the loader also takes one value for a list of one
        item = _type_schema(typing.get_args(tp)[0])
        return {"anyOf": [{"type": "array", "items": item}, item]}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": ["string", "number"]}  # numbers are read as their text, like the loader does
    raise TypeError(f"no JSON Schema for the config annotation {tp!r}")


def _default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _class_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    texts = _descriptions(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        prop = dict(f.metadata["schema"]) if "schema" in f.metadata else _type_schema(hints[f.name])
        if f.name in texts:
            prop["description"] = texts[f.name]
        if f.default is not dataclasses.MISSING:
            prop["default"] = _default(f.default)
        elif f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            required.append(f.name)
            if prop.get("type") == ["object", "null"]:
                prop["type"] = "object"  # a required section (`inputs`: its files) is never its defaults
        properties[f.name] = prop
    summary = (inspect.getdoc(cls) or "").split("\n\n", 1)[0].replace("\n", " ")
    schema: dict[str, Any] = {"type": "object", "description": summary, "properties": properties,
                              "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a geximpute YAML config."""
    schema = _class_schema(Config)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"geximpute configuration (geximpute {__version__})",
        **schema,
    }
