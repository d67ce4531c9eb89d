"""The "nothing to do" decision: a run whose data, code and parameters are the live model's
ends early; anything less (or force_retrain) trains."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ml.lineage import (
    CODE_VERSION_TAG,
    DATA_DIGEST_TAG,
    FINGERPRINT_TAG,
    decide_unchanged,
    training_fingerprint,
    training_identity,
)
from ml.settings import DataSettings, TrainingSettings, with_overrides

TRAINING = TrainingSettings()
DATA = DataSettings()
CANDIDATE = training_identity("d" * 64, TRAINING, DATA, code="0123abcd")


def test_same_digest_code_and_parameters_is_unchanged():
    decision = decide_unchanged(CANDIDATE, "3", {**CANDIDATE, "holdout_rmse": "1.2"})
    assert decision.unchanged
    assert decision.champion_version == "3"
    assert decision.reason == (
        "unchanged: @champion v3 was trained on the same data digest, code version and parameters"
    )


@pytest.mark.parametrize(
    ("tag", "name"),
    [
        (DATA_DIGEST_TAG, "data digest"),
        (CODE_VERSION_TAG, "code version"),
        (FINGERPRINT_TAG, "parameters"),
    ],
)
def test_any_of_the_three_differing_is_changed(tag, name):
    decision = decide_unchanged(CANDIDATE, "3", {**CANDIDATE, tag: "other"})
    assert not decision.unchanged
    assert decision.reason == f"changed: not the same {name} as @champion v3"


@pytest.mark.parametrize("tag", [DATA_DIGEST_TAG, CODE_VERSION_TAG, FINGERPRINT_TAG])
def test_a_champion_without_the_tags_is_changed(tag):
    older = {k: v for k, v in CANDIDATE.items() if k != tag}
    decision = decide_unchanged(CANDIDATE, "2", older)
    assert not decision.unchanged
    assert f"@champion v2 has no {tag} tag" in decision.reason
    assert not decide_unchanged(CANDIDATE, "2", None).unchanged


def test_no_champion_is_changed():
    decision = decide_unchanged(CANDIDATE, None, None, alias="live")
    assert not decision.unchanged
    assert decision.reason == "changed: no @live yet"


def test_force_is_changed_even_when_everything_matches():
    decision = decide_unchanged(CANDIDATE, "3", dict(CANDIDATE), force=True)
    assert not decision.unchanged
    assert "force_retrain" in decision.reason


def test_an_unknown_code_version_never_matches():
    unknown = {**CANDIDATE, CODE_VERSION_TAG: "unknown"}
    assert not decide_unchanged(unknown, "3", dict(unknown)).unchanged


def test_the_fingerprint_follows_what_is_trained_not_where():
    base = training_fingerprint(TRAINING, DATA)
    assert base.startswith("sha256:") and base == training_fingerprint(TrainingSettings(), DATA)
    for field, value in [
        ("epochs", TRAINING.epochs + 1),
        ("learning_rate", TRAINING.learning_rate / 2),
        ("batch_size", TRAINING.batch_size * 2),
        ("hidden_units", [8]),
        ("seed", TRAINING.seed + 1),
        ("early_stopping_patience", TRAINING.early_stopping_patience + 1),
        ("validation_fraction", 0.3),
    ]:
        changed = with_overrides(TRAINING, **{field: value})
        assert training_fingerprint(changed, DATA) != base, field
    assert training_fingerprint(TRAINING, with_overrides(DATA, split_seed=7)) != base
    # Where and how fast it ran is not a parameter (a training pod sets threads and pod_*).
    placed = with_overrides(TRAINING, runner="kubernetes", threads=2, pod_cpu="4")
    assert training_fingerprint(placed, DATA) == base
    # Nor is the window's length: the digest is what says which data it was.
    assert training_fingerprint(TRAINING, with_overrides(DATA, window_days=3)) == base


@pytest.mark.integration  # a fresh interpreter
def test_the_check_imports_no_tensorflow(mlflow_store, tmp_path):
    """What the DAG's unchanged_check task calls, in a fresh interpreter, on an empty store
    (MLflow itself loads pandas; TensorFlow and Keras stay out)."""
    code = (
        "import sys\n"
        "from ml.pipeline import unchanged_check\n"
        "from ml.settings import DataSettings, RegistrySettings, TrainingSettings\n"
        "result = unchanged_check({'digest': 'x'}, DataSettings(), TrainingSettings(), "
        f"RegistrySettings(), tracking_uri={mlflow_store!r})\n"
        "assert result['unchanged'] is False, result\n"
        "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


# -- the code version -----------------------------------------------------------------------


def _git(root, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout with a committed package folder; GIT_SHA unset (a laptop, not an image)."""
    monkeypatch.delenv("GIT_SHA", raising=False)
    package = tmp_path / "ml"
    package.mkdir()
    (package / "model.py").write_text("UNITS = 64\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return package, _git(tmp_path, "rev-parse", "HEAD")


def test_a_clean_checkout_is_its_commit(checkout):
    from ml.lineage import code_version

    package, sha = checkout
    assert code_version(package) == sha


def test_uncommitted_changes_to_the_code_are_another_version_and_the_same_change_the_same(
    checkout,
):
    """Edited but not committed code must not read as the champion's code: else the nightly
    run would end "unchanged" and the edit would never train."""
    from ml.lineage import code_version

    package, sha = checkout
    (package / "model.py").write_text("UNITS = 128\n")
    edited = code_version(package)
    assert edited.startswith(f"{sha}+dirty.") and edited != sha
    assert code_version(package) == edited  # the same edit: the same version (can be unchanged)
    (package / "model.py").write_text("UNITS = 32\n")
    assert code_version(package) not in (sha, edited)
    (package / "model.py").write_text("UNITS = 64\n")
    assert code_version(package) == sha  # back to the commit
    (package / "extra.py").write_text("X = 1\n")  # a new file, not yet added
    assert code_version(package).startswith(f"{sha}+dirty.")


def test_changes_outside_the_package_do_not_change_its_version(checkout):
    from ml.lineage import code_version

    package, sha = checkout
    (package.parent / "README.md").write_text("docs only\n")
    assert code_version(package) == sha


def test_an_image_s_git_sha_wins_and_no_checkout_is_unknown(tmp_path, monkeypatch):
    from ml.lineage import UNKNOWN_CODE_VERSION, code_version

    monkeypatch.setenv("GIT_SHA", "abc123")
    assert code_version(tmp_path) == "abc123"
    monkeypatch.delenv("GIT_SHA")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repo above tmp
    assert code_version(tmp_path) == UNKNOWN_CODE_VERSION
