"""Shared pytest set-up: a single-thread fixture, the ../shared fixture path, a small trained
checkpoint for the script tests, and a complete output folder of it."""
import os
import signal

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests send Ctrl-C and SIGHUP to this process and to the runs they start, and check that
# each is a cancel. A test command started in the background of a non-interactive shell (`cmd &`)
# has SIGINT ignored, and one under nohup SIGHUP; the runs they start would inherit that and,
# as designed, keep ignoring them. Deliverable signals are the tests' premise, so restore them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

SHARED_FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")
ORIGINAL_NET = os.path.join(SHARED_FIXTURES, "original-net.pkl")


@pytest.fixture
def original_net_path():
    """Path of the original PyHessianDist checkpoint; skips when ../shared is absent."""
    if not os.path.isfile(ORIGINAL_NET):
        pytest.skip("../shared/fixtures/original-net.pkl is not available")
    return ORIGINAL_NET


@pytest.fixture
def single_thread():
    """Run torch on one intra-op thread for the duration of a test.

    The tests' models are tiny; on a small, shared CPU two OpenMP threads competing with
    another busy process can be 10x slower than one, and one thread is what the
    subprocess tests get through OMP_NUM_THREADS=1 as well.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def trained_resnet8(seed=0, steps=30):
    """A ResNet8 after a few SGD steps on the synthetic data: a realistic, quick Hessian."""
    from models.resnet import resnet
    from support.datasets import get_datasets

    torch.manual_seed(seed)
    model = resnet(depth=8)
    data = get_datasets("synthetic").train_eval
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (64,), generator=g).tolist()
        x = torch.stack([data[i][0] for i in idx])
        y = torch.tensor([data[i][1] for i in idx])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A ResNet8 checkpoint in our format (written without training.py, in ~2 s)."""
    from problems import image_record
    from support.checkpoints import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "net.pkl"
    model = trained_resnet8()
    save_checkpoint(path, model, image_record(model, "synthetic"), epoch=1, test_accuracy=None,
                    args={})
    return str(path)


@pytest.fixture(scope="session")
def complete_outputs(checkpoint, tmp_path_factory):
    """A complete output folder (results.json and every figure of test_analysis.COMMON), written
    by a real analysis run: the earlier set that faults must leave byte for byte."""
    import subprocess
    import sys

    from test_analysis import COMMON, SCRIPT

    out = tmp_path_factory.mktemp("complete")
    proc = subprocess.run([sys.executable, SCRIPT, "--resume", checkpoint, "--output-dir",
                           str(out), *COMMON], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return out
