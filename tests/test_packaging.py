"""The wheel ships every package of the source tree (`fastinf/` and its subpackages) and the
shipped weights: a subpackage the packaging config forgets imports fine from a checkout and
fails only once installed."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder → the import path its packages ship under (pyproject: package-dir).
PACKAGE_ROOTS = {"fastinf": "fastinf"}
WEIGHTS = Path("fastinf") / "weights"
STATIC = Path("fastinf") / "service" / "static"
# Top-level entries that are not part of a build; copying them would only slow it down or
# leak stale files (build/, *.egg-info) into it.
UNBUILT = (
    ".git",
    ".venv*",
    ".whl",
    ".*cache*",
    ".benchmarks",
    "demo_out",
    "build",
    "dist",
    "*.egg-info",
    "bench",
)


def unbuilt(folder: str, names: list[str]) -> set[str]:
    """`shutil.copytree` ignore: UNBUILT at the top level, __pycache__ everywhere."""
    ignored = {name for name in names if name == "__pycache__"}
    if Path(folder) == ROOT:
        ignored |= shutil.ignore_patterns(*UNBUILT)(folder, names)
    return ignored


def expected_members() -> set[str]:
    """Wheel paths of every module of every package (a folder with __init__.py) under the
    package roots, and of every file of the shipped weights and the service's page, read
    from the source tree."""
    members = set()
    for source, target in PACKAGE_ROOTS.items():
        for folder, subfolders, files in os.walk(ROOT / source):
            subfolders[:] = [name for name in subfolders if name != "__pycache__"]
            if "__init__.py" not in files:
                continue
            relative = Path(folder).relative_to(ROOT / source)
            members |= {
                (Path(target) / relative / name).as_posix()
                for name in files
                if name.endswith(".py")
            }
    for data in (WEIGHTS, STATIC):
        members |= {
            path.relative_to(ROOT).as_posix() for path in (ROOT / data).rglob("*") if path.is_file()
        }
    return members


def build_tooling_missing() -> str | None:
    for module in ("pip", "setuptools"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed in this environment (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    missing = build_tooling_missing()
    if missing:
        pytest.skip(f"cannot build the wheel: {missing}")
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree, and a
    # stale build/lib would put files into the wheel that the config no longer ships.
    source = tmp_path_factory.mktemp("source") / "fastinf"
    shutil.copytree(ROOT, source, ignore=unbuilt)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps"]
    command += ["--no-build-isolation", "--no-index", "-q", "-w", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"building the wheel failed:\n{done.stdout}\n{done.stderr}"
    (path,) = out.glob("fastinf-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_expected_members_are_read_from_the_source_tree():
    members = expected_members()
    assert {"fastinf/__init__.py", "fastinf/kernels/__init__.py"} <= members
    assert any(name.endswith(".safetensors") for name in members)
    assert not any(name.startswith("kernels/") for name in members)


def test_wheel_ships_every_package_and_the_weights(wheel):
    shipped = set(wheel.namelist())
    missing = sorted(expected_members() - shipped)
    assert not missing, f"the wheel lacks {missing}: fix the packaging config in pyproject.toml"
    stray = sorted(name for name in shipped if name.startswith("kernels/"))
    assert not stray, f"kernels must ship as fastinf.kernels, not as a top-level {stray}"


def test_no_top_level_folder_shadows_an_installed_package():
    """`python -m` puts the checkout's root first on sys.path, so a top-level package folder
    there would hide a distribution of the same name (a top-level `kernels/` once broke
    `import transformers`, which imports the `kernels` distribution)."""
    packages = sorted(path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file())
    assert packages == ["fastinf"], f"only fastinf/ may be a package at the root: {packages}"
