#!/usr/bin/env bash
# End-to-end check of the kubernetes deploy target on a real cluster (for example kind).
# NOT run in CI here: no cluster exists on these machines. The unit tests run the same rollout
# code against an API test double instead (tests/serving/test_rollout.py).
#
#   scripts/k8s_e2e.sh
#
# What it does:
#   1. builds the serving and pipeline images (scripts/build_images.sh, else podman/docker
#      build of docker/*.Dockerfile), tagged e2e-<git sha> (not :latest, so the default
#      imagePullPolicy is IfNotPresent and the images loaded into kind are used);
#   2. loads them into kind (when the current context is a kind cluster);
#   3. bootstraps the namespace with `python -m serving render ... | kubectl apply
#      --server-side` at FROM_VERSION (RBAC, Service, Deployment, HPA, PDB, NetworkPolicy; the
#      ServiceMonitor/PrometheusRule only if the Prometheus Operator's CRDs are installed);
#   4. runs the rollout to TO_VERSION exactly as the DAG does: a pod built by
#      KubernetesPodOperator from serving.kubernetes.rollout_pod_kwargs, with the rollout
#      ServiceAccount, streaming its log, and checks its exit code;
#   5. checks a prediction through the Service (kubectl port-forward) and that the answer
#      carries X-Model-Version: TO_VERSION;
#   6. optionally (E2E_FAILURE_DRILL=1) rolls out a serving image that does not exist and
#      checks that the rollout fails with ErrImagePull, rolls back, and TO_VERSION serves again.
#
# Needs: kubectl with a current context you may create namespaces/RBAC in, kind (for image
# loading), podman or docker, the project venv (`make install`), and an MLflow server that
# both this machine and the cluster's pods can reach, with at least one version of the model.
#
# Environment:
#   E2E_MLFLOW_URI      MLflow as this machine reaches it (default: $MLFLOW_TRACKING_URI or
#                       http://127.0.0.1:5000)
#   E2E_MLFLOW_URI_CLUSTER  MLflow as pods reach it (required; for kind on Linux e.g.
#                       http://<docker network "kind" gateway>:5000 with MLflow bound to 0.0.0.0)
#   MODEL_NAME          registered model (default: regression-model)
#   FROM_VERSION / TO_VERSION  versions to bootstrap with / roll out (default: the two newest)
#   NAMESPACE           default: ml-serving        KIND_CLUSTER  default: from the context
#   E2E_SKIP_BUILD=1    use images already built/loaded   E2E_FAILURE_DRILL=1  see step 6
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${VENV:-$REPO/.venv}/bin/python

NAMESPACE=${NAMESPACE:-ml-serving}
MODEL_NAME=${MODEL_NAME:-regression-model}
E2E_MLFLOW_URI=${E2E_MLFLOW_URI:-${MLFLOW_TRACKING_URI:-http://127.0.0.1:5000}}
TAG=e2e-$(git rev-parse --short HEAD 2>/dev/null || echo local)
SERVING_IMAGE=${SERVING_IMAGE:-train-and-deploy/serving:$TAG}
PIPELINE_IMAGE=${PIPELINE_IMAGE:-train-and-deploy/pipeline:$TAG}
LOCAL_PORT=${LOCAL_PORT:-18080}

log() { printf '[k8s_e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

# -- 0. prerequisites -------------------------------------------------------------------------
command -v kubectl >/dev/null || die "kubectl not found"
[ -x "$PY" ] || die "no venv at $PY: run 'make install'"
[ -n "${E2E_MLFLOW_URI_CLUSTER:-}" ] ||
    die "set E2E_MLFLOW_URI_CLUSTER to an MLflow URL the cluster's pods can reach"
kubectl version >/dev/null 2>&1 || die "no cluster: kubectl cannot reach the current context"
CONTEXT=$(kubectl config current-context)
log "cluster context: $CONTEXT"
if command -v podman >/dev/null; then ENGINE=podman; elif command -v docker >/dev/null; then
    ENGINE=docker
else die "neither podman nor docker found"; fi

# FROM/TO versions: the two newest registered versions unless given.
read -r DEFAULT_FROM DEFAULT_TO < <(MLFLOW_TRACKING_URI=$E2E_MLFLOW_URI "$PY" - "$MODEL_NAME" <<'EOF'
import sys
from mlflow import MlflowClient
versions = sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name='{sys.argv[1]}'"))
if not versions:
    sys.exit(f"no version of {sys.argv[1]} in the registry: run the pipeline once (make run)")
print(versions[-2] if len(versions) > 1 else versions[-1], versions[-1])
EOF
)
FROM_VERSION=${FROM_VERSION:-$DEFAULT_FROM}
TO_VERSION=${TO_VERSION:-$DEFAULT_TO}
log "model $MODEL_NAME: bootstrap at version $FROM_VERSION, roll out version $TO_VERSION"

# -- 1. images ----------------------------------------------------------------------------------
if [ "${E2E_SKIP_BUILD:-0}" != 1 ]; then
    if [ -x scripts/build_images.sh ]; then
        log "building images with scripts/build_images.sh"
        SERVING_IMAGE=$SERVING_IMAGE PIPELINE_IMAGE=$PIPELINE_IMAGE scripts/build_images.sh all
    else
        for image in serving pipeline; do
            tag=$SERVING_IMAGE
            [ "$image" = pipeline ] && tag=$PIPELINE_IMAGE
            log "building $tag from docker/$image.Dockerfile"
            "$ENGINE" build -f "docker/$image.Dockerfile" -t "$tag" .
        done
    fi
fi
# podman names local images localhost/<name>; that is the name kind will know them by.
if [ "$ENGINE" = podman ]; then
    case $SERVING_IMAGE in localhost/* | */*.*/*) ;; *) SERVING_IMAGE=localhost/$SERVING_IMAGE ;; esac
    case $PIPELINE_IMAGE in localhost/* | */*.*/*) ;; *) PIPELINE_IMAGE=localhost/$PIPELINE_IMAGE ;; esac
fi

# -- 2. load into kind ----------------------------------------------------------------------------
KIND_CLUSTER=${KIND_CLUSTER:-}
if [ -z "$KIND_CLUSTER" ] && [[ $CONTEXT == kind-* ]]; then KIND_CLUSTER=${CONTEXT#kind-}; fi
if [ -n "$KIND_CLUSTER" ]; then
    command -v kind >/dev/null || die "kind not found (needed to load images into $KIND_CLUSTER)"
    for image in "$SERVING_IMAGE" "$PIPELINE_IMAGE"; do
        log "loading $image into kind cluster $KIND_CLUSTER"
        if [ "$ENGINE" = podman ]; then
            archive=$(mktemp --suffix=.tar)
            podman save -o "$archive" "$image"
            kind load image-archive "$archive" --name "$KIND_CLUSTER"
            rm -f "$archive"
        else
            kind load docker-image "$image" --name "$KIND_CLUSTER"
        fi
    done
else
    log "not a kind cluster: $SERVING_IMAGE and $PIPELINE_IMAGE must be pullable by the nodes"
fi

export PIPELINE_DEPLOY_NAMESPACE=$NAMESPACE
export PIPELINE_DEPLOY_SERVING_IMAGE=$SERVING_IMAGE
export PIPELINE_DEPLOY_PIPELINE_IMAGE=$PIPELINE_IMAGE
export PIPELINE_DEPLOY_TARGET=kubernetes

# -- 3. bootstrap -------------------------------------------------------------------------------
HAVE_MONITORING=0
kubectl get crd servicemonitors.monitoring.coreos.com prometheusrules.monitoring.coreos.com \
    >/dev/null 2>&1 && HAVE_MONITORING=1
log "bootstrapping namespace $NAMESPACE at models:/$MODEL_NAME/$FROM_VERSION" \
    "(monitoring objects: $([ $HAVE_MONITORING = 1 ] && echo yes || echo 'no CRDs, skipped'))"
"$PY" -m serving render --model-uri "models:/$MODEL_NAME/$FROM_VERSION" --version "$FROM_VERSION" \
    --tracking-uri "$E2E_MLFLOW_URI_CLUSTER" |
    HAVE_MONITORING=$HAVE_MONITORING "$PY" -c '
import os, sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
if os.environ["HAVE_MONITORING"] != "1":
    docs = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
' | kubectl apply --server-side --field-manager=train-and-deploy -f -
kubectl -n "$NAMESPACE" rollout status deployment/model-server --timeout=300s ||
    die "the bootstrap Deployment did not become ready (kubectl -n $NAMESPACE describe pods)"

# -- 4. the rollout, as the DAG runs it ---------------------------------------------------------
run_rollout_pod() { # $1: version; prints the pod's exit code
    local version=$1 manifest pod phase
    manifest=$(mktemp --suffix=.json)
    MLFLOW_CLUSTER=$E2E_MLFLOW_URI_CLUSTER "$PY" - "$MODEL_NAME" "$version" >"$manifest" <<'EOF'
import json, os, sys
from kubernetes.client import ApiClient
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from ml.settings import DeploySettings
from serving.kubernetes import rollout_pod_kwargs
name, version = sys.argv[1], sys.argv[2]
kwargs = rollout_pod_kwargs(DeploySettings(), model_uri=f"models:/{name}/{version}",
                            version=version, tracking_uri=os.environ["MLFLOW_CLUSTER"])
pod = KubernetesPodOperator(task_id="rollout", **kwargs).build_pod_request_obj(dry_run=True)
print(json.dumps(ApiClient().sanitize_for_serialization(pod)))
EOF
    pod=$(kubectl create -f "$manifest" -o jsonpath='{.metadata.name}')
    rm -f "$manifest"
    log "rollout pod $pod: models:/$MODEL_NAME/$version"
    for _ in $(seq 1 300); do
        phase=$(kubectl -n "$NAMESPACE" get pod "$pod" -o jsonpath='{.status.phase}')
        [ "$phase" = Pending ] || break
        sleep 2
    done
    kubectl -n "$NAMESPACE" logs -f "$pod" >&2 || true
    for _ in $(seq 1 60); do
        phase=$(kubectl -n "$NAMESPACE" get pod "$pod" -o jsonpath='{.status.phase}')
        case $phase in Succeeded | Failed) break ;; esac
        sleep 2
    done
    kubectl -n "$NAMESPACE" get pod "$pod" \
        -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}'
    kubectl -n "$NAMESPACE" delete pod "$pod" --wait=false >/dev/null
}

code=$(run_rollout_pod "$TO_VERSION")
[ "$code" = 0 ] || die "rollout of version $TO_VERSION exited $code (see its log above)"
log "rollout of version $TO_VERSION succeeded"

# -- 5. a prediction through the Service ----------------------------------------------------------
PF_LOG=$(mktemp)
kubectl -n "$NAMESPACE" port-forward service/model-server "$LOCAL_PORT:80" >"$PF_LOG" 2>&1 &
PF_PID=$!
trap 'kill $PF_PID 2>/dev/null || true; rm -f "$PF_LOG"' EXIT
for _ in $(seq 1 30); do
    curl -sf "http://127.0.0.1:$LOCAL_PORT/ping" >/dev/null && break
    sleep 1
done
check_prediction() { # $1: expected version
    MLFLOW_TRACKING_URI=$E2E_MLFLOW_URI "$PY" - "models:/$MODEL_NAME/$1" "$1" \
        "http://127.0.0.1:$LOCAL_PORT" <<'EOF'
import sys, httpx
from mlflow.models.utils import load_serving_example
uri, version, base = sys.argv[1:]
example = load_serving_example(uri)
resp = httpx.post(f"{base}/invocations", content=example,
                  headers={"Content-Type": "application/json"}, timeout=30)
served = resp.headers.get("x-model-version")
print(f"POST {base}/invocations -> {resp.status_code} version={served} {resp.text[:200]}")
sys.exit(0 if resp.status_code == 200 and served == version else 1)
EOF
}
check_prediction "$TO_VERSION" || die "the Service does not serve version $TO_VERSION"
log "prediction through the Service: version $TO_VERSION answers"

# -- 6. optional failure drill: a broken image must be rolled back --------------------------------
if [ "${E2E_FAILURE_DRILL:-0}" = 1 ]; then
    log "failure drill: rolling out an image that does not exist"
    code=$(PIPELINE_DEPLOY_SERVING_IMAGE=localhost/train-and-deploy/does-not-exist:0 \
        run_rollout_pod "$TO_VERSION")
    [ "$code" = 1 ] || die "the broken rollout exited $code, expected 1 (rolled back)"
    kill $PF_PID 2>/dev/null || true
    kubectl -n "$NAMESPACE" port-forward service/model-server "$LOCAL_PORT:80" >"$PF_LOG" 2>&1 &
    PF_PID=$!
    sleep 3
    check_prediction "$TO_VERSION" || die "after the rollback, version $TO_VERSION does not serve"
    log "failure drill: rolled back, version $TO_VERSION serves"
fi

log "OK: kubernetes target end to end (namespace $NAMESPACE, context $CONTEXT)"
