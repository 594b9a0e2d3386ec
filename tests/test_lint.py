"""The tree passes ruff with the project's configuration (pyproject.toml)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    try:
        proc = subprocess.run([*cmd, "check", "."], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
    except FileNotFoundError:
        pytest.fail("ruff is not installed: pip install -r requirements.txt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
