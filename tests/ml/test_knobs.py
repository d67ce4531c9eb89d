"""ml.knobs: a settings field as a form field (JSON schema) and as a CLI option."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from ml.knobs import add_cli_options, cli_overrides, field_schema, property_schema
from ml.settings import DataSettings, GateSettings, TrainingSettings

BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "type")


def _property(cls, field):
    return cls.model_json_schema()["properties"][field]


@pytest.mark.parametrize(
    ("cls", "field"),
    [
        (TrainingSettings, "epochs"),
        (TrainingSettings, "learning_rate"),
        (GateSettings, "min_r2"),
        (GateSettings, "force_deploy"),
        (DataSettings, "source"),
        (DataSettings, "holdout_fraction"),
    ],
)
def test_a_field_s_schema_has_the_field_s_type_bounds_and_text(cls, field):
    schema = property_schema(cls, field)
    declared = _property(cls, field)
    assert {k: schema.get(k) for k in BOUNDS} == {k: declared.get(k) for k in BOUNDS}
    assert schema["title"] == declared["title"]
    assert schema.get("description") == declared.get("description")
    assert "default" not in schema


def test_an_optional_field_is_null_or_its_type_with_its_bounds():
    schema = property_schema(TrainingSettings, "threads")
    (declared,) = [
        v for v in _property(TrainingSettings, "threads")["anyOf"] if v["type"] != "null"
    ]
    assert schema["type"] == ["null", declared["type"]]
    assert schema["minimum"] == declared["minimum"]


def test_a_list_of_numbers_is_an_array_and_objects_and_unknown_fields_are_refused():
    from pydantic_settings import BaseSettings

    from serving.deploy.settings import DeploySettings

    class WithObjects(BaseSettings):
        labels: dict[str, str] = {}
        nested: list[list[int]] = []

    schema = property_schema(DeploySettings, "canary_steps")
    assert (schema["type"], schema["items"], schema["minItems"]) == ("array", {"type": "number"}, 1)
    with pytest.raises(ValueError, match="labels"):
        property_schema(WithObjects, "labels")
    with pytest.raises(ValueError, match="nested"):
        property_schema(WithObjects, "nested")
    with pytest.raises(KeyError, match="epoch"):
        property_schema(TrainingSettings, "epoch")


def test_the_default_is_the_deployment_s_value(monkeypatch):
    built_in = TrainingSettings.model_fields["epochs"].default
    monkeypatch.setenv("PIPELINE_TRAIN_EPOCHS", str(built_in + 3))
    assert field_schema(TrainingSettings(), "epochs")["default"] == built_in + 3
    assert field_schema(DataSettings(source="files"), "source")["default"] == "files"


def _parse(cls, fields, *argv):
    parser = argparse.ArgumentParser()
    add_cli_options(parser, cls, *fields)
    return parser.parse_args(list(argv))


def test_options_override_only_what_is_given(monkeypatch):
    monkeypatch.setenv("PIPELINE_TRAIN_BATCH_SIZE", "16")
    fields = ("epochs", "learning_rate", "batch_size")
    args = _parse(TrainingSettings, fields, "--epochs", "3", "--learning-rate", "0.25")
    settings = cli_overrides(TrainingSettings(), args, *fields)
    assert (settings.epochs, settings.learning_rate, settings.batch_size) == (3, 0.25, 16)
    assert cli_overrides(TrainingSettings(), _parse(TrainingSettings, fields), *fields) == (
        TrainingSettings()
    )


def test_an_option_out_of_the_field_s_bounds_is_refused_naming_the_field():
    maximum = _property(TrainingSettings, "epochs")["maximum"]
    args = _parse(TrainingSettings, ("epochs",), "--epochs", str(maximum + 1))
    with pytest.raises(ValidationError, match="epochs"):
        cli_overrides(TrainingSettings(), args, "epochs")


def test_bool_options_set_either_way_and_literals_are_choices(monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_GATE_FORCE_DEPLOY", "true")
    on = _parse(GateSettings, ("force_deploy",), "--force-deploy")
    off = _parse(GateSettings, ("force_deploy",), "--no-force-deploy")
    unset = _parse(GateSettings, ("force_deploy",))
    assert cli_overrides(GateSettings(), on, "force_deploy").force_deploy is True
    assert cli_overrides(GateSettings(), off, "force_deploy").force_deploy is False
    assert cli_overrides(GateSettings(), unset, "force_deploy").force_deploy is True  # the env's

    for choice in _property(DataSettings, "source")["enum"]:
        assert _parse(DataSettings, ("source",), "--source", choice).source == choice
    with pytest.raises(SystemExit):
        _parse(DataSettings, ("source",), "--source", "nowhere")
    assert "invalid choice" in capsys.readouterr().err


def test_help_says_the_description_env_var_and_built_in_default():
    parser = argparse.ArgumentParser()
    add_cli_options(parser, GateSettings, "max_regression")
    text = " ".join(parser.format_help().split())
    field = GateSettings.model_fields["max_regression"]
    assert " ".join(field.description.split()) in text  # its "%" printed as is
    assert f"[PIPELINE_GATE_MAX_REGRESSION, built in: {field.default}]" in text
