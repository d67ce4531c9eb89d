"""Typed settings of the deploy side: where and how a gated model version is rolled out.

Deployment-wide defaults come from ``PIPELINE_DEPLOY_*`` environment variables; per-run knobs
(the ``deploy_target`` Param, CLI flags) override them with :func:`ml.settings.with_overrides`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ml.settings import LOCAL_STATE_DIR, split_csv, split_csv_ints


class DeploySettings(BaseSettings):
    """Where and how a gated model version is rolled out."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_DEPLOY_", extra="forbid")

    target: Literal["local", "kubernetes"] = "local"
    # local target: a stable front port proxying to the healthy model-server process.
    local_host: str = "127.0.0.1"
    local_port: int = Field(5001, ge=1, le=65_535)
    local_slot_ports: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [5011, 5012])
    local_state_dir: str = str(LOCAL_STATE_DIR / "serving")
    local_queue: str = Field(
        "default",
        description="Airflow queue of the tasks that read or change the local target (its "
        "rollout, deploy_model's request, reconcile's check). With the CeleryExecutor, the "
        "worker on the serving host (the host that runs the model servers) serves it.",
    )
    health_timeout_s: float = Field(180.0, gt=0)
    rollout_pool: str = Field(
        "model_rollout",
        description="Airflow pool (one slot) every rollout task of every DAG runs in: one "
        "rollout at a time. `make run` creates it; create it in your Airflow too.",
    )
    rollout_lock_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="How long a rollout waits for the target's rollout lock (held by another "
        "rollout for its whole deploy-verify-promote) before it fails and is retried.",
    )
    # Progressive delivery (serving.deploy.progressive; docs/operations.md, "Shadow and canary").
    rollout_strategy: Literal["direct", "shadow", "canary"] = Field(
        "direct",
        title="Rollout strategy",
        description="direct: the new version takes every request once verified. shadow: it "
        "first answers a mirrored share of the live requests for a bake time, judged on live "
        "metrics, then takes them all. canary: shadow first, then a growing share of the "
        "requests (canary_steps), each step judged. shadow and canary need live traffic and "
        "a Prometheus (prometheus_url).",
    )
    shadow_share: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        title="Shadow share",
        description="Share of the live requests mirrored to the candidate in the shadow step "
        "(0: a canary starts without one).",
    )
    canary_steps: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 25.0, 50.0],
        min_length=1,
        title="Canary steps (%)",
        description="Percent of the predictions the candidate answers, step by step; after "
        "the last step passes it answers all of them (100%). Comma-separated in the env var.",
    )
    canary_bake_s: float = Field(
        120.0,
        gt=0.0,
        title="Bake time per step (s)",
        description="How long each shadow or canary step lasts before the judge decides.",
    )
    judge_min_requests: int = Field(
        300,
        ge=1,
        title="Requests needed to judge",
        description="A step whose candidate answered fewer requests over the judged minute "
        "cannot be judged: the rollout stops as a fault (retried), never promoting unjudged. "
        "The PSI of n predictions from one distribution is ~9/n by chance alone (10 bins).",
    )
    judge_error_ratio: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        title="Judge: 5xx share",
        description="A step fails when more than this share of the candidate's answers are 5xx.",
    )
    judge_p99_ratio: float = Field(
        2.0,
        ge=1.0,
        title="Judge: p99 latency ratio",
        description="A step fails when the candidate's p99 latency exceeds this many times the "
        "stable version's, plus judge_p99_slack_s.",
    )
    judge_p99_slack_s: float = Field(
        0.025,
        ge=0.0,
        title="Judge: p99 latency slack (s)",
        description="Added to the stable p99 times judge_p99_ratio, so that sub-millisecond "
        "jitter never fails a step.",
    )
    judge_psi: float = Field(
        0.1,
        gt=0.0,
        title="Judge: prediction PSI",
        description="A step fails when the PSI of the candidate's predictions against the "
        "stable version's, over the same minute and the stable version's drift-profile "
        "buckets, exceeds this.",
    )
    judge_shadow_diff_p99: float = Field(
        5.0,
        gt=0.0,
        title="Judge: shadow paired difference p99",
        description="A shadow step fails when the p99 of |candidate - live| over mirrored "
        "requests exceeds this, in the model's own units (the default suits the project's "
        "load regressor: two nightly versions differ by ~3 at p99, a 10% shift by ~6).",
    )
    prometheus_url: str | None = Field(
        None,
        description="The Prometheus the judge asks (it must load the recording rules of "
        "docker/k8s/monitoring/rollout-judge-rule.yaml and scrape the model servers with their "
        "track label); `make run` sets the local stack's.",
    )
    # kubernetes target
    kubernetes_conn_id: str = "kubernetes_default"
    namespace: str = "ml-serving"
    pipeline_image: str = "train-and-deploy/pipeline:latest"
    serving_image: str = "train-and-deploy/serving:latest"
    service_account: str = "model-rollout"
    deployment_name: str = "model-server"
    service_url: str | None = Field(
        None,
        description="Base URL of the live endpoint as Airflow workers reach it (verify, "
        "reconcile); defaults to the local front port, or the in-cluster Service DNS name for "
        "the kubernetes target. The rollout pod always verifies through the in-cluster "
        "Service (it is not passed to the pod).",
    )
    gateway_name: str | None = Field(
        None,
        description="The Gateway (Gateway API; `name` or `namespace/name`) clients reach the "
        "model server through: the HTTPRoute of the same name as the Deployment then carries "
        "a canary's weight and a shadow's RequestMirror. Without one, the Service splits the "
        "requests by replica ratio and a canary has no shadow step.",
    )
    canary_url: str | None = Field(
        None,
        description="Base URL of the canary's own Service as the rollout reaches it (the "
        "candidate is verified there); defaults to its in-cluster DNS name.",
    )
    # kubernetes target: the serving Deployment (serving.manifests) and the rollout
    # (serving.rollout). Defaults are sized from measurements: docs/operations.md.
    min_replicas: int = Field(2, ge=1, description="HPA floor; 2 keeps one pod up in drains.")
    max_replicas: int = Field(6, ge=1, description="HPA ceiling.")
    serving_cpu: str = Field("500m", description="CPU request of a model-server pod.")
    serving_memory: str = Field(
        "1536Mi",
        description="Memory request = limit of a model-server pod (~750 MiB RSS measured).",
    )
    allowed_client_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["airflow", "monitoring"],
        description="Namespaces (besides its own) whose pods may reach the model server "
        "(NetworkPolicy); comma-separated in the env var.",
    )
    pod_tracking_uri: str | None = Field(
        None,
        description="MLflow as the pipeline's pods reach it, when that differs from the "
        "Airflow Connection's URI (e.g. an in-cluster Service name); None: the same URI.",
    )
    pod_env_secret: str | None = Field(
        None,
        description="Secret whose keys become env vars of every pipeline pod (training and "
        "rollout): MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, object-store credentials.",
    )
    progress_deadline_s: int = Field(
        150,
        ge=10,
        description="The serving Deployment's progressDeadlineSeconds: how long a rollout may "
        "make no progress before the Deployment controller reports ProgressDeadlineExceeded "
        "and the rollout undoes it. One pod's startup-probe budget (90 s) plus a minute for "
        "scheduling and pulling the image on a fresh node.",
    )
    min_ready_s: int = Field(
        5,
        ge=0,
        description="The serving Deployment's minReadySeconds: how long a new pod must stay "
        "ready before it counts as available (and the next old pod goes); catches pods that "
        "flap right after their first ready probe.",
    )
    api_retry_s: float = Field(
        60.0,
        gt=0,
        description="How long the rollout keeps retrying Kubernetes API calls that get no "
        "answer (refused, 5xx, 429, a lost watch) before it gives up as a fault, which Airflow "
        "retries.",
    )

    payload_log_sample_percent: float = Field(
        10.0,
        ge=0.0,
        le=100.0,
        description="Share of answered requests the model servers write to the payload log "
        "(0: none). The local target's servers write to PIPELINE_QUALITY_PAYLOAD_PATH; on "
        "Kubernetes, payload_log_claim or payload_log_url says where.",
    )
    payload_log_claim: str | None = Field(
        None,
        description="PersistentVolumeClaim (ReadWriteMany) mounted in every serving pod for the "
        "payload log; each pod writes its own files (the pod name is in their names).",
    )
    payload_log_url: str | None = Field(
        None,
        description="Object-store URL the serving pods write the payload log to, when there is "
        "no claim (the serving image then needs fsspec and the store's driver).",
    )

    @field_validator("local_slot_ports", mode="before")
    @classmethod
    def _split_ports(cls, value: Any) -> Any:
        return split_csv_ints(value)

    @field_validator("canary_steps", mode="before")
    @classmethod
    def _split_steps(cls, value: Any) -> Any:
        # "5,25,50" in the env var; "[5, 25, 50]" where a pod's env renders the run's Param.
        if isinstance(value, str) and value.strip().startswith("["):
            return json.loads(value)
        return split_csv(value)

    @field_validator("allowed_client_namespaces", mode="before")
    @classmethod
    def _split_namespaces(cls, value: Any) -> Any:
        return split_csv(value)

    @model_validator(mode="after")
    def _replica_range(self) -> DeploySettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self

    @model_validator(mode="after")
    def _canary_steps_grow(self) -> DeploySettings:
        steps = self.canary_steps
        if any(not 0 < p < 100 for p in steps) or steps != sorted(set(steps)):
            raise ValueError("canary_steps must grow strictly, each between 0 and 100 (percent)")
        return self

    @model_validator(mode="after")
    def _two_distinct_slots(self) -> DeploySettings:
        ports = self.local_slot_ports
        if len(ports) != 2 or len(set(ports)) != 2 or self.local_port in ports:
            raise ValueError(
                "local_slot_ports needs two distinct ports, both different from local_port"
            )
        return self

    @property
    def endpoint_url(self) -> str:
        if self.service_url:
            return self.service_url.rstrip("/")
        if self.target == "local":
            return f"http://{self.local_host}:{self.local_port}"
        return f"http://{self.deployment_name}.{self.namespace}.svc.cluster.local"
