"""`make serve` installs requirements.txt only; `make test` adds requirements-test.txt.

A module the server imports at run time that is pinned only for the tests would work under
`make test` and fail on a machine that only serves; a test package pinned for serving is
shipped for nothing. These tests read the pin files and the installed packages' metadata.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.no_database

ROOT = Path(__file__).resolve().parent.parent
OWN_PACKAGES = ("server", "rules", "storage")
# Every virtual environment has pip; sqlite-utils declares it.
ALWAYS_THERE = {"pip"}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(file: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version and not re.search(r"[<>=!~;\s]", version), f"{file}: {line!r} is not an exact pin"
        out[normal(name)] = version
    return out


SERVING, TESTING = pins("requirements.txt"), pins("requirements-test.txt")
# An extra of one command (`report campaign --plot`), imported only when asked for and
# installed by hand; a library of the server may load it when it is there.
PLOT = pins("requirements-plot.txt")


def needs(dist: str) -> set[str]:
    """What one installed distribution requires on this Python, without extras."""
    out = set()
    for text in metadata.distribution(dist).requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.add(normal(req.name))
    return out


def distributions_of(top_level_names, every_name_installed: bool = True) -> set[str]:
    """The installed distributions providing these modules; this project's own excluded.
    Not every loaded module comes from one (__main__, the editable install's finder)."""
    by_module = metadata.packages_distributions()
    out = set()
    for name in top_level_names:
        if name in sys.stdlib_module_names or name in OWN_PACKAGES or name == "__future__":
            continue
        if every_name_installed:
            assert name in by_module, f"{name} is imported but no installed distribution provides it"
        out.update(normal(d) for d in by_module.get(name, ()))
    return out - {"loyalty"}


def test_the_pins_are_exact_apart_and_what_is_installed():
    assert not SERVING.keys() & TESTING.keys(), "pinned in both files"
    for name, version in {**SERVING, **TESTING}.items():
        assert metadata.version(name) == version, f"{name}: pinned {version}, installed {metadata.version(name)}"


def test_the_serving_pins_are_closed_under_their_requirements():
    """pip install -r requirements.txt in an empty venv installs nothing unpinned or test-only."""
    for dist in SERVING:
        missing = needs(dist) - SERVING.keys() - ALWAYS_THERE
        assert not missing, f"{dist} needs {sorted(missing)}, not in requirements.txt"
    both = SERVING.keys() | TESTING.keys()
    for dist in TESTING:
        missing = needs(dist) - both - ALWAYS_THERE
        assert not missing, f"{dist} needs {sorted(missing)}, pinned nowhere"


def test_every_import_of_the_server_source_is_a_serving_pin():
    """Read from the source, so imports inside functions (the /metrics handler's) count too."""
    names = set()
    for package in OWN_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    outside = distributions_of({n for n in names if normal(n) not in PLOT}) - SERVING.keys()
    assert not outside, f"the server imports {sorted(outside)}, which requirements.txt does not pin"


LOAD_ALL = """
import importlib, json, pkgutil, sys
for package in sys.argv[1:]:
    importlib.import_module(package)
    for info in pkgutil.walk_packages(sys.modules[package].__path__, package + "."):
        importlib.import_module(info.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_loading_every_server_module_loads_only_serving_distributions():
    """What the packages themselves import in turn, which reading the source cannot see."""
    out = subprocess.run([sys.executable, "-c", LOAD_ALL, *OWN_PACKAGES], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    outside = distributions_of(json.loads(out), every_name_installed=False) - SERVING.keys() - PLOT.keys()
    assert not outside, f"loading the server loads {sorted(outside)}, which requirements.txt does not pin"
