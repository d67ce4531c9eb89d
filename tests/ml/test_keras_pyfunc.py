"""ml/keras_pyfunc.py repeats what serving.server.contract defines (MLflow runs the file on its
own, so it cannot import it): these tests keep the copies equal."""

from __future__ import annotations

import ast
from pathlib import Path

from ml import train
from serving.server import contract

PYFUNC = Path(train.__file__).with_name(contract.KERAS_CODE_FILE)


def _module() -> ast.Module:
    # Parsed, not imported: importing it would pull in TensorFlow for a string comparison.
    return ast.parse(PYFUNC.read_text(encoding="utf-8"))


def test_the_code_file_the_trainer_logs_is_the_one_the_server_recognises():
    assert PYFUNC.is_file()
    assert train.PYFUNC_CODE_PATH == PYFUNC
    assert PYFUNC.name == contract.KERAS_CODE_FILE


def test_prediction_column_matches_the_contract():
    values = [
        node.value.value
        for node in _module().body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["PREDICTION_COLUMN"]
        and isinstance(node.value, ast.Constant)
    ]
    assert values == [contract.PREDICTION_COLUMN]


def test_python_model_class_matches_the_contract():
    classes = [node.name for node in _module().body if isinstance(node, ast.ClassDef)]
    assert contract.KERAS_PYTHON_MODEL_CLASS in classes


def test_artifact_key_read_at_load_time_matches_the_contract():
    keys = {
        node.slice.value
        for node in ast.walk(_module())
        if isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "artifacts"
        and isinstance(node.slice, ast.Constant)
    }
    assert keys == {contract.KERAS_ARTIFACT_KEY}
    assert train.KERAS_ARTIFACT_KEY == contract.KERAS_ARTIFACT_KEY
