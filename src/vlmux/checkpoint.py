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


def read_index(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of every *.safetensors file in the folder, by name."""
    index: dict[str, TensorEntry] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        data_start = 8 + length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            index[name] = TensorEntry(file, entry["dtype"], tuple(entry["shape"]), data_start + begin, data_start + end)
    return index
