"""``python -m serving.server``: the model server (what the serving image runs).

    python -m serving.server --model-uri models:/regression-model/3 [--host] [--port] [--workers]

The model URI may also come from ``$SERVING_MODEL_URI`` (how the Kubernetes Deployment pins
it); the registry from ``$MLFLOW_TRACKING_URI``; ``--body-timeout-s`` from
``$SERVING_BODY_TIMEOUT_S``, ``--strict`` from ``$SERVING_STRICT`` (1/true/yes/on) and
``--max-feature-histograms`` from ``$SERVING_MAX_FEATURE_HISTOGRAMS``. Logs are JSON lines on
stderr, access logs JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from serving.server.contract import MODEL_URI_ENV

BODY_TIMEOUT_ENV = "SERVING_BODY_TIMEOUT_S"
STRICT_ENV = "SERVING_STRICT"
MAX_FEATURE_HISTOGRAMS_ENV = "SERVING_MAX_FEATURE_HISTOGRAMS"
DEFAULT_BODY_TIMEOUT_S = 10.0  # = serving.server.config.DEFAULT_BODY_TIMEOUT_S (not imported: slow)
DEFAULT_MAX_FEATURE_HISTOGRAMS = 32  # = serving.server.metrics.DEFAULT_MAX_FEATURE_HISTOGRAMS
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _env_flag(name: str) -> bool:
    text = os.environ.get(name, "").strip().lower()
    if text not in _TRUE + _FALSE:
        raise SystemExit(f"${name} must be one of {', '.join(_TRUE + _FALSE[1:])}: {text!r}")
    return text in _TRUE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="Serve an MLflow model over MLflow's scoring protocol (blocking).",
    )
    p.add_argument(
        "--model-uri",
        help=f"models:/name/version, models:/name@alias, runs:/... (default: ${MODEL_URI_ENV})",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes (each loads the model; /metrics answers for all of them)",
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=16 * 1024 * 1024, help="larger bodies get 413"
    )
    p.add_argument("--max-batch-rows", type=int, default=256, help="micro-batch size cap")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="extra wait to fill a micro-batch (0: only what queued while the model was busy)",
    )
    p.add_argument(
        "--batch-mode",
        choices=("auto", "thread", "inline"),
        default="auto",
        help="where the model runs: auto = on the event loop for small batches, else a thread",
    )
    p.add_argument("--no-fast-path", action="store_true", help="always use the pyfunc")
    p.add_argument(
        "--no-pyfunc-batching",
        action="store_true",
        help="one pyfunc predict per request (default: concurrent requests share one, where safe)",
    )
    p.add_argument(
        "--no-slim",
        action="store_true",
        help="ignore a model's LiteRT artifact (serve it with TensorFlow)",
    )
    p.add_argument(
        "--tf-threads", type=int, default=1, help="TensorFlow op threads (0: TF default)"
    )
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument(
        "--request-timeout",
        type=float,
        help="seconds per request, like MLflow's (default: $MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT "
        "or 60)",
    )
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for in-flight requests",
    )
    p.add_argument(
        "--body-timeout-s",
        type=_positive_seconds,
        default=os.environ.get(BODY_TIMEOUT_ENV) or DEFAULT_BODY_TIMEOUT_S,
        help="seconds a request's whole body may take to arrive; after that 408 and the "
        f"connection closes (default: ${BODY_TIMEOUT_ENV} or {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=_env_flag(STRICT_ENV),
        help="400 for columns not in the model's input schema and non-numbers in numeric "
        f"columns, which MLflow drops or converts (default: ${STRICT_ENV}, else off)",
    )
    p.add_argument(
        "--max-feature-histograms",
        type=_count,
        default=os.environ.get(MAX_FEATURE_HISTOGRAMS_ENV) or DEFAULT_MAX_FEATURE_HISTOGRAMS,
        help="input columns (the first N) that get a model_server_feature_value histogram; "
        f"0: none (default: ${MAX_FEATURE_HISTOGRAMS_ENV} or {DEFAULT_MAX_FEATURE_HISTOGRAMS})",
    )
    p.add_argument(
        "--profile-from",
        metavar="MODEL_URI",
        help="take the feature and prediction histogram buckets from this model's drift "
        "profile instead of the served model's (a canary: the live version's, so that the two "
        "prediction distributions compare bucket by bucket)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported once the arguments are good: --help and usage errors need no numpy or uvicorn.
    from serving.server.config import ServerConfig
    from serving.server.runner import run

    model_uri = args.model_uri or os.environ.get(MODEL_URI_ENV)
    if not model_uri:
        logging.basicConfig(stream=sys.stderr)
        logging.getLogger("serving.server").error("--model-uri (or %s) is required", MODEL_URI_ENV)
        return 2
    config = ServerConfig(
        model_uri=model_uri,
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_request_bytes=args.max_request_bytes,
        max_batch_rows=args.max_batch_rows,
        batch_wait_ms=args.batch_wait_ms,
        batch_mode=args.batch_mode,
        fast_path=not args.no_fast_path,
        pyfunc_batching=not args.no_pyfunc_batching,
        slim=not args.no_slim,
        tf_threads=args.tf_threads,
        access_log=not args.no_access_log,
        request_timeout_s=args.request_timeout
        or float(os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT") or 60),
        graceful_timeout_s=args.graceful_timeout,
        body_timeout_s=args.body_timeout_s,
        strict=args.strict,
        max_feature_histograms=args.max_feature_histograms,
        profile_from=args.profile_from,
        log_level="DEBUG" if args.verbose else "INFO",
    )
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
