"""Reading safetensors headers: an 8-byte little-endian length, then JSON naming each tensor's dtype, shape
and byte range. The format is that simple, so reading it here beats importing a framework in the parent."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors name: BF16, F32, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


class CorruptCheckpoint(ValueError):
    """A *.safetensors file whose header cannot be read: truncated, or not safetensors at all."""


def read_index(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of every *.safetensors file in the folder, by name; CorruptCheckpoint names a file that is not
    safetensors."""
    index: dict[str, TensorEntry] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                if size < 8:
                    raise ValueError(f"{size} bytes, too few for a header")
                (length,) = struct.unpack("<Q", f.read(8))
                if not 2 <= length <= size - 8:
                    raise ValueError(f"a header of {length} bytes in a file of {size}")
                header = json.loads(f.read(length))
            entries = [(name, entry["dtype"], tuple(entry["shape"]), *entry["data_offsets"])
                       for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpoint(f"{file} is not a readable safetensors file ({e}); it may be "
                                    "truncated: download or copy it again") from None
        data_start = 8 + length
        for name, dtype, shape, begin, end in entries:
            index[name] = TensorEntry(file, dtype, shape, data_start + begin, data_start + end)
    return index
