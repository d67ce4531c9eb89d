# The slim model server: `python -m serving.server` without TensorFlow or Keras.
#
# It serves models logged with a LiteRT artifact (ml/export.py; every model ml.train logs has
# one unless its conversion failed) through the LiteRT runtime (serving/server/slim.py). A
# model without one cannot load here (its pyfunc needs TensorFlow): serve it with the full
# image (docker/serving.Dockerfile). Same contract as the full image otherwise:
#
#   podman run -p 8080:8080 \
#     -e SERVING_MODEL_URI=models:/regression-model/3 \
#     -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#     train-and-deploy/serving-slim:latest
#
# Build it with scripts/build_images.sh, which stages this context offline (no registry or
# package index is reachable from these builds): requirements.txt (the lock), wheels/ (the
# wheelhouse), tools/uv, and serving/server/ (the model server package, nothing else of the
# repository). See docs/containers.md.
#
# No pyarrow either (~130 MB): Parquet request bodies get MLflow's 400 here, JSON and CSV work.
#
# Layers, slowest-changing first: base (Debian bookworm + python3.11) → user → dependencies
# (keyed by the lock file only) → code. A code change rebuilds the last two small layers.
# Runs as uid 10001 and writes only to /tmp, so it works with a read-only root filesystem
# (Kubernetes readOnlyRootFilesystem + an emptyDir on /tmp; `podman run --read-only`).

ARG BASE_IMAGE=localhost/train-and-deploy/base:latest
FROM ${BASE_IMAGE}

ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    TF_CPP_MIN_LOG_LEVEL=2

# Numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin app

# -- dependencies: rebuilt only when the lock changes ---------------------------------------
# The wheelhouse and uv are bind-mounted, so neither ends up in a layer. Then, trimmed: C
# headers and the test suites of numpy/pandas. Bytecode is written only for the modules serving
# imports (a read-only root cannot cache it at run time).
COPY requirements.txt /opt/requirements.txt
RUN --mount=type=bind,source=wheels,target=/wheels \
    --mount=type=bind,source=tools,target=/tools \
    /tools/uv venv --quiet --no-python-downloads --python 3.11 /opt/venv \
    && /tools/uv pip install --quiet --no-cache --offline --no-index --find-links /wheels \
        --python /opt/venv/bin/python --requirement /opt/requirements.txt \
    && cd /opt/venv/lib/python3.11/site-packages \
    && rm -rf numpy/_core/include pandas/tests numpy/tests numpy/*/tests \
    && echo /opt/app >train_and_deploy.pth \
    && PYTHONDONTWRITEBYTECODE= python -c "if True: \
        import numpy, pandas, pandas.core.methods.to_dict, ai_edge_litert.interpreter; \
        import prometheus_client, prometheus_client.multiprocess, prometheus_client.asgi; \
        import prometheus_client.openmetrics.exposition, prometheus_client.gc_collector; \
        import prometheus_client.platform_collector, prometheus_client.process_collector; \
        import mlflow, mlflow.pyfunc, mlflow.models, mlflow.artifacts, mlflow.tracking; \
        import mlflow.pyfunc.scoring_server; \
        from mlflow.store.artifact import models_artifact_repo, http_artifact_repo; \
        from mlflow.store.artifact import runs_artifact_repo, mlflow_artifacts_repo; \
        import uvicorn, uvicorn.loops.uvloop, uvicorn.protocols.http.httptools_impl; \
        import uvicorn.protocols.http.h11_impl, uvicorn.lifespan.on" \
    && ! python -c "import tensorflow" 2>/dev/null \
    && ! python -c "import keras" 2>/dev/null

# -- code ------------------------------------------------------------------------------------
# /opt/app is on the venv's path (the .pth above): the packages import from any working dir.
# Only the server package: a test fails if it imports anything outside its own dependencies.
COPY serving /opt/app/serving
RUN python -m compileall -q /opt/app \
    && python -c "import serving.server.__main__, serving.server.app, serving.server.slim"

ARG GIT_SHA=unknown
ENV GIT_SHA=${GIT_SHA}
LABEL io.train-and-deploy.image="serving-slim" \
      org.opencontainers.image.title="train-and-deploy serving (slim)" \
      org.opencontainers.image.description="MLflow scoring protocol model server, LiteRT, no TensorFlow" \
      org.opencontainers.image.revision="${GIT_SHA}"

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# /ping answers 200 only after the model is loaded and a warm-up prediction succeeded. The
# check reads the server's own --host/--port from its command line (a later --port given to
# `podman run` wins, as it does for argparse), so it never probes some other process's port.
# The start period covers the model download + MLflow import. (Kubernetes ignores
# HEALTHCHECK: the Deployment has its own readiness/liveness probes on /ping.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 CMD ["python", "-c", \
    "import glob, urllib.request\nhost, port = '127.0.0.1', '8080'\nfor path in glob.glob('/proc/[0-9]*/cmdline'):\n    try:\n        argv = open(path, 'rb').read().decode().split('\\0')\n    except OSError:\n        continue\n    if 'serving.server' not in argv:\n        continue\n    for flag, value in zip(argv, argv[1:]):\n        if flag == '--port':\n            port = value\n        elif flag == '--host' and value not in ('0.0.0.0', '::', ''):\n            host = value\n    break\nurllib.request.urlopen(f'http://{host}:{port}/ping', timeout=2)\n"]
# Model URI: $SERVING_MODEL_URI (or --model-uri); registry: $MLFLOW_TRACKING_URI.
# Extra arguments are appended (`... --workers 2`); a later --port/--host overrides these.
ENTRYPOINT ["python", "-m", "serving.server", "--host", "0.0.0.0", "--port", "8080"]
