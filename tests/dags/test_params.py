"""The trigger forms' Params are the settings' fields: generated, never restated.

Each knob (its type, default, bounds, title, description) is declared once, in the pydantic
settings. ``_params.KNOBS`` only maps a Param name to its settings field; these tests fail if a
Param's schema drifts from its field, if a default is not the deployment's setting, if a run's
Param does not reach its setting, or if a bound or default is written a second time in the DAG
layer or in ``python -m ml``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from _params import (
    KNOBS,
    ROLLOUT_KNOBS,
    data_settings,
    deploy_settings,
    gate_settings,
    run_settings,
    training_settings,
)

from ml import settings as ml_settings
from serving.deploy.settings import DeploySettings
from tests.dags.conftest import DAGS_DIR, load_dag

REPO = DAGS_DIR.parent
BOUNDS = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
          "items", "minItems")  # fmt: skip
DAG_KNOBS = {
    "train_and_deploy": [name for name in KNOBS if name != "batch_window_days"],
    "deploy_model": ["deploy_target", *ROLLOUT_KNOBS],
    "score_batch": ["batch_window_days"],
    "gate_new_version": [
        *("data_window_days", "max_rmse", "min_r2", "max_regression", "require_approval"),
        *("deploy_target", *ROLLOUT_KNOBS),
    ],
}
SETTINGS_CLASSES = [
    ml_settings.DataSettings,
    ml_settings.TrainingSettings,
    ml_settings.GateSettings,
    ml_settings.RegistrySettings,
    ml_settings.DriftSettings,
    ml_settings.QualitySettings,
    ml_settings.BatchSettings,
    DeploySettings,
]


def _declared(name: str) -> dict:
    cls, field = KNOBS[name]
    return cls.model_json_schema()["properties"][field]


def _other_value(name: str):
    """A valid value of the knob ``name`` that is not its built-in default."""
    declared = _declared(name)
    cls, field = KNOBS[name]
    default = cls.model_fields[field].get_default(call_default_factory=True)
    if "enum" in declared:
        return next(v for v in declared["enum"] if v != default)
    if declared["type"] == "boolean":
        return not default
    if declared["type"] == "integer":
        return default + 1 if default + 1 <= declared.get("maximum", default + 1) else default - 1
    if declared["type"] == "array":
        return default[:-1]  # lists here: of several numbers
    return default / 2  # numbers here: positive defaults, bounds around them


def _env_name(name: str) -> str:
    cls, field = KNOBS[name]
    return f"{cls.model_config['env_prefix']}{field.upper()}"


@pytest.fixture
def deployment_env(monkeypatch):
    """Every knob's env var set to a value that is not its built-in default."""
    values = {name: _other_value(name) for name in KNOBS}
    for name, value in values.items():
        monkeypatch.setenv(
            _env_name(name), str(value).lower() if isinstance(value, bool) else str(value)
        )
    return values


@pytest.mark.parametrize("dag_id", sorted(DAG_KNOBS))
def test_each_knob_param_is_its_settings_field_with_the_deployment_s_default(
    dag_id, deployment_env
):
    params = load_dag(dag_id).params
    for name in DAG_KNOBS[dag_id]:
        param, declared = params.get_param(name), _declared(name)
        assert {k: param.schema.get(k) for k in BOUNDS} == {k: declared.get(k) for k in BOUNDS}
        assert param.value == deployment_env[name], name
        assert param.schema["title"] and param.description, name
        if "description" in declared:
            assert param.description == declared["description"], name
            assert param.schema["title"] == declared["title"], name


def test_a_run_s_params_reach_its_settings():
    """Every knob's Param overrides its own field (and nothing else) for the run."""
    overriders = {
        ml_settings.BatchSettings: lambda params: run_settings(ml_settings.BatchSettings, params),
        ml_settings.DataSettings: data_settings,
        ml_settings.TrainingSettings: training_settings,
        ml_settings.GateSettings: gate_settings,
        DeploySettings: deploy_settings,
    }
    assert {cls for cls, _ in KNOBS.values()} <= set(overriders)
    for name, (cls, field) in KNOBS.items():
        value = _other_value(name)
        settings = overriders[cls]({name: value})
        assert getattr(settings, field) == value, name
        assert settings.model_dump(exclude={field}) == cls().model_dump(exclude={field}), name
        assert overriders[cls]({}) == cls()  # no Param: the deployment's settings


def _name_of(call: ast.Call, parents: dict[ast.AST, ast.AST]) -> str:
    """The dict key a call is the value of, else the function it is in."""
    parent = parents.get(call)
    if isinstance(parent, ast.Dict):
        key = parent.keys[parent.values.index(call)]
        if isinstance(key, ast.Constant):
            return str(key.value)
    node = call
    while node in parents and not isinstance(node, ast.FunctionDef):
        node = parents[node]
    return getattr(node, "name", "<module>")


def _calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            yield getattr(func, "id", getattr(func, "attr", "")), node, parents


def test_no_param_in_the_dag_layer_restates_a_knob():
    """A ``Param(...)`` written out in dags/ is a DAG-only Param (its own name, default and
    bounds), never one of a settings field."""
    fields = {field for _, field in KNOBS.values()}
    written = {}
    for path in sorted(DAGS_DIR.glob("*.py")):
        for func, call, parents in _calls(path):
            if func == "Param" and (call.args or call.keywords):
                written[_name_of(call, parents)] = path.name
    restated = {name: file for name, file in written.items() if name in KNOBS or name in fields}
    assert restated == {}
    assert {"force_retrain", "version", "reason", "window_end_param"} <= set(written)


def test_no_ml_cli_option_restates_a_setting():
    """``python -m ml`` options of settings fields come from ml.knobs: no ``add_argument`` in
    ml/__main__.py names a settings field (with its type, default or help)."""
    fields = {f for cls in SETTINGS_CLASSES for f in cls.model_fields}
    written = set()
    for func, call, _ in _calls(REPO / "ml" / "__main__.py"):
        if func == "add_argument":
            for arg in call.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    written.add(str(arg.value).removeprefix("--").replace("-", "_"))
    assert written, "the scan found no add_argument call at all"
    assert written & fields == set()
