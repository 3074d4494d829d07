"""Tests for ringq.data: split loading (ImageFolder + cache, IDX, CIFAR batches), index selection,
and the two loaders (in-memory augmentation, rank sharding, torchvision path)."""
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from ringq import data
from ringq.errors import DataError
from ringq.data import (InMemoryLoader, balanced_indices, epoch_plan, load_split, make_loader,
                        train_val_split)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLASSES = ["dog", "airplane", "cat"]  # created in this order; the loader must sort them


# ---- fixtures / writers -----------------------------------------------------------------------

def write_image_folder(root, per_class=3, size=(8, 6), seed=0):
    """root/<class>/NN.png (lossless) for CLASSES; returns {class: [HWC uint8 arrays in file order]}."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        arrays[name] = []
        for k in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{k:02d}.png")
            arrays[name].append(arr)
    return arrays


def write_idx(path, array, gz=False):
    """IDX file of a uint8 array: magic 0,0,0x08,ndim + big-endian uint32 dims + bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def idx_split(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_idx_split(folder, split, n, gz=False, seed=0):
    images, labels = idx_split(n, seed)
    names = data.IDX_FILES[split]
    write_idx(folder / names[0], images, gz)
    write_idx(folder / names[1], labels, gz)
    return images, labels


def coordinate_images(n, side=8):
    """n copies of a 1-channel image whose pixel (i, j) holds 1 + i*side + j (never 0 = padding)."""
    img = (1 + torch.arange(side * side)).view(1, 1, side, side).to(torch.uint8)
    return img.expand(n, 1, side, side).contiguous()


def decode_offsets(x, side=8):
    """(dy, dx, flip) of each augmented coordinate image in x (float = uint8/255) [n, 1, side, side]."""
    v = torch.round(x[:, 0] * 255).long().flatten(1)
    first = (v > 0).float().argmax(1)  # first non-padding pixel, row-major
    r, c = first // side, first % side
    val = v[torch.arange(len(v)), first]
    flip = v[torch.arange(len(v)), first + 1] < val  # pixel to its right is real content too
    i, j = (val - 1) // side, (val - 1) % side
    dy = i - r + data.PAD
    dx = torch.where(flip, j - (side - 1 - c), j - c) + data.PAD
    return dy, dx, flip


# ---- ImageFolder and cache --------------------------------------------------------------------

def test_image_folder_loading_class_order_shapes(tmp_path):
    arrays = write_image_folder(tmp_path / "train")
    Image.fromarray(arrays["cat"][0]).save(tmp_path / "train" / "cat" / "99.jpg", quality=95)
    ds = load_split("cifar10", tmp_path, "train")
    assert ds.classes == ["airplane", "cat", "dog"]
    assert ds.images.shape == (10, 3, 6, 8) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    expected = torch.from_numpy(arrays["airplane"][1]).permute(2, 0, 1)
    assert torch.equal(ds.images[1], expected)
    assert len(ds) == 10
    sub = ds.subset(torch.tensor([0, 9]))
    assert len(sub) == 2 and sub.labels.tolist() == [0, 2] and sub.classes == ds.classes


def test_cache_written_reused_and_invalidated(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "test")
    first = load_split("cifar10", tmp_path, "test")
    cache = tmp_path / ".ringq_cache" / "test.pt"
    stored = torch.load(cache, weights_only=True)
    assert set(stored) == {"fingerprint", "images", "labels", "classes"}
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]

    real_decode = data._decode_image

    def refuse(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(data, "_decode_image", refuse)
    again = load_split("cifar10", tmp_path, "test")
    assert torch.equal(again.images, first.images) and again.classes == first.classes

    Image.new("RGB", (8, 6), (1, 2, 3)).save(tmp_path / "test" / "cat" / "50.png")
    decoded = []
    monkeypatch.setattr(data, "_decode_image", lambda p: decoded.append(p) or real_decode(p))
    grown = load_split("cifar10", tmp_path, "test")
    assert len(grown) == 10 and len(decoded) == 10
    assert grown.images[6].flatten(1)[:, 0].tolist() == [1, 2, 3]


def test_corrupt_cache_is_rebuilt(tmp_path):
    write_image_folder(tmp_path / "test")
    first = load_split("cifar10", tmp_path, "test")
    cache = tmp_path / ".ringq_cache" / "test.pt"
    cache.write_bytes(b"not a torch file")
    assert torch.equal(load_split("cifar10", tmp_path, "test").images, first.images)
    assert torch.load(cache, weights_only=True)["images"].shape == first.images.shape


def test_cache_falls_back_to_home_when_data_dir_unwritable(tmp_path, monkeypatch):
    data_dir, home = tmp_path / "data", tmp_path / "home"
    write_image_folder(data_dir / "test")
    (data_dir / ".ringq_cache").write_text("a file where the cache folder should go")
    monkeypatch.setenv("HOME", str(home))
    load_split("cifar10", data_dir, "test")
    assert len(list((home / ".cache" / "ringq").glob("*/test.pt"))) == 1


def test_mixed_image_sizes_name_the_files(tmp_path):
    write_image_folder(tmp_path / "train", per_class=1)
    Image.new("RGB", (5, 5)).save(tmp_path / "train" / "cat" / "odd.png")
    with pytest.raises(DataError, match=r"differ in size.*airplane/00\.png.*cat/odd\.png"):
        load_split("cifar10", tmp_path, "train")


def test_undecodable_image_is_named(tmp_path):
    write_image_folder(tmp_path / "train", per_class=1)
    (tmp_path / "train" / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot decode image .*dog/bad\.jpg"):
        load_split("cifar10", tmp_path, "train")


def test_cifar_python_batches(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [3, 7]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)  # fake md5s
    ds = load_split("cifar10", tmp_path, "test")
    assert ds.images.shape == (2, 3, 32, 32) and ds.images.is_contiguous()
    assert ds.labels.tolist() == [3, 7] and ds.classes == names
    assert len(load_split("cifar10", tmp_path, "train")) == 10


def test_cifar_missing_names_expected_files(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()  # present but incomplete
    with pytest.raises(DataError, match=r"unusable.*data_batch_1\.\.5, test_batch.*train/<class>/\*\.jpg"):
        load_split("cifar10", tmp_path, "test")


# ---- IDX ---------------------------------------------------------------------------------------

def test_idx_raw_in_data_dir(tmp_path):
    images, labels = write_idx_split(tmp_path, "test", 7)
    ds = load_split("mnist", tmp_path, "test")
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.classes == [str(d) for d in range(10)]


def test_idx_gz_in_torchvision_layout(tmp_path):
    images, labels = write_idx_split(tmp_path / "FashionMNIST" / "raw", "train", 5, gz=True)
    ds = load_split("fashion-mnist", tmp_path, "train")
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.tolist() == labels.tolist()
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10


def test_idx_missing_files_named(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", idx_split(3)[0])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte .*not found.*MNIST/raw"):
        load_split("mnist", tmp_path, "test")


def test_idx_corrupt_files_named(tmp_path):
    images, labels = idx_split(4)
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is corrupt or truncated"):
        load_split("mnist", tmp_path, "test")
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(20))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is corrupt.*magic"):
        load_split("mnist", tmp_path, "test")
    path.unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken gzip")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_split("mnist", tmp_path, "test")


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"no such data directory .*nope; expected the four IDX.*"
                                        r"train-images-idx3-ubyte"):
        load_split("fashion-mnist", tmp_path / "nope", "train")
    with pytest.raises(DataError, match=r"no such data directory .*nope; .*cifar-10-batches-py"):
        load_split("cifar10", tmp_path / "nope", "train")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("download", [False, True])
def test_data_dir_under_a_file_is_one_data_error(tmp_path, download):
    (tmp_path / "afile").write_text("x")
    for path in (tmp_path / "afile" / "x", tmp_path / "afile" / "x" / "y"):
        with pytest.raises(DataError, match=f"data directory {path} cannot exist: "
                                            f"{tmp_path / 'afile'} is a file"):
            load_split("cifar10", path, "test", download=download)
    with pytest.raises(DataError, match="is not a directory"):
        data.check_data_dir(tmp_path / "afile", "cifar10", download)


def test_check_data_dir_creates_nothing(tmp_path):
    missing = tmp_path / "typo" / "data"
    assert data.check_data_dir(missing, "mnist", download=True) == missing
    with pytest.raises(DataError, match="no such data directory"):
        data.check_data_dir(missing, "mnist", download=False)
    assert not (tmp_path / "typo").exists()
    assert data.check_data_dir(tmp_path, "mnist", download=False) == tmp_path


def test_check_data_dir_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.check_data_dir("~", "cifar10", download=False) == tmp_path


def test_failed_download_is_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError, match=r"downloading fashion-mnist .* failed"):
        load_split("fashion-mnist", tmp_path / "new", "test", download=True)
    assert (tmp_path / "new").is_dir()


@pytest.mark.skipif(not (SHARED / "data" / "fashion-mnist").is_dir(),
                    reason=f"real Fashion-MNIST not found at {SHARED / 'data' / 'fashion-mnist'}")
def test_real_fashion_mnist_test_split():
    ds = load_split("fashion-mnist", SHARED / "data" / "fashion-mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


# ---- index selection ---------------------------------------------------------------------------

LABELS = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)


def test_balanced_indices_balance_and_determinism():
    idx = balanced_indices(LABELS, 11, seed=3)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values) and idx.unique().numel() == 11
    assert torch.bincount(LABELS[idx]).tolist() == [4, 4, 3]
    assert torch.equal(idx, balanced_indices(LABELS, 11, seed=3))
    assert not torch.equal(idx, balanced_indices(LABELS, 11, seed=4))


@pytest.mark.parametrize("n, message", [(0, "cannot pick 0"), (61, "cannot pick 61"), (45, "class 0 has 10")])
def test_balanced_indices_errors(n, message):
    with pytest.raises(DataError, match=message):
        balanced_indices(LABELS, n, seed=0)


def test_train_val_split():
    train, val = train_val_split(LABELS, 9, seed=1)
    assert torch.bincount(LABELS[val]).tolist() == [3, 3, 3]
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(60))
    train, val = train_val_split(LABELS, 0, seed=1)
    assert torch.equal(train, torch.arange(60)) and val.numel() == 0 and val.dtype == torch.int64


# ---- InMemoryLoader ------------------------------------------------------------------------------

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def random_images(n=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 10, 12), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g))


def memory_loader(images, labels, batch_size=8, shuffle=True, augment=True, seed=5, **kw):
    return InMemoryLoader(images, labels, batch_size, MEAN, STD, "cpu", shuffle, augment, seed, **kw)


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def test_eval_batches_are_normalized_in_dataset_order():
    images, labels = random_images()
    out = batches(memory_loader(images, labels, shuffle=False, augment=False))
    assert [x.shape[0] for x, _ in out] == [8, 8, 5]
    x = torch.cat([b[0] for b in out])
    y = torch.cat([b[1] for b in out])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and torch.equal(y, labels)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(x, (images.float() / 255 - mean) / std, atol=1e-6)


def test_augmentation_matches_padded_slice_reference():
    images, labels = random_images()
    loader = memory_loader(images, labels)
    plan = epoch_plan(len(labels), seed=5, epoch=2, shuffle=True, augment=True)
    x = torch.cat([b[0] for b in batches(loader, epoch=2)])
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    assert plan.flip.any() and not plan.flip.all()
    for pos in range(len(labels)):
        padded = F.pad(images[plan.order[pos]], (4, 4, 4, 4))
        dy, dx = int(plan.dy[pos]), int(plan.dx[pos])
        ref = padded[:, dy:dy + 10, dx:dx + 12]
        if plan.flip[pos]:
            ref = ref.flip(-1)
        assert torch.allclose(x[pos], (ref.float() / 255 - mean) / std, atol=1e-6)


def test_same_seed_and_epoch_reproduce_other_epoch_differs():
    images, labels = random_images()
    a, b = memory_loader(images, labels), memory_loader(images, labels)
    first, again, other = batches(a, 3), batches(b, 3), batches(b, 4)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])


@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_shards_concatenate_to_single_process_batches(drop_last):
    images, labels = random_images()
    single = batches(memory_loader(images, labels, drop_last=drop_last), 1)
    shards = [batches(memory_loader(images, labels, drop_last=drop_last, rank=r, world_size=2), 1)
              for r in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == (2 if drop_last else 3)
    for k, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([shards[0][k][0], shards[1][k][0]]), x)
        assert torch.equal(torch.cat([shards[0][k][1], shards[1][k][1]]), y)


def test_batching_errors():
    images, labels = random_images()
    with pytest.raises(DataError, match="not divisible by the world size"):
        memory_loader(images, labels, batch_size=9, world_size=2, rank=0)
    with pytest.raises(DataError, match="3 channels"):
        InMemoryLoader(images, labels, 8, (0.5,), (0.5,), "cpu", False, False, 0)
    with pytest.raises(DataError, match="unknown loader kind"):
        make_loader("fast", data.ArrayDataset(images, labels, []), 8, MEAN, STD, "cpu", False, False, 0)


# ---- crop statistics of both paths, torchvision loader ------------------------------------------

def check_offsets(dy, dx, flip):
    for offsets in (dy, dx):
        assert sorted(offsets.unique().tolist()) == list(range(9))
        assert abs(offsets.float().mean().item() - 4) < 0.3
    assert abs(flip.float().mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("kind", ["memory", "torchvision"])
def test_crop_offset_statistics(kind):
    n = 3000
    ds = data.ArrayDataset(coordinate_images(n), torch.zeros(n, dtype=torch.int64), ["x"])
    loader = make_loader(kind, ds, 500, (0.0,), (1.0,), "cpu", shuffle=True, augment=True, seed=0)
    loader.set_epoch(0)
    x = torch.cat([b[0] for b in loader])
    assert x.shape == (n, 1, 8, 8)
    dy, dx, flip = decode_offsets(x)
    check_offsets(dy, dx, flip)
    if kind == "memory":  # the decoded geometry is exactly the drawn plan
        plan = epoch_plan(n, 0, 0, True, True)
        assert torch.equal(dy, plan.dy) and torch.equal(dx, plan.dx) and torch.equal(flip, plan.flip)


def test_torchvision_loader_batches_and_epochs():
    images, labels = random_images(n=20)
    ds = data.ArrayDataset(images, labels, [str(d) for d in range(10)])
    loader = make_loader("torchvision", ds, 8, MEAN, STD, "cpu", shuffle=True, augment=False, seed=1)
    assert len(loader) == 3
    order = [torch.cat([y for _, y in batches(loader, e)]) for e in (0, 0, 1)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    assert sorted(order[0].tolist()) == sorted(labels.tolist())
    x, _ = batches(loader, 0)[0]
    assert x.shape == (8, 3, 10, 12) and x.dtype == torch.float32

    shards = [make_loader("torchvision", ds, 8, MEAN, STD, "cpu", shuffle=True, augment=True, seed=1,
                          rank=r, world_size=2) for r in range(2)]
    sizes = [[y.numel() for _, y in batches(s, 2)] for s in shards]
    assert sizes == [[4, 4, 2], [4, 4, 2]]


def test_image_folder_cache_is_used_from_another_working_directory(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "data" / "test")
    monkeypatch.chdir(tmp_path)
    load_split("cifar10", "data", "test")
    monkeypatch.chdir(tmp_path / "data")
    monkeypatch.setattr(data, "_decode_image", lambda p: pytest.fail(f"decoded {p}"))
    assert len(load_split("cifar10", os.curdir, "test")) == 9
