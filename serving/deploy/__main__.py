"""``python -m serving.deploy ...``: the deploy side as a CLI, for rollout pods, the local target
and people.

    python -m serving.deploy proxy                       # the local front proxy (blocking)
    python -m serving.deploy deploy-local --model-uri models:/regression-model/3 --version 3
    python -m serving.deploy status                      # exit 0 if something healthy is live
    python -m serving.deploy stop                        # stop proxy + model servers
    python -m serving.deploy resume                      # start them again, same version
    python -m serving.deploy rollout --request '{"kind": "champion"}' --target local
    python -m serving.deploy verify --model-uri models:/regression-model/3 [--data holdout.parquet]
    python -m serving.deploy rollout --model-uri models:/regression-model/3 --version 3  # k8s
    python -m serving.deploy render --model-uri models:/regression-model/3 --version 3   # YAML
        [--out-dir docker/k8s/base] [--prometheus-rules docker/prometheus/rules.yml]
        [--grafana-dashboard docker/grafana/model-server-dashboard.json]      # write files

Settings come from ``DeploySettings`` (``PIPELINE_DEPLOY_*`` env vars); the MLflow tracking URI
from ``MLFLOW_TRACKING_URI``. Results are printed as JSON on stdout, logs go to stderr.
Heavy imports (mlflow, pandas) happen inside the commands so ``proxy`` starts fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ml.settings import tracking_uri, with_overrides
from serving.deploy.settings import DeploySettings


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _settings(args: argparse.Namespace) -> DeploySettings:
    return with_overrides(
        DeploySettings(),
        local_host=getattr(args, "host", None),
        local_port=getattr(args, "port", None),
        local_state_dir=getattr(args, "state_dir", None),
    )


def cmd_proxy(args: argparse.Namespace) -> int:
    from serving.deploy.proxy import run_proxy

    run_proxy(_settings(args))
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from serving.deploy.local import DeployError, LocalTarget

    target = LocalTarget(_settings(args), tracking_uri())
    try:
        _print(target.deploy(args.model_uri, args.version))
    except DeployError as exc:
        logging.getLogger("serving").error("%s", exc)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from serving.deploy.local import LocalTarget

    status = LocalTarget(_settings(args), tracking_uri()).status()
    _print(status)
    return 0 if status and status.get("healthy") else 1


def cmd_stop(args: argparse.Namespace) -> int:
    from serving.deploy.local import LocalTarget

    stopped = LocalTarget(_settings(args), tracking_uri()).stop_all(forget=args.forget)
    _print({"stopped": stopped, "forgotten": args.forget})
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from serving.deploy.local import LocalTarget

    live = LocalTarget(_settings(args), tracking_uri()).resume()
    _print({"version": live.version, "healthy": live.healthy, "detail": live.detail})
    return 0 if live.healthy or live.version is None else 1


def cmd_verify(args: argparse.Namespace) -> int:
    import mlflow
    import pandas as pd

    from serving.deploy.verify import VerificationError, verify_endpoint

    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.models.Model.load(args.model_uri)
    if args.data:
        reader = pd.read_parquet if args.data.endswith(".parquet") else pd.read_csv
        frame = reader(args.data)
    else:
        frame = model.load_input_example(args.model_uri)
        if not isinstance(frame, pd.DataFrame):
            logging.getLogger("serving").error(
                "%s has no DataFrame input example: pass --data", args.model_uri
            )
            return 1
    if args.rows:
        frame = frame.head(args.rows)
    if args.feature_columns:
        features = [c.strip() for c in args.feature_columns.split(",") if c.strip()]
    elif model.signature is not None and model.signature.inputs.has_input_names():
        features = model.signature.inputs.input_names()
    else:
        features = list(frame.columns)
    endpoint = args.endpoint or _settings(args).endpoint_url
    try:
        _print(verify_endpoint(endpoint, args.model_uri, frame, features, atol=args.atol))
    except VerificationError as exc:
        logging.getLogger("serving").error("verification failed: %s", exc)
        return 1
    return 0


def _k8s_settings(args: argparse.Namespace) -> DeploySettings:
    return with_overrides(
        DeploySettings(),
        namespace=getattr(args, "namespace", None),
        deployment_name=getattr(args, "deployment", None),
        serving_image=getattr(args, "serving_image", None),
    )


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.request:
        return _rollout_request(args)
    if not (args.model_uri and args.version):
        logging.getLogger("serving").error("rollout needs --request, or --model-uri and --version")
        return 2
    return _apply_version(args)


def _rollout_request(args: argparse.Namespace) -> int:
    """The whole rollout path (plan, deploy, verify, promote or restore) for one request."""
    from pathlib import Path

    from ml.settings import RegistrySettings
    from serving.deploy.rollout import (
        Request,
        RequestRejected,
        RolloutError,
        VerificationFailed,
        run_request,
    )

    log = logging.getLogger("serving")
    try:
        request = Request.from_dict(args.request)
    except (ValueError, TypeError) as exc:
        log.error("bad --request: %s", exc)
        return 2
    settings = with_overrides(_k8s_settings(args), target=args.target)
    try:
        result = run_request(
            request,
            settings,
            RegistrySettings(),
            tracking_uri=args.tracking_uri or tracking_uri(),
        )
    except VerificationFailed as exc:
        log.error("verification failed (the previous version was put back): %s", exc)
        return 1
    except RequestRejected as exc:
        log.error("%s", exc)
        return 2
    except RolloutError as exc:
        log.error("rollout not completed (nothing marked bad; retry): %s", exc)
        return 3
    _print(result)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, default=str))
    return 0


def _apply_version(args: argparse.Namespace) -> int:
    """Apply one pinned version to the Deployment (wait, smoke, roll back): no registry moves."""
    from pathlib import Path

    from serving.deploy.kubernetes import (
        EXIT_USAGE,
        KubeClient,
        Rollout,
        Smoke,
        mlflow_input_example,
    )
    from serving.deploy.manifests import UnpinnedModelURI, parse_pinned_uri

    try:  # before any cluster I/O: an alias never reaches the Deployment
        parse_pinned_uri(args.model_uri, args.version)
    except UnpinnedModelURI as exc:
        logging.getLogger("serving").error("%s", exc)
        return EXIT_USAGE
    settings = _k8s_settings(args)
    if args.input_example:
        example = Path(args.input_example).read_text()

        def input_example(uri: str) -> str | None:
            return example if uri == args.model_uri else None
    else:
        input_example = mlflow_input_example
    rollout = Rollout(
        KubeClient.from_environment(settings.namespace, settings.deployment_name),
        settings,
        model_uri=args.model_uri,
        version=args.version,
        tracking_uri=args.tracking_uri or tracking_uri(),
        service_url=args.service_url,
        input_example=input_example,
        smoke=Smoke(interval_s=min(1.0, args.poll_interval)),
        timeout_s=args.timeout,
        smoke_timeout_s=args.smoke_timeout,
        poll_s=args.poll_interval,
    )
    result = rollout.run()
    _print(result.to_dict())
    return result.exit_code


def cmd_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from serving.deploy.manifests import UnpinnedModelURI, base_files, render, to_yaml

    settings = _k8s_settings(args)
    try:
        objects = render(
            settings,
            args.model_uri,
            args.version,
            tracking_uri=args.tracking_uri or tracking_uri(),
            include_namespace=not args.no_namespace,
        )
    except UnpinnedModelURI as exc:
        logging.getLogger("serving").error("%s", exc)
        return 2
    files: dict[Path, str] = {}
    if args.out_dir:
        files.update({Path(args.out_dir) / n: t for n, t in base_files(objects).items()})
    if args.prometheus_rules:
        from serving.deploy.manifests import prometheus_rules_file

        files[Path(args.prometheus_rules)] = prometheus_rules_file(settings)
    if args.grafana_dashboard:
        from serving.deploy.dashboard import dashboard_json

        files[Path(args.grafana_dashboard)] = dashboard_json(settings)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        logging.getLogger("serving").info("wrote %s", path)
    if not files:
        sys.stdout.write(to_yaml(objects))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.deploy", description="Deploy: local target, verification, rollout."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def local_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", help="override PIPELINE_DEPLOY_LOCAL_STATE_DIR")
        p.add_argument("--port", type=int, help="override PIPELINE_DEPLOY_LOCAL_PORT")

    p = sub.add_parser("proxy", help="run the local front proxy (blocking; SIGTERM stops it)")
    local_opts(p)
    p.add_argument("--host", help="override PIPELINE_DEPLOY_LOCAL_HOST")
    p.set_defaults(func=cmd_proxy)

    p = sub.add_parser("deploy-local", help="roll a model version out to the local target")
    local_opts(p)
    p.add_argument("--model-uri", required=True, help="pinned URI, e.g. models:/name/3")
    p.add_argument("--version", required=True)
    p.set_defaults(func=cmd_deploy_local)

    p = sub.add_parser("status", help="what the local target serves; exit 1 if not healthy")
    local_opts(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "stop", help="stop the local proxy and model servers (`resume` serves the same again)"
    )
    local_opts(p)
    p.add_argument("--forget", action="store_true", help="also forget what was deployed")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "resume", help="start the local target again with what it served before it stopped"
    )
    local_opts(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("verify", help="smoke + parity test a live endpoint against a model")
    local_opts(p)
    p.add_argument("--endpoint", help="base URL (default: the deploy settings' endpoint)")
    p.add_argument("--model-uri", required=True)
    p.add_argument("--data", help="CSV or Parquet rows to send (default: the input example)")
    p.add_argument("--feature-columns", help="comma-separated (default: the model signature)")
    p.add_argument("--rows", type=int, help="use only the first N rows")
    p.add_argument("--atol", type=float, default=1e-5)
    p.set_defaults(func=cmd_verify)

    def k8s_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model-uri", required=True, help="pinned URI, e.g. models:/name/3")
        p.add_argument("--version", required=True, help="the version the URI pins")
        p.add_argument("--namespace", help="override PIPELINE_DEPLOY_NAMESPACE")
        p.add_argument("--deployment", help="override PIPELINE_DEPLOY_DEPLOYMENT_NAME")
        p.add_argument("--serving-image", help="override PIPELINE_DEPLOY_SERVING_IMAGE")
        p.add_argument(
            "--tracking-uri",
            help="MLflow URI the model servers load from (default: $MLFLOW_TRACKING_URI)",
        )

    p = sub.add_parser(
        "rollout",
        help="the rollout path for a request (--request), or apply one pinned version to the "
        "Kubernetes Deployment (--model-uri/--version)",
        description="--request: plan, deploy, verify, promote or restore on --target. Exit 0: "
        "live (or unchanged, or nothing to do); 1: verification failed and the previous "
        "version was put back; 2: bad arguments; 3: not completed, nothing marked bad (retry). "
        "--model-uri/--version (Kubernetes only, no registry moves): 0 rolled out; 1 failed and "
        "rolled back; 3 failed and not rolled back.",
    )
    p.add_argument(
        "--request",
        help='JSON, e.g. {"kind": "champion"} or {"kind": "version", "version": "5"} '
        "(serving.deploy.rollout.Request)",
    )
    p.add_argument(
        "--target",
        choices=("local", "kubernetes"),
        default="kubernetes",
        help="with --request: where to roll out (default kubernetes: this is the rollout pod)",
    )
    p.add_argument("--output", help="with --request: also write the result JSON here (XCom)")
    p.add_argument("--model-uri", help="pinned URI, e.g. models:/name/3")
    p.add_argument("--version", help="the version the URI pins")
    p.add_argument("--namespace", help="override PIPELINE_DEPLOY_NAMESPACE")
    p.add_argument("--deployment", help="override PIPELINE_DEPLOY_DEPLOYMENT_NAME")
    p.add_argument("--serving-image", help="override PIPELINE_DEPLOY_SERVING_IMAGE")
    p.add_argument(
        "--tracking-uri",
        help="MLflow URI the model servers load from (default: $MLFLOW_TRACKING_URI)",
    )
    p.add_argument(
        "--service-url",
        help="base URL for the smoke test (default: http://<deployment>.<namespace>"
        ".svc.cluster.local:80, or PIPELINE_DEPLOY_SERVICE_URL)",
    )
    p.add_argument(
        "--input-example", help="JSON request body for the smoke test (default: the model's)"
    )
    p.add_argument(
        "--timeout", type=float, help="seconds for the rolling update (default: health_timeout_s)"
    )
    p.add_argument(
        "--smoke-timeout", type=float, help="seconds for the smoke test (default: smoke_timeout_s)"
    )
    p.add_argument("--poll-interval", type=float, default=2.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser(
        "render", help="print the Kubernetes manifests (multi-document YAML) for a model version"
    )
    k8s_opts(p)
    p.add_argument("--out-dir", help="write a kustomize base there instead of printing")
    p.add_argument(
        "--prometheus-rules",
        metavar="FILE",
        help="also write the alerts as a plain Prometheus rule file (docker/prometheus/rules.yml)",
    )
    p.add_argument(
        "--grafana-dashboard",
        metavar="FILE",
        help="also write the Grafana dashboard JSON (docker/grafana/model-server-dashboard.json)",
    )
    p.add_argument("--no-namespace", action="store_true", help="leave out the Namespace object")
    p.set_defaults(func=cmd_render)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
