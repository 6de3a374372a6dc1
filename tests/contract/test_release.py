"""Release readiness: the sdist and wheel build, pass `twine check`, and the installed wheel runs the quickstart.

The wheel goes into a fresh virtual environment with nothing of the source tree on its path: its dependencies
(torch, transformers, peft) come from the test environment's site-packages through a `.pth` line, so nothing is
downloaded and the editable install of the test environment stays invisible (a `.pth` file is only read in a site
directory, not in a directory that another `.pth` file added).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import peft_xlora

ROOT = Path(__file__).resolve().parents[2]
# What the sdist is built from: the files setuptools packs (the package, metadata and the files MANIFEST.in names).
SDIST_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in", "src"]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """Builds the sdist, then the wheel from the unpacked sdist (what `python -m build` does), offline."""
    src = tmp_path_factory.mktemp("release-src")
    for name in SDIST_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with the setuptools already installed instead of downloading it.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=src)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_twine_check_passes(dists):
    output = _run([sys.executable, "-m", "twine", "check", "--strict", str(dists["sdist"]), str(dists["wheel"])], ROOT)
    assert output.count("PASSED") == 2, output


def test_version_is_single_sourced(dists):
    version = peft_xlora.__version__
    assert dists["wheel"].name == f"peft_xlora-{version}-py3-none-any.whl"
    assert dists["sdist"].name == f"peft_xlora-{version}.tar.gz"
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        metadata = wheel.read(f"peft_xlora-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata


def test_dists_hold_the_package_and_licence(dists):
    version = peft_xlora.__version__
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"peft_xlora-{version}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"peft_xlora-{version}.dist-info/entry_points.txt").decode()
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "peft_xlora").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert "peft_xlora/py.typed" in names
    assert f"peft_xlora-{version}.dist-info/licenses/LICENSE" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "peft-xlora = " in entry_points
    with tarfile.open(dists["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "src/peft_xlora/__init__.py"} <= members


def test_installed_wheel_runs_the_quickstart(dists, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip()
    )
    (purelib / "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(dists["wheel"]),
        ],
        tmp_path,
    )

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    check = (
        "import sys, importlib.metadata, peft_xlora\n"
        f"assert not {{{str(ROOT)!r}, {str(ROOT / 'src')!r}}} & set(sys.path), sys.path\n"
        f"assert peft_xlora.__file__.startswith({str(venv)!r}), peft_xlora.__file__\n"
        "assert importlib.metadata.version('peft-xlora') == peft_xlora.__version__\n"
        "print(peft_xlora.__version__)\n"
    )
    assert _run([str(python), "-c", check], tmp_path, env).strip() == peft_xlora.__version__
    assert "usage" in _run([str(venv / "bin" / "peft-xlora"), "--help"], tmp_path, env).lower()

    # The quickstart, run from a folder outside the source tree with the installed package.
    script = tmp_path / "quickstart.py"
    shutil.copy2(ROOT / "examples" / "quickstart.py", script)
    output = _run([str(python), str(script), "--steps", "2", "--out", str(tmp_path / "out")], tmp_path, env)
    assert "reloaded logits identical: True" in output
    assert (tmp_path / "out" / "xlora" / "adapter_config.json").is_file()
