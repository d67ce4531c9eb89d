"""``python -m serving ...``: the serving side as a CLI, for pods, the local target and people.

    python -m serving proxy                       # the local front proxy (blocking)
    python -m serving deploy-local --model-uri models:/regression-model/3 --version 3
    python -m serving status                      # exit 0 if something healthy is live
    python -m serving stop                        # stop proxy + model servers
    python -m serving verify --model-uri models:/regression-model/3 [--data holdout.parquet]
    python -m serving rollout ...                 # the kubernetes rollout (not in this build)

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

from ml.settings import DeploySettings, tracking_uri, with_overrides

EXIT_NOT_IMPLEMENTED = 2


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
    from serving.proxy import run_proxy

    run_proxy(_settings(args))
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from serving.local import DeployError, LocalTarget

    target = LocalTarget(_settings(args), tracking_uri())
    try:
        _print(target.deploy(args.model_uri, args.version))
    except DeployError as exc:
        logging.getLogger("serving").error("%s", exc)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from serving.local import LocalTarget

    status = LocalTarget(_settings(args), tracking_uri()).status()
    _print(status)
    return 0 if status and status.get("healthy") else 1


def cmd_stop(args: argparse.Namespace) -> int:
    from serving.local import LocalTarget

    _print({"stopped": LocalTarget(_settings(args), tracking_uri()).stop_all()})
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import mlflow
    import pandas as pd

    from serving.verify import VerificationError, verify_endpoint

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


def cmd_rollout(args: argparse.Namespace) -> int:
    print("serving rollout: not implemented in this build: see issue 4", file=sys.stderr)
    return EXIT_NOT_IMPLEMENTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving", description="Model serving: local target, verification, rollout."
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

    p = sub.add_parser("stop", help="stop the local proxy and model servers")
    local_opts(p)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("verify", help="smoke + parity test a live endpoint against a model")
    local_opts(p)
    p.add_argument("--endpoint", help="base URL (default: the deploy settings' endpoint)")
    p.add_argument("--model-uri", required=True)
    p.add_argument("--data", help="CSV or Parquet rows to send (default: the input example)")
    p.add_argument("--feature-columns", help="comma-separated (default: the model signature)")
    p.add_argument("--rows", type=int, help="use only the first N rows")
    p.add_argument("--atol", type=float, default=1e-5)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("rollout", help="roll out to Kubernetes (not in this build)")
    p.set_defaults(func=cmd_rollout)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `rollout` takes its flags from the (later) implementation: accept them all for now.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "rollout":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
