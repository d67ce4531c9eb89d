"""Binaries built once per machine from a Go module pinned in the repository.

A module folder (``go.mod``, ``go.sum``, small ``*/main.go`` wrappers) names the programs; they
are built with ``go build`` into ``~/.cache/train-and-deploy/<module folder>/<digest>``, the
digest taken over the module's pins, so a changed pin builds again and an unchanged one never
does. Used by the Kubernetes tier's control plane (tests/k8s/controlplane) and the object
store (scripts/objectstore).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


class Unavailable(RuntimeError):
    """The binaries cannot be had here (no Go, not Linux, not built yet)."""


def cache_dir(module: Path) -> Path:
    """Where ``module``'s binaries live: per machine, per set of pins."""
    digest = hashlib.sha256()
    for path in sorted([module / "go.mod", module / "go.sum", *module.glob("*/*.go")]):
        digest.update(path.name.encode() + path.read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "train-and-deploy" / module.name / digest.hexdigest()[:16]


def find(module: Path, names: tuple[str, ...], *, also: Path | None = None, make: str) -> dict:
    """``{name: path}`` of each binary, from ``also`` (a folder of prebuilt ones) if there,
    else from the build cache; :class:`Unavailable` names what is missing and ``make``, the
    target that builds them."""
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"these binaries are built for Linux only (this is {sys.platform})")
    found, missing = {}, []
    for name in names:
        for folder in ([also] if also else []) + [cache_dir(module)]:
            if (folder / name).is_file() and os.access(folder / name, os.X_OK):
                found[name] = folder / name
                break
        else:
            missing.append(name)
    if missing:
        hint = (
            f"install Go >= 1.26 and run `make {make}`"
            if shutil.which("go") is None
            else f"run `make {make}` (builds them from {module.name}/, minutes once)"
        )
        raise Unavailable(f"no {', '.join(missing)} binary: {hint}")
    return found


def build(
    module: Path, packages: Mapping[str, str], *, also: Path | None = None, ldflags: str = ""
) -> Path:
    """``go build`` each ``{name: package}`` that neither the cache nor ``also`` holds into
    the cache (statically, ``CGO_ENABLED=0``); returns the cache folder."""
    go = shutil.which("go")
    if go is None:
        raise Unavailable(f"Go is not installed: building {module.name}/ needs Go >= 1.26")
    out = cache_dir(module)
    wanted = [n for n in packages if not (out / n).exists() and not (also and (also / n).exists())]
    if not wanted:
        return out
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"building {', '.join(wanted)} into {out} (the first build takes minutes)", flush=True)
    subprocess.run(
        [go, "build", "-trimpath", "-ldflags", ldflags, "-o", f"{staging}/"]
        + [packages[n] for n in wanted],
        cwd=module,
        check=True,
        env={**os.environ, "CGO_ENABLED": "0"},
    )
    out.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        (staging / name).replace(out / name)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"built in {time.monotonic() - started:.0f} s", flush=True)
    return out
