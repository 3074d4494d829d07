"""Datasets as uint8 tensors in memory, and the two batch loaders built on them.

Sources: CIFAR-10 (official python batches, an ImageFolder of JPEG/PNG files, or a download) and
MNIST / Fashion-MNIST (the four IDX files, raw or gzip). Every split is returned as an
``ArrayDataset`` of uint8 images [n, C, H, W] and int64 labels [n].

Loaders: ``InMemoryLoader`` keeps the whole split on the device and augments batch-wise with tensor
ops (exactly reproducible from (seed, epoch), rank-sharded from one global batch);
``TorchvisionLoader`` is a plain ``DataLoader`` applying torchvision transforms per image.
``make_loader`` picks one by name.
"""
import gzip
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .atomic import save_atomic
from .errors import DataError, RingqError

NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
DATASETS = ("cifar10", "mnist", "fashion-mnist")
SPLITS = ("train", "test")
LOADER_KINDS = ("memory", "torchvision")

PAD = 4  # pixels of zero padding before the random crop (torchvision's RandomCrop(size, padding=4))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_DIRNAME = ".ringq_cache"
CACHE_VERSION = "ringq-imagefolder-v1"

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one MNIST-style files use


@dataclass
class ArrayDataset:
    """A split in memory: images uint8 [n, C, H, W] (CPU), labels int64 [n], class names."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self):
        return self.labels.numel()

    def subset(self, indices):
        """The rows ``indices`` (LongTensor [k]) as a new ArrayDataset."""
        return ArrayDataset(self.images[indices], self.labels[indices], list(self.classes))


# ---------------------------------------------------------------------------------------------
# Loading splits
# ---------------------------------------------------------------------------------------------

def expected_files(dataset):
    """One-line description of the files ``load_split`` looks for, and how to obtain them."""
    if dataset == "cifar10":
        return ("cifar-10-batches-py/ (data_batch_1..5, test_batch; get it by running with download "
                "enabled while online) or an ImageFolder copy train/<class>/*.jpg + test/<class>/*.jpg "
                "(e.g. extract cifar10-jpeg.tar.xz into the data directory)")
    names = ", ".join(IDX_FILES["train"] + IDX_FILES["test"])
    return (f"the four IDX files {names} (raw or .gz) directly in the data directory or in "
            f"{IDX_TORCHVISION_DIR[dataset]}/raw/ (get them by running with download enabled while online)")


def check_data_dir(path, dataset, download):
    """``path`` as a Path (``~`` expanded), checked before anything reads or downloads.

    DataError (one line) when ``path`` or one of its parents is a file, or when
    ``path`` does not exist and ``download`` is off: a mistyped directory is
    never created unless a download into it is what comes next.
    """
    path = Path(path).expanduser()
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker == path:
        raise DataError(f"data directory {path} is not a directory")
    if blocker is not None:
        raise DataError(f"data directory {path} cannot exist: {blocker} is a file")
    if not path.is_dir() and not download:
        raise DataError(f"no such data directory {path}; expected {expected_files(dataset)}")
    return path


def load_split(dataset, data_dir, split, download=False):
    """Load ``split`` ("train"/"test") of ``dataset`` from ``data_dir`` as an ArrayDataset.

    With ``download`` the dataset is fetched through torchvision when no local copy is found
    (``data_dir`` is created for it when missing; :func:`check_data_dir`).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    data_dir = check_data_dir(data_dir, dataset, download)
    if not data_dir.is_dir():  # a download into it follows: nothing else can be there
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create data directory {data_dir}: {e.strerror or e}") from None
    if dataset == "cifar10":
        return _load_cifar10(data_dir, split, download)
    return _load_idx_dataset(dataset, data_dir, split, download)


def _load_cifar10(data_dir, split, download):
    """CIFAR-10 from the python batches, else an ImageFolder, else (``download``) torchvision."""
    import torchvision

    train = split == "train"
    batches = data_dir / "cifar-10-batches-py"
    broken = ""
    if batches.is_dir():
        try:
            return _from_torchvision_cifar(torchvision.datasets.CIFAR10(root=data_dir, train=train))
        except (OSError, RuntimeError) as err:
            broken = f" ({batches} is unusable: {_first_line(err)})"
    if (data_dir / split).is_dir():
        return load_image_folder(data_dir / split, cache_root=data_dir, cache_name=split)
    if download:
        try:
            ds = torchvision.datasets.CIFAR10(root=data_dir, train=train, download=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise DataError(f"downloading CIFAR-10 into {data_dir} failed ({_first_line(err)}); "
                            f"provide {expected_files('cifar10')}") from err
        return _from_torchvision_cifar(ds)
    raise DataError(f"no CIFAR-10 {split} data in {data_dir}{broken}; expected {expected_files('cifar10')}")


def _from_torchvision_cifar(ds):
    """ArrayDataset from a torchvision CIFAR10 object (``.data`` uint8 [n, H, W, 3], ``.targets``)."""
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---- ImageFolder + on-disk cache -----------------------------------------------------------

def scan_image_folder(root):
    """(class names sorted, [(path, label)] by class then file name, fingerprint) of ``root/<class>/*``.

    The fingerprint (hex) covers every file's relative path, size and mtime (ns), so it changes
    whenever the tree does.
    """
    root = Path(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders; expected {root}/<class>/*.jpg")
    files, lines = [], [CACHE_VERSION]
    for label, name in enumerate(classes):
        entries = sorted((e for e in os.scandir(root / name)
                          if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)), key=lambda e: e.name)
        if not entries:
            raise DataError(f"class folder {root / name} has no .jpg/.jpeg/.png images")
        for e in entries:
            st = e.stat()
            lines.append(f"{name}/{e.name}\0{st.st_size}\0{st.st_mtime_ns}")
        files.extend((e.path, label) for e in entries)
    return classes, files, hashlib.sha1("\n".join(lines).encode()).hexdigest()


def _decode_image(path):
    """RGB uint8 array [H, W, 3] of one image file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot decode image {path} ({_first_line(err)}); replace or remove it") from err


def decode_image_folder(root, classes, files):
    """Decode ``files`` ([(path, label)]) once each into an ArrayDataset; all must share one size."""
    arrays = []
    for path, _ in files:
        arr = _decode_image(path)
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(f"images in {root} differ in size: {files[0][0]} is {_size(arrays[0])} but "
                            f"{path} is {_size(arr)}; resize them to one size")
        arrays.append(arr)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ArrayDataset(images, labels, list(classes))


def _size(arr):
    return f"{arr.shape[1]}x{arr.shape[0]}"


def cache_dirs(cache_root):
    """Where the decoded-split cache may live, in order: next to the data, then ~/.cache/ringq/<sha1>/."""
    root = Path(cache_root).resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()
    return [root / CACHE_DIRNAME, Path.home() / ".cache" / "ringq" / digest]


def load_image_folder(root, cache_root, cache_name):
    """ImageFolder ``root/<class>/*.{jpg,jpeg,png}`` as an ArrayDataset, cached as ``<cache_name>.pt``.

    The cache (the first usable of ``cache_dirs(cache_root)``; none if neither is writable) is reused
    only while the file list, sizes and mtimes are unchanged.
    """
    classes, files, fingerprint = scan_image_folder(root)
    paths = [d / f"{cache_name}.pt" for d in cache_dirs(cache_root)]
    for path in paths:
        cached = read_cache(path, fingerprint)
        if cached is not None:
            return cached
    ds = decode_image_folder(root, classes, files)
    for path in paths:
        if write_cache(path, ds, fingerprint):
            break
    return ds


def read_cache(path, fingerprint):
    """The ArrayDataset stored at ``path`` if it is readable, well-formed and matches ``fingerprint``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, unreadable or corrupt: any failure means "rebuild"
        return None
    if not (isinstance(obj, dict) and obj.get("fingerprint") == fingerprint):
        return None
    images, labels, classes = obj.get("images"), obj.get("labels"), obj.get("classes")
    well_formed = (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
                   and isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
                   and labels.shape == images.shape[:1]
                   and isinstance(classes, list) and all(isinstance(c, str) for c in classes))
    return ArrayDataset(images, labels, classes) if well_formed else None


def write_cache(path, ds, fingerprint):
    """Atomically save ``ds`` with ``fingerprint`` to ``path``; False (nothing left behind) on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"fingerprint": fingerprint, "images": ds.images, "labels": ds.labels,
                     "classes": list(ds.classes)}, path)
        return True
    except (OSError, RuntimeError, RingqError):
        return False


# ---- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------

def _load_idx_dataset(dataset, data_dir, split, download):
    """MNIST / Fashion-MNIST ``split`` from IDX files, downloading through torchvision if allowed."""
    names = IDX_FILES[split]
    paths = [find_idx_file(data_dir, dataset, name) for name in names]
    if None in paths and download:
        _download_idx(dataset, data_dir)
        paths = [find_idx_file(data_dir, dataset, name) for name in names]
    missing = [name for name, path in zip(names, paths) if path is None]
    if missing:
        raw_dir = data_dir / IDX_TORCHVISION_DIR[dataset] / "raw"
        raise DataError(f"{dataset} {split} split: {', '.join(missing)} (or .gz) not found in {data_dir} "
                        f"nor {raw_dir}; expected {expected_files(dataset)}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{paths[0]} must hold images [n, H, W] and {paths[1]} labels [n]; "
                        f"got {images.ndim} and {labels.ndim} dimensions; replace them with the official "
                        "files")
    if len(images) != len(labels):
        raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels; "
                        "replace them with the official files")
    if labels.size and labels.max() >= 10:
        raise DataError(f"{paths[1]} has label {labels.max()}, expected 0..9; "
                        "replace it with the official file")
    classes = MNIST_CLASSES if dataset == "mnist" else FASHION_MNIST_CLASSES
    return ArrayDataset(torch.from_numpy(images).unsqueeze(1).contiguous(),
                        torch.from_numpy(labels.astype(np.int64)), list(classes))


def find_idx_file(data_dir, dataset, name):
    """Path of IDX file ``name`` (raw first, then .gz) in ``data_dir`` or its torchvision raw/ folder."""
    for folder in (data_dir, data_dir / IDX_TORCHVISION_DIR[dataset] / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _download_idx(dataset, data_dir):
    """Fetch the IDX files into ``data_dir/<MNIST|FashionMNIST>/raw`` with torchvision."""
    import torchvision

    cls = torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.FashionMNIST
    try:
        cls(root=data_dir, train=True, download=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"downloading {dataset} into {data_dir} failed ({_first_line(err)}); "
                        f"provide {expected_files(dataset)}") from err


def read_idx(path):
    """uint8 numpy array of an IDX file (raw or .gz): magic 0,0,type,ndim then big-endian uint32 dims."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path} ({_first_line(err)}); "
                        "replace it with the official file") from err
    return parse_idx(raw, path)


def parse_idx(raw, path):
    """uint8 array from the bytes ``raw`` of IDX file ``path`` (named in errors)."""
    corrupt = f"IDX file {path} is corrupt or truncated"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{corrupt} (bad magic number); replace it with the official file")
    if raw[2] != IDX_UBYTE:
        raise DataError(f"IDX file {path} has element type 0x{raw[2]:02x}, expected unsigned bytes (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{corrupt} (header cut short); replace it with the official file")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) != header + math.prod(dims):
        raise DataError(f"{corrupt} (dimensions {dims} need {header + math.prod(dims)} bytes, file has "
                        f"{len(raw)}); replace it with the official file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


# ---------------------------------------------------------------------------------------------
# Index selection
# ---------------------------------------------------------------------------------------------

def balanced_indices(labels, n, seed):
    """Sorted LongTensor of ``n`` indices into ``labels`` [N], n // k per class (k classes present),
    the remainder one each to the first classes; drawn with a torch.Generator seeded by ``seed``."""
    labels = torch.as_tensor(labels).cpu()
    if not 1 <= n <= labels.numel():
        raise DataError(f"cannot pick {n} examples from {labels.numel()}; choose 1..{labels.numel()}")
    classes = torch.unique(labels)
    per_class, remainder = divmod(n, classes.numel())
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for i, c in enumerate(classes.tolist()):
        members = torch.nonzero(labels == c).flatten()
        quota = per_class + (1 if i < remainder else 0)
        if members.numel() < quota:
            raise DataError(f"class {c} has {members.numel()} examples, fewer than the {quota} needed "
                            f"for a balanced pick of {n}; choose a smaller size")
        chosen.append(members[torch.randperm(members.numel(), generator=g)[:quota]])
    return torch.sort(torch.cat(chosen)).values


def train_val_split(labels, val_size, seed):
    """(train_idx, val_idx) LongTensors: a class-balanced validation set of ``val_size`` and the rest."""
    n = torch.as_tensor(labels).numel()
    if val_size == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    if val_size >= n:
        raise DataError(f"validation size {val_size} leaves no training examples out of {n}")
    val = balanced_indices(labels, val_size, seed)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


# ---------------------------------------------------------------------------------------------
# Batch loaders
# ---------------------------------------------------------------------------------------------

def epoch_seed(seed, epoch):
    """Seed of the generator that draws one epoch's order and augmentation."""
    return seed * 100003 + epoch


class EpochPlan(NamedTuple):
    """One epoch's draws, indexed by position in the epoch: order [n] (dataset row at each position),
    crop offsets dy, dx [n] in 0..2*PAD (None without augmentation), flip [n] bool (None likewise)."""
    order: torch.Tensor
    dy: Optional[torch.Tensor]
    dx: Optional[torch.Tensor]
    flip: Optional[torch.Tensor]


def epoch_plan(n, seed, epoch, shuffle, augment):
    """The EpochPlan for ``n`` samples, drawn on CPU from ``epoch_seed(seed, epoch)`` (same on any run)."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    if not augment:
        return EpochPlan(order, None, None, None)
    offsets = torch.randint(0, 2 * PAD + 1, (2, n), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    return EpochPlan(order, offsets[0], offsets[1], flip)


def crop_flip(images, dy, dx, flip):
    """Batch-wise random crop + horizontal flip of uint8 images [b, C, H, W].

    Each image is zero-padded by PAD pixels, cropped to H x W at row ``dy[i]``, column ``dx[i]``
    (of the padded image) and then mirrored where ``flip[i]``; dy, dx, flip are [b] on the same device.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    dev = images.device
    rows = dy[:, None] + torch.arange(h, device=dev)                            # [b, H]
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)         # [b, W]
    index = (rows[:, :, None] * (w + 2 * PAD) + cols[:, None, :]).view(b, 1, h * w)
    return padded.reshape(b, c, -1).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)


def normalize(images, mean, std):
    """float32 (images / 255 - mean) / std for uint8 images [b, C, H, W]; mean, std [1, C, 1, 1]."""
    return images.float().div_(255).sub_(mean).div_(std)


def _check_batching(batch_size, rank, world_size):
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"invalid batching: batch size {batch_size}, rank {rank}, world size {world_size}")
    if batch_size % world_size:
        raise DataError(f"global batch size {batch_size} is not divisible by the world size {world_size}")


def _channel_stats(values, channels, device, name):
    if len(values) != channels:
        raise DataError(f"normalization {name} has {len(values)} values "
                        f"but the images have {channels} channels")
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, channels, 1, 1)


class InMemoryLoader:
    """Batches from a split held on ``device``: yields (x float32 [b, C, H, W] normalized, y int64 [b]).

    ``batch_size`` is the GLOBAL batch: every rank draws the same epoch plan and takes rows
    [r*b/W, (r+1)*b/W) of each global batch, so W processes together see exactly the samples and
    augmentations of one process. A final partial batch (kept unless ``drop_last``) is split the
    same way, so ranks may get unequal (even empty) shares of it. Call ``set_epoch`` before each
    epoch; without shuffle and augmentation the order is the dataset order.
    """

    def __init__(self, images, labels, batch_size, mean, std, device, shuffle, augment, seed,
                 drop_last=False, rank=0, world_size=1):
        _check_batching(batch_size, rank, world_size)
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise DataError(f"expected uint8 images [n, C, H, W] and labels [n]; got {images.dtype} "
                            f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.mean = _channel_stats(mean, images.shape[1], device, "mean")
        self.std = _channel_stats(std, images.shape[1], device, "std")
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        n = self.labels.numel()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def global_batch_sizes(self):
        """Images per step of an epoch, summed over all processes: a list of len(self) ints."""
        n = self.labels.numel()
        return [min(self.batch_size, n - start)
                for start in range(0, len(self) * self.batch_size, self.batch_size)]

    def __iter__(self):
        n = self.labels.numel()
        dev = self.images.device
        order, dy, dx, flip = (t if t is None else t.to(dev)
                               for t in epoch_plan(n, self.seed, self.epoch, self.shuffle, self.augment))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            size = min(self.batch_size, n - start)
            lo = start + self.rank * size // self.world_size
            hi = start + (self.rank + 1) * size // self.world_size
            idx = order[lo:hi]
            x = self.images[idx]
            if self.augment:
                x = crop_flip(x, dy[lo:hi], dx[lo:hi], flip[lo:hi])
            yield normalize(x, self.mean, self.std), self.labels[idx]


class _TransformedArrays(Dataset):
    """Per-image view of uint8 images [n, C, H, W] + labels [n] with a torchvision transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return self.labels.numel()

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def image_transform(size, mean, std, augment):
    """torchvision pipeline for one uint8 image [C, H, W] -> float32 normalized [C, H, W]."""
    from torchvision import transforms

    steps = [transforms.RandomCrop(size, padding=PAD), transforms.RandomHorizontalFlip()] if augment else []
    steps += [transforms.ConvertImageDtype(torch.float32), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


class TorchvisionLoader(DataLoader):
    """DataLoader over an ArrayDataset with per-image torchvision transforms; yields CPU batches
    (pinned for ``device`` when it is a CUDA device) of batch_size / world_size per rank.

    ``set_epoch`` forwards to the DistributedSampler (world_size > 1) and reseeds the generator that
    drives shuffling and the workers' augmentation seeds. Only with workers > 0 is augmentation
    reproducible from (seed, epoch); with workers == 0 it uses the global torch RNG. A
    DistributedSampler without ``drop_last`` repeats a few samples to give every rank equal shares.
    """

    def __init__(self, dataset, batch_size, mean, std, shuffle, augment, seed, workers,
                 rank=0, world_size=1, drop_last=False, device="cpu"):
        _check_batching(batch_size, rank, world_size)
        _channel_stats(mean, dataset.images.shape[1], "cpu", "mean")
        _channel_stats(std, dataset.images.shape[1], "cpu", "std")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        wrapped = _TransformedArrays(dataset.images, dataset.labels,
                                     image_transform(tuple(dataset.images.shape[2:]), mean, std, augment))
        pinned = torch.device(device).type == "cuda"
        sampler = (DistributedSampler(wrapped, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                      seed=seed, drop_last=drop_last) if world_size > 1 else None)
        super().__init__(wrapped, batch_size=batch_size // world_size,
                         shuffle=shuffle if sampler is None else None, sampler=sampler,
                         num_workers=workers, pin_memory=pinned,
                         pin_memory_device=str(device) if pinned else "", drop_last=drop_last, generator=torch.Generator())
        self.set_epoch(0)

    def global_batch_sizes(self):
        """Images per step of an epoch, summed over all processes: a list of len(self) ints.

        Every rank's sampler yields the same number of samples, so each step's
        global batch is ``world_size`` times the rank's batch.
        """
        per_rank = len(self.sampler)
        return [min(self.batch_size, per_rank - start) * self.world_size
                for start in range(0, len(self) * self.batch_size, self.batch_size)]

    def set_epoch(self, epoch):
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, epoch) * self.world_size + self.rank)


def make_dataloader(dataset, batch_size, mean, std, shuffle, augment, seed, workers,
                    rank=0, world_size=1, drop_last=False, device="cpu"):
    """The torchvision path: a TorchvisionLoader (a DataLoader with ``set_epoch``) over ``dataset``."""
    return TorchvisionLoader(dataset, batch_size, mean, std, shuffle, augment, seed, workers,
                             rank=rank, world_size=world_size, drop_last=drop_last, device=device)


def make_loader(kind, dataset, batch_size, mean, std, device, shuffle, augment, seed,
                workers=0, drop_last=False, rank=0, world_size=1):
    """Loader of ``kind`` over ArrayDataset ``dataset``; ``batch_size`` is the global batch.

    "memory": InMemoryLoader, batches already on ``device`` (``workers`` unused).
    "torchvision": TorchvisionLoader, CPU batches (pinned when ``device`` is CUDA): move them with
    ``.to(device, non_blocking=True)``, a no-op for the memory loader's. Both have ``set_epoch``
    and ``__len__``.
    """
    if kind == "memory":
        return InMemoryLoader(dataset.images, dataset.labels, batch_size, mean, std, device, shuffle,
                              augment, seed, drop_last=drop_last, rank=rank, world_size=world_size)
    if kind == "torchvision":
        return make_dataloader(dataset, batch_size, mean, std, shuffle, augment, seed, workers,
                               rank=rank, world_size=world_size, drop_last=drop_last,
                               device=device)
    raise DataError(f"unknown loader kind {kind!r}; choose one of {', '.join(LOADER_KINDS)}")
