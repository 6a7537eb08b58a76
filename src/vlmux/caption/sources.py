"""Where the images come from: files and folders given on the command line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmux.images import is_image_path


class UsageError(ValueError):
    """Bad input from the user: the message says what to do; the CLI exits 2."""


@dataclass(frozen=True)
class ImageRef:
    path: Path
    root: Path  # the input folder it was found under (a file's own folder for a file given directly)

    @property
    def key(self) -> str:
        """The file's name in results: POSIX path relative to its input root."""
        return self.path.relative_to(self.root).as_posix()


def collect_images(inputs: list[str], recursive: bool = False) -> list[ImageRef]:
    refs: list[ImageRef] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise UsageError(f"{given}: no such file or folder")
        if path.is_file():
            refs.append(ImageRef(path.absolute(), path.absolute().parent))
            continue
        found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir()) if p.is_file() and is_image_path(p))
        if not found:
            hint = "; add -r to search its subfolders" if not recursive and any(p.is_dir() for p in path.iterdir()) else ""
            raise UsageError(f"{given}: no images found (looked for .jpg, .png, .webp, ...){hint}")
        root = path.absolute()
        refs.extend(ImageRef(p.absolute(), root) for p in found)
    unique = list({ref.path: ref for ref in refs}.values())  # an image given twice is captioned once
    return unique
