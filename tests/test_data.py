"""Data sets: synthetic determinism and views, ImageFolder layout, CIFAR offline errors, subsets."""
import os
import socket
import time

import numpy as np
import pytest
import torch

import utils

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def synthetic():
    return utils.get_datasets("synthetic")


def test_synthetic_shapes_and_classes(synthetic):
    assert synthetic.name == "synthetic" and synthetic.num_classes == 10
    assert len(synthetic.train) == len(synthetic.train_eval) == utils.SYNTHETIC_TRAIN_SIZE
    assert len(synthetic.test) == utils.SYNTHETIC_TEST_SIZE
    x, y = synthetic.train_eval[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert synthetic.test[0][0].shape == (3, 32, 32)
    assert sorted(set(synthetic.train.targets)) == list(range(10))
    assert np.bincount(synthetic.test.targets).min() > 0
    assert synthetic.normalization == {"mean": list(utils.CIFAR10_MEAN),
                                       "std": list(utils.CIFAR10_STD)}


def test_synthetic_is_deterministic_and_independent_of_global_seed(synthetic):
    torch.manual_seed(12345)
    np.random.seed(7)
    utils._synthetic_arrays.cache_clear()
    again = utils.get_datasets("synthetic")
    assert np.array_equal(again.train.data, synthetic.train.data)
    assert again.train.targets == synthetic.train.targets
    assert np.array_equal(again.test.data, synthetic.test.data)
    assert again.test.targets == synthetic.test.targets
    # train and test are different images
    assert not np.array_equal(synthetic.train.data[: len(synthetic.test)], synthetic.test.data)


def test_synthetic_is_not_trivial(synthetic):
    # Same-class images differ (noise, shifts, distractors), and the data use the uint8 range.
    data, targets = synthetic.train.data, np.array(synthetic.train.targets)
    a, b = np.flatnonzero(targets == 3)[:2]
    assert not np.array_equal(data[a], data[b])
    assert data.dtype == np.uint8 and data.shape[1:] == (32, 32, 3)
    assert data.min() == 0 and data.max() == 255


def test_train_eval_is_unaugmented_and_train_is_augmented(synthetic):
    x1, y1 = synthetic.train_eval[5]
    x2, y2 = synthetic.train_eval[5]
    assert torch.equal(x1, x2) and y1 == y2
    # train_eval is exactly ToTensor + Normalize of the stored image
    mean = torch.tensor(utils.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(utils.CIFAR10_STD).view(3, 1, 1)
    raw = torch.from_numpy(synthetic.train.data[5]).permute(2, 0, 1).float() / 255
    assert torch.allclose(x1, (raw - mean) / std, atol=1e-5)
    # the augmented view of the same item varies between draws
    torch.manual_seed(0)
    draws = [synthetic.train[5][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert all(synthetic.train[5][1] == y1 for _ in range(2))


def test_normalization_override(synthetic):
    norm = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    b = utils.get_datasets("synthetic", normalization=norm)
    assert b.normalization == norm
    raw = torch.from_numpy(b.train.data[0]).permute(2, 0, 1).float() / 255
    assert torch.allclose(b.train_eval[0][0], (raw - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(utils.DataError, match="normalization"):
        utils.get_datasets("synthetic", normalization={"mean": [0.5], "std": [0.0]})


def test_default_normalization_cifar100():
    assert utils.default_normalization("cifar100") == {"mean": [0.5071, 0.4865, 0.4409],
                                                       "std": [0.2673, 0.2564, 0.2762]}
    assert utils.default_normalization("imagefolder")["mean"] == list(utils.CIFAR10_MEAN)


def test_unknown_dataset():
    with pytest.raises(utils.DataError, match="unknown dataset 'nope'"):
        utils.get_datasets("nope")


# ---- ImageFolder ---------------------------------------------------------------------


def make_image_tree(root, classes=("cat", "dog"), per_class=6, size=(40, 28),
                    splits=("train", "test")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                arr[..., ci % 3] = 255  # a class colour so a tiny net can learn something
                Image.fromarray(arr).save(folder / f"{i}.png")
    return root


def test_imagefolder_loads_and_resizes(tmp_path):
    make_image_tree(tmp_path)
    b = utils.get_datasets("imagefolder", tmp_path)
    assert b.num_classes == 2 and b.name == "imagefolder"
    assert len(b.train) == len(b.train_eval) == 12 and len(b.test) == 12
    for view in (b.train, b.train_eval, b.test):
        x, y = view[0]
        assert x.shape == (3, 32, 32) and y in (0, 1)
    assert torch.equal(b.train_eval[3][0], b.train_eval[3][0])


def test_imagefolder_missing_dir_names_path_and_layout(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(utils.DataError) as info:
        utils.get_datasets("imagefolder", missing)
    msg = str(info.value)
    assert str(missing / "train") in msg and "<class>" in msg and "\n" not in msg


def test_imagefolder_missing_test_split(tmp_path):
    make_image_tree(tmp_path, splits=("train",))
    with pytest.raises(utils.DataError, match="test"):
        utils.get_datasets("imagefolder", tmp_path)


def test_imagefolder_class_mismatch(tmp_path):
    make_image_tree(tmp_path, splits=("train",))
    make_image_tree(tmp_path, classes=("cat", "emu"), splits=("test",))
    with pytest.raises(utils.DataError, match="classes"):
        utils.get_datasets("imagefolder", tmp_path)


def test_imagefolder_empty_class_folder(tmp_path):
    make_image_tree(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "test" / "empty").mkdir()
    with pytest.raises(utils.DataError, match="cannot read image folder"):
        utils.get_datasets("imagefolder", tmp_path)


def test_imagefolder_one_class(tmp_path):
    make_image_tree(tmp_path, classes=("cat",))
    with pytest.raises(utils.DataError) as info:
        utils.get_datasets("imagefolder", tmp_path)
    msg = str(info.value)
    assert "needs at least 2 classes" in msg and "(cat)" in msg and str(tmp_path / "train") in msg
    assert "\n" not in msg


def make_jpeg_tree(root, bad="truncated"):
    """train/ and test/ with classes a, b; train/b/bad.jpg is a JPEG cut in half (or no image)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            arr = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / cls / "good.jpg", quality=90)
    data = (root / "train" / "b" / "good.jpg").read_bytes()
    bad_path = root / "train" / "b" / "bad.jpg"
    bad_path.write_bytes(data[: len(data) // 2] if bad == "truncated" else b"\x00not an image" * 10)
    return bad_path


@pytest.mark.parametrize("bad,says", [("truncated", "truncated"),
                                      ("garbage", "not an image file PIL can read")])
def test_unreadable_image_names_the_file(tmp_path, bad, says):
    bad_path = make_jpeg_tree(tmp_path, bad)
    b = utils.get_datasets("imagefolder", tmp_path)
    index = [p for p, _ in b.train.samples].index(str(bad_path))
    good = next(i for i in range(len(b.train)) if i != index)
    assert b.train_eval[good][0].shape == (3, 32, 32)
    for view in (b.train, b.train_eval):
        with pytest.raises(utils.DataError) as info:
            view[index]
        msg = str(info.value)
        assert msg == f"cannot read image {bad_path}: {msg.split(': ', 1)[1]}"
        assert says.lower() in msg.lower() and msg.endswith("; remove or replace the file")
        assert "\n" not in msg


def test_dataloader_surfaces_data_error_with_file_name(tmp_path):
    bad_path = make_jpeg_tree(tmp_path)
    b = utils.get_datasets("imagefolder", tmp_path)
    loader = torch.utils.data.DataLoader(b.train_eval, batch_size=2, num_workers=0)
    with pytest.raises(utils.DataError, match=f"cannot read image {bad_path}: .*truncated"):
        list(loader)


@pytest.mark.slow
def test_dataloader_worker_data_error_stays_one_line(tmp_path):
    """A worker re-raises in the parent with torch's traceback text; the message is recovered."""
    bad_path = make_jpeg_tree(tmp_path)
    b = utils.get_datasets("imagefolder", tmp_path)
    batches = iter(torch.utils.data.DataLoader(b.train_eval, batch_size=1, num_workers=1))
    try:
        with pytest.raises(utils.DataError) as info:
            list(batches)
    finally:
        batches._shutdown_workers()  # stop the worker now (a later garbage collection can wait 5 s)
    msg = str(info.value)
    assert msg.startswith(f"cannot read image {bad_path}: ") and "truncated" in msg.lower()
    assert "\n" not in msg


def test_shard_batches_names_unreadable_file(tmp_path):
    bad_path = make_jpeg_tree(tmp_path)
    b = utils.get_datasets("imagefolder", tmp_path)
    with pytest.raises(utils.DataError, match=f"cannot read image {bad_path}"):
        utils.shard_batches(b.train_eval, list(range(len(b.train_eval))), 2)


def test_user_errors_pickle():
    import pickle

    for cls in (utils.UserError, utils.DataError, utils.CheckpointError):
        text = "cannot read image x.jpg: bad; remove or replace the file"
        err = pickle.loads(pickle.dumps(cls(text)))
        assert type(err) is cls and str(err) == text


# ---- CIFAR offline ---------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Make every outgoing connection fail at once, as on an offline machine."""

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("name,archive", [("cifar10", "cifar-10-python.tar.gz"),
                                          ("cifar100", "cifar-100-python.tar.gz")])
def test_cifar_offline_is_one_clear_line(tmp_path, no_network, name, archive):
    start = time.time()
    with pytest.raises(utils.DataError) as info:
        utils.get_datasets(name, tmp_path, download=True)
    msg = str(info.value)
    assert archive in msg and str(tmp_path) in msg and "--dataset synthetic" in msg
    assert "\n" not in msg
    assert time.time() - start < 30


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(utils.DataError, match="cifar-10-python.tar.gz"):
        utils.get_datasets("cifar10", tmp_path, download=False)


def test_cifar_corrupt_archive(tmp_path, no_network):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(utils.DataError, match="cifar-10-python.tar.gz"):
        utils.get_datasets("cifar10", tmp_path, download=False)


def test_cifar_from_placed_archive(tmp_path):
    """A (tiny, fake) archive placed by hand is used without any network access."""
    import hashlib
    import pickle
    import tarfile

    import torchvision

    folder = tmp_path / "build" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")

    def md5(path):
        return hashlib.md5(open(path, "rb").read()).hexdigest()

    # Point torchvision's checksums at the fake files (the real ones would not match).
    cls = torchvision.datasets.CIFAR10
    patched = {
        "tgz_md5": md5(archive),
        "train_list": [[n, md5(folder / n)] for n in names[:5]],
        "test_list": [["test_batch", md5(folder / "test_batch")]],
        "meta": dict(cls.meta, md5=md5(folder / "batches.meta")),
    }
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.replace(archive, data_dir / archive.name)
    mp = pytest.MonkeyPatch()
    try:
        for k, v in patched.items():
            mp.setattr(cls, k, v)
        b = utils.get_datasets("cifar10", data_dir, download=False)
    finally:
        mp.undo()
    assert len(b.train) == 20 and len(b.test) == 4 and b.num_classes == 10
    assert b.train_eval[0][0].shape == (3, 32, 32)
    assert b.train.data is b.train_eval.data  # the un-augmented view shares the samples


# ---- Hessian subset --------------------------------------------------------------------


def test_hessian_subset_deterministic_and_distinct():
    ds = list(range(100))
    a = utils.hessian_subset(ds, 30, seed=1)
    assert a == utils.hessian_subset(ds, 30, seed=1)
    assert a != utils.hessian_subset(ds, 30, seed=2)
    assert len(set(a)) == 30 and all(0 <= i < 100 for i in a)
    assert sorted(utils.hessian_subset(ds, 100, seed=3)) == ds
    torch.manual_seed(0)
    state = torch.get_rng_state()
    utils.hessian_subset(ds, 10, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("n", [0, -1, 101])
def test_hessian_subset_bad_sizes(n):
    with pytest.raises(utils.DataError, match="--hessian-batch-size") as info:
        utils.hessian_subset(list(range(100)), n, seed=1)
    if n > 100:
        assert "100" in str(info.value)


# ---- devices ----------------------------------------------------------------------------


def test_resolve_device_cpu_fallback(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.resolve_device(True) == torch.device("cpu")
    err = capsys.readouterr().err
    assert err.strip() == "warning: --cuda requested but no GPU is available; running on CPU"
    assert utils.resolve_device(False) == torch.device("cpu")
    assert utils.resolve_device(True, warn=False) == torch.device("cpu")
    assert capsys.readouterr().err == ""
