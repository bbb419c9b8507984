"""Datasets on the device: digits, ImageFolder with its decode cache, subsets, augmentation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from orc_fast.data import (
    DataError,
    augment,
    class_balanced_subset,
    load_dataset,
    normalize,
    steps_per_epoch,
)

SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORC_FAST_CACHE", str(tmp_path / "cache"))


def test_digits_is_embedded_upsampled_and_split_the_same_way_every_time():
    data = load_dataset("digits")
    assert data.train_images.shape == (1437, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (360, 3, 32, 32)
    assert data.classes == [str(c) for c in range(10)] and data.num_classes == 10
    assert set(data.train_labels.tolist()) == set(range(10))
    assert torch.equal(data.train_images[:, 0], data.train_images[:, 2])  # grey in 3 channels
    assert not data.flip  # a mirrored digit is another glyph
    again = load_dataset("digits")
    assert torch.equal(again.test_labels, data.test_labels) and torch.equal(again.test_images, data.test_images)
    assert load_dataset("digits", image_size=16).train_images.shape[-1] == 16


def test_normalisation_statistics_come_from_the_training_images():
    data = load_dataset("digits")
    images = torch.cat([x for x, _ in data.eval_batches("test", 500)])
    assert images.dtype == torch.float32
    train = normalize(data.train_images, data.mean, data.std)
    assert train.mean().abs() < 1e-3 and (train.std() - 1).abs() < 1e-2


def test_augment_is_a_padded_crop_and_maybe_a_flip():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = augment(images, generator, padding=2, flip=True)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        candidates = [
            (dy, dx, flip)
            for dy in range(5) for dx in range(5) for flip in (False, True)
            if torch.equal(out[i], (padded[i].flip(-1) if flip else padded[i])[:, dy:dy + 8, 4 - dx:12 - dx] if flip
                           else padded[i][:, dy:dy + 8, dx:dx + 8])
        ]
        assert candidates, f"image {i} is not a crop of its padded self"
        flips += any(flip for _, _, flip in candidates)
    assert 0 < flips < 16
    no_flip = augment(images, torch.Generator().manual_seed(1), padding=0, flip=False)
    assert torch.equal(no_flip, images)


def test_augment_is_reproducible_from_the_generator():
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    a = augment(images, torch.Generator().manual_seed(3))
    b = augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_train_batches_cover_an_epoch_in_full_batches():
    data = load_dataset("digits", train_subset=200)
    generator = torch.Generator().manual_seed(0)
    batches = list(data.train_batches(64, generator))
    assert len(batches) == steps_per_epoch(200, 64) == 3
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == 192
    assert all(x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
    assert steps_per_epoch(10, 64) == 1  # a tiny set still gets one (smaller) batch
    assert len(list(load_dataset("digits", train_subset=10).train_batches(64, generator))) == 1


def test_class_balanced_subset():
    labels = torch.tensor([0] * 50 + [1] * 50 + [2] * 5)
    index = class_balanced_subset(labels, 31, 3)
    assert len(index) == 31 and len(set(index.tolist())) == 31
    assert torch.bincount(labels[index]).tolist() == [13, 13, 5]  # class 2 runs out; the rest share
    assert torch.equal(index, class_balanced_subset(labels, 31, 3))  # the same for every run
    assert torch.bincount(labels[class_balanced_subset(labels, 30, 3)]).tolist() == [13, 12, 5]
    data = load_dataset("digits", train_subset=100)
    assert torch.bincount(data.train_labels).tolist() == [10] * 10


# ---------------------------------------------------------------------------- imagefolder


def write_tree(root: Path, classes=("cat", "dog"), per_class=3, size=10, splits=("train", "test")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_imagefolder_loads_resizes_and_caches_outside_the_data(tmp_path):
    root = write_tree(tmp_path / "data")
    before = sorted(p for p in root.rglob("*"))
    data = load_dataset("imagefolder", str(root), image_size=16, log=lambda m: None)
    assert data.classes == ["cat", "dog"]
    assert data.train_images.shape == (6, 3, 16, 16) and data.test_images.shape == (6, 3, 16, 16)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(p for p in root.rglob("*")) == before  # nothing written into the data folder
    cached = list((tmp_path / "cache").glob("imagefolder-*.pt"))
    assert len(cached) == 1
    # The second load comes from the cache (log says nothing about decoding).
    messages = []
    again = load_dataset("imagefolder", str(root), image_size=16, log=messages.append)
    assert not any("decoding" in m for m in messages)
    assert torch.equal(again.train_images, data.train_images)
    # A new image: a new decode, which replaces the old cache entry of this folder.
    write_tree(root, classes=("cat",), per_class=4)
    os.utime(root / "train" / "cat", ns=(1, 10**18))
    grown = load_dataset("imagefolder", str(root), image_size=16, log=messages.append)
    assert len(grown.train_labels) == 7
    assert [p.name for p in (tmp_path / "cache").glob("imagefolder-*.pt")] != [p.name for p in cached]
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 1


def test_imagefolder_cache_sees_a_file_rewritten_in_place(tmp_path):
    from PIL import Image

    root = write_tree(tmp_path / "data")
    first = load_dataset("imagefolder", str(root), image_size=10, log=lambda m: None)
    image = root / "train" / "cat" / "1.png"
    folder_times = {d: d.stat().st_mtime_ns for d in (root, root / "train", root / "train" / "cat")}
    stat = image.stat()
    Image.fromarray(np.full((10, 10, 3), 7, dtype=np.uint8)).save(image)  # same name, same folder
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even 1 ns later is another file
    for directory, mtime in folder_times.items():  # what the old key looked at is unchanged
        os.utime(directory, ns=(mtime, mtime))
    messages = []
    second = load_dataset("imagefolder", str(root), image_size=10, log=messages.append)
    assert any("decoding" in m for m in messages)
    assert (second.train_images[1] == 7).all() and not (first.train_images[1] == 7).all()
    assert torch.equal(second.train_images[[0, 2, 3, 4, 5]], first.train_images[[0, 2, 3, 4, 5]])
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 1  # the stale decode is gone


def test_imagefolder_cache_key_covers_the_decode_settings(tmp_path):
    root = write_tree(tmp_path / "data")
    small = load_dataset("imagefolder", str(root), image_size=8, log=lambda m: None)
    large = load_dataset("imagefolder", str(root), image_size=12, log=lambda m: None)
    assert small.image_size == 8 and large.image_size == 12
    # Two settings of one folder are two slots; neither replaces the other.
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 2
    messages = []
    load_dataset("imagefolder", str(root), image_size=8, log=messages.append)
    assert not any("decoding" in m for m in messages)


def overwrite_tensor_bytes(cache_file: Path, count: int = 2000) -> None:
    """Overwrite ``count`` bytes in the middle of the largest tensor stored in a torch.save
    file (a zip archive whose records are stored uncompressed), as a disk fault would."""
    import struct
    import zipfile

    with zipfile.ZipFile(cache_file) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert record.compress_type == zipfile.ZIP_STORED and record.file_size > count
    raw = bytearray(cache_file.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[record.header_offset + 26:record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length + (record.file_size - count) // 2
    raw[start:start + count] = bytes(255 - b for b in raw[start:start + count])  # every byte changes
    cache_file.write_bytes(bytes(raw))


def test_imagefolder_cache_with_damaged_tensor_bytes_is_rebuilt(tmp_path):
    root = write_tree(tmp_path / "data", per_class=4, size=32)
    fresh = load_dataset("imagefolder", str(root), image_size=32, log=lambda m: None)
    (cache_file,) = (tmp_path / "cache").glob("imagefolder-*.pt")
    overwrite_tensor_bytes(cache_file)
    torch.load(cache_file, weights_only=True)  # still unpickles: only a checksum can tell
    messages = []
    again = load_dataset("imagefolder", str(root), image_size=32, log=messages.append)
    rebuilt = [m for m in messages if str(cache_file) in m and "rebuilding" in m]
    assert len(rebuilt) == 1 and "checksum" in rebuilt[0], messages
    assert any("decoding" in m for m in messages)
    assert torch.equal(again.train_images, fresh.train_images) and torch.equal(again.test_images, fresh.test_images)
    messages.clear()  # the cache was rewritten whole: the next load reads it without a word
    load_dataset("imagefolder", str(root), image_size=32, log=messages.append)
    assert not messages


def test_imagefolder_bad_trees(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("imagefolder", None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no train/ folder"):
        load_dataset("imagefolder", str(empty))
    (empty / "train").mkdir()
    (empty / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("imagefolder", str(empty))
    mismatch = write_tree(tmp_path / "mismatch", splits=("train",))
    write_tree(mismatch, classes=("cat", "bird"), splits=("test",))
    with pytest.raises(DataError, match=r"test classes differ.*missing in test: \['dog'\].*not in train: \['bird'\]"):
        load_dataset("imagefolder", str(mismatch))
    hollow = write_tree(tmp_path / "hollow")
    for f in (hollow / "test" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="without images: dog"):
        load_dataset("imagefolder", str(hollow))
    single = write_tree(tmp_path / "single", classes=("cat",))
    with pytest.raises(DataError, match="only one class"):
        load_dataset("imagefolder", str(single), log=lambda m: None)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_dataset("imagefolder", str(tmp_path / "a_file"))
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_dataset("cifar10", str(tmp_path / "a_file"))
    broken = write_tree(tmp_path / "broken")
    (broken / "train" / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode image"):
        load_dataset("imagefolder", str(broken), log=lambda m: None)


def test_training_subsets_must_cover_every_class():
    with pytest.raises(DataError, match="--train-subset 5 is smaller than the 10 classes"):
        load_dataset("digits", image_size=8, train_subset=5)
    with pytest.raises(DataError, match="--train-subset 99999 asks for more than the 1437 training images"):
        load_dataset("digits", image_size=8, train_subset=99999)
    # 10 images, one per class, of which the validation split takes one: a class has none left.
    with pytest.raises(DataError, match="no training image of class"):
        load_dataset("digits", image_size=8, train_subset=10, val_split=1)
    assert len(load_dataset("digits", image_size=8, train_subset=10).train_labels) == 10
    assert len(load_dataset("digits", image_size=8, train_subset=1437).train_labels) == 1437


def test_class_folders_of_a_test_set_alone(tmp_path):
    from orc_fast.data import load_class_folders

    root = write_tree(tmp_path / "data", classes=("dog", "cat", "owl"))
    classes, images, labels = load_class_folders(root / "test", 12, log=lambda m: None)
    assert classes == ["cat", "dog", "owl"] and images.shape == (9, 3, 12, 12) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(DataError, match="does not exist"):
        load_class_folders(tmp_path / "nope", 12)
    with pytest.raises(DataError, match="holds no class folders"):
        load_class_folders(root / "test" / "cat", 12)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("cifar10", None)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar100", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10", str(tmp_path))  # no --download: nothing fetched
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"] or not list(tmp_path.iterdir())


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/data/cifar10 is absent")
def test_shared_cifar10_layout():
    from orc_fast.data import _scan_imagefolder

    classes, listing = _scan_imagefolder(SHARED_CIFAR10)
    assert len(classes) == 10
    assert sum(len(v) for v in listing["train"].values()) == 50000
    assert sum(len(v) for v in listing["test"].values()) == 10000


def test_validation_split_is_held_out_class_balanced_and_fixed():
    from orc_fast.data import load_dataset

    full = load_dataset("digits", image_size=16, val_split=0)
    split = load_dataset("digits", image_size=16, val_split=100)
    again = load_dataset("digits", image_size=16, val_split=100)
    assert len(split.val_labels) == 100 and len(split.train_labels) == len(full.train_labels) - 100
    counts = torch.bincount(split.val_labels, minlength=10)
    assert counts.max() - counts.min() <= 1  # class-balanced
    # Disjoint from training: every training image of the full set lands in exactly one split.
    def keys(images):
        return {bytes(image.flatten().tolist()) for image in images}

    val_keys, train_keys = keys(split.val_images), keys(split.train_images)
    assert not val_keys & train_keys
    assert val_keys | train_keys == keys(full.train_images)
    assert torch.equal(split.val_labels, again.val_labels) and torch.equal(split.val_images, again.val_images)
    assert len(load_dataset("digits", image_size=16, val_split=-1).val_labels) == len(full.train_labels) // 10
