"""``python -m serving.server``: the model server (what the serving image runs).

    python -m serving.server --model-uri models:/regression-model/3 [--host] [--port] [--workers]

The model URI may also come from ``$SERVING_MODEL_URI`` (how the Kubernetes Deployment pins
it); the registry from ``$MLFLOW_TRACKING_URI``; ``--body-timeout-s`` from
``$SERVING_BODY_TIMEOUT_S``, ``--strict`` from ``$SERVING_STRICT`` (1/true/yes/on) and
``--max-feature-histograms`` from ``$SERVING_MAX_FEATURE_HISTOGRAMS``, ``--payload-log-path``
and ``--payload-log-sample-percent`` from ``$SERVING_PAYLOAD_LOG_PATH`` and
``$SERVING_PAYLOAD_LOG_SAMPLE_PERCENT``. Logs are JSON lines on stderr, access logs JSON lines on
stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Callable

from serving.server.contract import MODEL_URI_ENV

BODY_TIMEOUT_ENV = "SERVING_BODY_TIMEOUT_S"
STRICT_ENV = "SERVING_STRICT"
MAX_FEATURE_HISTOGRAMS_ENV = "SERVING_MAX_FEATURE_HISTOGRAMS"
PAYLOAD_LOG_PATH_ENV = "SERVING_PAYLOAD_LOG_PATH"
PAYLOAD_LOG_SAMPLE_ENV = "SERVING_PAYLOAD_LOG_SAMPLE_PERCENT"
DEFAULT_BODY_TIMEOUT_S = 10.0  # = serving.server.config.DEFAULT_BODY_TIMEOUT_S (not imported: slow)
DEFAULT_MAX_FEATURE_HISTOGRAMS = 32  # = serving.server.metrics.DEFAULT_MAX_FEATURE_HISTOGRAMS
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _number(cast: type, noun: str, ok: Callable[[float], bool], rule: str):
    """An argparse ``type``: ``cast(text)``, refused with a readable reason unless ``ok``."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}: {text!r}")
        return value

    return parse


_positive_seconds = _number(
    float, "a number of seconds", lambda v: 0 < v < float("inf"), "a positive number of seconds"
)
_count = _number(int, "a whole number", lambda v: v >= 0, "0 or more")
_percent = _number(float, "a number", lambda v: 0 <= v <= 100, "a percentage from 0 to 100")
_megabytes = _number(
    float,
    "a number of megabytes",
    lambda v: 0 < v < float("inf"),
    "a positive number of megabytes",
)


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
    p.add_argument("--model-uri", help="models:/name/version, models:/name@alias, runs:/... "
                   f"(default: ${MODEL_URI_ENV})")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1, help="processes (each loads the model; "
                   "/metrics answers for all of them)")  # fmt: skip
    p.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024,
                   help="larger bodies get 413")  # fmt: skip
    p.add_argument("--max-batch-rows", type=int, default=256, help="micro-batch size cap")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="extra wait to fill a "
                   "micro-batch (0: only what queued while the model was busy)")  # fmt: skip
    p.add_argument("--batch-mode", choices=("auto", "thread", "inline"), default="auto",
                   help="where the model runs: auto = on the event loop for small batches, "
                   "else a thread")  # fmt: skip
    p.add_argument("--no-fast-path", action="store_true", help="always use the pyfunc")
    p.add_argument("--no-pyfunc-batching", action="store_true", help="one pyfunc predict per "
                   "request (default: concurrent requests share one, where safe)")  # fmt: skip
    p.add_argument("--no-slim", action="store_true",
                   help="ignore a model's LiteRT artifact (serve it with TensorFlow)")  # fmt: skip
    p.add_argument("--tf-threads", type=int, default=1,
                   help="TensorFlow op threads (0: TF default)")  # fmt: skip
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument("--request-timeout", type=float, help="seconds per request, like MLflow's "
                   "(default: $MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT or 60)")  # fmt: skip
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests")  # fmt: skip
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
        "--payload-log-path",
        default=os.environ.get(PAYLOAD_LOG_PATH_ENV) or None,
        help="folder (or fsspec URL) the payload log writes daily partitions to "
        f"(default: ${PAYLOAD_LOG_PATH_ENV}; none: no payload log)",
    )
    p.add_argument(
        "--payload-log-sample-percent",
        type=_percent,
        default=os.environ.get(PAYLOAD_LOG_SAMPLE_ENV) or 0.0,
        help="share of answered requests written to the payload log, 0 to 100 "
        f"(default: ${PAYLOAD_LOG_SAMPLE_ENV} or 0)",
    )
    p.add_argument(
        "--payload-log-max-file-mb",
        type=_megabytes,
        default=32.0,
        help="a payload log file is closed (and a new one started) at this size",
    )
    p.add_argument(
        "--payload-log-max-day-mb",
        type=_megabytes,
        default=1024.0,
        help="what one process writes to the payload log per day at most; the rest is dropped "
        "and counted",
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
    problem = None
    if not model_uri:
        problem = f"--model-uri (or {MODEL_URI_ENV}) is required"
    elif "://" in (args.payload_log_path or "") and importlib.util.find_spec("fsspec") is None:
        problem = "a payload log URL needs fsspec (and the store's driver) in the image"
    if problem:
        logging.basicConfig(stream=sys.stderr)
        logging.getLogger("serving.server").error("%s", problem)
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
        payload_log_path=args.payload_log_path,
        payload_log_sample_percent=args.payload_log_sample_percent,
        payload_log_max_file_mb=args.payload_log_max_file_mb,
        payload_log_max_day_mb=args.payload_log_max_day_mb,
        profile_from=args.profile_from,
        log_level="DEBUG" if args.verbose else "INFO",
    )
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
