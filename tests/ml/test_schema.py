"""ml.schema: the built-in synthetic schema, named columns, and the schema file overlay.
(Partitions validated against a schema: test_data.py.)"""

from __future__ import annotations

import json

import pytest

from ml.schema import SYNTHETIC_FEATURES, ColumnSpec, DataSchema, load_schema
from ml.settings import DataSettings


def make_settings(tmp_path, **overrides) -> DataSettings:
    return DataSettings(**({"path": str(tmp_path / "data")} | overrides))


def test_builtin_schema_for_the_synthetic_source(tmp_path):
    schema = load_schema(make_settings(tmp_path, target_column="load_mw"))
    assert schema.feature_names == SYNTHETIC_FEATURES
    assert schema.target.name == "load_mw"
    assert all(spec.min is not None and spec.max is not None for spec in schema.features)
    assert DataSchema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema


def test_named_columns_have_no_ranges_until_a_schema_file_adds_them(tmp_path):
    settings = make_settings(tmp_path, source="files", feature_columns="a,b", target_column="y")
    schema = load_schema(settings)
    assert schema == DataSchema((ColumnSpec("a"), ColumnSpec("b")), ColumnSpec("y"))

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(
        json.dumps(
            {
                "features": [{"name": "b", "min": 0, "max": 1.5, "nullable": True}],
                "target": {"name": "y", "min": -3},
            }
        )
    )
    overlaid = load_schema(settings.model_copy(update={"schema_file": str(schema_file)}))
    assert overlaid == DataSchema(
        (ColumnSpec("a"), ColumnSpec("b", min=0.0, max=1.5, nullable=True)),
        ColumnSpec("y", min=-3.0),
    )


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, FileNotFoundError, "does not exist"),
        ("{not json", ValueError, "not valid JSON"),
        ('["a list"]', ValueError, "top level must be an object"),
        ('{"features": [{"min": 1}]}', ValueError, "needs a string 'name'"),
        ('{"features": [{"name": "a", "min": "low"}]}', ValueError, "'min' must be a number"),
        ('{"features": [{"name": "a", "min": 5, "max": 1}]}', ValueError, "min 5.0 is above"),
        ('{"features": [{"name": "a", "typo": 1}]}', ValueError, "unknown keys"),
        ('{"features": [{"name": "nope"}]}', ValueError, "neither features nor the target"),
    ],
    ids=[
        "missing",
        "not-json",
        "not-object",
        "no-name",
        "bad-min",
        "min-above-max",
        "typo",
        "unknown-column",
    ],
)
def test_bad_schema_file_names_the_file(tmp_path, content, error, message):
    schema_file = tmp_path / "my-schema.json"
    if content is not None:
        schema_file.write_text(content)
    settings = make_settings(
        tmp_path, feature_columns="a,b", target_column="y", schema_file=str(schema_file)
    )
    with pytest.raises(error) as excinfo:
        load_schema(settings)
    assert str(schema_file) in str(excinfo.value)
    assert message in str(excinfo.value)
