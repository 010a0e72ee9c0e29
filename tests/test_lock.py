"""The dependency lock that `make setup` installs from agrees with setup.cfg and the Makefile."""

from __future__ import annotations

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements-lock.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        assert version, f"lock line {line!r} is not NAME==VERSION"
        assert canonicalize_name(name) not in pins, f"{name} is pinned twice"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["test"].splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def test_every_requirement_is_pinned_inside_its_range() -> None:
    pins = _lock()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required by setup.cfg but not in requirements-lock.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements-lock.txt pins {req.name}=={pins[name]}, outside setup.cfg's {req.specifier}")


def test_every_extra_of_the_test_requirements_is_pinned() -> None:
    """lm-eval[hf] brings accelerate and peft: the lock holds what the extras pull in too."""
    pins = _lock()
    assert {"accelerate", "peft"} <= set(pins)


def test_make_installs_from_the_lock_and_the_torch_pin_agrees() -> None:
    makefile = (REPO / "Makefile").read_text()
    setup = makefile.split("$(BIN)/quantkit:", 1)[1].split("\n\n", 1)[0]
    installs = [line.strip() for line in setup.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("-c $(LOCK)" in line for line in installs), installs
    assert "LOCK = requirements-lock.txt" in makefile
    torch_pin = next(line for line in installs if "torch==" in line).split("torch==", 1)[1].split()[0]
    assert _lock()["torch"] == Version(torch_pin)
