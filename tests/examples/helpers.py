"""Helpers for the examples' tests: the examples import path and a miniature CUB200-2011."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CUB = EXAMPLES / "cub"  # the CUB trainer: train.py and its trainer package
for _path in (EXAMPLES, CUB):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def make_mini_cub(root: Path, num_classes: int = 4, per_class: int = 6, size: int = 40, seed: int = 0) -> Path:
    """Writes a CUB200-2011 lookalike (official layout, small coloured JPEGs); returns CUB_200_2011/.

    Each class has its own base colour plus noise, so a few steps can already learn something.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    cub = root / "CUB_200_2011"
    images, labels, classes, split = [], [], [], []
    image_id = 0
    for c in range(1, num_classes + 1):
        name = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {name}")
        (cub / "images" / name).mkdir(parents=True)
        base = rng.integers(0, 255, 3)
        for i in range(per_class):
            image_id += 1
            pix = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            rel = f"{name}/Bird_{c}_{i:04d}.jpg"
            Image.fromarray(pix).save(cub / "images" / rel, quality=85)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(i % 2 == 0)}")
    for fname, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("classes.txt", classes),
        ("train_test_split.txt", split),
    ):
        (cub / fname).write_text("\n".join(lines) + "\n")
    return cub


def import_example(name: str):
    """Imports a module of examples/ (demo, held_out, ...) or examples/cub/ (train, trainer.*): neither is installed."""
    import importlib

    return importlib.import_module(name)


# A small flow for the CUB trainer's command line: fast, and still every layer kind.
SMALL_FLOW_ARGS = ["--flow-blocks", "2", "--flow-hidden", "32", "--flow-layers", "3"]
# The CUB trainer at its smallest: an untrained ResNet18 on 32 px images, 2 steps per epoch.
FAST_TRAIN_ARGS = [
    *("--arch", "resnet18", "--weights", "none", "--image-size", "32"),
    *("--samples-per-class", "2", "--max-steps", "2", "--workers", "0"),
    *SMALL_FLOW_ARGS,
    *("--no-progress", "--threads", "1"),
]
