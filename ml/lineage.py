"""What a model is trained from, and whether the live one was trained from the same.

A training is identified by three things: the content digest of its data window
(``ml.pipeline.load_window``), the code version (git sha) and a fingerprint of the effective
training parameters. The training run and the version it registers carry all three as tags;
when the ``@champion`` version's tags equal the ones a new run would have, retraining would
reproduce it, and the run ends early as "unchanged" (unless forced).

Light on purpose: no TensorFlow, MLflow or pandas, so the check before training is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.settings import DataSettings, TrainingSettings

DATA_DIGEST_TAG = "data_digest"
CODE_VERSION_TAG = "code_version"
FINGERPRINT_TAG = "training_fingerprint"
# In the order the log names them.
IDENTITY_TAGS = {
    DATA_DIGEST_TAG: "data digest",
    CODE_VERSION_TAG: "code version",
    FINGERPRINT_TAG: "parameters",
}
UNKNOWN_CODE_VERSION = "unknown"
# Where and how fast it ran is not what it learned: the runner and pod sizing, and the thread
# count (training pods set it from their CPU limit, a worker leaves it to TensorFlow).
_PLACEMENT_FIELDS = frozenset({"runner", "threads"})
# The data settings that decide which rows train and how they are split; the rows' content
# is the data digest.
_DATA_FIELDS = ("feature_columns", "target_column", "holdout_fraction", "split_seed")


def code_version(package: Path | None = None) -> str:
    """The version of the code that trains: GIT_SHA (set in images), else the checkout's commit.

    Uncommitted changes under ``package`` (the ``ml`` package by default: what builds and fits
    the model) make it ``<sha>+dirty.<digest of the changes>``: edited code is never read as
    the champion's code, and the same edit gives the same version. Changes elsewhere in the
    checkout do not count.
    """
    if sha := os.environ.get("GIT_SHA", "").strip():
        return sha
    root = package or Path(__file__).resolve().parent
    try:
        head = _git(root, "rev-parse", "HEAD").decode().strip()
        changed = _git(root, "diff", "HEAD", "--binary", "--", ".")
        untracked = _git(root, "ls-files", "-z", "--others", "--exclude-standard", "--", ".")
        if not head:
            return UNKNOWN_CODE_VERSION
        if not changed and not untracked:
            return head
        digest = hashlib.sha256(changed)
        for name in sorted(n for n in untracked.decode().split("\0") if n):
            digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN_CODE_VERSION
    return f"{head}+dirty.{digest.hexdigest()[:12]}"


def _git(root: Path, *args: str) -> bytes:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, timeout=5, check=True
    ).stdout


def training_fingerprint(training: TrainingSettings, data: DataSettings) -> str:
    """``sha256:<hex>`` of the effective parameters (placement fields left out), as canonical
    JSON (sorted keys)."""
    fields = {
        name: value
        for name, value in training.model_dump(mode="json").items()
        if name not in _PLACEMENT_FIELDS and not name.startswith("pod_")
    }
    split = data.model_dump(mode="json", include=set(_DATA_FIELDS))
    text = json.dumps({"training": fields, "data": split}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def training_identity(
    data_digest: str, training: TrainingSettings, data: DataSettings, *, code: str | None = None
) -> dict[str, str]:
    """The tags that identify a training: data digest, code version, parameter fingerprint."""
    return {
        DATA_DIGEST_TAG: data_digest,
        CODE_VERSION_TAG: code if code is not None else code_version(),
        FINGERPRINT_TAG: training_fingerprint(training, data),
    }


@dataclass(frozen=True)
class UnchangedDecision:
    unchanged: bool
    reason: str
    champion_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_unchanged(
    candidate: Mapping[str, str],
    champion_version: str | None,
    champion_tags: Mapping[str, str] | None,
    *,
    force: bool = False,
    alias: str = "champion",
) -> UnchangedDecision:
    """Whether training ``candidate`` (a :func:`training_identity`) would redo ``@alias``.

    Unchanged only when the champion's tags hold the same data digest, code version and
    parameter fingerprint. Anything less is "changed" (train): ``force``, no champion, a
    champion without the tags (registered before they were recorded), an unknown code
    version (on either side), or any of the three differing.
    """
    if force:
        return UnchangedDecision(False, "changed: force_retrain is set, training anyway")
    if champion_version is None:
        return UnchangedDecision(False, f"changed: no @{alias} yet")
    who = f"@{alias} v{champion_version}"
    tags = champion_tags or {}
    missing = [tag for tag in IDENTITY_TAGS if not tags.get(tag)]
    differing = [name for tag, name in IDENTITY_TAGS.items() if candidate.get(tag) != tags.get(tag)]
    if missing:
        why = f"{who} has no {', '.join(missing)} tag (registered before it was recorded)"
    elif UNKNOWN_CODE_VERSION in (candidate.get(CODE_VERSION_TAG), tags[CODE_VERSION_TAG]):
        why = f"the code version is unknown, no match with {who}"
    elif differing:
        why = f"not the same {', '.join(differing)} as {who}"
    else:
        why = None
    if why:
        return UnchangedDecision(False, f"changed: {why}", champion_version)
    same = "the same data digest, code version and parameters"
    return UnchangedDecision(True, f"unchanged: {who} was trained on {same}", champion_version)
