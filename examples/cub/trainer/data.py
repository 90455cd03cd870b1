"""CUB200-2011 (official layout or a class-folder tree): reading, checking and image transforms."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ConfigError, LayoutError

__all__ = ["ConfigError", "LayoutError", "Split", "check_images", "read_cub", "read_folder_tree"]

CUB_LAYOUT = """expected the CUB200-2011 layout:
  CUB_200_2011/images.txt               '<image_id> <class_dir>/<file>.jpg' per line
  CUB_200_2011/image_class_labels.txt   '<image_id> <class_id>' per line
  CUB_200_2011/classes.txt              '<class_id> <class_name>' per line
  CUB_200_2011/train_test_split.txt     '<image_id> <0|1>' per line
  CUB_200_2011/images/<class_dir>/<file>.jpg
or a plain class-folder tree: <root>/images/<class>/<file>.jpg (or <root>/<class>/<file>.jpg)"""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class Split:
    """Image paths (or arrays) and labels of the train and test parts of a DML split.

    Train labels are remapped to 0..C_train-1 (one proxy per class); test labels keep distinct
    integer ids (only equality matters for retrieval).
    """

    train_items: list
    train_labels: np.ndarray
    test_items: list
    test_labels: np.ndarray
    class_names: dict[int, str]
    layout: str = ""  # what was read, e.g. "official CUB200-2011 layout (images.txt) in /data/CUB_200_2011"

    @property
    def num_train_classes(self) -> int:
        return int(self.train_labels.max()) + 1 if len(self.train_labels) else 0


def _read_table(path: Path, expected: str, ncols: int) -> dict[int, str]:
    """Reads '<int id> <value...>' lines into {id: value}; errors name the file and line."""
    if not path.is_file():
        raise LayoutError(f"missing file {path}; {CUB_LAYOUT}")
    table: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=ncols - 1)
            if len(parts) != ncols or not parts[0].isdigit():
                raise LayoutError(f"{path}:{lineno}: malformed line {line.rstrip()!r}; expected {expected!r}")
            key = int(parts[0])
            if key in table:
                raise LayoutError(f"{path}:{lineno}: duplicate id {key}")
            table[key] = parts[1].strip()
    if not table:
        raise LayoutError(f"{path} is empty; {CUB_LAYOUT}")
    return table


def _int_value(path: Path, key: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LayoutError(f"{path}: id {key} has non-integer value {value!r}") from None


def find_cub_root(root: str | os.PathLike) -> Path | None:
    """The directory holding images.txt (root or root/CUB_200_2011), or None for a folder tree."""
    root = Path(root)
    for cand in (root, root / "CUB_200_2011"):
        if (cand / "images.txt").exists():
            return cand
    return None


def read_cub(root: str | os.PathLike, split: str = "dml", check_files: bool = True) -> Split:
    """Reads CUB200-2011 in its official layout, or a class-folder tree.

    Args:
        root: The CUB_200_2011 directory, its parent, or a folder tree root.
        split: ``"dml"`` (first half of the classes by id train, the rest test: classes 1-100 /
            101-200 on CUB), ``"classes:N"`` (first N classes train), or ``"official"``
            (train_test_split.txt: same classes in both parts; official layout only).
        check_files: Check that every listed image exists.

    Raises:
        LayoutError: A file is missing or malformed; the message names it and the layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"dataset directory {root} does not exist; {CUB_LAYOUT}")
    cub = find_cub_root(root)
    if cub is None:
        no_index = f"no images.txt in {root} or {root / 'CUB_200_2011'}"
        try:
            tree = read_folder_tree(root, split)
        except LayoutError as e:
            raise LayoutError(f"{no_index} (official layout), and read as a class-folder tree: {e}") from None
        tree.layout += f" ({no_index}, so not the official layout)"
        return tree
    images = _read_table(cub / "images.txt", "<image_id> <relative/path.jpg>", 2)
    labels_raw = _read_table(cub / "image_class_labels.txt", "<image_id> <class_id>", 2)
    classes = _read_table(cub / "classes.txt", "<class_id> <class_name>", 2)
    is_train_raw = _read_table(cub / "train_test_split.txt", "<image_id> <is_training_image>", 2)
    labels = {k: _int_value(cub / "image_class_labels.txt", k, v) for k, v in labels_raw.items()}
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train_raw)):
        missing = sorted(set(images) - set(table))
        if missing:
            raise LayoutError(f"{cub / name} has no line for image id {missing[0]} listed in {cub / 'images.txt'}")
    unknown = sorted({c for c in labels.values() if c not in classes})
    if unknown:
        raise LayoutError(
            f"{cub / 'image_class_labels.txt'} uses class id {unknown[0]} absent from {cub / 'classes.txt'}"
        )
    ids = sorted(images)
    paths = [cub / "images" / images[i] for i in ids]
    if check_files:
        for p in paths:
            if not p.is_file():
                raise LayoutError(f"missing image {p} (listed in {cub / 'images.txt'}); {CUB_LAYOUT}")
    y = np.array([labels[i] for i in ids], dtype=np.int64)
    if split == "official":
        is_train = np.array([_int_value(cub / "train_test_split.txt", i, is_train_raw[i]) == 1 for i in ids])
    else:
        is_train = _class_split(y, split)
    return _make_split(paths, y, is_train, classes, f"official CUB200-2011 layout (images.txt) in {cub}")


def read_folder_tree(root: str | os.PathLike, split: str = "dml") -> Split:
    """Reads ``<root>/images/<class>/<file>`` (or ``<root>/<class>/<file>``); classes sorted by name."""
    root = Path(root)
    base = root / "images" if (root / "images").is_dir() else root
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir())
    if not class_dirs:
        raise LayoutError(f"{base} has no class folders; {CUB_LAYOUT}")
    if split == "official":
        raise LayoutError(
            f"--split official needs {root / 'train_test_split.txt'} (official layout); "
            "a folder tree supports --split dml or classes:N"
        )
    paths, ys, names = [], [], {}
    for cid, d in enumerate(class_dirs, 1):
        names[cid] = d.name
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        ys += [cid] * len(files)
    if not paths:
        folders = ", ".join(d.name for d in class_dirs[:3]) + (", ..." if len(class_dirs) > 3 else "")
        raise LayoutError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {base} ({folders}); {CUB_LAYOUT}"
        )
    y = np.array(ys, dtype=np.int64)
    if len(np.unique(y)) < 2:
        found = ", ".join(names[c] for c in np.unique(y))
        raise LayoutError(
            f"found 1 class in {base} ({found}); is this CUB_200_2011? Pass the CUB_200_2011 directory "
            "(or its parent) as --data, or a folder with one subfolder of images per class (2 or more)"
        )
    return _make_split(
        paths,
        y,
        _class_split(y, split),
        names,
        f"class-folder tree {base}/<class>/<image> (classes in folder-name order)",
    )


def _class_split(y: np.ndarray, split: str) -> np.ndarray:
    """Boolean train mask for a held-out-class split ("dml" = first half of the classes)."""
    classes = np.unique(y)
    if split == "dml":
        n_train = len(classes) // 2
    elif split.startswith("classes:") and split.split(":", 1)[1].strip().isdigit():
        n_train = int(split.split(":", 1)[1])
    else:
        raise ConfigError(
            f"--split {split!r} is not a split: use dml (first half of the classes train), "
            "classes:N (first N classes train) or official (train_test_split.txt)"
        )
    if not 0 < n_train < len(classes):
        raise ConfigError(
            f"--split {split} puts {n_train} of the {len(classes)} classes in training, which leaves "
            f"{'no train' if n_train <= 0 else 'no test'} classes: use --split classes:N with "
            f"0 < N < {len(classes)}"
        )
    return np.isin(y, classes[:n_train])


def _make_split(items: list, y: np.ndarray, is_train: np.ndarray, names: dict[int, str], layout: str) -> Split:
    if not is_train.any() or is_train.all():
        raise ConfigError(
            f"the split leaves {'no train' if not is_train.any() else 'no test'} images "
            f"({len(items)} images in {layout}): check train_test_split.txt, or use --split dml"
        )
    train_classes = np.unique(y[is_train])
    remap = {int(c): i for i, c in enumerate(train_classes)}
    return Split(
        train_items=[items[i] for i in np.flatnonzero(is_train)],
        train_labels=np.array([remap[int(c)] for c in y[is_train]], dtype=np.int64),
        test_items=[items[i] for i in np.flatnonzero(~is_train)],
        test_labels=y[~is_train].astype(np.int64),
        class_names=names,
        layout=layout,
    )


def _decode_error(path: Path, size: int) -> str | None:
    """None if the image decodes, else what went wrong (one line)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEGs decode at a reduced scale: every byte is still read
            img.load()
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be used
        return f"{type(e).__name__}: {e}"
    return None


def check_images(paths: list, size: int = 64, workers: int = 1) -> None:
    """Decodes every image once (at reduced scale) so that a corrupt or empty file is found before training.

    Raises:
        LayoutError: Naming the first file that does not decode and how many do not.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
        errors = list(pool.map(lambda p: _decode_error(Path(p), size), paths, chunksize=64))
    bad = [(p, e) for p, e in zip(paths, errors) if e is not None]
    if bad:
        (first, why), more = bad[0], len(bad) - 1
        raise LayoutError(
            f"image {first} does not decode ({why})"
            + (f"; {more} more of the {len(paths)} images do not either" if more else "")
            + ": replace the file(s) with readable images, or delete them (official layout: also "
            "their lines in images.txt, image_class_labels.txt and train_test_split.txt)"
        )


class ImageDataset(Dataset):
    """(image tensor, label) pairs from image paths, loaded with PIL."""

    def __init__(self, paths: list, labels: np.ndarray, transform, eval_transform=None) -> None:
        self.paths, self.labels, self.transform = paths, torch.as_tensor(labels), transform
        self.eval_transform = eval_transform

    def eval_view(self) -> ImageDataset:
        """The same images with the test-time transform (for plotting train embeddings)."""
        return ImageDataset(self.paths, self.labels, self.eval_transform or self.transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LITE_NORM = ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502))  # EfficientNet-Lite: (x - 127) / 128


def image_transforms(size: int, train: bool, norm_stats=IMAGENET_NORM):
    """Normalized transforms: random resized crop + flip for training, resize + centre crop else."""
    from torchvision import transforms as T

    norm = T.Normalize(*norm_stats)
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(), norm])
