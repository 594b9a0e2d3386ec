"""The analysis run's timing line and results.json "timings" (support/report.py)."""
import time

import pytest

import utils

IMPORTED_AT = time.time()


def test_process_start_time_is_before_this_module_ran():
    start = utils.process_start_time()
    # /proc counts in clock ticks (10 ms): the start lies before this module was imported
    assert start <= IMPORTED_AT + 0.05
    assert start > IMPORTED_AT - 24 * 3600


def test_process_start_time_of_a_process_execed_from_an_earlier_one():
    """bash runs the last command of a subshell or && chain by exec: /proc then gives the
    subshell's start. The script's first statement replaces it when it is seconds earlier."""
    import os
    import subprocess
    import sys

    code = ("import time; t = time.time(); import utils; "
            "print(t - utils.process_start_time(), t - utils.process_start_time(t))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cmd, inherited in ((f"sleep 3; exec {sys.executable} -c '{code}'", True),
                           (f"{sys.executable} -c '{code}'", False)):
        out = subprocess.run(["bash", "-c", cmd], cwd=root, capture_output=True, text=True,
                             check=True).stdout.split()
        raw, fixed = map(float, out)
        assert (raw > 2.5) == inherited, (cmd, raw)   # /proc: the fork's time
        assert 0 <= fixed < 2.0, (cmd, fixed)        # the run's own start


def test_finish_timings_and_the_line():
    timings = {"process_start": time.time() - 10.0, "startup": 2.0, "data": 0.5,
               "setup_pass": 1.25, "products": 5.0, "writing": 0.75}
    utils.finish_timings(timings)
    assert timings["total"] == pytest.approx(10.0, abs=0.5)
    assert timings["other"] == pytest.approx(timings["total"] - 9.5)
    line = utils.timings_line(timings)
    assert line.startswith("timings: start-up 2.0 s, data 0.5 s, set-up pass 1.2 s, "
                           "products 5.0 s, writing 0.8 s; other ")
    assert line.endswith(f"total {timings['total']:.1f} s")
    assert [k for k, _ in utils.PHASES] == ["startup", "data", "setup_pass", "products",
                                           "writing"]
