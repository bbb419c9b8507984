"""Datasets held on the training device as uint8 tensors, augmented there in batches.

docs/design.md §5 and 6. ``load_dataset`` returns a ``DeviceDataset`` whatever the
source (scikit-learn digits, torchvision CIFAR, an ImageFolder tree); ``train_batches``
yields normalised, augmented float batches without any per-image Python or DataLoader
worker: one gather does the random crop (zero padding) and the horizontal flip of a
whole batch.

Decoded ImageFolder trees are cached under ``~/.cache/orc_fast`` (``$ORC_FAST_CACHE``
or ``$XDG_CACHE_HOME/orc_fast`` when set), never inside the data folder, which may be
read-only. The cache key is the folder's absolute path, the decode settings (image
size, colour mode, resampling) and every file's name, size and modification time in
nanoseconds; a newer decode of the same folder at the same settings replaces the old one.
Each cache file carries a SHA-256 of every tensor's bytes, checked on load: a corrupted
file is decoded again and rewritten, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import write_atomic

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
CACHE_VERSION = 3  # 3: tensors' SHA-256 stored beside them (docs/design.md §6)
# How an image file becomes a uint8 array (``_decode``); part of the decode cache's key.
DECODE = {"mode": "RGB", "resample": "bilinear"}


class DataError(ValueError):
    """The data asked for is missing, empty or inconsistent (a user error, not a bug)."""


@dataclass
class DeviceDataset:
    """Train, validation and test splits as uint8 [N, 3, H, W] images and int64 [N] labels on
    one device. The validation split is held out of the training set (it may be empty)."""

    name: str
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: torch.Tensor  # [3] fp32, in [0, 1] units, from the training images
    std: torch.Tensor
    flip: bool  # horizontal flips keep the label (not so for digits)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    def to(self, device) -> DeviceDataset:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return DeviceDataset(**moved)

    # ---------------------------------------------------------------- the Source interface

    def size(self, split: str) -> int:
        return len(self._split(split)[1])

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(self.size("train"), batch_size)

    def train_batches(self, batch_size: int, generator: torch.Generator, augment_images: bool = True):
        """One epoch of (normalised augmented images [B, 3, H, W] fp32, labels [B]) on the
        device, in the order ``generator`` draws (its state, saved with a checkpoint, is
        where the next epoch's order comes from)."""
        count = len(self.train_labels)
        order = torch.randperm(count, generator=generator, device=self.train_labels.device)
        size = min(batch_size, count)
        for step in range(steps_per_epoch(count, batch_size)):
            index = order[step * size : (step + 1) * size]
            images = self.train_images[index]
            if augment_images:
                images = augment(images, generator, flip=self.flip)
            yield normalize(images, self.mean, self.std), self.train_labels[index]

    def eval_batches(self, split: str, batch_size: int = 1000):
        """(normalised images, labels) of the ``test`` or ``val`` split, in order, unaugmented."""
        all_images, all_labels = self._split(split)
        for start in range(0, len(all_labels), batch_size):
            images = all_images[start : start + batch_size]
            yield normalize(images, self.mean, self.std), all_labels[start : start + batch_size]

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        splits = {"train": (self.train_images, self.train_labels), "val": (self.val_images, self.val_labels),
                  "test": (self.test_images, self.test_labels)}
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(splits)}")
        return splits[split]


class Source(Protocol):
    """What the trainer reads data through (docs/design.md §6): class names and the
    normalisation a trained member expects, a training epoch in batches, and the
    evaluation splits. ``DeviceDataset`` is the on-device implementation; a streaming one
    plugs in here."""

    classes: list[str]
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def num_classes(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    def size(self, split: str) -> int: ...

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def train_batches(self, batch_size: int, generator: torch.Generator, augment_images: bool = True): ...

    def eval_batches(self, split: str, batch_size: int = 1000): ...


# ---------------------------------------------------------------------------- sources


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] uint8 -> [N, C, size, size] uint8 (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    out = []
    for chunk in images.split(4096):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _digits(image_size: int):
    """scikit-learn's bundled 8x8 handwritten digits, grey -> 3 channels, upsampled.

    A fixed stratified 80/20 split (the same for every seed): 1437 train, 360 test.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).mul(255.0)[:, None]  # [N, 1, 8, 8]
    images = _resize_uint8(images.round().to(torch.uint8), image_size).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=0
    )
    train_index, test_index = torch.from_numpy(np.sort(train_index)), torch.from_numpy(np.sort(test_index))
    classes = [str(c) for c in range(10)]
    return classes, images[train_index], labels[train_index], images[test_index], labels[test_index]


def _cifar(name: str, data_dir: str | None, download: bool, image_size: int):
    import torchvision

    if not data_dir:
        raise DataError(f"--dataset {name} needs --data-dir (add --download to fetch it there)")
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"data folder {root} is a file, not a folder")
    if not download and not root.is_dir():
        raise DataError(f"data folder {root} does not exist (add --download to fetch {name} into it)")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = []
    for train in (True, False):
        try:
            split = cls(root=str(root), train=train, download=download)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
            hint = "" if download else " (add --download to fetch it)"
            raise DataError(f"{name} not found in {root}: {error}{hint}") from None
        except (urllib.error.URLError, OSError) as error:  # no network, a full or read-only folder
            reason = getattr(error, "reason", None) or error
            reason = getattr(reason, "strerror", None) or str(reason)
            raise DataError(f"cannot download {name} into {root}: {reason}") from None
        images = torch.from_numpy(np.asarray(split.data)).permute(0, 3, 1, 2).contiguous()
        splits += [_resize_uint8(images, image_size), torch.tensor(split.targets, dtype=torch.long)]
    return list(split.classes), *splits


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is a file, not a folder")


def scan_class_folders(folder: Path) -> dict[str, list[Path]]:
    """The images of each class folder of ``folder`` (``folder/<class>/*``), classes sorted;
    raises DataError when there are no class folders or one holds no images."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder} holds no class folders")
    listing = {c: _image_files(folder / c) for c in classes}
    empty = [c for c, files in listing.items() if not files]
    if empty:
        raise DataError(f"{folder} has class folders without images: {', '.join(empty[:5])}")
    return listing


def _scan_imagefolder(root: Path) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """Validate the D/train/<class>, D/test/<class> layout; list the images of each class."""
    _check_folder(root)
    listing: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"data folder {root} has no {split}/ folder (expected {root}/{split}/<class>/*)")
        listing[split] = scan_class_folders(split_dir)
    train_classes, test_classes = list(listing["train"]), list(listing["test"])
    if train_classes != test_classes:
        missing = sorted(set(train_classes) - set(test_classes))
        extra = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"{root}: test classes differ from train classes (missing in test: {missing or 'none'}; "
            f"not in train: {extra or 'none'})"
        )
    return train_classes, listing


def cache_dir() -> Path:
    if os.environ.get("ORC_FAST_CACHE"):
        return Path(os.environ["ORC_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "orc_fast"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:24]


def _cache_path(root: Path, listing: dict[str, dict[str, list[Path]]], image_size: int) -> Path:
    """imagefolder-<folder and decode settings>-<every file's name, size and mtime>.pt.

    The first part names the slot: a tree decoded at given settings has one cache file,
    and a newer one replaces it. The second changes when any file is added, removed or
    rewritten (size and nanosecond mtime), even in place, which leaves directory mtimes
    alone."""
    settings = {"version": CACHE_VERSION, "root": str(root.resolve()), "splits": list(listing), "size": image_size,
                "decode": DECODE}
    files = []
    for split, classes in listing.items():
        for name, paths in classes.items():
            for path in paths:
                stat = path.stat()
                files.append([split, name, path.name, stat.st_size, stat.st_mtime_ns])
    return cache_dir() / f"imagefolder-{_digest(settings)}-{_digest(files)}.pt"


def _decode(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert(DECODE["mode"])
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling[DECODE["resample"].upper()])
            return np.asarray(image, dtype=np.uint8)
    except Exception as error:  # noqa: BLE001 - any decoder failure is a data problem
        raise DataError(f"cannot decode image {path}: {error}") from None


def _decode_split(files: list[tuple[Path, int]], image_size: int):
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL
        arrays = list(pool.map(lambda item: _decode(item[0], image_size), files, chunksize=256))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return images, labels


def _save_torch_atomic(obj, path: Path) -> None:
    write_atomic(path, lambda handle: torch.save(obj, handle))


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes: torch.load checks no checksum of tensor data, so
    without it a cache file damaged on disk would be trained on silently (docs/design.md §6)."""
    return hashlib.sha256(tensor.contiguous().numpy()).hexdigest()


def _cache_digests(decoded: dict) -> dict:
    return {split: {"images": _tensor_sha256(images), "labels": _tensor_sha256(labels)}
            for split, (images, labels) in decoded.items()}


def _read_cache(cache_path: Path, listing: dict[str, dict[str, list[Path]]]) -> tuple[dict | None, str | None]:
    """(the cached {split: (images, labels)}, None), or (None, why the file cannot be used)."""
    try:
        cached = torch.load(cache_path, weights_only=True)
        decoded = {split: (cached["images"][split], cached["labels"][split]) for split in listing}
        if cached["classes"] != {split: list(classes) for split, classes in listing.items()}:
            return None, "for other class folders"
        if cached["digests"] != _cache_digests(decoded):
            return None, "corrupt (its SHA-256 checksum does not match)"
    except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt
        return None, f"unreadable ({type(error).__name__})"
    return decoded, None


def _decode_cached(root: Path, listing: dict[str, dict[str, list[Path]]], image_size: int, log=print) -> dict:
    """{split: (uint8 images [N, 3, S, S], labels [N])} of a scanned tree, labels indexing each
    split's sorted classes; decoded once, then read from the cache (checksums verified)."""
    cache_path = _cache_path(root, listing, image_size)
    if cache_path.exists():
        cached, problem = _read_cache(cache_path, listing)
        if cached is not None:
            return cached
        log(f"decode cache {cache_path} is {problem}: rebuilding it")
    log(f"decoding {root} once ({sum(len(f) for s in listing.values() for f in s.values())} images) ...")
    decoded = {}
    for split, classes in listing.items():
        files = [(path, label) for label, paths in enumerate(classes.values()) for path in paths]
        decoded[split] = _decode_split(files, image_size)
    try:
        _save_torch_atomic(
            {"classes": {split: list(classes) for split, classes in listing.items()},
             "images": {split: images for split, (images, _) in decoded.items()},
             "labels": {split: labels for split, (_, labels) in decoded.items()},
             "digests": _cache_digests(decoded)},
            cache_path,
        )
        log(f"cached the decoded images in {cache_path}")
        slot = cache_path.name.rsplit("-", 1)[0]
        for older in cache_path.parent.glob(f"{slot}-*.pt"):  # what this tree decoded to before
            if older != cache_path:
                older.unlink(missing_ok=True)
    except OSError as error:
        log(f"warning: could not write the decode cache {cache_path}: {error}")
    return decoded


def _imagefolder(data_dir: str | None, image_size: int, log=print):
    if not data_dir:
        raise DataError("--dataset imagefolder needs --data-dir D with D/train/<class>/* and D/test/<class>/*")
    root = Path(data_dir)
    classes, listing = _scan_imagefolder(root)
    decoded = _decode_cached(root, listing, image_size, log)
    return classes, *decoded["train"], *decoded["test"]


def load_class_folders(folder: str | os.PathLike, image_size: int, log=print) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One folder of class folders (``folder/<class>/*``, e.g. a test set on its own): its
    sorted class names, uint8 images [N, 3, S, S] and labels [N] indexing those names.
    Decoded and cached like an ImageFolder tree."""
    root = Path(folder)
    _check_folder(root)
    listing = {"": scan_class_folders(root)}
    ((images, labels),) = _decode_cached(root, listing, image_size, log).values()
    return list(listing[""]), images, labels


# ---------------------------------------------------------------------------- assembly


def class_balanced_subset(labels: torch.Tensor, size: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``size`` samples, as equal a share of each class as the data allows.

    Random within each class under its own fixed ``seed`` (so every method and every
    training seed sees the same subset); returned sorted.
    """
    generator = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    per_class = [idx[torch.randperm(len(idx), generator=generator)] for idx in per_class]
    capacity = [len(idx) for idx in per_class]
    quota = list(capacity)
    remaining, open_classes = min(size, len(labels)), list(range(num_classes))
    # Water-filling: classes smaller than the fair share give all they have; the others
    # split the rest evenly, the first classes taking the remainder one each.
    while open_classes:
        share = remaining // len(open_classes)
        small = [c for c in open_classes if capacity[c] <= share]
        if not small:
            extra = remaining - share * len(open_classes)
            for rank, c in enumerate(open_classes):
                quota[c] = share + (1 if rank < extra else 0)
            break
        remaining -= sum(capacity[c] for c in small)
        open_classes = [c for c in open_classes if c not in small]
    chosen = torch.cat([per_class[c][: quota[c]] for c in range(num_classes)])
    return chosen.sort().values


def load_dataset(
    name: str,
    data_dir: str | None = None,
    download: bool = False,
    image_size: int = 32,
    train_subset: int = 0,
    device="cpu",
    log=print,
    val_split: int = 0,
) -> DeviceDataset:
    """Load a dataset into uint8 tensors on ``device``; raises DataError on bad input.

    ``val_split`` images (class-balanced, the same for every seed) are held out of the
    training set (after ``train_subset``) as the validation split; -1: 10% of the training
    images, at most 5,000.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if image_size < 8:
        raise DataError(f"--image-size must be >= 8, got {image_size}")
    if name == "digits":
        classes, train_x, train_y, test_x, test_y = _digits(image_size)
    elif name in ("cifar10", "cifar100"):
        classes, train_x, train_y, test_x, test_y = _cifar(name, data_dir, download, image_size)
    else:
        classes, train_x, train_y, test_x, test_y = _imagefolder(data_dir, image_size, log)
    if len(train_y) == 0 or len(test_y) == 0:
        raise DataError(f"dataset {name} has an empty train or test split")
    if len(classes) < 2:
        raise DataError(f"dataset {name} has only one class ({classes[0]}): a classifier needs at least 2")
    if train_subset < 0:
        raise DataError(f"--train-subset must be >= 0, got {train_subset}")
    if train_subset > len(train_y):
        raise DataError(f"--train-subset {train_subset} asks for more than the {len(train_y)} training images of {name}")
    if 0 < train_subset < len(classes):
        raise DataError(f"--train-subset {train_subset} is smaller than the {len(classes)} classes of {name}: "
                        f"every class needs a training image")
    if train_subset:
        index = class_balanced_subset(train_y, train_subset, len(classes))
        train_x, train_y = train_x[index], train_y[index]
    if val_split < 0:
        val_split = min(len(train_y) // 10, 5000)
    if val_split >= len(train_y):
        raise DataError(f"--val-split {val_split} leaves no training images (the training set has {len(train_y)})")
    held_out = torch.zeros(len(train_y), dtype=torch.bool)
    if val_split:
        # Its own fixed seed, so the split does not depend on the subset's draw.
        held_out[class_balanced_subset(train_y, val_split, len(classes), seed=1)] = True
    val_x, val_y = train_x[held_out], train_y[held_out]
    train_x, train_y = train_x[~held_out], train_y[~held_out]
    untrained = [classes[c] for c, n in enumerate(torch.bincount(train_y, minlength=len(classes)).tolist()) if n == 0]
    if untrained:
        raise DataError(f"dataset {name}: no training image of class {', '.join(untrained[:5])} is left after "
                        f"--train-subset {train_subset} and --val-split {val_split} (use more training images)")
    scaled = train_x.float().div_(255.0)
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-3)
    dataset = DeviceDataset(
        name=name, classes=list(classes), train_images=train_x, train_labels=train_y,
        test_images=test_x, test_labels=test_y, val_images=val_x, val_labels=val_y, mean=mean, std=std, flip=name != "digits",
    )
    return dataset.to(device)


# ---------------------------------------------------------------------------- batches


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> fp32, per-channel standardised."""
    return standardize(images.float().div_(255.0), mean, std)


def standardize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """fp32 [B, 3, H, W] in [0, 1] -> per-channel standardised (what a trained member expects)."""
    return (images - mean[:, None, None]) / std[:, None, None]


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop of every image from its zero-padded self, and a random horizontal flip.

    One advanced-indexing gather for the whole batch on the images' device; the random
    offsets and flips come from ``generator`` (on the same device).
    """
    batch, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    rows = dy[:, None] + torch.arange(height, device=device)  # [B, H]
    cols = torch.arange(width, device=device).expand(batch, width)
    if flip:
        flipped = torch.rand(batch, generator=generator, device=device) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(-1), cols)
    cols = dx[:, None] + cols  # [B, W]
    channels = torch.arange(images.shape[1], device=device)
    return padded[
        torch.arange(batch, device=device)[:, None, None, None],
        channels[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches only (a tiny last batch would upset batch norm), at least one."""
    return max(1, num_images // batch_size)


