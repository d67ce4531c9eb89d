"""The benchmarked models: the project's regressor, its tensorflow-flavor copy, a Ridge."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

CHECK_ROWS = 16


def prepare_models(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train+register (or reuse) the pyfunc version; log+register the tensorflow-flavor copy."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow
    import numpy as np
    import pandas as pd

    tracking_uri = args.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if not args.tracking_uri:
        os.chdir(workdir)  # a SQLite store keeps artifacts under ./mlruns

    from datetime import date, timedelta

    from ml.schema import SYNTHETIC_FEATURES
    from ml.settings import DataSettings, TrainingSettings
    from ml.synthetic import synthetic_partition

    data_settings = DataSettings()
    days = [date(2024, 3, 1) + timedelta(days=i) for i in range(7)]
    frame = pd.concat([synthetic_partition(d, data_settings) for d in days], ignore_index=True)
    target = data_settings.target_column

    client = mlflow.MlflowClient()
    if args.model_name:
        name, version = args.model_name, str(args.model_version)
        pyfunc_uri = f"models:/{name}/{version}"
        meta = mlflow.models.Model.load(pyfunc_uri)
        columns = meta.signature.inputs.input_names()
    else:
        from ml.train import train_model

        result = train_model(
            frame,
            SYNTHETIC_FEATURES,
            target,
            TrainingSettings(epochs=args.epochs),
            experiment_name="bench-serving",
            run_name="bench-serving",
        )
        name = "bench-regressor"
        version = str(mlflow.register_model(result.model_uri, name).version)
        pyfunc_uri = f"models:/{name}/{version}"
        columns = list(SYNTHETIC_FEATURES)

    # The tensorflow-flavor copy of the very same network.
    import keras
    from mlflow.models import infer_signature

    local = Path(mlflow.artifacts.download_artifacts(pyfunc_uri, dst_path=str(workdir / "pyfunc")))
    conf = mlflow.models.Model.load(str(local)).flavors["python_function"]
    network = keras.saving.load_model(
        local / conf["artifacts"]["keras_model"]["path"], compile=False
    )
    sample = frame[columns].head(5).to_numpy("float32")
    mlflow.set_experiment("bench-serving")
    with mlflow.start_run(run_name="bench-serving-tensorflow-flavor"):
        tf_info = mlflow.tensorflow.log_model(
            network,
            name="model",
            signature=infer_signature(sample, np.asarray(network(sample))),
            input_example=sample,
        )
    tf_name = f"{name}-tensorflow-flavor"
    tf_version = str(mlflow.register_model(tf_info.model_uri, tf_name).version)
    del client

    # A scikit-learn pyfunc on the same columns (no fast path: micro-batched pyfunc.predict).
    from sklearn.linear_model import Ridge

    regression = Ridge().fit(frame[columns], frame[target])
    with mlflow.start_run(run_name="bench-serving-sklearn"):
        sk_info = mlflow.sklearn.log_model(
            regression,
            name="model",
            signature=infer_signature(frame[columns], regression.predict(frame[columns])),
            input_example=frame[columns].head(3),
        )
    sk_name = f"{name}-sklearn"
    sk_version = str(mlflow.register_model(sk_info.model_uri, sk_name).version)

    rows = frame[columns].sample(n=CHECK_ROWS, random_state=7).to_numpy("float64").tolist()
    return {
        "tracking_uri": tracking_uri,
        "pyfunc_uri": pyfunc_uri,
        "tf_uri": f"models:/{tf_name}/{tf_version}",
        "sklearn_uri": f"models:/{sk_name}/{sk_version}",
        "columns": columns,
        "check_rows": rows,
        "payload_row": rows[0],
    }
