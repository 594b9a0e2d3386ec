"""Data sets for the scripts: cifar10, cifar100, imagefolder and synthetic, the Hessian subset
and a rank's share of it.

``get_datasets(name, data_dir)`` -> ``DataBundle`` (train with augmentation, train_eval without,
test, num_classes, normalization); ``hessian_subset`` picks the Hessian samples by seed;
``shard_batches`` cuts them into one rank's mini-batches.  Problems the user can fix (missing
or unreadable files, a bad layout, a bad size) raise ``DataError`` with one sentence.
"""
import copy
import json
import math
import os
import socket
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch

from support.errors import DataError, short_reason

__all__ = [
    "cached_datasets",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "SYNTHETIC_NUM_CLASSES",
    "SYNTHETIC_TEST_SIZE",
    "SYNTHETIC_TRAIN_SIZE",
    "DataBundle",
    "SyntheticCIFAR",
    "default_normalization",
    "get_datasets",
    "hessian_subset",
    "shard_batches",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")


@dataclass
class DataBundle:
    """The three views of one data set that the scripts need.

    train:       training split with augmentation (RandomCrop(32, 4) + horizontal flip)
    train_eval:  the SAME training split without augmentation (for Hessian computations)
    test:        test split without augmentation
    num_classes: number of classes
    normalization: {"mean": [r, g, b], "std": [r, g, b]} used by all three views
    name:        the data set's name (one of DATASETS)
    image_size:  side of the square images the views return (32 except for imagefolder)
    """

    train: torch.utils.data.Dataset
    train_eval: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    normalization: dict
    name: str
    image_size: int = 32


def default_normalization(name):
    """The normalisation a data set uses unless told otherwise (CIFAR-10's, except cifar100)."""
    if name == "cifar100":
        return {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD)}
    return {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


def _check_normalization(normalization):
    try:
        mean = [float(x) for x in normalization["mean"]]
        std = [float(x) for x in normalization["std"]]
    except (TypeError, KeyError, ValueError):
        raise DataError(
            f"normalization must be a dict {{'mean': [r, g, b], 'std': [r, g, b]}}, "
            f"got {normalization!r}"
        ) from None
    finite_means = all(math.isfinite(m) for m in mean)
    positive_stds = all(s > 0 and math.isfinite(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or not (finite_means and positive_stds):
        raise DataError(
            f"normalization needs 3 finite means and 3 positive stds, got mean={mean} std={std}"
        )
    return {"mean": mean, "std": std}


class _ToNormalizedTensor:
    """torchvision's ``Compose([ToTensor(), Normalize(mean, std)])`` in torch alone (the same
    operations, so the same numbers), for a PIL image or an HxWxC uint8 array: the analysis of
    the synthetic set then never imports torchvision (~1-3 s of start-up; measured with
    cProfile)."""

    def __init__(self, normalization):
        self.mean = torch.tensor(normalization["mean"]).view(-1, 1, 1)
        self.std = torch.tensor(normalization["std"]).view(-1, 1, 1)

    def __call__(self, img):
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        return t.to(torch.get_default_dtype()).div(255).sub_(self.mean).div_(self.std)


class _Pipeline:
    """torchvision's pipeline: [Resize] + [RandomCrop + RandomHorizontalFlip when
    ``augment``] + ToTensor + Normalize, built (importing torchvision) on its first call."""

    def __init__(self, normalization, resize, image_size, augment):
        self.normalization, self.resize = normalization, resize
        self.image_size, self.augment = image_size, augment
        self.pipeline = None

    def _build(self):
        from torchvision import transforms as T

        n = self.image_size
        head = [T.Resize((n, n))] if self.resize else []
        aug = ([T.RandomCrop(n, padding=max(1, round(n / 8))), T.RandomHorizontalFlip()]
               if self.augment else [])
        norm = T.Normalize(self.normalization["mean"], self.normalization["std"])
        return T.Compose(head + aug + [T.ToTensor(), norm])

    def __call__(self, img):
        if self.pipeline is None:
            self.pipeline = self._build()
        return self.pipeline(img)


def _transforms(normalization, resize=False, image_size=32):
    """(augmented, plain) transform pipelines shared by every data set: with ``resize``, images
    are first resized to ``image_size`` x ``image_size``; the crop pads by image_size / 8
    (4 pixels at 32, as the original). torchvision is imported when an augmented (or resized)
    image is first drawn."""
    plain = (_Pipeline(normalization, True, image_size, False) if resize
             else _ToNormalizedTensor(normalization))
    return _Pipeline(normalization, resize, image_size, True), plain


def _with_transform(dataset, transform):
    """A shallow copy of a torchvision data set (sharing its samples) with another transform."""
    view = copy.copy(dataset)
    view.transform = transform
    if hasattr(view, "transforms") and hasattr(view, "target_transform"):
        from torchvision.datasets.vision import StandardTransform

        view.transforms = StandardTransform(transform, view.target_transform)
    return view


# ---- synthetic ------------------------------------------------------------------------

SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_TRAIN_SIZE = 5000
SYNTHETIC_TEST_SIZE = 1000
SYNTHETIC_NOISE = 0.2  # std of the per-pixel Gaussian noise (pixel range [0, 1])
SYNTHETIC_DISTRACTOR = 0.3  # largest weight of the blended-in template of another class
SYNTHETIC_LABEL_NOISE = 0.08  # fraction of labels redrawn uniformly (caps accuracy near 93%)
_SYNTHETIC_SEED = 20240229  # fixed: training and a later analysis must see the same images


@lru_cache(maxsize=4)
def _synthetic_arrays(train, size):
    """Generate (images uint8 [N, 32, 32, 3], labels int64 [N]) deterministically.

    Each class c has a smooth random colour template T_c: a 3x4x4 Gaussian field,
    bicubically upsampled to 32x32 and scaled to [0.1, 0.9].  An image of class c is

        clip(a * ((1 - w) * S(T_c) + w * T_d) + b + noise, 0, 1)  stored as uint8

    where S randomly mirrors the template (so flip augmentation stays in distribution)
    and rolls it by up to 4 pixels each way, d is another random class blended in with
    weight w ~ U[0, SYNTHETIC_DISTRACTOR], a ~ U[0.6, 1] a contrast, b ~ U[-0.1, 0.1] a
    brightness shift, and noise ~ N(0, SYNTHETIC_NOISE^2) per pixel.  Finally a fraction
    SYNTHETIC_LABEL_NOISE of the labels is redrawn uniformly at random, so no model
    reaches zero loss (a Hessian at zero loss is degenerate and uninformative).

    The templates come from one fixed seed, train and test images from two others, so
    every call returns identical data whatever the global RNG state.
    """
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    field = torch.randn(SYNTHETIC_NUM_CLASSES, 3, 4, 4, generator=g)
    templates = F.interpolate(field, size=(32, 32), mode="bicubic", align_corners=False)
    lo = templates.amin(dim=(1, 2, 3), keepdim=True)
    hi = templates.amax(dim=(1, 2, 3), keepdim=True)
    templates = 0.1 + 0.8 * (templates - lo) / (hi - lo)

    g = torch.Generator().manual_seed(_SYNTHETIC_SEED + (1 if train else 2))
    labels = torch.arange(size) % SYNTHETIC_NUM_CLASSES
    labels = labels[torch.randperm(size, generator=g)]
    x = templates[labels].clone()
    flip = torch.rand(size, generator=g) < 0.5
    x[flip] = x[flip].flip(-1)
    shifts = torch.randint(-4, 5, (size, 2), generator=g)
    # each image rolled by its (dy, dx): out[.., i, j] = x[.., (i - dy) % 32, (j - dx) % 32]
    # (torch.roll's indexing, gathered for all images at once)
    pos = torch.arange(32)
    rows = (pos[None, :] - shifts[:, :1]) % 32
    cols = (pos[None, :] - shifts[:, 1:]) % 32
    x = x[torch.arange(size)[:, None, None, None], torch.arange(3)[None, :, None, None],
          rows[:, None, :, None], cols[:, None, None, :]]
    offset = torch.randint(1, SYNTHETIC_NUM_CLASSES, (size,), generator=g)
    other = (labels + offset) % SYNTHETIC_NUM_CLASSES
    w = SYNTHETIC_DISTRACTOR * torch.rand(size, 1, 1, 1, generator=g)
    contrast = 0.6 + 0.4 * torch.rand(size, 1, 1, 1, generator=g)
    brightness = 0.2 * (torch.rand(size, 1, 1, 1, generator=g) - 0.5)
    noise = SYNTHETIC_NOISE * torch.randn(size, 3, 32, 32, generator=g)
    x = contrast * ((1 - w) * x + w * templates[other]) + brightness + noise
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    relabel = torch.rand(size, generator=g) < SYNTHETIC_LABEL_NOISE
    labels[relabel] = torch.randint(0, SYNTHETIC_NUM_CLASSES, (int(relabel.sum()),), generator=g)
    return images, labels


class SyntheticCIFAR(torch.utils.data.Dataset):
    """A deterministic, learnable CIFAR-shaped data set (3x32x32 RGB, 10 classes).

    Images are stored as uint8 HWC like torchvision's CIFAR10 and returned through the
    same transform pipeline (PIL image -> transform).  The data do not depend on any
    global seed.  See ``_synthetic_arrays`` for how the images are made.
    """

    classes: ClassVar[list] = [f"class{i}" for i in range(SYNTHETIC_NUM_CLASSES)]

    def __init__(self, train=True, transform=None, size=None):
        self.train = train
        self.transform = transform
        self.target_transform = None
        if size is None:
            size = SYNTHETIC_TRAIN_SIZE if train else SYNTHETIC_TEST_SIZE
        images, labels = _synthetic_arrays(bool(train), int(size))
        self.data = images.numpy()
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        if isinstance(self.transform, _ToNormalizedTensor):  # no PIL round trip needed
            return self.transform(self.data[index]), self.targets[index]
        from PIL import Image

        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# ---- CIFAR ------------------------------------------------------------------------------

_CIFAR_INFO = {
    # name: (torchvision class name, archive, extracted folder, label)
    "cifar10": ("CIFAR10", "cifar-10-python.tar.gz", "cifar-10-batches-py", "CIFAR-10"),
    "cifar100": ("CIFAR100", "cifar-100-python.tar.gz", "cifar-100-python", "CIFAR-100"),
}


def _load_cifar(name, data_dir, download, train_tf, plain_tf):
    """(train, train_eval, test) of CIFAR-10/100 from ``data_dir``, downloading when allowed."""
    import torchvision

    cls_name, archive, folder, label = _CIFAR_INFO[name]
    cls = getattr(torchvision.datasets, cls_name)
    have_archive = os.path.isfile(os.path.join(data_dir, archive))
    have_folder = os.path.isdir(os.path.join(data_dir, folder))
    # With the archive present, download=True only verifies and extracts it (no network).
    want_download = bool(download) or (have_archive and not have_folder)
    old_timeout = socket.getdefaulttimeout()
    try:
        # A blocked network should fail in seconds, not hang; 30 s per socket operation
        # is still generous for a real download.
        if want_download and not have_folder and old_timeout is None:
            socket.setdefaulttimeout(30)
        train = cls(root=data_dir, train=True, download=want_download, transform=train_tf)
        test = cls(root=data_dir, train=False, download=False, transform=plain_tf)
    except Exception as exc:  # noqa: BLE001 - RuntimeError, URLError, tarfile errors...
        if have_archive:
            how = f"{archive} there could not be used ({short_reason(exc)}; is it complete?)"
        elif want_download:
            how = f"could not be downloaded ({short_reason(exc)})"
        else:
            how = "downloading is off"
        raise DataError(
            f"{label} is not in {data_dir}/ and {how}; place {archive} in {data_dir}/ "
            f"(or pass --data-dir DIR), or use --dataset synthetic or "
            f"--dataset imagefolder --data-dir DIR"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return train, _with_transform(train, plain_tf), test


# ---- ImageFolder --------------------------------------------------------------------------


# What PIL raises for damaged files: OSError ("image file is truncated", UnidentifiedImageError),
# SyntaxError (broken PNG chunks), ValueError, EOFError, struct.error (cut-off headers).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


def _load_image(path):
    """ImageFolder's loader: the image at ``path`` as RGB, or DataError naming the file.

    PIL reads lazily, so a truncated or corrupt file fails only here, when a sample is
    first used (in training, in ``shard_batches``, or in a DataLoader worker).
    """
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert("RGB")
    except _IMAGE_ERRORS + (Image.DecompressionBombError,) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else short_reason(exc)
        if isinstance(exc, Image.UnidentifiedImageError):
            reason = "not an image file PIL can read"
        raise DataError(f"cannot read image {path}: {reason}; remove or replace the file") from None


def _load_imagefolder(data_dir, train_tf, plain_tf):
    """(train, train_eval, test) from ``data_dir/{train,test}/<class>/*`` image files."""
    from torchvision.datasets import ImageFolder

    layout = "expected DIR/train/<class>/*.png|jpg and DIR/test/<class>/*.png|jpg"
    roots = {}
    for split in ("train", "test"):
        path = os.path.join(data_dir, split)
        if not os.path.isdir(path):
            raise DataError(
                f"image folder {path} does not exist; {layout} (set DIR with --data-dir)"
            )
        roots[split] = path
    try:
        train = ImageFolder(roots["train"], transform=train_tf, loader=_load_image)
        test = ImageFolder(roots["test"], transform=plain_tf, loader=_load_image)
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        raise DataError(
            f"cannot read image folder {data_dir}: {short_reason(exc)}; {layout}"
        ) from None
    if len(train.classes) < 2:
        raise DataError(
            f"image folder {roots['train']} has only one class folder ({train.classes[0]}) "
            f"but a classifier needs at least 2 classes; "
            f"add one folder per class under train/ and test/"
        )
    if train.classes != test.classes:
        raise DataError(
            f"image folder {data_dir}: train classes {train.classes} differ from test classes "
            f"{test.classes}; give both splits the same class folders"
        )
    return train, _with_transform(train, plain_tf), test


def get_datasets(name, data_dir="data", normalization=None, download=True, image_size=32):
    """Build the train (augmented), train_eval (un-augmented train) and test views of a data set.

    name: one of DATASETS.
      * cifar10 / cifar100: torchvision data sets in ``data_dir`` (downloaded when missing
        and ``download``; offline, place the archive in ``data_dir``).
      * imagefolder: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*``, any
        image size (resized to ``image_size`` x ``image_size``, default 32).
      * synthetic: ``SyntheticCIFAR`` (5,000 train / 1,000 test, 10 classes), no files.
    normalization: None for the data set's default, or {"mean": [...], "std": [...]}
      (the analysis passes the one recorded in the checkpoint).

    image_size: the side the images are resized to (imagefolder only; the others are 32x32).

    All views share one pipeline: [Resize((N, N)) for imagefolder] + [RandomCrop(N, N/8)
    + RandomHorizontalFlip for train] + ToTensor + Normalize.  Raises DataError.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    image_size = _check_image_size(name, image_size)
    normalization = _check_normalization(
        default_normalization(name) if normalization is None else normalization
    )
    data_dir = os.fspath(data_dir)
    train_tf, plain_tf = _transforms(normalization, resize=(name == "imagefolder"),
                                     image_size=image_size)

    if name in _CIFAR_INFO:
        train, train_eval, test = _load_cifar(name, data_dir, download, train_tf, plain_tf)
        num_classes = len(train.classes)
    elif name == "imagefolder":
        train, train_eval, test = _load_imagefolder(data_dir, train_tf, plain_tf)
        num_classes = len(train.classes)
    else:
        train = SyntheticCIFAR(train=True, transform=train_tf)
        train_eval = _with_transform(train, plain_tf)
        test = SyntheticCIFAR(train=False, transform=plain_tf)
        num_classes = SYNTHETIC_NUM_CLASSES
    return DataBundle(
        train=train,
        train_eval=train_eval,
        test=test,
        num_classes=num_classes,
        normalization=normalization,
        name=name,
        image_size=image_size,
    )


def _check_image_size(name, image_size):
    """``image_size`` as an int; DataError unless positive, and 32 for all but imagefolder."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"--image-size must be a positive integer, got {image_size!r}")
    if name != "imagefolder" and image_size != 32:
        raise DataError(f"--image-size {image_size} applies to --dataset imagefolder only "
                        f"({name} images are 32x32); drop --image-size")
    return image_size


_CACHE: dict = {}


def cached_datasets(name, data_dir="data", normalization=None, download=True, image_size=32):
    """``get_datasets`` remembered within this process (a script that validates and then runs
    in the same process loads its data set once); ``download`` applies to the first call."""
    key = (name, os.fspath(data_dir), json.dumps(normalization), image_size,
           (SYNTHETIC_TRAIN_SIZE, SYNTHETIC_TEST_SIZE) if name == "synthetic" else None)
    if key not in _CACHE:
        _CACHE.clear()  # one data set at a time
        _CACHE[key] = get_datasets(name, data_dir, normalization=normalization,
                                   download=download, image_size=image_size)
    return _CACHE[key]


def hessian_subset(dataset, num_samples, seed, flag="--hessian-batch-size"):
    """``num_samples`` distinct indices of ``dataset``, chosen by ``torch.randperm`` from ``seed``.

    The same (len(dataset), num_samples, seed) always gives the same list, on every rank and
    every machine (a private torch.Generator; the global RNG is untouched). ``flag`` names the
    option that set ``num_samples`` in the error messages.
    """
    n = len(dataset)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise DataError(f"{flag} must be a positive integer, got {num_samples!r}")
    if num_samples > n:
        raise DataError(
            f"{flag} {num_samples} exceeds the {n} samples of the training set; "
            f"pass {flag} {n} or less"
        )
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:num_samples].tolist()


def shard_batches(dataset, indices, mini_batch_size, rank=0, world_size=1, collate=None):
    """This rank's Hessian mini-batches: ``indices`` cut in order into mini-batches of
    ``mini_batch_size`` (the last may be smaller), dealt round-robin to ``world_size`` ranks, so
    every world size covers exactly the same samples. Returns ``(batches, num_mini_batches)``;
    each batch is what ``collate`` (default: ``torch.utils.data.default_collate``) makes of its
    samples (for images, ``(x, y)`` tensors), on the host. A sample that cannot be read raises
    DataError naming its file (see ``_load_image``).
    """
    chunks = [indices[i:i + mini_batch_size] for i in range(0, len(indices), mini_batch_size)]
    collate = collate or torch.utils.data.default_collate
    batches = [collate([dataset[i] for i in chunk]) for chunk in chunks[rank::world_size]]
    return batches, len(chunks)
