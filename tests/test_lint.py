"""The tree passes ruff with the project's configuration (pyproject.toml), and only the library
is installed."""
import json
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


def test_only_the_library_is_installed(tmp_path):
    """`pip install -e .` puts pyhessian_dist (and its subpackages) in site-packages, nothing
    else: the scripts' module names (utils, models, support, ...) would shadow a user's own."""
    names = ["pyhessian_dist", "pyhessian_dist.operators", "utils", "models", "support",
             "analyses", "problems", "bench", "training", "density_plot"]
    code = ("import importlib.util, json; print(json.dumps({n: importlib.util.find_spec(n) "
            f"is not None for n in {names!r}}}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items()
                                          if k != "PYTHONPATH"})
    assert proc.returncode == 0, ("the installed pyhessian_dist cannot be imported from another "
                                  "folder (is pip's editable install of it this checkout? "
                                  f"`pip install -e .`): {proc.stderr[-400:]}")
    found = json.loads(proc.stdout)
    assert found["pyhessian_dist"] and found["pyhessian_dist.operators"]
    assert not any(found[n] for n in names[2:]), found
