"""Thumbnails for the review page, made with PIL once per picture and kept in a cache folder, keyed by the file's
path, size and modification time (an image replaced on disk gets a new thumbnail)."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from vlmux.caption.sinks import atomic_write
from vlmux.images import load_image

THUMB_SIDE = 320


def cache_folder() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vlmux" / "review-thumbs"


class Thumbnails:
    def __init__(self, folder: Path | None = None, side: int = THUMB_SIDE) -> None:
        self.folder = folder or cache_folder()
        self.side = side

    def get(self, image: Path) -> bytes:
        """The JPEG thumbnail of `image`, from the cache or made now; ImageError (a ValueError) for what is no picture."""
        stat = image.stat()
        name = hashlib.sha256(f"{image}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.side}".encode()).hexdigest()[:32]
        cached = self.folder / f"{name}.jpg"
        try:
            return cached.read_bytes()
        except FileNotFoundError:
            pass
        data = self._make(image)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, data)
        return data

    def _make(self, image: Path) -> bytes:
        small = load_image(str(image), draft=(self.side, self.side))  # the caption job's decoder: bombs refused
        small.thumbnail((self.side, self.side))
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()
