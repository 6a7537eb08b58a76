"""The reviewer's decisions, one JSON line each, appended and fsynced beside the output before the page hears back:
a closed tab or a killed server loses at most the decision in flight. Opening replays the lines (undo included), so
a review resumes where it stopped."""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmux.caption.sinks import atomic_write

ACTIONS = ("choose", "edit", "reject")


@dataclass(frozen=True)
class Decision:
    key: str
    action: str  # one of ACTIONS
    model: str | None = None  # the model whose caption was chosen, or edited from
    text: str | None = None  # the caption kept (None for a rejected image)
    at: float = 0.0  # time.time() when it was made


def journal_path(output: Path) -> Path:
    """Beside the output file; inside a folder of sidecars."""
    return output / ".vlmux-review.jsonl" if output.is_dir() else output.with_name(f".{output.name}.review.jsonl")


def asked_path(output: Path) -> Path:
    """Where the answers of "ask another model" are kept (caption's JSONL records), beside the journal."""
    return output / ".vlmux-review-asked.jsonl" if output.is_dir() else output.with_name(f".{output.name}.review-asked.jsonl")


class Journal:
    def __init__(self, path: Path, writable: bool = True) -> None:
        """`writable` False: only read (an export while a server appends): a partial last line is skipped, not cut
        from the file, which is the server's to append to."""
        self.path = path
        self.writable = writable
        self._history: dict[str, list[Decision]] = {}  # per image, its decisions in order; the last one holds
        self._stack: list[str] = []  # the images of all decisions in order, for undo
        self.times: list[float] = []  # when each standing decision was made, for the reviewer's rate
        if path.exists():
            self._replay()
        self._file = None  # opened at the first decision: reading a review (for an export) creates nothing

    def _replay(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a kill mid-write leaves a partial last line: drop it
            data = data[: data.rfind(b"\n") + 1]
            if self.writable:
                atomic_write(self.path, data)
        for number, line in enumerate(data.decode("utf-8").split("\n"), 1):  # not splitlines: U+2028 in an edit
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if entry.get("action") == "undo":
                    self._undo()
                else:
                    self._apply(Decision(**entry))
            except (ValueError, TypeError):
                raise ValueError(f"{self.path}:{number}: not a review decision; move the file away to start the review afresh") from None

    def decision(self, key: str) -> Decision | None:
        history = self._history.get(key)
        return history[-1] if history else None

    def latest(self) -> Decision | None:
        """The most recent decision that stands, where a reopened review resumes."""
        return self.decision(self._stack[-1]) if self._stack else None

    def decided(self) -> dict[str, Decision]:
        return {key: history[-1] for key, history in self._history.items() if history}

    def record(self, decision: Decision) -> None:
        """Write the decision to disk (flushed and synced), then let it stand."""
        self._append(asdict(decision))
        self._apply(decision)

    def undo(self) -> Decision | None:
        """Take back the latest standing decision; returns it, or None when there is none."""
        if not self._stack:
            return None
        self._append({"action": "undo", "at": time.time()})
        return self._undo()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    def _append(self, entry: dict) -> None:
        if not self.writable:
            raise RuntimeError(f"{self.path} was opened to read only")
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _apply(self, decision: Decision) -> None:
        if decision.action not in ACTIONS:
            raise ValueError(f"unknown action {decision.action!r}")
        self._history.setdefault(decision.key, []).append(decision)
        self._stack.append(decision.key)
        self.times.append(decision.at)

    def _undo(self) -> Decision | None:
        if not self._stack:
            return None
        key = self._stack.pop()
        self.times.pop()
        return self._history[key].pop()
