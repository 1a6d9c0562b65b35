"""MNIST from its four IDX files, read directly: torchvision is imported only to download them.
Images come as values in [0, 1]; the models normalise them themselves (model.Normalize)."""

import contextlib
import math
import os
import shutil
import stat
import sys
from pathlib import Path

import torch

from pruning.files import shown

FILES = {  # name: IDX magic number (0x08: unsigned bytes; low byte: number of dimensions)
    "train-images-idx3-ubyte": 0x803, "train-labels-idx1-ubyte": 0x801,
    "t10k-images-idx3-ubyte": 0x803, "t10k-labels-idx1-ubyte": 0x801,
}


class DataError(Exception):
    """The data cannot be used; the message says why in one line."""


def data_root(data_dir=None):
    """--data-dir, else $MNIST_DATA_DIR, else ./data."""
    return Path(data_dir or os.environ.get("MNIST_DATA_DIR") or "data")


def read_idx(path, magic):
    """The uint8 tensor stored in the IDX file at `path`, checked against its own header
    before anything of its size is allocated."""
    ndim = magic & 0xFF
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{shown(path)} is not a regular file; replace it with the original file")
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 + 4 * ndim or int.from_bytes(header[:4], "big") != magic:
                raise DataError(f"{path} is not an MNIST IDX file (magic number {header[:4].hex() or 'missing'}, "
                                f"expected {magic:08x}); replace it with the original file")
            shape = [int.from_bytes(header[i:i + 4], "big") for i in range(4, len(header), 4)]
            if size != len(header) + math.prod(shape):
                raise DataError(f"{path} is truncated or corrupted ({size:,} bytes, expected "
                                f"{len(header) + math.prod(shape):,} for shape {shape}); "
                                "replace it with the original file")
            if shape[0] == 0:
                raise DataError(f"{path} holds no images; replace it with the original file")
            values = bytearray(math.prod(shape))  # read straight into it: no second copy of the file
            if f.readinto(values) != len(values):
                raise DataError(f"{path} changed while it was read; run again")
            return torch.frombuffer(values, dtype=torch.uint8).view(shape)
    except OSError as e:
        raise DataError(f"cannot read {shown(path)}: {e.strerror}") from None


def download(root):
    """Fetch the four files into root/MNIST/raw with torchvision; on failure leave no new folder
    behind and say why in one line."""
    raw = root / "MNIST" / "raw"
    new = next((p for p in (root, root / "MNIST", raw) if not p.exists()), None)
    try:
        from torchvision.datasets import MNIST
        with contextlib.redirect_stdout(sys.stderr):
            MNIST(root, train=True, download=True)
    except Exception as e:
        if new:
            shutil.rmtree(new, ignore_errors=True)
        reasons = [line for line in str(e).splitlines() if line and not line.startswith(("Error", "Tried"))]
        reason = reasons[-1] if reasons else f"{type(e).__name__}: {e}"
        raise DataError(f"MNIST is not in {raw.resolve()} (needs {', '.join(FILES)}) and the download failed "
                        f"({reason}); put the files there, or point --data-dir or $MNIST_DATA_DIR at a folder "
                        "holding MNIST/raw/") from None


def mnist(data_dir: str | os.PathLike | None = None, validation: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """MNIST from data_dir (default: $MNIST_DATA_DIR, else ./data), as load() gives it."""
    return load(data_root(data_dir), validation)


def load(root, validation=0):
    """((x_train, y_train), (x_test, y_test)): flattened float images in [0, 1] and int64 labels.
    With validation=N, ((x_train, y_train), (x_val, y_val), (x_test, y_test)): the last N training
    images held out. Downloads the files first when any is missing."""
    raw = root / "MNIST" / "raw"
    try:
        present = all((raw / name).exists() for name in FILES)
    except OSError as e:
        raise DataError(f"cannot use the data folder {shown(root)}: {e.strerror}") from None
    if not present:
        download(root)
    data = {name: read_idx(raw / name, magic) for name, magic in FILES.items()}
    splits = []
    for prefix in ("train", "t10k"):
        images, labels = data[f"{prefix}-images-idx3-ubyte"], data[f"{prefix}-labels-idx1-ubyte"]
        if images.shape[1:] != (28, 28) or len(images) != len(labels) or (labels > 9).any():
            raise DataError(f"{raw} does not hold MNIST: images must be 28x28 with one label 0-9 each")
        splits.append((images.float().div_(255).flatten(1), labels.long()))
    if validation:
        (x, y), test = splits
        if validation >= len(y):
            raise DataError(f"--validation {validation:,} leaves no training images of {len(y):,}")
        return (x[:-validation], y[:-validation]), (x[-validation:], y[-validation:]), test
    return splits


def shifted(images, pixels, generator=None):
    """A copy of a batch of 28x28 images (shaped (N, 784), (N, 28, 28) or (N, 1, 28, 28)), each moved
    by a random whole number of pixels from -pixels to pixels across and down, drawn from generator,
    the pixels moved in from outside 0 (MNIST's background)."""
    n, side = len(images), 28
    if images[0].numel() != side * side:
        raise ValueError(f"shifting moves 28x28 images, not images of shape {tuple(images.shape[1:])}")
    padded = torch.nn.functional.pad(images.reshape(n, side, side), (pixels,) * 4)
    down, across = torch.randint(0, 2 * pixels + 1, (2, n, 1, 1), generator=generator).to(images.device)
    rows = torch.arange(side, device=images.device).view(1, side, 1) + down
    columns = torch.arange(side, device=images.device).view(1, 1, side) + across
    return padded[torch.arange(n, device=images.device).view(n, 1, 1), rows, columns].reshape(images.shape)


def dropped(images, p, generator=None):
    """A copy of a batch of images, each pixel set to 0 (MNIST's background) with probability p,
    drawn from generator, and the others scaled by 1 / (1 - p): dropout of the input (Srivastava et
    al. 2014), which trains a network not to lean on any one pixel."""
    keep = torch.rand(images.shape, generator=generator) >= p
    return images * keep.to(images.device) / (1 - p)
