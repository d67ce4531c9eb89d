"""requirements.txt and constraints.txt say the same thing (both written by `make lock`).

constraints.txt is the tested venv's freeze; requirements.txt is what `pip install -r` needs
from it (pyproject.toml's runtime and dev dependencies, resolved with every version fixed by
constraints.txt). A version bumped in one file but not the other, or a dependency added to
pyproject.toml without re-running `make lock`, fails here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    """``{normalized name: version}`` of the ``name==version`` lines of a requirements file."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"{path.name}:{number}: not an exact `name==version` pin: {raw!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{path.name}:{number}: {name} is pinned twice"
        pins[name] = match.group(2)
    return pins


def _direct_dependencies() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [Requirement(spec) for spec in specs]


def test_every_requirements_pin_is_the_constraints_pin():
    constraints = _pins(REPO / "constraints.txt")
    requirements = _pins(REPO / "requirements.txt")

    assert requirements, "requirements.txt pins nothing"
    missing = sorted(set(requirements) - set(constraints))
    assert missing == [], f"pinned in requirements.txt, absent from constraints.txt: {missing}"
    differ = {
        name: (version, constraints[name])
        for name, version in requirements.items()
        if version != constraints[name]
    }
    assert differ == {}, f"requirements.txt vs constraints.txt versions differ: {differ}"


def test_every_direct_dependency_is_pinned_in_requirements_within_its_range():
    requirements = _pins(REPO / "requirements.txt")

    for requirement in _direct_dependencies():
        name = canonicalize_name(requirement.name)
        assert name in requirements, (
            f"{requirement.name} (pyproject.toml) is not in requirements.txt: run `make lock`"
        )
        assert requirement.specifier.contains(requirements[name], prereleases=True), (
            f"requirements.txt pins {name}=={requirements[name]}, outside pyproject.toml's "
            f"{requirement}"
        )


def test_make_lock_writes_both_files():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("\nlock:", 1)[1].split("\n\n", 1)[0]
    assert "mv constraints.txt.tmp constraints.txt" in recipe
    assert "--output-file requirements.txt" in recipe
