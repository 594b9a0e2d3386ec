"""Test-only entry point: run a script as ``__main__`` with its ``import torch`` blocked.

``PYTHONPATH=. python tests/import_entry.py SCRIPT ARGS...`` prints ``[fault] blocked in import
torch`` on stdout when the script starts importing torch and then waits, so that a test can
cancel a script deterministically while it is still importing (the product code has no hook).
"""
import importlib.abc
import os
import runpy
import sys
import time


class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print(f"[fault] blocked in import torch (pid {os.getpid()})", flush=True)
            time.sleep(600)
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, _BlockTorch())
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
