"""A Keras network as one frozen TensorFlow graph, called directly: the fast path's engine
(``serving.server.loader`` decides when it applies). No DataFrame, no schema enforcement pass,
no ``keras.Model.predict``; ``threads`` sizes the op pool (default 1: for small requests a
hand-off to a pool costs more than it saves; scale out with processes). TensorFlow is imported
only when a network is wrapped.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from serving.server.compat import direct_callable, freeze

log = logging.getLogger(__name__)


class KerasFastPath:
    """One concrete TensorFlow function over the Keras network: float32 rows in, float64 out.

    The function (``model(x, training=False)`` traced once for ``float32 [None, n_features]``)
    is frozen (variables become constants) and run by a ``tf.compat.v1.Session`` in the calling
    thread, with graph rewriting switched off: the same kernels compute the same numbers
    (checked bit for bit against the function at load), while a one-row call costs a small
    fraction of eager dispatch, and the GIL is released while the graph runs.
    Two things cut the per-call cost further without changing a bit: the frozen graph is
    slimmed (``Identity``/``NoOp`` nodes dropped, constant subexpressions such as the
    normalization's ``sqrt(variance)`` computed once, by the same kernels; about a third fewer
    nodes to run per call), and it is called through ``Session::MakeCallable`` (feeds, fetches
    and executor resolved once). Per-call figures, in a tight loop and inside a busy server
    where the caches are cold, are in docs/benchmarks.md. ``engine="function"`` calls the
    concrete function itself (also the fallback whenever the graph cannot be frozen or does not
    reproduce the function exactly).
    """

    def __init__(
        self, keras_model: Any, feature_columns: list[str], output_name: str, *,
        engine: str = "session", threads: int = 1, tensor_input: bool = False,
    ) -> None:  # fmt: skip
        """``keras_model``: a ``.keras`` file or a loaded ``keras.Model``. ``tensor_input``:
        the model takes one unnamed tensor (the keras/tensorflow flavors): requests send rows
        by position, and the answer is laid out as the network's output (``[[v], ...]`` for
        ``(None, 1)``, ``[v, ...]`` for ``(None,)``), as MLflow's scoring server writes it;
        otherwise named columns in, ``[{output_name: v}, ...]`` out."""
        import tensorflow as tf

        if isinstance(keras_model, str | os.PathLike):
            import keras

            model = keras.saving.load_model(keras_model, compile=False)
        else:
            model = keras_model
        try:
            input_shape = tuple(model.input_shape)
            output_shape = tuple(model.output_shape)
        except (AttributeError, ValueError) as exc:
            raise ValueError(f"the network has no single fixed input/output: {exc}") from exc
        if len(input_shape) != 2 or input_shape[1] != len(feature_columns):
            has = f"the model has {len(feature_columns)} feature columns"
            raise ValueError(f"the network takes input shape {input_shape}, but {has}")
        if output_shape not in ((None, 1), (None,)):
            raise ValueError(f"the network's output shape {output_shape} is not one value")
        n_features = len(feature_columns)
        self.tensor_input = tensor_input
        # How the scoring server lays out the answer: "records" [{name: v}], "nested" [[v]],
        # "flat" [v].
        nested = output_shape == (None, 1)
        self.output_layout = ("nested" if nested else "flat") if tensor_input else "records"

        @tf.function(input_signature=[tf.TensorSpec(shape=[None, n_features], dtype=tf.float32)])
        def forward(features):
            return model(features, training=False)

        self._model = model  # keeps the variables alive for the traced graph
        self._forward = forward.get_concrete_function()
        self._tf = tf
        self.feature_columns = list(feature_columns)
        self.n_features = n_features
        self.output_name = output_name
        self.engine = "function"
        self._call = self._call_function
        if engine == "session":
            try:
                self._call = self._session_callable(threads)
                self.engine = "session"
            except Exception as exc:  # e.g. ops that cannot be frozen: the function still works
                log.warning("frozen-graph session unavailable, calling the function: %s", exc)

    def _call_function(self, rows: np.ndarray) -> np.ndarray:
        return self._forward(self._tf.constant(rows, dtype=self._tf.float32)).numpy()

    def _session_callable(self, threads: int):
        tf = self._tf
        frozen = freeze(self._forward)
        graph_def = frozen.graph.as_graph_def()
        feed_name, fetch_name = frozen.inputs[0].name, frozen.outputs[0].name
        session = _graph_session(tf, graph_def, threads)
        try:
            # Fewer nodes per call: identities dropped, constant subexpressions computed once
            # (by this session, so with the very same kernels). Checked below, like the rest.
            slim_def, slim_fetch = _slim_graph(tf, session, graph_def, fetch_name)
            slim = _graph_session(tf, slim_def, threads)
            run = direct_callable(slim, feed_name, slim_fetch)
            self._check_same(run)
            self._tf_session = slim
            session.close()
            return run
        except Exception as exc:
            log.info("slimmed graph unavailable (%s): running the frozen graph as is", exc)
        self._tf_session = session
        try:
            run = direct_callable(session, feed_name, fetch_name)
            self._check_same(run)
        except Exception as exc:
            log.info("direct session call unavailable (%s): using Session.run", exc)
            tensor = session.graph.get_tensor_by_name
            run = session.make_callable(tensor(fetch_name), feed_list=[tensor(feed_name)])
            self._check_same(run)
        return run

    def _check_same(self, run) -> None:
        grid = np.linspace(-3.0, 3.0, 3 * self.n_features, dtype=np.float32)
        spread = np.random.default_rng(0).normal(scale=50.0, size=(64, self.n_features))
        spread = spread.astype(np.float32)
        for probe in (grid.reshape(3, self.n_features), spread, spread[:1]):
            if not np.array_equal(np.asarray(run(probe)), self._call_function(probe)):
                raise RuntimeError("the frozen graph does not reproduce the function")

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """``rows``: float32, shape (n, n_features). Returns float64, shape (n,)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        return np.asarray(self._call(rows)).reshape(-1).astype(np.float64)


def _graph_session(tf, graph_def, threads: int):
    """A session over ``graph_def`` that runs it as it is, in the calling thread."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    # inter_op < 0: the graph runs in the calling thread, no hand-off to a pool thread
    # (the hand-off more than doubles a one-row call; docs/benchmarks.md).
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=max(threads, 0), inter_op_parallelism_threads=-1
    )
    # No graph rewriting (constant folding, op fusion): the same kernels as the function,
    # hence the same floating-point results.
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    options = config.graph_options.optimizer_options
    options.opt_level = tf.compat.v1.OptimizerOptions.L0
    options.do_constant_folding = False
    options.do_function_inlining = False
    return tf.compat.v1.Session(graph=graph, config=config)


def _slim_graph(tf, session, graph_def, fetch_name: str):
    """``graph_def`` minus what costs time per call without changing a single bit.

    Only for graphs of stateless ops (where control edges cannot matter): ``Identity`` and
    ``NoOp`` nodes are dropped (their consumers read the identity's input), and every node
    that only depends on constants becomes a constant holding the value ``session`` computes
    for it (the kernels that would compute it on every call). Returns (graph_def, fetch name).
    """
    graph = session.graph
    nodes = list(graph_def.node)
    if any(graph.get_operation_by_name(n.name).op_def.is_stateful for n in nodes):
        raise ValueError("the graph has stateful ops")

    def data_inputs(node) -> list[str]:
        return [i for i in node.input if not i.startswith("^")]

    alias = {}
    for node in nodes:
        if node.op == "Identity":
            (source,) = data_inputs(node)
            alias[node.name] = source

    def resolve(name: str) -> str:
        while name.split(":")[0] in alias:
            name = alias[name.split(":")[0]]
        return name

    constant = {n.name for n in nodes if n.op == "Const"}
    folded: list[str] = []
    for node in nodes:  # GraphDefs list nodes in topological order (import order)
        if node.op in ("Const", "Placeholder", "NoOp") or node.name in alias:
            continue
        sources = [resolve(i) for i in data_inputs(node)]
        if sources and all(s.split(":")[0] in constant for s in sources):
            if len(graph.get_operation_by_name(node.name).outputs) != 1:
                continue
            constant.add(node.name)
            folded.append(node.name)
    values = dict(zip(folded, session.run([f"{n}:0" for n in folded]), strict=True))

    slim = type(graph_def)()
    slim.versions.CopyFrom(graph_def.versions)
    slim.library.CopyFrom(graph_def.library)
    for node in nodes:
        if node.op == "NoOp" or node.name in alias:
            continue
        out = slim.node.add()
        if node.name in values:
            value = np.asarray(values[node.name])
            out.name = node.name
            out.op = "Const"
            out.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
            out.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
            continue
        out.CopyFrom(node)
        del out.input[:]
        out.input.extend(resolve(i) for i in data_inputs(node))
    fetch = resolve(fetch_name)
    if ":" not in fetch:
        fetch += ":0"
    return slim, fetch


def configure_tensorflow(threads: int) -> None:
    """TensorFlow's thread pools (``threads`` > 0) and quiet C++ logs, before a model loads."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError as exc:  # the TF runtime was initialised already
            log.info("TensorFlow thread pools already set up: %s", exc)
