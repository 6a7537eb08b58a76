"""Where the images come from: files, folders, list files, CSV/Parquet tables with a path column, and saved
Hugging Face datasets with an image column."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlmux.caption.identity import unique_keys
from vlmux.images import is_image_path

PATH_COLUMNS = ("image", "file_name", "file", "path", "image_path", "filepath")
EXISTING_CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class UsageError(ValueError):
    """Bad input from the user: the message says what to do; the CLI exits 2."""


@dataclass(frozen=True)
class ImageRef:
    path: Path | None  # None for images that live inside a dataset
    root: Path  # the input it was found under, or the common folder of several inputs: keys are relative to it
    name: str | None = None  # the result key of a dataset image
    fetch: Callable[[], bytes] | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """The image's name in results: POSIX path relative to its root (identity.unique_keys picks the roots)."""
        return self.name if self.name is not None else self.path.relative_to(self.root).as_posix()

    def payload(self) -> str | bytes:
        """What the worker decodes: a path, or the bytes of a dataset image."""
        return self.fetch() if self.fetch is not None else str(self.path)

    def existing_caption(self) -> str:
        """An existing sidecar caption or tag list beside the image, for the {existing} prompt placeholder."""
        if self.path is None:
            return ""
        for extension in EXISTING_CAPTION_EXTENSIONS:
            sidecar = self.path.with_suffix(extension)
            if sidecar.is_file():
                return sidecar.read_text(encoding="utf-8", errors="replace").strip()
        return ""


def collect_images(inputs: list[str], recursive: bool = False, image_column: str | None = None,
                   follow_symlinks: bool = False, warn: Callable[[str], None] = _to_stderr) -> list[ImageRef]:
    """The images the inputs name; `warn` hears of symlinked folders a recursive search left out."""
    refs: list[ImageRef] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise UsageError(f"{given}: no such file or folder")
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            refs.extend(_dataset(path, image_column))
        elif path.is_dir():
            refs.extend(_folder(path, recursive, follow_symlinks, warn))
        elif path.suffix.lower() == ".txt":
            refs.extend(_listed(path, [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]))
        elif path.suffix.lower() in (".csv", ".parquet"):
            refs.extend(_listed(path, _table_paths(path, image_column)))
        else:
            refs.append(ImageRef(path.absolute(), path.absolute().parent))
    unique = list({(ref.root, ref.name) if ref.path is None else ref.path: ref for ref in refs}.values())  # given twice: once
    return unique_keys(unique)


def _folder(path: Path, recursive: bool, follow_symlinks: bool, warn: Callable[[str], None]) -> list[ImageRef]:
    if recursive:
        found, skipped = _walk(path, follow_symlinks)
        for link in skipped:
            warn(f"warning: skipped the symlinked folder {link}; add --follow-symlinks to search it too")
    else:
        found = [p for p in path.iterdir() if p.is_file() and is_image_path(p)]
    if not found:
        hint = "; add -r to search its subfolders" if not recursive and any(p.is_dir() for p in path.iterdir()) else ""
        raise UsageError(f"{path}: no images found (looked for .jpg, .png, .webp, ...){hint}")
    root = path.absolute()
    return [ImageRef(p.absolute(), root) for p in sorted(found)]


def _walk(root: Path, follow_symlinks: bool) -> tuple[list[Path], list[Path]]:
    """Image files under `root` and the symlinked folders left out. Followed links are walked once per real folder,
    so a link back up the tree (a loop) or two links to one folder give each image once."""
    found: list[Path] = []
    skipped: list[Path] = []
    walked: set[str] = set()
    folders = [root]
    while folders:
        folder = folders.pop()
        real = os.path.realpath(folder)
        if real in walked:
            continue
        walked.add(real)
        for entry in os.scandir(folder):
            entry_path = Path(entry.path)
            if entry.is_dir():
                if entry.is_symlink() and not follow_symlinks:
                    skipped.append(entry_path)
                else:
                    folders.append(entry_path)
            elif entry.is_file() and is_image_path(entry_path):
                found.append(entry_path)
    return found, sorted(skipped)


def _listed(source: Path, entries: list[str]) -> list[ImageRef]:
    """Paths from a list file or table, relative to that file's folder; a missing file still becomes a result
    (an error record), so a typo in one line does not stop the job."""
    root = source.absolute().parent
    refs = []
    for entry in entries:
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if Path(entry).is_absolute() else root / entry
        refs.append(ImageRef(path, root if path.is_relative_to(root) else path.parent))
    if not refs:
        raise UsageError(f"{source}: lists no images")
    return refs


def _table_paths(path: Path, column: str | None) -> list[str]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        columns = table.column_names
        pick = _pick_column(path, columns, column)
        return [str(value) for value in table.column(pick).to_pylist() if value is not None]
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if not rows:
        found = f"only a header row ({', '.join(reader.fieldnames)})" if reader.fieldnames else "nothing"
        raise UsageError(f"{path}: the table has no rows, {found}; list one image path per row")
    pick = _pick_column(path, list(rows[0]), column)
    return [row[pick] for row in rows]


def _pick_column(path: Path, columns: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise UsageError(f"{path}: no column {wanted!r}; it has {', '.join(columns)}")
        return wanted
    for candidate in PATH_COLUMNS:
        if candidate in columns:
            return candidate
    raise UsageError(f"{path}: no image path column found among {', '.join(columns)}; name it with --image-column")


def _dataset(path: Path, column: str | None) -> list[ImageRef]:
    """A dataset saved with save_to_disk: each row's image bytes are read when the row is captioned."""
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{path} is a Hugging Face dataset: pip install datasets to read it") from None
    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    refs = []
    for split, table in splits:
        images = [name for name, feature in table.features.items() if isinstance(feature, datasets.Image)]
        pick = column or (images[0] if images else None)
        if pick is None or pick not in table.column_names:
            raise UsageError(f"{path}: no image column in split {split or 'default'!r}; name it with --image-column")
        raw = table.cast_column(pick, datasets.Image(decode=False))
        for index in range(len(raw)):
            name = f"{split}/{index:06d}" if split else f"{index:06d}"
            refs.append(ImageRef(None, path.absolute(), name, fetch=_row_bytes(raw, pick, index)))
    return refs


def _row_bytes(table, column: str, index: int) -> Callable[[], bytes]:
    def fetch() -> bytes:
        image = table[index][column]
        if image.get("bytes") is not None:
            return image["bytes"]
        return Path(image["path"]).read_bytes()

    return fetch
