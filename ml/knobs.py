"""A settings field as the other layers see it: a typed form field, a CLI option.

Each knob is declared once, in the pydantic settings (``ml/settings.py``,
``serving/deploy/settings.py``); the Airflow trigger forms (``dags/_params.py``, via
:func:`field_schema`: what a ``Param`` takes, with the deployment's value as default; a list of
numbers is an array with ``items`` and ``minItems``) and ``python -m ml``
(:func:`add_cli_options` / :func:`cli_overrides`: an option left out keeps the setting, a value
out of bounds is refused naming the field) derive theirs from its JSON schema.
"""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from pydantic_settings import BaseSettings

from ml.settings import with_overrides

S = TypeVar("S", bound=BaseSettings)

# What a form or an option needs of a field's JSON schema.
_SCHEMA_KEYS = (
    *("type", "enum", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
    *("minLength", "maxLength", "items", "minItems", "title", "description"),
)
_CLI_TYPES = {"integer": int, "number": float, "string": str}


def property_schema(cls: type[BaseSettings], field: str) -> dict[str, Any]:
    """``field`` of ``cls`` as JSON schema, without its default. ``X | None`` becomes
    ``"type": ["null", X]`` (the form of an optional field in a trigger form)."""
    properties = cls.model_json_schema()["properties"]
    if field not in properties:
        raise KeyError(f"{cls.__name__} has no field {field!r}")
    prop = dict(properties[field])
    if "anyOf" in prop:
        variants = prop.pop("anyOf")
        values = [v for v in variants if v.get("type") != "null"]
        if len(values) != 1 or len(variants) != 2:
            raise ValueError(f"{cls.__name__}.{field}: only `X | None` unions are supported")
        prop = {**values[0], **prop, "type": ["null", values[0].get("type")]}
    scalar = prop.get("items", {}) if prop.get("type") == "array" else prop
    if scalar.get("type") in (None, "array", "object") or "$ref" in prop:
        raise ValueError(f"{cls.__name__}.{field}: not a scalar field or list of scalars ({prop})")
    return {key: prop[key] for key in _SCHEMA_KEYS if key in prop}


def field_schema(settings: BaseSettings, field: str) -> dict[str, Any]:
    """:func:`property_schema` with ``default``: the value ``settings`` holds (the deployment's,
    from its env vars), as JSON."""
    schema = property_schema(type(settings), field)
    schema["default"] = settings.model_dump(mode="json", include={field})[field]
    return schema


def add_cli_options(parser: argparse.ArgumentParser, cls: type[BaseSettings], *fields: str):
    """An option ``--<field>`` (dashes for underscores) per field of ``cls``, typed like the
    field (a ``Literal``: its choices; a bool: ``--x`` / ``--no-x``), helped by its
    description, its env var and its built-in default. Unset, it parses as None."""
    prefix = cls.model_config.get("env_prefix", "")
    for field in fields:
        schema = property_schema(cls, field)
        kind = schema["type"][-1] if isinstance(schema["type"], list) else schema["type"]
        builtin = cls.model_fields[field].get_default(call_default_factory=True)
        text = schema.get("description") or schema.get("title", field)
        # argparse formats help with %: a literal one is doubled.
        what = f"{text} [{prefix}{field.upper()}, built in: {builtin}]".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": field, "default": None, "help": what}
        if kind == "boolean":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "enum" in schema:
            kwargs["choices"] = schema["enum"]
        else:
            kwargs["type"] = _CLI_TYPES[kind]
        parser.add_argument(f"--{field.replace('_', '-')}", **kwargs)


def cli_overrides(settings: S, args: argparse.Namespace, *fields: str) -> S:
    """``settings`` with the options :func:`add_cli_options` added for ``fields`` applied
    (validated again: a bound broken names the field)."""
    return with_overrides(settings, **{field: getattr(args, field) for field in fields})
