"""load_model: which path serves a model and why, identities, and clear load errors.

The project's Keras pyfunc is trained and logged for real (marked ``integration``: it trains);
the generic-pyfunc and error cases load a tiny Python model saved locally (unit).
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest

from serving.server.loader import ModelLoadError, load_model, resolve_identity

SUM_MODEL = """
import mlflow


class Sum(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input[["a", "b"]].sum(axis=1).to_numpy()


mlflow.models.set_model(Sum())
"""


@pytest.fixture(scope="module")
def generic_model(tmp_path_factory) -> str:
    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("generic")
    (root / "sum_model.py").write_text(textwrap.dedent(SUM_MODEL))
    path = root / "model"
    mlflow.pyfunc.save_model(path, python_model=str(root / "sum_model.py"), pip_requirements=[])
    return str(path)


def test_a_generic_pyfunc_is_served_through_its_predict_and_says_why(generic_model):
    loaded = load_model(generic_model)
    assert loaded.fast is None
    assert loaded.fast_path_note == "no 'keras_model' artifact"
    assert loaded.flavor == "pyfunc:sum_model.py"
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [0.5, -2.0]})
    assert list(loaded.pyfunc.predict(frame)) == [1.5, 0.0]
    described = loaded.describe()
    assert described["fast_path"] is False and described["uri"] == generic_model
    assert described["version"] is None and described["load_seconds"] >= 0


def test_a_uri_that_does_not_resolve_is_a_load_error_naming_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_model(missing)


def test_a_folder_that_is_not_a_pyfunc_is_a_load_error(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(ModelLoadError, match="as an MLflow pyfunc"):
        load_model(str(tmp_path))


def test_run_and_path_uris_are_pinned_without_asking_a_server():
    run = resolve_identity("runs:/0a1b2c/model")
    assert (run.run_id, run.download_uri, run.version) == ("0a1b2c", "runs:/0a1b2c/model", None)
    local = resolve_identity("/models/m")
    assert (local.run_id, local.download_uri) == (None, "/models/m")


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory) -> tuple[str, pd.DataFrame]:
    """The project's Keras pyfunc, trained for two epochs and logged to a SQLite store."""
    import mlflow

    from ml.settings import TrainingSettings
    from ml.train import train_model

    root = tmp_path_factory.mktemp("keras")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        rng = np.random.default_rng(0)
        frame = pd.DataFrame(rng.normal(size=(200, 3)), columns=["x0", "x1", "x2"])
        frame["target"] = frame.sum(axis=1)
        settings = TrainingSettings(epochs=2, hidden_units=[8], threads=1)
        result = train_model(
            frame, ["x0", "x1", "x2"], "target", settings, experiment_name="loader"
        )
        yield result.model_uri, frame
        mlflow.set_tracking_uri(None)


@pytest.mark.integration
def test_the_project_keras_pyfunc_gets_the_fast_path_with_the_same_numbers(keras_model):
    uri, frame = keras_model
    # The TensorFlow path: the model also has a LiteRT artifact (tests/serving/server/test_slim.py).
    loaded = load_model(uri, slim=False)
    assert loaded.fast is not None, loaded.fast_path_note
    assert loaded.fast_path_note.startswith("keras concrete function")
    assert loaded.flavor == "pyfunc:keras_pyfunc.py"
    features = frame[["x0", "x1", "x2"]]
    reference = loaded.pyfunc.predict(features)["prediction"].to_numpy()
    fast = np.asarray(loaded.fast.predict(features.to_numpy("float32"))).ravel()
    np.testing.assert_allclose(fast, reference, rtol=1e-5, atol=1e-5)
    assert loaded.serving_input_example() is not None


@pytest.mark.integration
def test_the_fast_path_can_be_turned_off(keras_model):
    uri, _ = keras_model
    loaded = load_model(uri, fast_path=False)
    assert loaded.fast is None and loaded.fast_path_note == "disabled"


@pytest.fixture(scope="module")
def keras_flavor_models(tmp_path_factory) -> dict[str, str]:
    """One small Keras network, trained for a few epochs and saved with the ``tensorflow``
    and ``keras`` flavors (tensor signature), plus variants the fast path must refuse."""
    import keras
    import mlflow.keras
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    root = tmp_path_factory.mktemp("keras-flavors")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 3)).astype("float32")
    y = x @ np.array([1.0, -2.0, 0.5], dtype="float32") + 3.0
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    network = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    network.compile(optimizer="adam", loss="mse")
    network.fit(x, y, epochs=3, batch_size=32, verbose=0)
    signature = infer_signature(x[:4], np.asarray(network(x[:4])))
    paths = {name: str(root / name) for name in ("tensorflow", "keras", "tf-no-signature")}
    # Declared requirements: inferring them loads each model in a child interpreter (seconds).
    requirements = ["mlflow", "tensorflow-cpu"]
    mlflow.tensorflow.save_model(
        network, paths["tensorflow"], signature=signature, pip_requirements=requirements
    )
    mlflow.keras.save_model(
        network, paths["keras"], signature=signature, pip_requirements=requirements
    )
    mlflow.tensorflow.save_model(
        network, paths["tf-no-signature"], signature=False, pip_requirements=requirements
    )
    return {**paths, "rows": x}


@pytest.mark.integration
@pytest.mark.parametrize("flavor", ["tensorflow", "keras"])
def test_a_keras_network_logged_with_its_flavor_gets_the_fast_path(keras_flavor_models, flavor):
    loaded = load_model(keras_flavor_models[flavor])
    assert loaded.fast is not None, loaded.fast_path_note
    assert loaded.flavor == flavor
    assert f"{flavor} flavor, float32 [-1, 3] tensor" in loaded.fast_path_note
    assert loaded.fast.tensor_input and loaded.fast.output_layout == "nested"
    rows = keras_flavor_models["rows"]
    reference = np.asarray(loaded.pyfunc.predict(rows)).reshape(-1)
    np.testing.assert_allclose(loaded.fast.predict(rows), reference, rtol=0, atol=1e-5)
    assert loaded.describe()["serving_path"] == "keras-fast-path"


@pytest.mark.integration
def test_a_keras_flavor_without_a_signature_is_served_by_its_pyfunc_and_says_why(
    keras_flavor_models,
):
    loaded = load_model(keras_flavor_models["tf-no-signature"])
    assert loaded.fast is None
    assert loaded.fast_path_note == "tensorflow flavor without a signature (input width unknown)"
    assert loaded.describe()["serving_path"] == "pyfunc"
