"""The pinned requirement sets and the conda env agree with pyproject.toml."""
import tomllib

import yaml
from packaging.requirements import Requirement

from tests.conftest import REPO


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            r = Requirement(line)
            (spec,) = r.specifier
            assert spec.operator == "==", f"{line}: not an exact pin"
            out[r.name.lower()] = spec.version
    return out


def test_requirements_pin_every_dependency_within_pyproject_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    sets = [(project["dependencies"], "requirements.txt")]
    sets += [(deps, f"requirements-{extra}.txt") for extra, deps in project["optional-dependencies"].items()]
    for deps, req_file in sets:
        pins = _pins((REPO / "envs" / req_file).read_text().splitlines())
        declared = {Requirement(d).name.lower(): Requirement(d) for d in deps}
        assert set(pins) == set(declared), f"envs/{req_file} vs pyproject: {set(pins) ^ set(declared)}"
        for name, version in pins.items():
            assert declared[name].specifier.contains(version), f"{name}=={version} outside {declared[name]}"


def test_conda_env_matches_requirements():
    env = yaml.safe_load((REPO / "envs" / "stagediff.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip) == _pins((REPO / "envs" / "requirements.txt").read_text().splitlines())
    assert "torch==2.13.0" in pip
