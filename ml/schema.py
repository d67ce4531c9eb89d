"""The schema training data must follow: its columns, their ranges and nullability.

:func:`load_schema` builds it from :class:`~ml.settings.DataSettings`: the built-in synthetic
schema (with physically plausible ranges) when no ``feature_columns`` are named, otherwise
the named columns without ranges; an optional JSON ``schema_file`` then overlays ranges and
nullability column by column. :mod:`ml.data` validates partitions against it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from ml.settings import DataSettings

# The built-in synthetic source's features (:mod:`ml.synthetic` writes them), in order.
SYNTHETIC_FEATURES: list[str] = [
    "temperature_c",
    "humidity_pct",
    "hour_of_day",
    "is_weekend",
    "wind_speed_ms",
    "solar_wm2",
]


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    min: float | None = None
    max: float | None = None
    nullable: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a column needs a name")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"column '{self.name}': min {self.min} is above max {self.max}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> ColumnSpec:
        if not isinstance(raw, dict):
            raise ValueError(f"a column spec must be an object, got {raw!r}")
        unknown = set(raw) - {"name", "min", "max", "nullable"}
        if unknown:
            raise ValueError(f"column spec {raw!r} has unknown keys {sorted(unknown)}")
        if not isinstance(raw.get("name"), str):
            raise ValueError(f"column spec {raw!r} needs a string 'name'")
        return cls(
            name=raw["name"],
            min=_optional_float(raw.get("min"), "min"),
            max=_optional_float(raw.get("max"), "max"),
            nullable=_bool(raw.get("nullable", False)),
        )


def _optional_float(value: Any, key: str) -> float | None:
    if value is None:
        return None
    # bool is an int subclass; true/false as a bound is a typo, not a number.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"'{key}' must be a number or null, got {value!r}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"'nullable' must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class DataSchema:
    features: tuple[ColumnSpec, ...]
    target: ColumnSpec

    def __post_init__(self) -> None:
        names = [*self.feature_names, self.target.name]
        if not self.features:
            raise ValueError("a schema needs at least one feature")
        if len(set(names)) != len(names):
            raise ValueError(f"column names must be unique, got {names}")

    @property
    def feature_names(self) -> list[str]:
        return [spec.name for spec in self.features]

    @property
    def columns(self) -> tuple[ColumnSpec, ...]:
        return (*self.features, self.target)

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": [spec.to_dict() for spec in self.features],
            "target": self.target.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> DataSchema:
        if not isinstance(raw, dict) or not isinstance(raw.get("features"), list):
            raise ValueError("a schema needs a 'features' list and a 'target' object")
        if "target" not in raw:
            raise ValueError("a schema needs a 'target' object")
        return cls(
            features=tuple(ColumnSpec.from_dict(item) for item in raw["features"]),
            target=ColumnSpec.from_dict(raw["target"]),
        )


def _synthetic_schema(target_column: str) -> DataSchema:
    # Physically plausible bounds: they also catch unit mix-ups (Kelvin, fractions for %).
    return DataSchema(
        features=(
            ColumnSpec("temperature_c", min=-40.0, max=50.0),
            ColumnSpec("humidity_pct", min=0.0, max=100.0),
            ColumnSpec("hour_of_day", min=0.0, max=23.0),
            ColumnSpec("is_weekend", min=0.0, max=1.0),
            ColumnSpec("wind_speed_ms", min=0.0, max=60.0),
            ColumnSpec("solar_wm2", min=0.0, max=1400.0),
        ),
        target=ColumnSpec(target_column, min=0.0),
    )


def load_schema(settings: DataSettings) -> DataSchema:
    """The schema the data must follow.

    No ``feature_columns`` means the built-in synthetic schema (with ranges); otherwise the
    named columns without ranges. ``schema_file`` then overlays ranges and nullability
    column by column.
    """
    if settings.feature_columns is None:
        schema = _synthetic_schema(settings.target_column)
    else:
        schema = DataSchema(
            features=tuple(ColumnSpec(name) for name in settings.feature_columns),
            target=ColumnSpec(settings.target_column),
        )
    if settings.schema_file:
        schema = _overlay_schema_file(schema, settings.schema_file)
    return schema


def _overlay_schema_file(schema: DataSchema, schema_file: str) -> DataSchema:
    try:
        with fsspec.open(schema_file, "r", encoding="utf-8") as handle:
            raw = json.load(handle)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"schema file {schema_file} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"schema file {schema_file} is not valid JSON: {exc}") from exc

    try:
        overrides = _parse_overrides(raw)
    except ValueError as exc:
        raise ValueError(f"schema file {schema_file} is invalid: {exc}") from exc

    known = {spec.name for spec in schema.columns}
    # A name that matches nothing is almost always a typo that would silently skip a check.
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"schema file {schema_file} declares {unknown}, which are neither features "
            f"nor the target (known columns: {sorted(known)})"
        )
    return DataSchema(
        features=tuple(overrides.get(spec.name, spec) for spec in schema.features),
        target=overrides.get(schema.target.name, schema.target),
    )


def _parse_overrides(raw: Any) -> dict[str, ColumnSpec]:
    if not isinstance(raw, dict):
        raise ValueError("the top level must be an object with 'features' and/or 'target'")
    unknown = set(raw) - {"features", "target"}
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(unknown)}")
    features = raw.get("features", [])
    if not isinstance(features, list):
        raise ValueError("'features' must be a list of column specs")
    specs = [ColumnSpec.from_dict(item) for item in features]
    if "target" in raw:
        specs.append(ColumnSpec.from_dict(raw["target"]))
    return {spec.name: spec for spec in specs}


__all__ = [
    "SYNTHETIC_FEATURES",
    "ColumnSpec",
    "DataSchema",
    "load_schema",
]
