"""The model server (``python -m serving.server``): MLflow's scoring protocol, faster, with
metrics. What the serving image contains, and nothing else: imports stop at numpy, MLflow's
pyfunc loader, uvicorn, orjson and TensorFlow for Keras models, never ``ml``,
``serving.deploy``, Airflow or the Kubernetes client (a test enforces it).

Routes (a client of ``mlflow models serve`` must not notice the switch):

- ``POST /invocations``  the scoring protocol (JSON in its four shapes with optional
  ``params``, CSV, Parquet), with MLflow's status codes and error JSON
- ``GET /ping``, ``GET /health``   200 once ready, 503 before (MLflow: 200 once loaded)
- ``GET /version``   the MLflow version, like MLflow
- ``GET /v1/model``  what is served: ``{name, version, uri, run_id, model_id, flavor, ...}``
- ``GET /metrics``   Prometheus text format (``prometheus_client``); with ``--workers N`` any
  worker answers for all of them (multiprocess mode: each worker keeps its numbers in files in
  ``$PROMETHEUS_MULTIPROC_DIR``)

Every response carries ``X-Model-Version`` when the model came from the registry, and every
``POST /invocations`` answer an ``X-Request-Id`` (the caller's, when it sent a sane one; else
a new one): the key a label is sent back with. With ``--payload-log-path`` and
``--payload-log-sample-percent``, that share of the answered requests is written, off the
request path, as daily partitions the pipeline reads (``serving.server.payload``). A request
that carries ``X-Live-Answer`` (a shadow's mirror of a live request, sent by the local front
proxy) also records, per row, how far this server's answer is from that one
(``model_server_shadow_abs_diff``); ``--profile-from MODEL_URI`` takes the histogram buckets
from another version's drift profile (a canary: the live version's).

Where this server deliberately differs from MLflow:

- bodies over ``--max-request-bytes`` get 413 (MLflow reads any size);
- a body must arrive whole within ``--body-timeout-s`` (default 10 s) of the first read, else
  408 and the connection is closed (MLflow sets no limit: a client sending less than its
  ``Content-Length`` holds a connection as long as it likes);
- with ``--strict`` (off by default; the Kubernetes Deployment turns it on), a column not in
  the model's input schema (MLflow drops it) and, in a numeric column, a value that is not a
  JSON number (MLflow turns ``true`` into 1.0, ``"2.5"`` into 2.5) are a 400 naming the
  column (``serving.server.strict``);
- error responses carry no ``stack_trace`` and never echo the request body or the parsed frame;
- ``NaN``/``Infinity`` literals (not JSON) are rejected with a clear 400, and for the Keras
  model missing or non-finite feature values too (MLflow answers ``NaN`` predictions, which is
  not valid JSON either);
- a request without a ``Content-Type`` gets 415 (MLflow fails with a 500);
- readiness waits for a warm-up prediction; SIGTERM drains in-flight requests; access logs are
  JSON lines on stdout, other logs JSON lines on stderr.

Modules, in the order a request meets them:

- ``__main__``: the command line; ``config``: the settings; ``runner``: uvicorn, workers,
  signals; ``app``: the ASGI app (routes, the request path, start and shutdown);
- ``body``: reading a body under a size limit and a deadline; ``jsoncodec``: orjson (or
  ``json``), one decode per body; ``strict``: strict mode; ``protocol``: the common JSON shapes
  read straight into rows, and answers laid out as MLflow's;
- ``batching``: the micro-batcher; ``pyfunc_batching``: micro-batching for any pyfunc;
  ``reference``: MLflow's parsing and ``PyFuncModel.predict``; ``replies``: replies and
  MLflow's error shapes;
- ``loader``: resolving, downloading and loading a model, and which path serves it;
  ``keras_fast``: a Keras network as one frozen TensorFlow graph; ``slim``: the LiteRT artifact
  without TensorFlow; ``warmup``: the check at load that the fast path answers like the pyfunc;
- ``records``: what the request path records, made into metric updates and access-log lines in
  batches; ``metrics`` and ``distributions``: Prometheus metrics; ``shadow``: a shadow's
  paired differences from the live answer its mirrored requests carry; ``logs``: JSON logs and
  the access log; ``payload``: the payload log;
- ``compat``: every private MLflow and TensorFlow API the server uses; ``contract``: what the
  pipeline and the server agree on.
"""
