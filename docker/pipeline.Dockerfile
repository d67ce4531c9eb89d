# The pipeline image: what KubernetesPodOperator pods run (`python -m ml train|evaluate|...`,
# `python -m serving.deploy rollout|verify`). The project's dependencies without Airflow: the pods
# run pipeline steps, not the scheduler. Commands come from the pod spec
# (serving.deploy.pods.rollout_pod_kwargs sets cmds/arguments); the default CMD prints help.
#
# Build it with `scripts/build_images.sh pipeline` (stages this context offline, like the
# serving image; see docs/containers.md). Same base, user, layer order and read-only-root
# friendliness as docker/serving.Dockerfile.

ARG BASE_IMAGE=localhost/train-and-deploy/base:latest
FROM ${BASE_IMAGE}

ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    KERAS_HOME=/tmp/.keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    MPLBACKEND=Agg \
    TF_CPP_MIN_LOG_LEVEL=2

RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin app

# -- dependencies: rebuilt only when the lock changes (see serving.Dockerfile for the trims) ----
COPY requirements.txt /opt/requirements.txt
RUN --mount=type=bind,source=wheels,target=/wheels \
    --mount=type=bind,source=tools,target=/tools \
    /tools/uv venv --quiet --no-python-downloads --python 3.11 /opt/venv \
    && /tools/uv pip install --quiet --no-cache --offline --no-index --find-links /wheels \
        --python /opt/venv/bin/python --requirement /opt/requirements.txt \
    && /tools/uv pip uninstall --quiet --python /opt/venv/bin/python libclang \
    && cd /opt/venv/lib/python3.11/site-packages \
    && rm -rf tensorflow/include pyarrow/include numpy/_core/include \
        pandas/tests pyarrow/tests h5py/tests numpy/tests numpy/*/tests \
        matplotlib/tests scipy/*/tests sklearn/*/tests \
    && echo /opt/app >train_and_deploy.pth \
    && PYTHONDONTWRITEBYTECODE= python -c "if True: \
        import numpy, pandas, pyarrow.parquet, fsspec, pydantic, pydantic_settings, httpx; \
        import tensorflow, keras, matplotlib.figure, matplotlib.backends.backend_agg; \
        import mlflow, mlflow.pyfunc, mlflow.models, mlflow.data, mlflow.tracking; \
        import mlflow.pyfunc.loaders.code_model, kubernetes.client"

# -- code ------------------------------------------------------------------------------------
COPY ml /opt/app/ml
COPY serving /opt/app/serving
RUN python -m compileall -q /opt/app \
    && python -c "import ml.__main__, ml.train, ml.evaluate, ml.registry, serving.deploy.__main__"

ARG GIT_SHA=unknown
# ml.train records GIT_SHA as the code version (no .git in the image).
ENV GIT_SHA=${GIT_SHA}
LABEL io.train-and-deploy.image="pipeline" \
      org.opencontainers.image.title="train-and-deploy pipeline" \
      org.opencontainers.image.description="Pipeline steps for Kubernetes pods" \
      org.opencontainers.image.revision="${GIT_SHA}"

USER 10001:10001
WORKDIR /tmp
CMD ["python", "-m", "ml", "--help"]
