"""The real photos the end-to-end tests feed to capture (Debian package ``darknet``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PHOTOS = Path("/usr/share/darknet/data")
THREE = ("dog.jpg", "person.jpg", "horses.jpg")  # dog, person, horse: COCO labels YOLO finds


def photos(tmp_path: Path, *names: str, folder: str = "photos") -> Path:
    """A folder under ``tmp_path`` with some of the photos (the three above by default)."""
    if not PHOTOS.is_dir():
        pytest.skip("Debian package darknet (real photos) is not installed")
    out = tmp_path / folder
    out.mkdir()
    for name in names or THREE:
        shutil.copy(PHOTOS / name, out / name)
    return out
