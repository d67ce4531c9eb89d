"""The private MLflow and TensorFlow APIs the server uses (``serving/server/compat.py``) are still
there and still take what compat.py passes them; no other server module reaches one.

After an upgrade, a failure here names the library's version and the symbol: find what replaced
it, and change compat.py (and its ``PRIVATE_APIS``) for that version. MLflow's are checked in the
unit tier; TensorFlow's need TensorFlow, so they are integration tests.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from serving.server.compat import PRIVATE_APIS, PrivateApi

SERVER = Path(__file__).resolve().parents[3] / "serving" / "server"
MLFLOW_APIS = [api for api in PRIVATE_APIS if api.library == "mlflow"]
TENSORFLOW_APIS = [api for api in PRIVATE_APIS if api.library == "tensorflow"]


def _version(library: str) -> str:
    return str(getattr(importlib.import_module(library), "__version__", "(version unknown)"))


def _parameters(obj) -> list[inspect.Parameter]:
    """``obj``'s parameters; for a pybind11 function (no Python signature), those named in the
    first line of its docstring: ``NAME(arg0: T, arg1: U) -> R``."""
    try:
        return list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        first = (getattr(obj, "__doc__", None) or "").strip().splitlines()[:1]
        match = re.match(r"\w+\((.*)\)\s*->", first[0]) if first else None
        if match is None:
            raise
        names = [p.split(":")[0].strip() for p in match.group(1).split(",") if p.strip()]
        return [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names]


def private_api_problem(api: PrivateApi) -> str | None:
    """What changed about ``api`` in the installed library (None: nothing that matters here)."""
    where = f"{api.library} {_version(api.library)}: {api.module}.{api.name}"
    uses = "serving/server/compat.py uses it"
    try:
        obj = importlib.import_module(api.module)
        for part in api.name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        return f"{where} is gone ({type(exc).__name__}: {exc}); {uses}"
    if api.parameters is not None:
        try:
            params = _parameters(obj)
        except (TypeError, ValueError) as exc:
            return f"{where} is no longer a function with a signature ({exc}); {uses}"
        names = tuple(p.name for p in params)
        passed = len(api.parameters)
        required_extra = [
            p.name
            for p in params[passed:]
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if names[:passed] != api.parameters or required_extra:
            return (
                f"{where} changed: it takes ({', '.join(names)}), compat.py passes "
                f"({', '.join(api.parameters)})"
            )
    holder = obj() if api.instance_members else obj  # members set by __init__: on an instance
    try:
        if missing := [m for m in api.members if not hasattr(holder, m)]:
            return f"{where} has no {', '.join(missing)} any more; {uses}"
    finally:
        if holder is not obj and callable(close := getattr(holder, "close", None)):
            close()
    return None


# -- the checker itself ---------------------------------------------------------------------------


def test_a_removed_or_changed_symbol_is_named_with_the_library_version():
    import mlflow

    gone = PrivateApi("mlflow", "mlflow.pyfunc.scoring_server", "_no_such_function", ("data",))
    problem = private_api_problem(gone)
    assert problem is not None
    assert f"mlflow {mlflow.__version__}" in problem
    assert "mlflow.pyfunc.scoring_server._no_such_function is gone" in problem

    module = "mlflow.pyfunc.scoring_server"
    same = PrivateApi("mlflow", module, "predictions_to_json", ("raw_predictions", "output"))
    assert private_api_problem(same) is None  # its third parameter has a default
    changed = PrivateApi("mlflow", module, "predictions_to_json", ("raw_predictions", "stream"))
    problem = private_api_problem(changed)
    assert problem is not None
    assert f"{module}.predictions_to_json changed" in problem
    assert "raw_predictions, output" in problem and "stream" in problem

    no_module = PrivateApi("mlflow", "mlflow.no_such_module", "anything", None)
    assert "is gone (ModuleNotFoundError" in (private_api_problem(no_module) or "")


# -- MLflow ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", MLFLOW_APIS, ids=[a.name for a in MLFLOW_APIS])
def test_the_private_mlflow_apis_are_still_there(api):
    assert (problem := private_api_problem(api)) is None, problem


def test_a_decoded_request_is_parsed_as_the_scoring_server_parses_it():
    import pandas as pd
    from mlflow.types import ColSpec, Schema

    from serving.server.compat import parse_json_data

    schema = Schema([ColSpec("double", "a"), ColSpec("long", "b")])

    class Metadata:  # what MLflow's parser asks of a model's metadata
        def get_params_schema(self):
            return None

    decoded = {"dataframe_split": {"columns": ["a", "b"], "data": [[1.5, 2]]}, "params": {"k": 1}}
    data, params, unified_llm = parse_json_data(decoded, Metadata(), schema)
    assert isinstance(data, pd.DataFrame)
    assert data.to_dict("records") == [{"a": 1.5, "b": 2}]
    assert [str(t) for t in data.dtypes] == ["float64", "int64"]
    assert params == {"k": 1}
    assert unified_llm is False


def test_a_model_id_uri_resolves_to_the_model_id_alone():
    """``serving.server.loader.resolve_identity`` tells a ``models:/<model id>`` URI from a
    registry one by the public ``get_model_name_and_version``'s answer: ``(model_id,)`` (no
    registry asked) or ``(name, version)``."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    assert get_model_name_and_version(None, "models:/m-0123456789abcdef") == ("m-0123456789abcdef",)
    assert get_model_name_and_version(None, "models:/regression-model/3") == (
        "regression-model",
        "3",
    )


_PRIVATE_MODULES = ("tensorflow.python", "tensorflow.core")


def _private_references(path: Path, private_attributes: set[str]) -> list[str]:
    """Where ``path`` reaches a private MLflow or TensorFlow name."""
    text = path.read_text()
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if module.split(".")[0] not in ("mlflow", "tensorflow", "keras"):
                continue
            if module.startswith(_PRIVATE_MODULES) or any(
                part.startswith("_") for part in module.split(".")
            ):
                found.append(f"{where} imports from {module}")
            found += [f"{where} imports {module}.{a.name}" for a in node.names if a.name[0] == "_"]
        elif isinstance(node, ast.Import):
            found += [
                f"{where} imports {a.name}"
                for a in node.names
                if a.name.startswith(_PRIVATE_MODULES)
            ]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in private_attributes
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        ):
            found.append(f"{where} uses .{node.attr}")
    if "_MLFLOW_" in text:
        found.append(f"{path.name} names one of MLflow's private environment variables")
    return found


def test_no_other_server_module_reaches_a_private_mlflow_or_tensorflow_name():
    """Private modules (``tensorflow.python``, ...), private names imported from MLflow or
    TensorFlow, the private attributes compat.py lists, and MLflow's private environment
    variables: only in compat.py."""
    listed = {part for api in PRIVATE_APIS for part in (*api.name.split("."), *api.members)}
    private_attributes = {name for name in listed if name.startswith("_")}
    found = [
        problem
        for path in sorted(SERVER.glob("*.py"))
        if path.name != "compat.py"
        for problem in _private_references(path, private_attributes)
    ]
    assert not found, "private MLflow/TensorFlow APIs outside compat.py:\n" + "\n".join(found)


# -- TensorFlow ------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("api", TENSORFLOW_APIS, ids=[a.name for a in TENSORFLOW_APIS])
def test_the_private_tensorflow_apis_are_still_there(api):
    assert (problem := private_api_problem(api)) is None, problem


@pytest.mark.integration
def test_a_frozen_function_called_directly_answers_like_the_function():
    import numpy as np
    import tensorflow as tf

    from serving.server.compat import direct_callable, freeze

    weights = tf.Variable([[2.0], [-1.0], [0.5]])

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def forward(rows):
        return tf.matmul(rows, weights) + 1.0

    concrete = forward.get_concrete_function()
    frozen = freeze(concrete)
    assert not frozen.graph.variables  # the variables became constants
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(frozen.graph.as_graph_def(), name="")
    rows = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    with tf.compat.v1.Session(graph=graph) as session:
        run = direct_callable(session, frozen.inputs[0].name, frozen.outputs[0].name)
        got = run(rows)
    assert np.array_equal(got, concrete(tf.constant(rows)).numpy())
