"""``python -m serving.deploy ...``: the deploy side as a CLI, for rollout pods, the local target
and people.

    python -m serving.deploy proxy                       # the local front proxy (blocking)
    python -m serving.deploy status                      # exit 0 if something healthy is live
    python -m serving.deploy stop                        # stop proxy + model servers
    python -m serving.deploy resume                      # start them again, same version
    python -m serving.deploy rollout --version 3 --target local    # deploy/roll back by hand
    python -m serving.deploy rollout --version 4 --strategy canary # judged on live traffic
    python -m serving.deploy rollout --request '{"kind": "champion"}'   # the rollout pod
    python -m serving.deploy verify --model-uri models:/regression-model/3 [--data holdout.parquet]
    python -m serving.deploy render --model-uri models:/regression-model/3 --version 3   # YAML
        [--monitoring] [--out-dir docker/k8s/base] [--prometheus-rules docker/prometheus/rules.yml]
        [--grafana-dashboard docker/grafana/model-server-dashboard.json]      # write files

Every way a version goes live is ``rollout`` (:func:`serving.deploy.rollout.run`: plan,
deploy, verify, then move ``@champion``, or put back what served before). Exit codes: 0 live
(or unchanged, or nothing to do); 1 a verdict: the version failed verification or never
became ready, it is tagged and what served before serves again; 2 refused: a bad request, a
version the registry does not have, a target that refuses (do not retry); 3 a fault: nothing
was marked, retry.

Settings come from ``DeploySettings`` (``PIPELINE_DEPLOY_*`` env vars); the MLflow tracking URI
from ``MLFLOW_TRACKING_URI``. Results are printed as JSON on stdout, logs go to stderr.
Heavy imports (mlflow, pandas) happen inside the commands so ``proxy`` starts fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
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


EXIT_OK, EXIT_VERDICT, EXIT_REFUSED, EXIT_FAULT = 0, 1, 2, 3


def cmd_rollout(args: argparse.Namespace) -> int:
    """The whole rollout path (plan, deploy, verify, promote or restore) for one request."""
    from pathlib import Path

    from ml.settings import RegistrySettings
    from serving.deploy.rollout import Request, run_request
    from serving.deploy.target import (
        RequestRejected,
        RolloutError,
        TargetRejected,
        Verdict,
    )

    log = logging.getLogger("serving")
    try:
        if args.version is not None:
            reason = args.reason or f"by hand: version {args.version}"
            request = Request("version", str(args.version), reason=reason)
        else:
            request = Request.from_dict(args.request or '{"kind": "champion"}')
        if args.strategy:
            request = Request(**{**request.to_dict(), "strategy": args.strategy})
    except (ValueError, TypeError) as exc:
        log.error("bad rollout request: %s", exc)
        return EXIT_REFUSED
    settings = with_overrides(_k8s_settings(args), target=args.target)

    def stopped(signum: int, frame: Any) -> None:
        # A deleted rollout pod (or `kill`): the steps end as a fault, and a canary's traffic
        # goes back to the live version on the way out.
        raise RolloutError(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        result = run_request(
            request, settings, RegistrySettings(), tracking_uri=args.tracking_uri or tracking_uri()
        )
    except Verdict as exc:
        log.error("VERDICT (tagged; what served before serves again; not retried): %s", exc)
        return EXIT_VERDICT
    except (RequestRejected, TargetRejected) as exc:
        log.error("REFUSED (retrying will not help): %s", exc)
        return EXIT_REFUSED
    except RolloutError as exc:
        log.error("FAULT (nothing marked bad; retry): %s", exc)
        return EXIT_FAULT
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print(result)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, default=str))
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from serving.deploy.manifests import (
        UnpinnedModelURI,
        base_files,
        render,
        render_monitoring,
        to_yaml,
    )

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
    if args.monitoring:
        objects = render_monitoring(settings)
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
        help="put a version live through the rollout path (the only way one goes live)",
        description="Plan, deploy, verify, then move @champion; on a failed check put back "
        "what served before. Exit 0: live (or unchanged, or nothing to do); 1: a verdict (the "
        "version failed verification or never became ready; tagged; do not retry); 2: refused "
        "(bad request, unknown version, a target that refuses; do not retry); 3: a fault "
        "(nothing marked; retry).",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--version",
        type=int,
        help="deploy exactly this version, then point @champion at it (the manual rollback)",
    )
    what.add_argument(
        "--request",
        help='JSON, e.g. {"kind": "champion"} (serving.deploy.rollout.Request); default: '
        "deploy what @champion names",
    )
    p.add_argument("--reason", help="why, in words: logged and written into the version's tags")
    p.add_argument(
        "--strategy",
        choices=("direct", "shadow", "canary"),
        help="how the version goes live (default: the request's, else "
        "PIPELINE_DEPLOY_ROLLOUT_STRATEGY); direct: at once, without the judge",
    )
    p.add_argument(
        "--target",
        choices=("local", "kubernetes"),
        default=DeploySettings().target,
        help="where (default: PIPELINE_DEPLOY_TARGET)",
    )
    p.add_argument("--output", help="also write the result JSON here")
    p.add_argument("--namespace", help="override PIPELINE_DEPLOY_NAMESPACE")
    p.add_argument("--deployment", help="override PIPELINE_DEPLOY_DEPLOYMENT_NAME")
    p.add_argument("--serving-image", help="override PIPELINE_DEPLOY_SERVING_IMAGE")
    p.add_argument("--tracking-uri", help="MLflow (default: $MLFLOW_TRACKING_URI)")
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
    p.add_argument(
        "--monitoring",
        action="store_true",
        help="the monitoring objects instead (ServiceMonitor, PrometheusRule: they need the "
        "Prometheus Operator's CRDs; the Grafana dashboard ConfigMap)",
    )
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
