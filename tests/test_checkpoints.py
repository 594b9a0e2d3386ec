"""Checkpoints: our format round trip, the original's plain state_dicts, and clear errors."""
import io
import os

import pytest
import torch

import utils
from models import resnet

pytestmark = pytest.mark.usefixtures("single_thread")

VARIANTS = [(True, True), (True, False), (False, True), (False, False)]


def save_plain(model, path, prefix="module."):
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)


def perturbed(model):
    """Give BN buffers non-default values so a round trip that drops them would show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.add_(torch.rand(buf.shape, generator=g))
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def same_outputs(a, b):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("batch_norm,residual", VARIANTS)
@pytest.mark.parametrize("prefix", ["module.", ""])
def test_original_format_infers_architecture(tmp_path, batch_norm, residual, prefix):
    model = perturbed(resnet(20, batch_norm=batch_norm, residual=residual))
    path = tmp_path / "net.pkl"
    save_plain(model, path, prefix)
    loaded, meta = utils.load_checkpoint(path)
    assert meta["arch"] == {"name": "resnet", "depth": 20, "batch_norm": batch_norm,
                            "residual": residual, "num_classes": 10}
    assert meta["source"] == "original-state-dict"
    assert meta["dataset"] is None and meta["normalization"] is None and meta["epoch"] is None
    assert meta["path"] == str(path)
    assert (loaded.batch_norm, loaded.residual, loaded.depth) == (batch_norm, residual, 20)
    assert not loaded.training
    assert same_outputs(model, loaded)


# Parameter counts worked out by hand (BN + residual): conv1+bn1 464; per stage-1 block 4,672;
# first block of stage 2 / 3 (with projection) 14,528 / 57,728, later blocks 18,560 / 73,984;
# fc 65 * num_classes.  ResNet20 gives the original's 272,474 the same way.
HAND_COUNTS = {(32, 10): 466_906, (8, 100): 83_892}


@pytest.mark.parametrize("depth,num_classes", sorted(HAND_COUNTS))
def test_original_format_infers_depth_and_classes(tmp_path, depth, num_classes):
    model = perturbed(resnet(depth, num_classes=num_classes)).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)  # the saved model's outputs, recorded before it is saved
    path = tmp_path / "net.pkl"
    save_plain(model, path)
    del model
    loaded, meta = utils.load_checkpoint(path)
    assert meta["arch"]["depth"] == depth and meta["arch"]["num_classes"] == num_classes
    assert utils.count_parameters(loaded) == HAND_COUNTS[(depth, num_classes)]
    with torch.no_grad():
        assert torch.equal(loaded(x), before)


def test_real_original_checkpoint(original_net_path):
    raw = torch.load(original_net_path, map_location="cpu", weights_only=True)
    assert len(raw) == 128 and all(k.startswith("module.") for k in raw)
    model, meta = utils.load_checkpoint(original_net_path)
    assert meta["arch"] == {"name": "resnet", "depth": 20, "batch_norm": True, "residual": True,
                            "num_classes": 10}
    assert meta["source"] == "original-state-dict"
    assert utils.count_parameters(model) == 272_474
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["module." + k])
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    # consistent explicit flags are fine, contradicting ones are not
    utils.load_checkpoint(original_net_path, batch_norm=True, residual=True)
    with pytest.raises(utils.CheckpointError, match="--no-residual"):
        utils.load_checkpoint(original_net_path, residual=False)


def test_our_format_round_trip(tmp_path):
    model = perturbed(resnet(8, num_classes=7, batch_norm=True, residual=False))
    path = tmp_path / "sub" / "dir" / "ck.pkl"  # parents are created
    args = {"lr": 0.1, "lr_decay_epoch": (80, 120), "saving_folder": tmp_path, "cuda": False}
    norm = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    utils.save_checkpoint(path, model, utils.image_record(model, "synthetic", norm), epoch=3,
                          test_accuracy=81.5, args=args)
    raw = torch.load(path, weights_only=True)  # only plain types inside
    assert raw["format"] == "pyhessian-dist-checkpoint" and raw["format_version"] == 1
    assert raw["args"]["lr_decay_epoch"] == [80, 120]
    assert raw["args"]["saving_folder"] == str(tmp_path)
    assert raw["torch_version"] == torch.__version__
    assert not any(k.startswith("module.") for k in raw["state_dict"])
    loaded, meta = utils.load_checkpoint(path)
    assert meta["arch"] == {"name": "resnet", "depth": 8, "batch_norm": True, "residual": False,
                            "num_classes": 7}
    assert meta["source"] == "pyhessian-dist"
    recorded = (meta["dataset"], meta["normalization"], meta["epoch"], meta["test_accuracy"])
    assert recorded == ("synthetic", norm, 3, 81.5)
    assert same_outputs(model, loaded)
    assert not [f for f in os.listdir(path.parent) if f != "ck.pkl"]  # no temp files left


def test_save_unwraps_dataparallel(tmp_path):
    model = resnet(8)
    utils.save_checkpoint(tmp_path / "ck.pkl", torch.nn.DataParallel(model),
                          utils.image_record(model, "synthetic"), epoch=1, test_accuracy=None,
                          args={})
    raw = torch.load(tmp_path / "ck.pkl", weights_only=True)
    assert "conv1.weight" in raw["state_dict"]


@pytest.mark.parametrize("flag,value,expected", [
    ("batch_norm", False, "--no-batch-norm was given; drop the flag or pass --batch-norm"),
    ("residual", False, "--no-residual was given; drop the flag or pass --residual"),
])
def test_contradicting_flags_our_format(tmp_path, flag, value, expected):
    path = tmp_path / "ck.pkl"
    utils.save_checkpoint(path, resnet(8), utils.image_record(resnet(8), "synthetic"), epoch=1,
                          test_accuracy=50.0, args={})
    with pytest.raises(utils.CheckpointError) as info:
        utils.load_checkpoint(path, **{flag: value})
    msg = str(info.value)
    assert f"trained with {flag}=True" in msg and expected in msg and str(path) in msg


def test_contradicting_flags_original_format(tmp_path):
    path = tmp_path / "net.pkl"
    save_plain(resnet(20, batch_norm=False, residual=False), path)
    with pytest.raises(utils.CheckpointError, match="batch_norm=False but --batch-norm was given"):
        utils.load_checkpoint(path, batch_norm=True)
    with pytest.raises(utils.CheckpointError, match="residual=False but --residual was given"):
        utils.load_checkpoint(path, residual=True)
    utils.load_checkpoint(path, batch_norm=False, residual=False)


def test_missing_file(tmp_path):
    with pytest.raises(utils.CheckpointError, match="checkpoint not found: .*nope.pkl"):
        utils.load_checkpoint(tmp_path / "nope.pkl")
    with pytest.raises(utils.CheckpointError, match="is a folder, not a file; pass the "
                       "checkpoint in it"):
        utils.load_checkpoint(tmp_path)  # a folder is not a checkpoint


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, legacy):
    buf = io.BytesIO()
    torch.save(resnet(8).state_dict(), buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    path = tmp_path / "half.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(utils.CheckpointError) as info:
        utils.load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"cannot read checkpoint {path}: ") and "complete file" in msg
    assert "\n" not in msg


def test_truncated_real_original(tmp_path, original_net_path):
    with open(original_net_path, "rb") as fh:
        data = fh.read()
    path = tmp_path / "half.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(utils.CheckpointError, match="cannot read checkpoint"):
        utils.load_checkpoint(path)


def _torch_bytes(obj, legacy=False):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _npy_bytes():
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    return buf.getvalue()


def _gzip_bytes():
    import gzip

    return gzip.compress(_torch_bytes({"a": torch.zeros(2)}))


NOT_TORCH = "it is not a file written by torch.save"
INCOMPLETE = "it is not a complete file written by torch.save ("
UNREADABLE = {
    # name: (file content, what the message must say about it)
    "text": (lambda: b"# notes\nlr = 0.1\n" * 20, f"{NOT_TORCH} (it starts with text: '# notes"),
    "garbage": (lambda: b"garbage" * 100, "it starts with text: 'garbage"),
    "empty": (lambda: b"", "the file is empty (0 bytes)"),
    "binary": (lambda: bytes(range(256)) * 4, INCOMPLETE),
    "truncated zip": (lambda: _torch_bytes(resnet(8).state_dict())[:3000], INCOMPLETE),
    "truncated legacy": (lambda: _torch_bytes(resnet(8).state_dict(), legacy=True)[:3000],
                         INCOMPLETE),
    "plain pickle": (lambda: b"\x80\x02}q\x00.", INCOMPLETE),
    "numpy": (_npy_bytes, INCOMPLETE),
    "gzip": (_gzip_bytes, INCOMPLETE),
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_file_is_one_meaningful_line(tmp_path, kind):
    make, says = UNREADABLE[kind]
    path = tmp_path / "ck.pkl"
    path.write_bytes(make())
    with pytest.raises(utils.CheckpointError) as info:
        utils.load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"cannot read checkpoint {path}: ") and says in msg
    assert msg.endswith("written by training.py or the original PyHessian") and "\n" not in msg
    assert "Error" not in msg  # no bare exception names from torch's error text


def test_errors_are_user_errors():
    assert issubclass(utils.CheckpointError, utils.UserError)
    assert issubclass(utils.DataError, utils.UserError)
    assert issubclass(utils.UserError, Exception)


def _with_values(state_dict, key, index_values):
    flat = state_dict[key].view(-1)
    for i, v in index_values:
        flat[i] = v
    return state_dict


def test_non_finite_weights_name_the_first_bad_tensor(tmp_path):
    path = tmp_path / "ck.pkl"
    model = resnet(8)
    with torch.no_grad():  # two bad tensors: the message names the first in state_dict order
        model.fc.bias[0] = float("inf")
        model.layer1[0].conv1.weight.view(-1)[[0, 5, 9]] = float("nan")
    utils.save_checkpoint(path, model, utils.image_record(model, "synthetic"), epoch=1,
                          test_accuracy=None, args={})
    with pytest.raises(utils.CheckpointError) as info:
        utils.load_checkpoint(path)
    assert str(info.value) == (
        f"checkpoint {path} has non-finite values in layer1.0.conv1.weight (3 NaN of 2304), "
        f"so it cannot be analysed; pass a checkpoint saved before the training diverged"
    )


def test_non_finite_buffer_in_original_format(tmp_path):
    path = tmp_path / "net.pkl"
    bad = [(1, float("inf")), (2, float("nan"))]
    sd = _with_values(resnet(20).state_dict(), "layer2.0.bn1.running_var", bad)
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    expected = r"non-finite values in layer2\.0\.bn1\.running_var \(1 NaN and 1 inf of 32\)"
    with pytest.raises(utils.CheckpointError, match=expected):
        utils.load_checkpoint(path)


def test_pickled_model_is_refused_not_executed(tmp_path):
    path = tmp_path / "model.pkl"
    torch.save(resnet(8), path)  # a whole pickled module: weights_only refuses it
    with pytest.raises(utils.CheckpointError, match="weights_only"):
        utils.load_checkpoint(path)


def test_non_resnet_state_dict(tmp_path):
    path = tmp_path / "mlp.pkl"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(utils.CheckpointError, match="not a CIFAR ResNet"):
        utils.load_checkpoint(path)


def test_state_dict_mismatch(tmp_path):
    sd = resnet(20).state_dict()
    del sd["layer2.1.conv1.weight"]
    path = tmp_path / "broken.pkl"
    torch.save(sd, path)
    with pytest.raises(utils.CheckpointError, match="missing keys .*layer2.1.conv1.weight"):
        utils.load_checkpoint(path)
    sd = resnet(20).state_dict()
    sd["fc.bias"] = torch.zeros(11)
    torch.save(sd, path)
    with pytest.raises(utils.CheckpointError, match="fc.bias has shape"):
        utils.load_checkpoint(path)


def test_newer_format_version(tmp_path):
    path = tmp_path / "ck.pkl"
    utils.save_checkpoint(path, resnet(8), utils.image_record(resnet(8), "synthetic"), epoch=1,
                          test_accuracy=None, args={})
    obj = torch.load(path, weights_only=True)
    obj["format_version"] = 99
    torch.save(obj, path)
    with pytest.raises(utils.CheckpointError, match="format_version 99"):
        utils.load_checkpoint(path)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    utils.atomic_write_bytes(path, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        utils.atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_save_to_unwritable_place_is_checkpoint_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(utils.CheckpointError, match="cannot write checkpoint"):
        utils.save_checkpoint(blocker / "ck.pkl", resnet(8),
                              utils.image_record(resnet(8), "synthetic"), epoch=1,
                              test_accuracy=None, args={})


# ---- the training state (training.py --resume) -----------------------------------------------
def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # a cached Gaussian in NumPy's state
    random.gauss(0, 1)  # and in Python's
    state = utils.capture_rng_state(gen)

    def draw():
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(),
                [random.random() for _ in range(3)], random.gauss(0, 1),
                torch.rand(3, generator=gen).tolist())

    first = draw()
    model = resnet(8)
    path = tmp_path / "state.pkl"
    utils.save_checkpoint(path, model, utils.image_record(model, "synthetic"), epoch=1,
                          test_accuracy=1.0, args={}, training_state={"epoch": 1, "rng": [state],
                                                                       "optimizer": {}})
    loaded = torch.load(path, weights_only=True)["training_state"]["rng"][0]
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    gen.manual_seed(99)
    utils.restore_rng_state(loaded, gen)
    assert draw() == first


def test_training_state_must_be_weights_only_safe(tmp_path):
    with pytest.raises(TypeError, match=r"training_state\['x'\] is a Generator"):
        utils.save_checkpoint(tmp_path / "x.pkl", resnet(8),
                              utils.image_record(resnet(8), "synthetic"), epoch=1,
                              test_accuracy=1.0, args={}, training_state={"x": torch.Generator()})
    assert not (tmp_path / "x.pkl").exists()


def test_read_training_state_needs_one(tmp_path):
    plain = tmp_path / "plain.pkl"
    save_plain(resnet(8), plain)
    with pytest.raises(utils.CheckpointError, match="not a checkpoint written by training.py"):
        utils.read_training_state(plain)
    ours = tmp_path / "net.best.pkl"
    utils.save_checkpoint(ours, resnet(8), utils.image_record(resnet(8), "synthetic"), epoch=1,
                          test_accuracy=1.0, args={})
    with pytest.raises(utils.CheckpointError, match="best-accuracy checkpoint, which holds no "
                                                    "training state .* pass .*net.pkl, the "
                                                    "last-epoch checkpoint"):
        utils.read_training_state(ours)


def test_image_size_is_recorded_and_defaults_to_32(tmp_path):
    path = tmp_path / "ours.pkl"
    utils.save_checkpoint(path, resnet(8), utils.image_record(resnet(8), "synthetic"), epoch=1,
                          test_accuracy=1.0, args={})
    assert utils.load_checkpoint(path)[1]["image_size"] == 32
    obj = torch.load(path, weights_only=True)
    del obj["image_size"]  # written before --image-size existed
    torch.save(obj, path)
    assert utils.load_checkpoint(path)[1]["image_size"] == 32
    save_plain(resnet(8), tmp_path / "plain.pkl")
    assert utils.load_checkpoint(tmp_path / "plain.pkl")[1]["image_size"] == 32
