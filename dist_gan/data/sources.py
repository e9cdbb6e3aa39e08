"""Datasets as indexable sets of uint8 images: MNIST IDX files, CIFAR-10's batches, a folder.

A source is one function ``(DataConfig) -> ImageSet`` registered in ``DATA_SOURCES``. ``ImageSet``
items are ``(uint8 tensor C x H x W at the configured resolution and channels, int label)``; label -1
means the dataset has no classes. The shard writer and the in-memory stream both read sources this way.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dist_gan.config import DataConfig
from dist_gan.data.mixtures import MIXTURES, POINT_SHAPE, mixture_points

log = logging.getLogger(__name__)

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES: dict[int, type | str] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(RuntimeError):
    """Training data is missing or malformed; the message names the file (and sample)."""


class ImageSet(Protocol):
    @property
    def class_names(self) -> list[str]: ...

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


@dataclass
class TensorImageSet:
    """Images already in memory: uint8 (N, C, H, W) (float for the 2-D mixtures' points) and int64
    labels."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array, checking its header against its size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or padded: header says {shape}, "
                        f"{expected} bytes expected, {len(raw)} found")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_mnist_file(directory: str | Path, stem: str) -> Path:
    directory = Path(directory)
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"MNIST file {stem}[.gz] not found in {directory} "
                    f"(data.mnist_dir must hold the four IDX files: {sorted(MNIST_FILES.values())})")


def load_mnist_idx(directory: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train" or "test") from IDX files: uint8 (N, 28, 28) and int64 labels."""
    images = read_idx(find_mnist_file(directory, MNIST_FILES[f"{split}_images"]))
    labels = read_idx(find_mnist_file(directory, MNIST_FILES[f"{split}_labels"]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"MNIST {split} files in {directory} disagree: images {images.shape}, "
                        f"labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float in [-1, 1], the range every network takes and gives; float
    samples (the 2-D mixtures' points) are already in the model's space and pass as float32."""
    if images.dtype.is_floating_point:
        return images.float()
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels or float samples, got {images.dtype}")
    return images.float().div_(127.5).sub_(1.0)  # .float() copied: in place is safe


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) luma (ITU-R BT.601 weights), as float."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True)


def fit_images(images: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to ``resolution`` and turn them into ``channels`` channels."""
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        resized = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear",
                                antialias=True, align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    return to_grey(images).round().clamp(0, 255).to(torch.uint8)


def _download(name: str, fetch, instead: str):
    """``fetch()`` (a torchvision download); a failure (no network, a mirror down) becomes one line
    that says what to do ``instead``, not the downloader's traceback."""
    try:
        return fetch()
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision wraps mirror failures
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not download {name} ({reason}); without network, {instead}") from None


def mnist_source(cfg: DataConfig, split: str = "train") -> TensorImageSet:
    """MNIST from ``cfg.mnist_dir``, or downloaded by torchvision into ``cfg.root``."""
    if cfg.mnist_dir:
        images, labels = load_mnist_idx(cfg.mnist_dir, split)
    else:
        from torchvision.datasets import MNIST

        files = ", ".join(f"{stem}.gz" for stem in MNIST_FILES.values())
        dataset = _download("MNIST", lambda: MNIST(cfg.root, train=split == "train", download=True),
                            f"put the four IDX files ({files}) in a directory and set "
                            "--data.mnist_dir=DIR")
        images, labels = dataset.data, dataset.targets.long()
    return TensorImageSet(fit_images(images.unsqueeze(1), cfg.resolution, cfg.channels), labels,
                          [str(d) for d in range(10)])


CIFAR10_FOLDER = "cifar-10-batches-py"  # the python version of CIFAR-10, as distributed
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


# All that CIFAR-10's python batches name: NumPy's array reconstruction (the rest is dicts, lists,
# bytes and numbers, which need no global; a re-pickled copy spells bytes with _codecs.encode).
_CIFAR10_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy", "ndarray"), ("numpy", "dtype"),
                    ("_codecs", "encode")}  # bytes, as Python 3 pickles them at protocol 2


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the real CIFAR-10 batches hold: a file naming any other
    function or class (which unpickling would call) is refused by that name."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR10_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds "
                                         "(refused: unpickling it could run code)")
        return super().find_class(module, name)


def _read_cifar10_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        if not isinstance(batch, dict):
            raise ValueError(f"it holds a {type(batch).__name__}, not a dict")
        return batch
    except FileNotFoundError as err:
        raise DataError(f"CIFAR-10 file {path} is missing ({CIFAR10_FOLDER}/ must hold "
                        f"{CIFAR10_FILES['train'] + CIFAR10_FILES['test'] + ['batches.meta']})") from err
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise DataError(f"cannot read CIFAR-10 file {path}: {err}") from err


def cifar10_source(cfg: DataConfig, split: str = "train") -> TensorImageSet:
    """CIFAR-10 from ``cfg.root``/cifar-10-batches-py (the python version, as distributed); when that
    folder is absent, torchvision downloads and checks it there first."""
    folder = Path(cfg.root) / CIFAR10_FOLDER
    if not folder.is_dir():
        from torchvision.datasets import CIFAR10

        _download("CIFAR-10", lambda: CIFAR10(cfg.root, train=True, download=True),
                  f"unpack cifar-10-python.tar.gz so that {folder} holds "
                  f"{', '.join(CIFAR10_FILES['train'] + CIFAR10_FILES['test'])} and batches.meta, "
                  "or set --data.root to the directory holding cifar-10-batches-py")
    images, labels = [], []
    for name in CIFAR10_FILES[split]:
        batch = _read_cifar10_pickle(folder / name)
        try:
            pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels += list(batch[b"labels"])
        except (KeyError, ValueError) as err:
            raise DataError(f"{folder / name} is not a CIFAR-10 batch (data: N x 3072 uint8, "
                            f"labels): {err!r}") from err
        if len(pixels) != len(batch[b"labels"]):
            raise DataError(f"{folder / name}: {len(pixels)} images but {len(batch[b'labels'])} labels")
        images.append(torch.from_numpy(pixels))
    names = [n.decode() for n in _read_cifar10_pickle(folder / "batches.meta")[b"label_names"]]
    return TensorImageSet(fit_images(torch.cat(images), cfg.resolution, cfg.channels),
                          torch.tensor(labels, dtype=torch.int64), names)


class FolderImageSet:
    """Every image file under ``root``: class sub-folders become labels; a flat folder has none (-1).

    Images are resized (shorter side) and centre-cropped to ``resolution``, converted to grey or RGB.
    """

    def __init__(self, root: str | Path, resolution: int, channels: int, follow_symlinks: bool = False):
        self.resolution, self.mode = resolution, "L" if channels == 1 else "RGB"
        self.items, self.class_names = folder_images(Path(root), follow_symlinks)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        try:
            with Image.open(path) as opened:
                image = to_8bit(opened).convert(self.mode)
                scale = self.resolution / min(image.size)
                size = (max(self.resolution, round(image.width * scale)),
                        max(self.resolution, round(image.height * scale)))
                image = image.resize(size, Image.Resampling.BICUBIC)
                left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
                image = image.crop((left, top, left + self.resolution, top + self.resolution))
                array = np.asarray(image, dtype=np.uint8)
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... for bad files
            raise DataError(f"cannot read image {path}: {err}") from err
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy()), label


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` with 8-bit channels, its range scaled rather than clipped: 16-bit and 32-bit integer
    grey (PNG/TIFF "I;16", "I") from 0..65535, float grey ("F") from 0..1 (or 0..255 if it exceeds
    1). Pillow's own conversion to "L" clips those at 255, turning most of a 16-bit image white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(array) * scale), 0, 255).astype(np.uint8), "L")
    return image


def folder_images(root: Path, follow_symlinks: bool = False) -> tuple[list[tuple[Path, int]], list[str]]:
    """The images of folder ``root`` with their labels, and the class names: each non-hidden
    sub-folder is a class; a folder without sub-folders is one unlabelled set (-1). Hidden files and
    folders (``.ipynb_checkpoints``) are ignored; images beside class folders are refused (they have
    no class); a symbolic link whose target lies outside ``root`` is skipped, with a warning, unless
    ``follow_symlinks`` (a folder from elsewhere could otherwise point the run at any file)."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (data.root)")
    top = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    classes = [p for p in top if p.is_dir() and (follow_symlinks or not _leaves(p, root))]
    flat = [p for p in top if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if classes and flat:
        raise DataError(f"image folder {root} holds both images ({flat[0].name}, ...) and sub-folders "
                        f"({classes[0].name}/, ...): sub-folders are classes, so every image must be in "
                        "one; move the loose images into a folder, or the folders out")
    skipped: list[Path] = []
    if classes:
        items = [(f, label) for label, d in enumerate(classes) for f in _walk(d, root, follow_symlinks, skipped)]
    else:
        items = [(f, -1) for f in _walk(root, root, follow_symlinks, skipped)]
    if skipped:
        log.warning("image folder %s: skipped %d symbolic link(s) leading out of it (e.g. %s -> %s); "
                    "set data.follow_symlinks=true to read them", root, len(skipped), skipped[0],
                    os.path.realpath(skipped[0]))
    if not items:
        raise DataError(f"no images ({sorted(IMAGE_SUFFIXES)}) found under {root}")
    return items, [p.name for p in classes]


def _leaves(path: Path, root: Path) -> bool:
    """Whether ``path`` is a symbolic link whose target lies outside ``root``."""
    if not path.is_symlink():
        return False
    target, inside = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return target != inside and inside not in target.parents


def _walk(directory: Path, root: Path, follow_symlinks: bool, skipped: list[Path]) -> list[Path]:
    """The image files under ``directory``, hidden entries left out; links out of ``root`` are
    appended to ``skipped`` instead (unless ``follow_symlinks``)."""
    found = []
    for where, dirs, files in os.walk(directory, followlinks=follow_symlinks):
        base = Path(where)
        for name in [d for d in dirs if not d.startswith(".")]:
            if not follow_symlinks and _leaves(base / name, root):
                skipped.append(base / name)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = base / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not follow_symlinks and _leaves(path, root):
                skipped.append(path)
            elif path.is_file():
                found.append(path)
    return sorted(found)


def folder_source(cfg: DataConfig, split: str = "train") -> FolderImageSet:
    return FolderImageSet(cfg.root, cfg.resolution, cfg.channels, cfg.follow_symlinks)


# (resolution, channels) each named data set comes at; a folder's is the config's (default 64 px RGB)
NATURAL_SIZE = {"mnist": (28, 1), "cifar10": (32, 3), "stacked_mnist": (28, 3),
                **{name: POINT_SHAPE[1::-1] for name in MIXTURES}}
STACKED_MNIST_SIZE = 128_000  # the set VEEGAN and PacGAN train on
STACKED_MNIST_TEST_SIZE = 26_000  # as many real triples as the protocol's generated samples
STACKED_MNIST_MODES = 1000


def stacked_mnist_source(cfg: DataConfig, split: str = "train") -> TensorImageSet:
    """StackedMNIST (Metz et al. 2017; VEEGAN, PacGAN): three MNIST digits of ``split``, one per
    channel, drawn with a fixed seed (the same set on every machine), ``data.limit`` of them (default
    128,000; the test split 26,000), label = the triple's class 100 a + 10 b + c (0-999). At
    ``data.resolution`` above 28 the digits are padded with black (32: for power-of-two networks),
    below it resized. Needs ``data.channels: 3``."""
    if cfg.channels != 3:
        raise DataError(f"data.source=stacked_mnist stacks three digits as three channels: set "
                        f"data.channels=3 (it is {cfg.channels})")
    mnist = mnist_source(dataclasses.replace(cfg, resolution=28, channels=1), split)
    digits, labels = mnist.images, mnist.labels
    count = (cfg.limit or STACKED_MNIST_SIZE) if split == "train" else STACKED_MNIST_TEST_SIZE
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    picks = torch.randint(0, len(digits), (count, 3), generator=generator)
    images = digits[:, 0][picks]  # (count, 3, 28, 28)
    triples = (labels[picks] * torch.tensor([100, 10, 1])).sum(1)
    if cfg.resolution > 28:
        before = (cfg.resolution - 28) // 2
        images = F.pad(images, (before, cfg.resolution - 28 - before) * 2)
    elif cfg.resolution < 28:
        images = fit_images(images, cfg.resolution, 3)
    return TensorImageSet(images.contiguous(), triples, [f"{t:03d}" for t in range(STACKED_MNIST_MODES)])


def mixture_source(cfg: DataConfig, split: str = "train") -> TensorImageSet:
    """A 2-D mixture of Gaussians (``data.mixtures``): float points, labelled by their mode."""
    points, modes = mixture_points(cfg, split)
    return TensorImageSet(points, modes, [f"mode{m}" for m in range(MIXTURES[cfg.source].modes)])


def synthetic_source(cfg: DataConfig, split: str = "train") -> TensorImageSet:
    """Seeded random pixels at the configured size, 10 classes: for throughput measurements and
    machines without a dataset (the GPU check). Nothing a GAN can learn anything useful from."""
    n = 8192 if split == "train" else 1024
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    shape = (n, cfg.channels, cfg.resolution, cfg.resolution)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return TensorImageSet(images, labels, [str(i) for i in range(10)])


@dataclass
class SubsetImageSet:
    """The images of ``base`` at ``indices``."""

    base: ImageSet
    indices: list[int]

    @property
    def class_names(self) -> list[str]:
        return self.base.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[self.indices[index]]


def limit_images(images: ImageSet, limit: int) -> ImageSet:
    """``limit`` images of ``images`` (all when 0 or more than there are): a subset drawn with a fixed
    seed, so every run, seed and process trains on the same images (StyleGAN2-ADA's --subset)."""
    if not limit or limit >= len(images):
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return SubsetImageSet(images, sorted(order[:limit].tolist()))


DATA_SOURCES: dict[str, Callable[..., ImageSet]] = {
    "mnist": mnist_source,
    "cifar10": cifar10_source,
    "folder": folder_source,
    "synthetic": synthetic_source,
    "stacked_mnist": stacked_mnist_source,
    **{name: mixture_source for name in MIXTURES},
}


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """A conditional model (``num_classes`` > 0) needs a label in [0, num_classes) for every image:
    checked on the host-side batch, before it goes to the device."""
    if num_classes and ((labels < 0).any() or (labels >= num_classes).any()):
        raise DataError(f"model.num_classes={num_classes} needs a label in [0, {num_classes}) for every "
                        f"image; this batch has labels {labels.unique().tolist()} (-1: the dataset has "
                        "no classes)")
