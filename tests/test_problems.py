"""Your own problem in one file (--problem): the contract, its checks, and both scripts end to
end on 1 and 3 processes against the exact Hessian (torch.func.hessian)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, hessian

from problems import FileProblem, ProblemError, build_model, check_problem
from support.checkpoints import read_checkpoint
from support.datasets import hessian_subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
REGRESSION = os.path.join(EXAMPLES, "regression.py")
DICTS = os.path.join(EXAMPLES, "dict_classifier.py")
# 50 samples in mini-batches of 20 -> [20, 20, 10]: uneven shards on 3 ranks
SAMPLES = ["--hessian-batch-size", "50", "--mini-hessian-batch-size", "20", "--seed", "3"]


def script(name, args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def exact_hessian(path, checkpoint=None, samples=50, seed=3, double=True):
    """The dense Hessian of the problem's mean loss over the analysis's Hessian samples, from
    torch.func.hessian of the flattened trainable parameters (an independent path: one batch of
    all samples, no mini-batches, no operator)."""
    problem = FileProblem(path, seed=seed)
    state = read_checkpoint(checkpoint)[0] if checkpoint else None
    model = build_model(problem, state, checkpoint)
    train = problem.dataset("train")
    batch = torch.utils.data.default_collate(
        [train[i] for i in hessian_subset(train, samples, seed)])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters()
                       if p.requires_grad])
    if double:
        theta = theta.double()
        model.double()
        batch = _double(batch)

    def loss(flat):
        ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, [s.numel() for s in
                                                                       shapes]), shapes)}
        outputs = problem.forward(_Call(model, ps), batch)
        return problem.loss(outputs, batch)

    return hessian(loss)(theta)


class _Call(torch.nn.Module):
    """``model`` with its parameters replaced by ``params`` (torch.func.functional_call)."""

    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, *args):
        return functional_call(self.model, self.params, args)


def _double(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_double(v) for v in x)
    return x


def analysis(args, out, world):
    proc = script("example_pyhessian_analysis.py", [
        *args, "--no-cuda", "--device_count", str(world), "--port", "0", *SAMPLES,
        "--eigenvalue", "--top-n", "3", "--tol", "1e-6", "--max-iter", "200", "--trace",
        "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc


def assert_exact(record, H, rtol):
    top = torch.linalg.eigvalsh(H).flip(0)[:3].tolist()
    assert record["results"]["eigenvalue"]["eigenvalues"] == pytest.approx(top, rel=rtol)
    tr = record["results"]["trace"]
    exact = float(torch.trace(H))
    assert abs(tr["trace"] - exact) <= 4 * tr["stderr"], (tr["trace"], tr["stderr"], exact)


# ------------------------------------------------------------------ the contract's checks
def problem_file(tmp_path, body, name="p.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


GOOD = textwrap.dedent("""
    import torch
    from torch import nn

    def model():
        return nn.Linear(3, 2)

    def dataset(split):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.TensorDataset(torch.randn(10, 3, generator=g),
                                              torch.randint(0, 2, (10,), generator=g))
""")

BAD = {
    "no model": ("import torch\ndef dataset(split):\n    return [1]\n",
                 "defines no model()"),
    "no functions": ("x = 1\n", "defines no model() and no dataset()"),
    "not a module": (GOOD + "\ndef model():\n    return {'w': 1}\n",
                     "model() returned a dict, not a torch.nn.Module"),
    "empty data": (GOOD + "\ndef dataset(split):\n    return []\n",
                   "dataset('train') is empty"),
    "iterable data": (GOOD + "\ndef dataset(split):\n    return iter([1, 2])\n",
                      "not a map-style data set"),
    "nan loss": (GOOD + "\ndef loss(outputs, batch):\n    return outputs.sum() * float('nan')\n",
                 "the loss of a first batch is nan"),
    "vector loss": (GOOD + "\ndef loss(outputs, batch):\n    return outputs.sum(dim=1)\n",
                    "not a scalar tensor"),
    "constant loss": (GOOD + "\ndef loss(outputs, batch):\n    return torch.tensor(1.0)\n",
                      "does not depend on the model's trainable parameters"),
    "syntax": ("def model(:\n", "syntax error on line 1"),
    "import fails": ("import no_such_module_xyz\n", "No module named 'no_such_module_xyz'"),
    "frozen": (GOOD + "\ndef model():\n    m = nn.Linear(3, 2)\n    m.requires_grad_(False)\n"
               "    return m\n", "no trainable parameters"),
    "model raises": (GOOD + "\ndef model():\n    raise ValueError('no weights here')\n",
                     "model() failed: ValueError: no weights here"),
}


def check(path):
    problem = FileProblem(path)
    model = build_model(problem)
    return check_problem(problem, model, splits=("train", "test"))


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_problem_file_is_one_sentence_naming_the_file(tmp_path, case):
    body, says = BAD[case]
    path = problem_file(tmp_path, body)
    with pytest.raises(ProblemError) as info:
        check(path)
    message = str(info.value)
    assert path in message and "\n" not in message
    if says:
        assert says in message, message


def test_tensors_that_disagree_on_the_leading_size_are_named(tmp_path):
    """A collate() of its own (e.g. padding sequences) may return tensors of different leading
    sizes; the sample count of such a batch is undefined."""
    path = problem_file(tmp_path, GOOD + textwrap.dedent("""
        def collate(samples):
            x = torch.stack([s[0] for s in samples])
            return x, torch.zeros(len(samples) + 1, dtype=torch.long)
    """))
    with pytest.raises(ProblemError, match="must agree on their leading size") as info:
        check(path)
    assert path in str(info.value)


def test_a_good_file_passes_and_reports_what_it_found(tmp_path):
    found = check(problem_file(tmp_path, GOOD))
    assert found["num_samples"] == {"train": 10, "test": 10}
    assert found["has_accuracy"] and found["loss"] > 0


def test_model_and_data_are_seeded_and_the_problem_pickles(tmp_path):
    import pickle

    path = problem_file(tmp_path, """
        import torch
        from torch import nn

        def model():
            return nn.Linear(3, 2)          # initialised from torch's global RNG

        def dataset(split):
            return torch.utils.data.TensorDataset(torch.randn(6, 3), torch.zeros(6).long())
    """)
    a, b = FileProblem(path, seed=5), pickle.loads(pickle.dumps(FileProblem(path, seed=5)))
    torch.manual_seed(123)  # the global state does not matter, and is left as it was
    state = torch.random.get_rng_state()
    assert torch.equal(a.model().weight, b.model().weight)
    assert torch.equal(a.dataset("train").tensors[0], b.dataset("train").tensors[0])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(FileProblem(path, seed=6).model().weight, a.model().weight)


# ------------------------------------------------------------------ the scripts
@pytest.mark.parametrize("case", ["not a module", "empty data", "nan loss", "no model"])
def test_bad_problem_files_stop_both_scripts_before_any_worker(tmp_path, case):
    path = problem_file(tmp_path, BAD[case][0])
    for name, args in (("example_pyhessian_analysis.py", ["--eigenvalue", "--device_count",
                                                          "2", "--output-dir",
                                                          str(tmp_path / "out")]),
                       ("training.py", ["--epochs", "1", "--saving-folder",
                                        str(tmp_path / "ck")])):
        proc = script(name, ["--problem", path, "--no-cuda", "--port", "0", *args],
                      timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert path in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "loading the model" not in proc.stdout and "epoch 1" not in proc.stdout


@pytest.mark.parametrize("flag", [["--dataset", "synthetic"], ["--model", "torch.nn:Linear"],
                                  ["--no-batch-norm"]])
def test_builtin_flags_are_refused_with_a_problem_file(tmp_path, flag):
    proc = script("example_pyhessian_analysis.py", [
        "--problem", REGRESSION, "--eigenvalue", "--no-cuda", *flag], timeout=120)
    assert proc.returncode == 2 and "describes the built-in image problem" in proc.stderr


def test_nothing_to_analyse_says_what_to_pass():
    proc = script("example_pyhessian_analysis.py", ["--eigenvalue", "--no-cuda"], timeout=120)
    assert proc.returncode == 2 and "--resume CKPT" in proc.stderr and "--problem" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_regression_file_as_built_is_exact(tmp_path, world):
    """float64 regression MLP at initialisation, analysed as model() builds it."""
    record, proc = analysis(["--problem", REGRESSION], tmp_path, world)
    assert record["world_size"] == world
    if world == 3:
        assert record["data"]["samples_per_rank"] == [20, 20, 10]
    assert record["operator"]["num_matvecs"] > 0
    assert "regression.py" in proc.stdout and "as model() builds it" in proc.stdout
    assert "mean loss of loss() in regression.py" in proc.stdout
    assert_exact(record, exact_hessian(REGRESSION), rtol=1e-7)


@pytest.fixture(scope="module")
def trained_dicts(tmp_path_factory):
    """dict_classifier.py trained 2 epochs by training.py (its recipe, 1 process)."""
    folder = tmp_path_factory.mktemp("dicts")
    proc = script("training.py", ["--problem", DICTS, "--epochs", "2", "--no-cuda",
                                  "--num-workers", "0", "--saving-folder", str(folder)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "net.pkl", proc


@pytest.mark.slow
def test_training_a_problem_file_records_it(trained_dicts):
    path, proc = trained_dicts
    assert "epoch 2/2" in proc.stdout and " acc " in proc.stdout  # accuracy() is reported
    assert "recipe: SGD lr 0.1" in proc.stdout  # the file's recipe()
    _state, meta = read_checkpoint(path)
    assert meta["problem"]["kind"] == "file" and meta["problem"]["path"] == DICTS
    assert len(meta["problem"]["sha256"]) == 64 and meta["epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_trained_dict_classifier_resumed_without_the_flag_is_exact(trained_dicts, tmp_path,
                                                                   world):
    path, _ = trained_dicts
    record, proc = analysis(["--resume", str(path)], tmp_path, world)
    assert record["model"]["problem"]["path"] == DICTS
    H = exact_hessian(DICTS, checkpoint=str(path))
    assert_exact(record, H.float().double(), rtol=2e-4)  # a float32 model


@pytest.mark.slow
def test_a_changed_problem_file_is_noted_on_resume(trained_dicts, tmp_path):
    path, _ = trained_dicts
    copy = tmp_path / "dict_copy.py"
    copy.write_text(Path(DICTS).read_text())
    ck = tmp_path / "ck"
    proc = script("training.py", ["--problem", str(copy), "--epochs", "1", "--no-cuda",
                                  "--num-workers", "0", "--saving-folder", str(ck)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(copy, "a") as fh:
        fh.write("\n# edited after training\n")
    proc = script("example_pyhessian_analysis.py", [
        "--resume", str(ck / "net.pkl"), "--no-cuda", "--eigenvalue", *SAMPLES,
        "--output-dir", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has changed since checkpoint" in proc.stderr


UNSEEN = os.path.join(ROOT, "tests", "problems")


@pytest.mark.slow
@pytest.mark.parametrize("name, double, rtol", [
    ("bn_cnn.py", True, 1e-7),            # BatchNorm in eval mode, 3-tuples, the defaults
    ("two_inputs.py", True, 1e-7),        # nested dicts, two inputs, frozen and unused params
    ("list_regression.py", False, 1e-4),  # lists of floats, float32, Huber loss
])
def test_other_problem_files_are_exact_on_three_processes(tmp_path, name, double, rtol):
    path = os.path.join(UNSEEN, name)
    record, _ = analysis(["--problem", path], tmp_path, 3)
    assert record["data"]["samples_per_rank"] == [20, 20, 10]
    assert_exact(record, exact_hessian(path, double=double), rtol=rtol)
