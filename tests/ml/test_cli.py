"""`python -m ml` as a pod or a person runs it: real files, real MLflow store.

The first test runs real subprocesses (the process contract: exit code, JSON on stdout, the
``--output`` file). The others call ``ml.__main__.main`` in this process with the same
arguments and environment, and check the same exit codes, stdout and stderr: a fresh
interpreter costs ~2 s of imports per call, which is what made this module slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

END = "2026-03-10"


def _ml(*args: str, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ml", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def _settings_env(tmp_path) -> dict[str, str]:
    return {
        "PIPELINE_DATA_PATH": str(tmp_path / "data"),
        "PIPELINE_DATA_WINDOW_DAYS": "2",
        "PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY": "200",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, **_settings_env(tmp_path)}


@pytest.fixture
def ml_main(tmp_path, monkeypatch, capsys):
    """``python -m ml <args>`` run in this process: returns (exit code, stdout, stderr)."""
    from ml.__main__ import main

    for name, value in _settings_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()  # only this call's output
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["python", "-m", "ml", *args], code, out, err)

    return run


@pytest.mark.integration  # real `python -m ml` processes
def test_window_then_validate_pass_references_through_files(tmp_path):
    env = _env(tmp_path)
    out = _ml("window", "--end", END, "--output", str(tmp_path / "w.json"), env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    window = json.loads((tmp_path / "w.json").read_text())
    assert json.loads(out.stdout) == window
    assert [p["day"] for p in window["partitions"]] == ["2026-03-08", "2026-03-09"]

    checked = _ml("validate", "--window", str(tmp_path / "w.json"), env=env, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["total_rows"] == 400


def test_a_step_takes_its_input_inline_as_a_pod_gets_it_from_xcom(ml_main):
    out = ml_main("window", "--end", END)
    assert out.returncode == 0, out.stderr
    inline = json.dumps(json.loads(out.stdout))
    checked = ml_main("validate", "--window", inline)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["total_rows"] == 400

    broken = ml_main("validate", "--window", inline[:-5])
    assert broken.returncode == 2
    assert "not a JSON step result" in broken.stderr


def test_bad_partition_exits_2_naming_partition_column_and_rule(tmp_path, ml_main):
    ml_main("window", "--end", END, "--output", str(tmp_path / "w.json"))
    window = json.loads((tmp_path / "w.json").read_text())
    uri = window["partitions"][1]["uri"]
    frame = pd.read_parquet(uri)
    frame["solar_wm2"] = -5.0
    frame.to_parquet(uri)

    out = ml_main("validate", "--window", str(tmp_path / "w.json"))
    assert out.returncode == 2
    assert uri in out.stderr and "solar_wm2" in out.stderr and "range" in out.stderr


def test_bad_argument_value_exits_2_with_the_setting_named(ml_main):
    out = ml_main("window", "--end", END, "--window-days", "0")
    assert out.returncode == 2
    assert "window_days" in out.stderr


def test_there_is_no_promote_step_every_version_goes_live_through_the_rollout(ml_main, capsys):
    """@champion moves only in the rollout path, once the version answers right
    (python -m serving.deploy rollout --version N is the manual way)."""
    with pytest.raises(SystemExit) as exited:
        ml_main("promote", "--version", '{"version": "1"}')
    assert exited.value.code == 2
    assert "invalid choice: 'promote'" in capsys.readouterr().err
