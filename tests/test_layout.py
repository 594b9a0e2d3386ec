"""The layout's rules (DESIGN.md): data flows one way, so no module of the library
(pyhessian_dist/), the analyses (analyses/) or the scripts' side (support/) imports a top-level
script; and a run that draws nothing never imports matplotlib."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}  # the top-level scripts and utils.py
BELOW = ("pyhessian_dist", "analyses", "support")


def absolute_imports(source: str) -> set[str]:
    """The top-level names of every absolute import in ``source``, also those inside functions
    (``from . import x`` and ``from .utils import y`` are the package's own modules)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_import_reader_sees_lazy_imports_and_skips_relative_ones():
    source = ("import os, torch.nn\n"
              "from .utils import group_add\n"
              "def draw():\n"
              "    from density_plot import get_esd_plot\n"
              "    import training as t\n")
    assert absolute_imports(source) == {"os", "torch", "density_plot", "training"}


def test_no_module_below_the_scripts_imports_a_script():
    assert {"density_plot", "training", "example_pyhessian_analysis", "utils"} <= SCRIPTS
    modules = [p for package in BELOW for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(modules) > 20
    offenders = {str(p.relative_to(ROOT)): sorted(absolute_imports(p.read_text()) & SCRIPTS)
                 for p in modules}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_matplotlib_is_imported_only_to_draw():
    code = ("import sys, analyses, density_plot, example_pyhessian_analysis, training, utils\n"
            "assert 'matplotlib' not in sys.modules, 'imported at start-up'\n"
            "from support.figures import esd_figure\n"
            "esd_figure([[0.0, 1.0]], [[0.5, 0.5]])\n"
            "import matplotlib\n"
            "print(matplotlib.get_backend())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().lower() == "agg"
