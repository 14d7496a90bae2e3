"""The layout's import contracts (pyproject.toml [tool.importlinter]): kept by the tree, and broken by a
forbidden import planted in a copy of it, so the check cannot pass vacuously."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT

PACKAGES = ("app", "worker", "common", "cli", "dispatcher", "cleanup", "tools")
LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT, "--config", "pyproject.toml", "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def copy_tree(dest: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("node_modules", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_tree_keeps_every_contract() -> None:
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("KEPT") == 4 and "BROKEN" not in r.stdout


@pytest.mark.parametrize("module, planted, contract", [
    ("app/routes/health.py", "import worker.pipeline", "The API never imports the worker"),
    ("app/routes/health.py", "import torch", "The API never imports the worker"),
    ("worker/encode.py", "import app.errors", "The worker never imports the API"),
    ("common/logs.py", "import fastapi", "The shared package imports neither"),
    ("dispatcher/delivery.py", "import worker.runner", "The dispatcher and cleanup need neither"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, planted: str, contract: str) -> None:
    root = copy_tree(tmp_path)
    target = root / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    r = lint(root)
    assert r.returncode != 0, r.stdout
    broken = [line for line in r.stdout.splitlines() if "BROKEN" in line]
    assert any(line.startswith(contract) for line in broken), r.stdout
