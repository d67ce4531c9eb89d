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
#   3. makes sure a model version is live: if the registry has none, the pipeline's own CLI
#      steps (`python -m ml window|validate|train|evaluate|register|promote`) make the first
#      one and point @champion at it; then bootstraps the namespace at FROM_VERSION (default:
#      @champion) with `python -m serving.deploy render ... | kubectl apply --server-side` (RBAC,
#      Service, Deployment, HPA, PDB, NetworkPolicy; the ServiceMonitor/PrometheusRule only if
#      the Prometheus Operator's CRDs are installed);
#   4. runs the whole `train_and_deploy` DAG with `airflow dags test` (a throwaway
#      AIRFLOW_HOME on this machine) and the Param deploy_target=kubernetes: load, validate,
#      train (in a KubernetesPodOperator pod with E2E_TRAIN_IN_POD=1), evaluate, register,
#      gate, the rollout pod `deploy_kubernetes`, verify through the Service, promote. The
#      Connections come from your kubeconfig and the MLflow URIs below; verify reaches the
#      Service through a `kubectl port-forward` that this script keeps alive;
#   5. checks that @champion moved to the new version and that a prediction through the
#      Service carries X-Model-Version: <new version>;
#   6. optionally (E2E_FAILURE_DRILL=1) runs a rollout pod (built like the DAG builds it) with
#      a serving image that does not exist and checks that it fails with ErrImagePull, rolls
#      back, and the new version serves again.
#
# Needs: kubectl with a current context you may create namespaces/RBAC in, kind (for image
# loading), podman or docker, the project venv (`make install`), and an MLflow server that
# both this machine and the cluster's pods can reach (`make up` starts one on :5000; bind it
# to 0.0.0.0 for kind).
#
# Environment:
#   E2E_MLFLOW_URI      MLflow as this machine reaches it (default: $MLFLOW_TRACKING_URI or
#                       http://127.0.0.1:5000)
#   E2E_MLFLOW_URI_CLUSTER  MLflow as pods reach it (required; for kind on Linux e.g.
#                       http://<docker network "kind" gateway>:5000 with MLflow bound to 0.0.0.0)
#   MODEL_NAME          registered model (default: regression-model)
#   FROM_VERSION        version to bootstrap the namespace with (default: @champion, or the
#                       version this script makes when the registry has none)
#   E2E_END_DATE        window end of the DAG run (default: today); the first version, when
#                       one is made, is trained on the window ending the day before
#   NAMESPACE           default: ml-serving        KIND_CLUSTER  default: from the context
#   E2E_TRAIN_IN_POD=1  train in a pod: PIPELINE_DATA_PATH must be visible on the nodes at the
#                       same path (kind: `scripts/k8s_e2e.sh kind-config` prints a cluster
#                       config with that extraMount); a hostPath PV/PVC exposes it to the pod
#   E2E_SKIP_BUILD=1    use images already built/loaded   E2E_FAILURE_DRILL=1  see step 6
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${VENV:-$REPO/.venv}/bin/python
AIRFLOW=$(dirname "$PY")/airflow

NAMESPACE=${NAMESPACE:-ml-serving}
MODEL_NAME=${MODEL_NAME:-regression-model}
E2E_MLFLOW_URI=${E2E_MLFLOW_URI:-${MLFLOW_TRACKING_URI:-http://127.0.0.1:5000}}
E2E_END_DATE=${E2E_END_DATE:-$(date -u +%F)}
TAG=e2e-$(git rev-parse --short HEAD 2>/dev/null || echo local)
SERVING_IMAGE=${SERVING_IMAGE:-train-and-deploy/serving:$TAG}
PIPELINE_IMAGE=${PIPELINE_IMAGE:-train-and-deploy/pipeline:$TAG}
LOCAL_PORT=${LOCAL_PORT:-18080}
# The data the DAG run trains on (the synthetic source writes it here).
export PIPELINE_DATA_PATH=${PIPELINE_DATA_PATH:-$REPO/.local/e2e/data}

log() { printf '[k8s_e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

if [ "${1:-}" = kind-config ]; then # a kind cluster whose nodes see the data folder
    mkdir -p "$PIPELINE_DATA_PATH"
    cat <<EOF
# kind create cluster --config <this file>
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      - hostPath: $PIPELINE_DATA_PATH
        containerPath: $PIPELINE_DATA_PATH
EOF
    exit 0
fi

WORK=$(mktemp -d -t k8s-e2e-XXXXXX)
PF_PID=
cleanup() {
    if [ -n "$PF_PID" ]; then
        pkill -P "$PF_PID" 2>/dev/null || true
        kill "$PF_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# -- 0. prerequisites -------------------------------------------------------------------------
command -v kubectl >/dev/null || die "kubectl not found"
if [ ! -x "$PY" ] || [ ! -x "$AIRFLOW" ]; then die "no venv with airflow at $PY: run 'make install'"; fi
[ -n "${E2E_MLFLOW_URI_CLUSTER:-}" ] ||
    die "set E2E_MLFLOW_URI_CLUSTER to an MLflow URL the cluster's pods can reach"
kubectl version >/dev/null 2>&1 || die "no cluster: kubectl cannot reach the current context"
CONTEXT=$(kubectl config current-context)
KUBECONFIG_FILE=${KUBECONFIG:-$HOME/.kube/config}
KUBECONFIG_FILE=${KUBECONFIG_FILE%%:*}
log "cluster context: $CONTEXT ($KUBECONFIG_FILE)"
if command -v podman >/dev/null; then ENGINE=podman; elif command -v docker >/dev/null; then
    ENGINE=docker
else die "neither podman nor docker found"; fi
export MLFLOW_TRACKING_URI=$E2E_MLFLOW_URI
"$PY" -c 'from mlflow import MlflowClient; MlflowClient().search_experiments(max_results=1)' \
    >/dev/null 2>&1 || die "MLflow at $E2E_MLFLOW_URI does not answer ('make up' starts one)"

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

# -- 3. a live version, and the namespace bootstrapped at it ------------------------------------
champion() { # prints the @champion version, or nothing
    "$PY" - "$MODEL_NAME" <<'EOF'
import sys
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
try:
    print(MlflowClient().get_model_version_by_alias(sys.argv[1], "champion").version)
except MlflowException:
    pass
EOF
}
if [ -z "${FROM_VERSION:-}" ]; then
    FROM_VERSION=$(champion)
    if [ -z "$FROM_VERSION" ]; then
        first_end=$(date -u -d "$E2E_END_DATE - 1 day" +%F)
        log "no @champion of $MODEL_NAME: making the first version (window ending $first_end)"
        ml() { "$PY" -m ml "$@" >/dev/null; }
        ml window --end "$first_end" --output "$WORK/window.json"
        ml validate --window "$WORK/window.json"
        ml train --window "$WORK/window.json" --tag e2e=bootstrap --output "$WORK/trained.json"
        ml evaluate --window "$WORK/window.json" --trained "$WORK/trained.json" \
            --output "$WORK/evaluation.json"
        ml register --window "$WORK/window.json" --trained "$WORK/trained.json" \
            --evaluation "$WORK/evaluation.json" --output "$WORK/version.json"
        ml promote --version "$WORK/version.json"
        FROM_VERSION=$(champion)
    fi
fi
[ -n "$FROM_VERSION" ] || die "no version of $MODEL_NAME to bootstrap with"

HAVE_MONITORING=0
kubectl get crd servicemonitors.monitoring.coreos.com prometheusrules.monitoring.coreos.com \
    >/dev/null 2>&1 && HAVE_MONITORING=1
log "bootstrapping namespace $NAMESPACE at models:/$MODEL_NAME/$FROM_VERSION" \
    "(monitoring objects: $([ $HAVE_MONITORING = 1 ] && echo yes || echo 'no CRDs, skipped'))"
PIPELINE_DEPLOY_TARGET=kubernetes "$PY" -m serving.deploy render \
    --model-uri "models:/$MODEL_NAME/$FROM_VERSION" --version "$FROM_VERSION" \
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

if [ "${E2E_TRAIN_IN_POD:-0}" = 1 ]; then
    # The training pod reads the partitions the DAG's load_window writes on this machine: a
    # hostPath PV on the node path kind mounts from here (see `kind-config`), bound to a PVC.
    log "training in a pod: PVC e2e-training-data -> node path $PIPELINE_DATA_PATH"
    mkdir -p "$PIPELINE_DATA_PATH"
    kubectl apply --server-side --field-manager=train-and-deploy -f - <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: e2e-training-data-$NAMESPACE}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: "$PIPELINE_DATA_PATH", type: Directory}
  claimRef: {namespace: $NAMESPACE, name: e2e-training-data}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: e2e-training-data, namespace: $NAMESPACE}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: e2e-training-data-$NAMESPACE
  resources: {requests: {storage: 1Gi}}
EOF
    export PIPELINE_TRAIN_RUNNER=kubernetes PIPELINE_TRAIN_POD_DATA_CLAIM=e2e-training-data
    export PIPELINE_TRAIN_POD_CPU=${PIPELINE_TRAIN_POD_CPU:-1}
    export PIPELINE_TRAIN_POD_MEMORY=${PIPELINE_TRAIN_POD_MEMORY:-2Gi}
fi

# -- 4. the whole DAG, deploy target kubernetes ---------------------------------------------------
# verify runs on this machine and asks the Service which version it serves: keep a
# port-forward to it alive (it drops whenever the pod behind it goes away in a rollout).
(
    while true; do
        kubectl -n "$NAMESPACE" port-forward service/model-server "$LOCAL_PORT:80" \
            >>"$WORK/port-forward.log" 2>&1 || true
        sleep 1
    done
) &
PF_PID=$!
export AIRFLOW_HOME=$WORK/airflow
export AIRFLOW__CORE__DAGS_FOLDER=$REPO/dags AIRFLOW__CORE__PLUGINS_FOLDER=$REPO/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///$AIRFLOW_HOME/airflow.db
export AIRFLOW_CONN_MLFLOW_DEFAULT=$E2E_MLFLOW_URI
# The XCom sidecar of the training pod runs the pipeline image: no alpine pull needed.
AIRFLOW_CONN_KUBERNETES_DEFAULT=$("$PY" - "$KUBECONFIG_FILE" "$CONTEXT" "$PIPELINE_IMAGE" <<'EOF'
import json, sys
extra = {"kube_config_path": sys.argv[1], "cluster_context": sys.argv[2], "in_cluster": False,
         "xcom_sidecar_container_image": sys.argv[3]}
print(json.dumps({"conn_type": "kubernetes", "extra": extra}))
EOF
)
export AIRFLOW_CONN_KUBERNETES_DEFAULT
# Pods reach MLflow by its in-cluster address; verify (here) reaches the Service by the tunnel.
export PIPELINE_DEPLOY_POD_TRACKING_URI=$E2E_MLFLOW_URI_CLUSTER
export PIPELINE_DEPLOY_SERVICE_URL=http://127.0.0.1:$LOCAL_PORT
"$AIRFLOW" db migrate >"$WORK/db-migrate.log" 2>&1 ||
    die "airflow db migrate failed: $(tail -3 "$WORK/db-migrate.log")"
# A generous regression allowance: this checks the rollout path, not the model's quality.
CONF=$(printf '{"deploy_target": "kubernetes", "data_end_date": "%s", "max_regression": 1.0}' \
    "$E2E_END_DATE")
log "airflow dags test train_and_deploy -c '$CONF'"
"$AIRFLOW" dags test train_and_deploy -c "$CONF" ||
    die "the train_and_deploy run failed (its task logs are above)"

# -- 5. the new version is live -----------------------------------------------------------------
NEW_VERSION=$(champion)
if [ -z "$NEW_VERSION" ] || [ "$NEW_VERSION" = "$FROM_VERSION" ]; then
    die "@champion did not move from version $FROM_VERSION (did the gate reject? see above)"
fi
log "@champion: version $FROM_VERSION -> $NEW_VERSION"
check_prediction() { # $1: expected version
    "$PY" - "models:/$MODEL_NAME/$1" "$1" "http://127.0.0.1:$LOCAL_PORT" <<'EOF'
import sys, time, httpx
from mlflow.models.utils import load_serving_example
uri, version, base = sys.argv[1:]
example = load_serving_example(uri)
for _ in range(30):  # the port-forward may be reconnecting after a rollout
    try:
        resp = httpx.post(f"{base}/invocations", content=example,
                          headers={"Content-Type": "application/json"}, timeout=30)
        break
    except httpx.TransportError:
        time.sleep(1)
else:
    sys.exit(f"{base} does not answer")
served = resp.headers.get("x-model-version")
print(f"POST {base}/invocations -> {resp.status_code} version={served} {resp.text[:200]}")
sys.exit(0 if resp.status_code == 200 and served == version else 1)
EOF
}
check_prediction "$NEW_VERSION" || die "the Service does not serve version $NEW_VERSION"
log "prediction through the Service: version $NEW_VERSION answers"

# -- 6. optional failure drill: a broken image must be rolled back --------------------------------
run_rollout_pod() { # $1: version; prints the pod's exit code
    local version=$1 manifest=$WORK/rollout-pod.json pod phase
    "$PY" - "$MODEL_NAME" "$version" >"$manifest" <<'EOF'
import json, os, sys
from kubernetes.client import ApiClient
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from ml.settings import DeploySettings
from serving.kubernetes import rollout_pod_kwargs
name, version = sys.argv[1], sys.argv[2]
kwargs = rollout_pod_kwargs(DeploySettings(target="kubernetes"),
                            model_uri=f"models:/{name}/{version}", version=version,
                            tracking_uri=os.environ["PIPELINE_DEPLOY_POD_TRACKING_URI"])
pod = KubernetesPodOperator(task_id="rollout", **kwargs).build_pod_request_obj(dry_run=True)
print(json.dumps(ApiClient().sanitize_for_serialization(pod)))
EOF
    pod=$(kubectl create -f "$manifest" -o jsonpath='{.metadata.name}')
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
if [ "${E2E_FAILURE_DRILL:-0}" = 1 ]; then
    log "failure drill: rolling out an image that does not exist"
    code=$(PIPELINE_DEPLOY_SERVING_IMAGE=localhost/train-and-deploy/does-not-exist:0 \
        run_rollout_pod "$NEW_VERSION")
    [ "$code" = 1 ] || die "the broken rollout exited $code, expected 1 (rolled back)"
    check_prediction "$NEW_VERSION" || die "after the rollback, version $NEW_VERSION does not serve"
    log "failure drill: rolled back, version $NEW_VERSION serves"
fi

log "OK: train_and_deploy, deploy target kubernetes, end to end (namespace $NAMESPACE, context $CONTEXT)"
