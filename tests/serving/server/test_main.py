"""The command line (``python -m serving.server``): flags, their environment variables, and the
defaults the settings (``serving.server.config``) and the metrics agree on."""

from __future__ import annotations

import pytest


def test_body_timeout_comes_from_the_command_line_or_the_environment(monkeypatch):
    from serving.server import config
    from serving.server.__main__ import DEFAULT_BODY_TIMEOUT_S, build_parser

    assert (
        DEFAULT_BODY_TIMEOUT_S
        == config.DEFAULT_BODY_TIMEOUT_S
        == config.ServerConfig("m").body_timeout_s
    )
    monkeypatch.delenv("SERVING_BODY_TIMEOUT_S", raising=False)
    monkeypatch.delenv("SERVING_STRICT", raising=False)
    args = build_parser().parse_args([])
    assert args.body_timeout_s == 10.0
    assert args.strict is False
    assert build_parser().parse_args(["--body-timeout-s", "2.5"]).body_timeout_s == 2.5
    assert build_parser().parse_args(["--strict"]).strict is True
    monkeypatch.setenv("SERVING_BODY_TIMEOUT_S", "4")
    monkeypatch.setenv("SERVING_STRICT", "1")
    args = build_parser().parse_args([])
    assert (args.body_timeout_s, args.strict) == (4.0, True)
    assert build_parser().parse_args(["--no-strict"]).strict is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--body-timeout-s", "0"])


def test_max_feature_histograms_comes_from_the_command_line_or_the_environment(monkeypatch):
    from serving.server import config, distributions
    from serving.server.__main__ import DEFAULT_MAX_FEATURE_HISTOGRAMS, build_parser

    assert (
        DEFAULT_MAX_FEATURE_HISTOGRAMS
        == distributions.DEFAULT_MAX_FEATURE_HISTOGRAMS
        == config.ServerConfig("m").max_feature_histograms
        == 32
    )
    monkeypatch.delenv("SERVING_MAX_FEATURE_HISTOGRAMS", raising=False)
    assert build_parser().parse_args([]).max_feature_histograms == 32
    assert build_parser().parse_args(["--max-feature-histograms", "0"]).max_feature_histograms == 0
    monkeypatch.setenv("SERVING_MAX_FEATURE_HISTOGRAMS", "8")
    assert build_parser().parse_args([]).max_feature_histograms == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-feature-histograms", "-1"])


def test_the_payload_log_comes_from_the_command_line_or_the_environment(monkeypatch):
    from serving.server import config
    from serving.server.__main__ import build_parser, main

    defaults = config.ServerConfig("m")
    monkeypatch.delenv("SERVING_PAYLOAD_LOG_PATH", raising=False)
    monkeypatch.delenv("SERVING_PAYLOAD_LOG_SAMPLE_PERCENT", raising=False)
    args = build_parser().parse_args([])
    assert (args.payload_log_path, args.payload_log_sample_percent) == (None, 0.0)
    assert args.payload_log_sample_percent == defaults.payload_log_sample_percent
    assert args.payload_log_max_file_mb == defaults.payload_log_max_file_mb
    assert args.payload_log_max_day_mb == defaults.payload_log_max_day_mb
    monkeypatch.setenv("SERVING_PAYLOAD_LOG_PATH", "/var/lib/payload-log")
    monkeypatch.setenv("SERVING_PAYLOAD_LOG_SAMPLE_PERCENT", "12.5")
    args = build_parser().parse_args([])
    assert args.payload_log_path == "/var/lib/payload-log"
    assert args.payload_log_sample_percent == 12.5
    for bad in (["--payload-log-sample-percent", "101"], ["--payload-log-max-file-mb", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    # an object-store URL without fsspec installed: refused before anything starts
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert main(["--model-uri", "models:/m/1", "--payload-log-path", "s3://bucket/log"]) == 2
