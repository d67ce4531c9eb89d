"""The server's settings, as one frozen dataclass (``python -m serving.server`` fills it in).

With ``--workers N`` the parent hands it to each worker process as JSON in
``$SERVING_SERVER_CONFIG`` (:meth:`ServerConfig.to_json`, ``serving.server.runner``).
"""

from __future__ import annotations

import dataclasses
import json

from serving.server.batching import DEFAULT_MAX_BATCH_ROWS
from serving.server.distributions import DEFAULT_MAX_FEATURE_HISTOGRAMS

CONFIG_ENV = "SERVING_SERVER_CONFIG"
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_uri: str
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    batch_wait_ms: float = 0.0
    batch_mode: str = "auto"
    fast_path: bool = True
    # Concurrent requests to a pyfunc served without the fast path share predict calls.
    pyfunc_batching: bool = True
    # A model's LiteRT artifact, when the runtime is installed (serving.server.slim).
    slim: bool = True
    tf_threads: int = 1
    access_log: bool = True
    request_timeout_s: float = 60.0
    graceful_timeout_s: float = 30.0
    # The whole request body must have arrived this long after the app starts reading it.
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # Reject what MLflow quietly coerces or drops (serving.server.strict.StrictInputs).
    strict: bool = False
    # Input columns that get a model_server_feature_value histogram (the first N).
    max_feature_histograms: int = DEFAULT_MAX_FEATURE_HISTOGRAMS
    # The payload log (serving.server.payload): where, and the share of requests (percent).
    payload_log_path: str | None = None
    payload_log_sample_percent: float = 0.0
    payload_log_max_file_mb: float = 32.0
    payload_log_max_day_mb: float = 1024.0
    # The feature and prediction histograms' buckets from this model's drift profile (a
    # canary's are the live version's, so that the two distributions compare bucket by bucket).
    profile_from: str | None = None
    log_level: str = "INFO"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        return cls(**json.loads(text))
