"""A tiny CIFAR-10 archive in the official format, served over local HTTP to torchvision.

torchvision's real download code (urllib, md5 checks, tar extraction) fetches it from a server
on 127.0.0.1; file:// URLs do not work there (its downloader reads `response.length`).

The official batches are Python 2 pickles that torchvision reads with encoding="latin1"; its
keys then come back as str ("data", "labels", "label_names"), which is what is written here.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR10

CLASS_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
BASE_FOLDER = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


@dataclass
class FakeCifar:
    archive: Path
    tgz_md5: str
    md5s: dict[str, str]  # member file name -> md5
    train_images: np.ndarray  # uint8 [N, 32, 32, 3] in batch order
    train_labels: np.ndarray  # int64 [N]


def build_fake_cifar10(folder: Path, per_class_per_batch: int = 1, seed: int = 0) -> FakeCifar:
    """Write `folder`/cifar-10-python.tar.gz with 5 train batches and a test batch."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    images, labels = [], []
    for name in [*TRAIN_BATCHES, "test_batch"]:
        batch_labels = np.tile(np.arange(len(CLASS_NAMES)), per_class_per_batch)
        batch = rng.integers(0, 256, (len(batch_labels), 3, 32, 32), dtype=np.uint8)
        entry = {"data": batch.reshape(len(batch), -1), "labels": batch_labels.tolist()}
        members[name] = _pickle(entry)
        if name != "test_batch":
            images.append(batch.transpose(0, 2, 3, 1))
            labels.append(batch_labels)
    members["batches.meta"] = _pickle({"label_names": CLASS_NAMES, "num_vis": 3072})
    archive = Path(folder) / ARCHIVE_NAME
    archive.parent.mkdir(parents=True, exist_ok=True)
    _write_tar(archive, members)
    return FakeCifar(
        archive=archive,
        tgz_md5=_md5(archive.read_bytes()),
        md5s={name: _md5(data) for name, data in members.items()},
        train_images=np.concatenate(images),
        train_labels=np.concatenate(labels).astype(np.int64),
    )


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve `folder` over HTTP on 127.0.0.1 while the block runs; yield the base URL."""
    handler = partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def patch_torchvision_cifar10(monkeypatch: pytest.MonkeyPatch, fake: FakeCifar, url: str) -> None:
    """Point torchvision's CIFAR10 download at `url` and the fake archive's checksums."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(CIFAR10, "url", url)
    monkeypatch.setattr(CIFAR10, "tgz_md5", fake.tgz_md5)
    monkeypatch.setattr(CIFAR10, "train_list", [[n, fake.md5s[n]] for n in TRAIN_BATCHES])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", fake.md5s["test_batch"]]])
    meta = {"filename": "batches.meta", "key": "label_names", "md5": fake.md5s["batches.meta"]}
    monkeypatch.setattr(CIFAR10, "meta", meta)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _pickle(entry: dict) -> bytes:
    return pickle.dumps(entry, protocol=2)


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _write_tar(archive: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        folder = tarfile.TarInfo(BASE_FOLDER)
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o755
        tar.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(f"{BASE_FOLDER}/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
