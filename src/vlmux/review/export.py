"""The curated set: per image the caption the reviewer chose or edited, rejected and undecided images left out,
written through `vlmux caption`'s own sinks, so every format it writes (JSONL, CSV, Parquet, ImageFolder metadata,
sidecar files) comes out the same way, under the model name `text` (metadata's caption column)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmux.caption.outputs import is_metadata, open_output, output_kind
from vlmux.caption.sinks import Record, SidecarSink
from vlmux.caption.sources import ImageRef, UsageError
from vlmux.caption.tables import metadata_key
from vlmux.review.journal import Journal, journal_path
from vlmux.review.records import read_output

EXPORT_MODEL = "text"


@dataclass(frozen=True)
class Exported:
    written: int
    rejected: int
    undecided: int
    missing: int  # decided images without a picture, not written as sidecars


def export_review(output: Path, images: Path | None, to: Path | None = None, sidecar: str | None = None) -> Exported:
    """Write the decisions on `output` to the file `to` or as sidecars IMAGE.`sidecar` beside the images. Reads the
    output and its journal without locking them, so a review may go on in the browser meanwhile."""
    if (to is None) == (sidecar is None):
        raise UsageError("give either --export FILE or --sidecar EXT")
    if to is not None:
        output_kind(to)
        if to.exists() or to.absolute() == output.absolute():
            raise UsageError(f"{to}: exists; the export writes a new file: remove it or choose another name")
    items = read_output(output)
    journal = Journal(journal_path(output), writable=False)
    decided = journal.decided()
    root = (images or (output if output.is_dir() else output.parent)).absolute()
    pairs, rejected, missing = [], 0, 0
    for item in items:
        decision = decided.get(item.key)
        if decision is None:
            continue
        if decision.action == "reject":
            rejected += 1
            continue
        ref = ImageRef(root / item.key, root)
        if sidecar is not None and not ref.path.is_file():
            missing += 1
            continue
        pairs.append((ref, Record(item.key, EXPORT_MODEL, decision.text, None)))
    if to is not None and is_metadata(to):
        for ref, _ in pairs:
            metadata_key(to, ref)  # every image under the metadata's folder, checked before the file is created
    sink = SidecarSink(sidecar, [EXPORT_MODEL], lock_at=root) if sidecar is not None else open_output(to, [EXPORT_MODEL])
    try:
        sink.write(pairs)
    finally:
        sink.close()
    undecided = sum(1 for item in items if item.key not in decided)
    return Exported(len(pairs), rejected, undecided, missing)
