"""Every private MLflow and TensorFlow API the server uses (a leading underscore, or an
unpublished module such as ``tensorflow.python.*``), reached from this one module, each only
where no public API does the same (each function says why). :data:`PRIVATE_APIS` lists them;
``tests/serving/server/test_compat.py`` checks each still exists and takes these arguments,
failing with the library's version and the symbol, and fails when another server module
reaches a private name. Imports stay inside the functions (TensorFlow only for Keras models).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrivateApi:
    """One private symbol, as the test checks it."""

    library: str  # "mlflow" or "tensorflow": the package whose version an error names
    module: str
    name: str  # attribute path in the module: "BaseSession._extend_graph"
    # The leading parameters the call here passes, in order; None: not called here.
    parameters: tuple[str, ...] | None
    # Attributes used on it (fields of a message class, an instance's attributes).
    members: tuple[str, ...] = ()
    # True: ``members`` exist on instances only (set by ``__init__``, message fields): the test
    # checks them on one made without arguments.
    instance_members: bool = False


_SCORING_SERVER = "mlflow.pyfunc.scoring_server"
_SESSION = "tensorflow.python.client.session"
_TF_C_API = "tensorflow.python.client.pywrap_tf_session"

PRIVATE_APIS = (
    PrivateApi("mlflow", _SCORING_SERVER, "_parse_json_data", ("data", "metadata", "input_schema")),
    PrivateApi("mlflow", "mlflow.environment_variables", "_MLFLOW_IS_IN_SERVING_ENVIRONMENT",
               None, members=("name",)),
    PrivateApi("tensorflow", "tensorflow.python.framework.convert_to_constants",
               "convert_variables_to_constants_v2", ("func",)),
    PrivateApi("tensorflow", _SESSION, "BaseSession._extend_graph", ("self",)),
    PrivateApi("tensorflow", _SESSION, "BaseSession", None, members=("_session",),
               instance_members=True),
    PrivateApi("tensorflow", "tensorflow.core.protobuf.config_pb2", "CallableOptions", None,
               members=("feed", "fetch"), instance_members=True),
    PrivateApi("tensorflow", _TF_C_API, "TF_NewBufferFromString", ("arg0",)),
    PrivateApi("tensorflow", _TF_C_API, "TF_DeleteBuffer", ("arg0",)),
    PrivateApi("tensorflow", _TF_C_API, "TF_SessionMakeCallable", ("arg0", "arg1")),
    PrivateApi("tensorflow", _TF_C_API, "TF_SessionRunCallable", ("arg0", "arg1", "arg2", "arg3")),
)  # fmt: skip


# -- MLflow --------------------------------------------------------------------------------------


def parse_json_data(decoded: Any, metadata: Any, schema: Any) -> tuple[Any, Any, bool]:
    """A decoded JSON request as ``mlflow.pyfunc.scoring_server.invocations`` parses it:
    ``(data, params, is_unified_llm_input)``.

    Why private: the scoring server's public entry points (``invocations``,
    ``infer_and_parse_data``) either take the raw body (a second decode of a body the server
    has decoded already) or leave out the ``params`` split and the unified-LLM and type-hint
    cases. ``_parse_json_data`` is what ``invocations`` itself calls on the decoded body.
    Note that it takes ``params`` out of ``decoded`` (``dict.pop``).
    """
    from mlflow.pyfunc import scoring_server

    parsed = scoring_server._parse_json_data(decoded, metadata, schema)
    return parsed.data, parsed.params, parsed.is_unified_llm_input


def mark_serving_environment() -> None:
    """Tell the model it is served, as ``mlflow models serve`` does at start.

    Why private: MLflow has no public switch for it. Its scoring server sets this variable in
    ``scoring_server.init``, and MLflow reads it for pyfuncs with type hints: when served, a
    value for a plain type hint (``int``, ``datetime``, ...) is first converted from its JSON
    form (``mlflow.types.type_hints``), where outside serving it must already have that type.
    """
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT

    os.environ[_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name] = "true"


# -- TensorFlow ----------------------------------------------------------------------------------


def freeze(concrete_function: Any) -> Any:
    """``concrete_function`` with its variables turned into constants (its graph frozen).

    Why private: TensorFlow 2 publishes no way to freeze a concrete function
    (``tf.compat.v1.graph_util.convert_variables_to_constants`` needs a v1 session that holds
    the variables); this is the function TensorFlow's own exporters call.
    """
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    return convert_variables_to_constants_v2(concrete_function)


def direct_callable(session: Any, feed_name: str, fetch_name: str) -> Any:
    """``rows -> output`` of ``session``'s graph through the C++ ``Session::MakeCallable`` API:
    feeds, fetches and the executor are resolved once, not on every call.

    Why private: the public ``Session.make_callable`` with a feed list runs every call through
    ``Session.run`` and its Python bookkeeping (~11 us instead of ~9 us per one-row call,
    docs/benchmarks.md); ``Session._make_callable_from_options`` is private as well. This is
    what that method does (the graph extended into the C++ session, a callable made from
    ``CallableOptions``), called without the Python wrapper around each run.
    """
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.client import pywrap_tf_session as c_api

    session._extend_graph()
    options = config_pb2.CallableOptions()
    options.feed.append(feed_name)
    options.fetch.append(fetch_name)
    buffer = c_api.TF_NewBufferFromString(options.SerializeToString())
    try:
        handle = c_api.TF_SessionMakeCallable(session._session, buffer)
    finally:
        c_api.TF_DeleteBuffer(buffer)
    # Never released: the session lives as long as the process.
    raw = session._session
    run_callable = c_api.TF_SessionRunCallable

    def run(rows: Any) -> Any:
        return run_callable(raw, handle, [rows], None)[0]

    return run
