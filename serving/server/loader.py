"""Load an MLflow model for serving, with a fast inference path for Keras models.

Any pyfunc URI loads (``models:/name/version``, ``@alias``, ``/latest``, ``models:/<model id>``,
``runs:/``, a local path). A registry URI is resolved to one version once, and that pinned
version is downloaded and reported: an alias moving later cannot make the server lie.

:func:`choose_fast_path` alone decides the path. The fast path takes the project's Keras pyfunc
(``ml.train``: ``keras_pyfunc.py``, ``KerasRegressor``, a ``keras_model`` artifact, numeric
named columns, one output) and Keras networks logged with ``mlflow.tensorflow`` (``model_type:
keras``) or ``mlflow.keras`` (not ``save_exported_model``) whose signature is one unnamed
``float32 [-1, n]`` tensor (what MLflow feeds ``predict``; the network is ``get_raw_model``).
It runs as a frozen TensorFlow graph (``keras_fast``) or, with a LiteRT artifact, without
TensorFlow (``slim``), once ``warmup`` saw it answer as the pyfunc does. Every other model goes
through its pyfunc (micro-batched where safe: ``pyfunc_batching``). TensorFlow is imported only
for Keras/TensorFlow models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.server.contract import (
    DRIFT_PROFILE_ARTIFACT,
    KERAS_ARTIFACT_KEY,
    KERAS_CODE_FILE,
    KERAS_PYTHON_MODEL_CLASS,
    is_numeric_column,
)
from serving.server.keras_fast import KerasFastPath, configure_tensorflow
from serving.server.slim import SlimUnavailable, load_slim

log = logging.getLogger(__name__)

CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"
# Same knob as `mlflow models serve`: a JSON model_config override for the pyfunc.
SERVING_MODEL_CONFIG_ENV = "SERVING_MODEL_CONFIG"


class ModelLoadError(RuntimeError):
    """The model could not be resolved, downloaded or loaded."""


@dataclass(frozen=True)
class ModelIdentity:
    """What is being served: the URI asked for, and the registry version it resolved to."""

    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    model_id: str | None = None
    download_uri: str = ""

    def to_dict(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in ("name", "version", "uri", "run_id", "model_id")}


@dataclass
class LoadedModel:
    identity: ModelIdentity
    local_path: str
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel
    flavor: str
    fast: KerasFastPath | None
    fast_path_note: str
    load_seconds: float = 0.0
    # Set at warm-up (serving.server.warmup): whether concurrent pyfunc requests share one
    # predict call, and why (not).
    batched_pyfunc: bool = False
    batching_note: str = "not checked"
    # One pyfunc.predict on the input example, timed at warm-up (None: not measured).
    predict_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metadata(self):
        return self.pyfunc.metadata

    @property
    def input_schema(self):
        return self.pyfunc.metadata.get_input_schema()

    @property
    def has_params_schema(self) -> bool:
        return self.pyfunc.metadata.get_params_schema() is not None

    def serving_input_example(self) -> str | None:
        """The logged serving payload (``serving_input_example.json``), if the model has one."""
        rel = (self.metadata.saved_input_example_info or {}).get("serving_input_path")
        try:
            return (Path(self.local_path) / rel).read_text() if rel else None
        except OSError:
            return None

    @property
    def serving_path(self) -> str:
        """``keras-fast-path``, ``pyfunc-batched`` or ``pyfunc``."""
        if self.fast is not None:
            return "keras-fast-path"
        return "pyfunc-batched" if self.batched_pyfunc else "pyfunc"

    def describe(self) -> dict[str, Any]:
        return {
            **self.identity.to_dict(),
            "flavor": self.flavor,
            "fast_path": self.fast is not None,
            "fast_path_note": self.fast_path_note,
            "serving_path": self.serving_path,
            "pyfunc_batching": self.batched_pyfunc,
            "pyfunc_batching_note": self.batching_note,
            "load_seconds": round(self.load_seconds, 3),
        }


def resolve_identity(uri: str) -> ModelIdentity:
    """Pin a model URI: registry URIs resolve (alias, stage, latest) to one version."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version, is_models_uri

    if is_models_uri(uri):
        from mlflow import MlflowClient

        client = MlflowClient()
        # (model_id,) for models:/<model id>, else (name, version) with an alias, a stage or
        # "latest" resolved; an improper URI raises MlflowException.
        resolved = get_model_name_and_version(client, uri)
        if len(resolved) == 1:
            (model_id,) = resolved
            run_id = getattr(client.get_logged_model(model_id), "source_run_id", None)
            return ModelIdentity(uri, run_id=run_id, model_id=model_id, download_uri=uri)
        name, version = resolved
        mv = client.get_model_version(name, version)
        return ModelIdentity(uri, name, str(version), mv.run_id, getattr(mv, "model_id", None),
                             download_uri=f"models:/{name}/{version}")  # fmt: skip
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/") :].split("/", 1)[0] or None
        return ModelIdentity(uri=uri, run_id=run_id, download_uri=uri)
    return ModelIdentity(uri=uri, download_uri=uri)


def load_drift_profile(identity: ModelIdentity) -> dict[str, Any] | None:
    """The drift profile logged with the model's training run (``drift/profile.json``), for
    the histogram buckets; None when the model has no run, the run has no profile, or it
    cannot be read (then the server uses generic buckets: never an error)."""
    if not identity.run_id:
        return None
    folder, _, _ = DRIFT_PROFILE_ARTIFACT.rpartition("/")
    try:
        from mlflow import MlflowClient
        from mlflow.artifacts import load_dict

        logged = {a.path for a in MlflowClient().list_artifacts(identity.run_id, folder)}
        if DRIFT_PROFILE_ARTIFACT not in logged:
            log.info("run %s has no %s: generic histogram buckets", identity.run_id,
                     DRIFT_PROFILE_ARTIFACT)  # fmt: skip
            return None
        profile = load_dict(f"runs:/{identity.run_id}/{DRIFT_PROFILE_ARTIFACT}")
    except Exception as exc:
        log.warning("cannot read the drift profile of run %s (%s): generic histogram buckets",
                    identity.run_id, exc)  # fmt: skip
        return None
    return profile if isinstance(profile, dict) else None


def load_model(
    uri: str, *, fast_path=True, tf_threads: int = 1, engine: str = "session", slim=True
) -> LoadedModel:
    """Resolve, download and load ``uri``; build the Keras fast path when it applies.

    With ``slim`` (and ``fast_path``), a model logged with a LiteRT artifact is served by the
    LiteRT runtime when it is installed and reproduces the artifact's check predictions
    (``serving.server.slim``): TensorFlow is then never imported. Otherwise the paths below.
    """
    started = time.monotonic()
    try:
        import mlflow
        from mlflow.models import Model

        identity = resolve_identity(uri)
        local_path = mlflow.artifacts.download_artifacts(artifact_uri=identity.download_uri)
        meta = Model.load(local_path)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot resolve or download {uri}: {exc}") from exc

    if identity.model_id is None and getattr(meta, "model_id", None):
        identity = dataclasses.replace(identity, model_id=meta.model_id)
    flavors = meta.flavors or {}
    flavor = _flavor_name(flavors, flavors.get("python_function") or {})
    if fast_path and slim:
        try:
            served = load_slim(local_path, meta, threads=tf_threads)
        except SlimUnavailable as exc:
            log.info("slim path not used for %s: %s", uri, exc)
        else:
            log.info("serving %s through the slim path: %s", uri, served.note)
            # served.path has the fast path's predict() interface.
            return LoadedModel(identity, local_path, served.pyfunc, flavor, served.path,
                               served.note, time.monotonic() - started)  # fmt: skip
    plan, why_not = choose_fast_path(meta) if fast_path else (None, "disabled")
    if plan is not None or {"keras", "tensorflow"} & set(flavors):
        configure_tensorflow(tf_threads)
    config_json = os.environ.get(SERVING_MODEL_CONFIG_ENV)
    extra_kwargs = {"model_config": json.loads(config_json)} if config_json else {}
    try:
        pyfunc = mlflow.pyfunc.load_model(local_path, **extra_kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {uri} as an MLflow pyfunc: {exc}") from exc
    fast = None
    if plan is not None:
        fast, why_not = _build_fast_path(plan, pyfunc, local_path, engine, tf_threads)
        if fast is None:
            log.warning("fast path unavailable for %s: %s", uri, why_not)
    return LoadedModel(
        identity, local_path, pyfunc, flavor, fast, why_not, time.monotonic() - started
    )


@dataclass(frozen=True)
class FastPathPlan:
    """What :func:`choose_fast_path` found: which network to wrap, and its input columns."""

    kind: str  # "project-pyfunc" (the .keras artifact) or "keras-flavor" (get_raw_model)
    feature_columns: list[str]
    output_name: str
    keras_file: str | None = None
    note: str = ""

    @property
    def tensor_input(self) -> bool:
        return self.kind == "keras-flavor"


def choose_fast_path(meta) -> tuple[FastPathPlan | None, str]:
    """The one place that decides whether a fast path serves ``meta`` (an MLmodel), and
    which: returns (plan, reason) or (None, why not). A new runtime adds its branch here."""
    plan, why_not = _keras_pyfunc_plan(meta)
    if plan is None and {"tensorflow", "keras"} & set(meta.flavors or {}):
        return _keras_flavor_plan(meta)
    return plan, why_not


def _keras_flavor_plan(meta) -> tuple[FastPathPlan | None, str]:
    """A network logged with ``mlflow.tensorflow`` / ``mlflow.keras``: eligible when it takes
    one unnamed ``float32 [-1, n]`` tensor (then the pyfunc feeds it a float32 matrix)."""
    flavors = meta.flavors or {}
    if "keras" in flavors:
        name, conf = "keras", flavors["keras"] or {}
        if conf.get("save_exported_model"):
            return None, "keras flavor saved as an exported model (no keras.Model to wrap)"
    else:
        name, conf = "tensorflow", flavors["tensorflow"] or {}
        if conf.get("model_type", "keras") != "keras":
            return None, f"tensorflow flavor of model_type {conf.get('model_type')!r}, not keras"
    signature = meta.signature
    if signature is None or signature.inputs is None:
        return None, f"{name} flavor without a signature (input width unknown)"
    if meta.get_params_schema() is not None:
        return None, "the model declares params"
    inputs = signature.inputs
    if not inputs.is_tensor_spec():
        return None, f"{name} flavor with a column signature"
    specs = inputs.inputs
    if len(specs) != 1 or specs[0].name is not None:
        return None, "the signature is not one unnamed tensor"
    spec = specs[0]
    shape = tuple(spec.shape)
    if np.dtype(spec.type) != np.float32:
        return None, f"the input tensor is {np.dtype(spec.type)}, not float32"
    if len(shape) != 2 or shape[0] != -1 or shape[1] < 1:
        return None, f"the input tensor's shape {list(shape)} is not [-1, n]"
    n = int(shape[1])
    note = f"{name} flavor, float32 [-1, {n}] tensor"
    return FastPathPlan("keras-flavor", [str(i) for i in range(n)], "0", note=note), "eligible"


def _build_fast_path(
    plan: FastPathPlan, pyfunc, local_path: str, engine: str, threads: int
) -> tuple[KerasFastPath | None, str]:
    """The fast path for ``plan`` over the loaded pyfunc, or (None, why not)."""
    if plan.kind == "project-pyfunc":
        cls = _python_model_class(pyfunc)
        if cls != KERAS_PYTHON_MODEL_CLASS:
            return None, f"python model class is {cls}, not {KERAS_PYTHON_MODEL_CLASS}"
        assert plan.keras_file is not None
        network: Any = str(Path(local_path) / plan.keras_file)
    else:
        try:
            network = pyfunc.get_raw_model()
        except Exception as exc:
            return None, f"the flavor's pyfunc gives no raw model: {exc}"
    try:
        fast = KerasFastPath(network, plan.feature_columns, plan.output_name, engine=engine,
                             threads=threads, tensor_input=plan.tensor_input)  # fmt: skip
    except Exception as exc:
        return None, f"fast path failed to build: {exc}"
    return fast, f"keras concrete function ({fast.engine}); {plan.note}"


def _keras_pyfunc_plan(meta) -> tuple[FastPathPlan | None, str]:
    """The fast path for ``meta`` when it is our Keras pyfunc; else (None, why not)."""
    conf = (meta.flavors or {}).get("python_function") or {}
    artifacts = conf.get("artifacts") or {}
    if KERAS_ARTIFACT_KEY not in artifacts:
        return None, f"no {KERAS_ARTIFACT_KEY!r} artifact"
    if conf.get("loader_module") != CODE_MODEL_LOADER:
        return None, "not a models-from-code pyfunc"
    if Path(str(conf.get("model_code_path") or "")).name != KERAS_CODE_FILE:
        return None, f"model code is not {KERAS_CODE_FILE}"
    signature = meta.signature
    if signature is None or signature.inputs is None or signature.outputs is None:
        return None, "no signature"
    inputs, outputs = signature.inputs, signature.outputs
    if inputs.is_tensor_spec() or not inputs.has_input_names():
        return None, "signature inputs are not named columns"
    specs = inputs.inputs
    if not all(is_numeric_column(s) and s.required for s in specs):
        return None, "signature inputs are not all required numeric columns"
    if outputs.is_tensor_spec() or not outputs.has_input_names() or len(outputs.inputs) != 1:
        return None, "signature output is not one named column"
    if meta.get_params_schema() is not None:
        return None, "the model declares params"
    names = inputs.input_names()
    config = conf.get("config") or conf.get("model_config") or {}
    features = list(config.get("feature_columns") or []) or names
    if sorted(features) != sorted(names) or len(set(features)) != len(features):
        return None, "model_config feature_columns differ from the signature inputs"
    keras_file = (artifacts[KERAS_ARTIFACT_KEY] or {}).get("path")
    if not keras_file:
        return None, "keras artifact has no path"
    output = outputs.input_names()[0]
    note = "the project's Keras pyfunc"
    return FastPathPlan("project-pyfunc", features, output, keras_file, note), "eligible"


def _python_model_class(pyfunc) -> str | None:
    try:
        return type(pyfunc.unwrap_python_model()).__name__
    except Exception:
        return None


def _flavor_name(flavors: dict[str, Any], pyfunc_conf: dict[str, Any]) -> str:
    others = sorted(f for f in flavors if f != "python_function")
    if others:
        return others[0]
    loader = pyfunc_conf.get("loader_module") or "python_function"
    if loader == CODE_MODEL_LOADER:
        code = Path(str(pyfunc_conf.get("model_code_path") or "")).name
        return f"pyfunc:{code}" if code else "pyfunc"
    return f"pyfunc:{loader}"
