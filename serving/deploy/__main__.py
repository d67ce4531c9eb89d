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
        [--out-dir docker/k8s/base]                                            # write files

Every way a version goes live is ``rollout`` (:func:`serving.deploy.rollout.run`; its exit
codes: ``rollout --help``). Settings come from ``DeploySettings`` (``PIPELINE_DEPLOY_*``), MLflow
from ``MLFLOW_TRACKING_URI``; results are JSON on stdout, logs on stderr. Heavy imports (mlflow,
pandas) happen inside the commands so ``proxy`` starts fast.
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

log = logging.getLogger("serving")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _settings(args: argparse.Namespace) -> DeploySettings:
    """The deploy settings with the command's overrides (options it lacks stay as set)."""
    names = {"local_host": "host", "local_port": "port", "local_state_dir": "state_dir",
             "namespace": "namespace", "deployment_name": "deployment",
             "serving_image": "serving_image"}  # fmt: skip
    return with_overrides(DeploySettings(), **{k: getattr(args, v, None) for k, v in names.items()})


def cmd_proxy(args: argparse.Namespace) -> int:
    from serving.deploy.proxy import run_proxy

    run_proxy(_settings(args))
    return 0


def _local(args: argparse.Namespace):
    from serving.deploy.local import LocalTarget

    return LocalTarget(_settings(args), tracking_uri())


def cmd_status(args: argparse.Namespace) -> int:
    status = _local(args).status()
    _print(status)
    return 0 if status and status.get("healthy") else 1


def cmd_stop(args: argparse.Namespace) -> int:
    stopped = _local(args).stop_all(forget=args.forget)
    _print({"stopped": stopped, "forgotten": args.forget})
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    live = _local(args).resume()
    _print({"version": live.version, "healthy": live.healthy, "detail": live.detail})
    return 0 if live.healthy or live.version is None else 1


def cmd_verify(args: argparse.Namespace) -> int:
    import mlflow
    import pandas as pd

    from serving.deploy.verify import VerificationFailed, verify_endpoint

    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.models.Model.load(args.model_uri)
    if args.data:
        reader = pd.read_parquet if args.data.endswith(".parquet") else pd.read_csv
        frame = reader(args.data)
    else:
        frame = model.load_input_example(args.model_uri)
        if not isinstance(frame, pd.DataFrame):
            log.error("%s has no DataFrame input example: pass --data", args.model_uri)
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
    except VerificationFailed as exc:
        log.error("verification failed: %s", exc)
        return 1
    return 0


EXIT_OK, EXIT_VERDICT, EXIT_REFUSED, EXIT_FAULT = 0, 1, 2, 3


def cmd_rollout(args: argparse.Namespace) -> int:
    """The whole rollout path (plan, deploy, verify, promote or restore) for one request."""
    from pathlib import Path

    from ml.settings import RegistrySettings
    from serving.deploy.rollout import Request, run_request
    from serving.deploy.target import RequestRejected, RolloutError, TargetRejected, Verdict

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
    settings = with_overrides(_settings(args), target=args.target)
    uri = args.tracking_uri or tracking_uri()

    def stopped(signum: int, frame: Any) -> None:
        # A deleted rollout pod (or `kill`): the steps end as a fault, and a canary's traffic
        # goes back to the live version on the way out.
        raise RolloutError(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        result = run_request(request, settings, RegistrySettings(), tracking_uri=uri)
    except Verdict as exc:
        log.error("VERDICT (tagged; what served before serves again; not retried): %s", exc)
        return EXIT_VERDICT
    except (RequestRejected, TargetRejected) as exc:
        log.error("REFUSED (retrying will not help): %s", exc)
        return EXIT_REFUSED
    except RolloutError as exc:
        log.error("FAULT (nothing marked bad; retry): %s", exc)
        return EXIT_FAULT
    except Exception:  # unforeseen: says nothing about the version (Python's own exit is 1)
        log.exception("FAULT (an unexpected error; nothing marked bad; retry)")
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

    from serving.deploy.manifests import UnpinnedModelURI, base_files, render, to_yaml

    uri = args.tracking_uri or tracking_uri()
    try:
        objects = render(_settings(args), args.model_uri, args.version, tracking_uri=uri,
                         include_namespace=not args.no_namespace)  # fmt: skip
    except UnpinnedModelURI as exc:
        log.error("%s", exc)
        return 2
    if not args.out_dir:
        sys.stdout.write(to_yaml(objects))
        return 0
    for name, text in base_files(objects).items():
        path = Path(args.out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log.info("wrote %s", path)
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
    why = "deploy exactly this version, then point @champion at it (the manual rollback)"
    what.add_argument("--version", type=int, help=why)
    why = 'JSON, e.g. {"kind": "champion"} (serving.deploy.rollout.Request); default: deploy '
    what.add_argument("--request", help=why + "what @champion names")
    p.add_argument("--reason", help="why, in words: logged and written into the version's tags")
    p.add_argument(
        "--strategy",
        choices=("direct", "shadow", "canary"),
        help="how the version goes live (default: the request's, else "
        "PIPELINE_DEPLOY_ROLLOUT_STRATEGY); direct: at once, without the judge",
    )
    p.add_argument("--target", choices=("local", "kubernetes"), default=DeploySettings().target,
                   help="where (default: PIPELINE_DEPLOY_TARGET)")  # fmt: skip
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
    p.add_argument("--no-namespace", action="store_true", help="leave out the Namespace object")
    p.set_defaults(func=cmd_render)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
