"""`ReviewSession`: the one owner of a review's state: the output's items, the journal of decisions, the output's
lock (one server per output, and no caption job writing it meanwhile), the filtered and sorted views the page pages
through, progress and the reviewer's rate."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

from vlmux.caption.identity import model_tags
from vlmux.caption.locks import OutputLock
from vlmux.caption.sinks import JsonlSink, Record
from vlmux.caption.sources import ImageRef
from vlmux.images import is_image_path
from vlmux.review.compare import disagreement, marked
from vlmux.review.journal import Decision, Journal, asked_path, journal_path
from vlmux.review.records import Candidate, Item, read_output

FILTERS = ("all", "unreviewed", "reviewed", "rejected", "errors")
ORDERS = ("file", "disagreement")
RATE_WINDOW = 600.0  # seconds of recent decisions the reviewer's rate is taken over
MAX_PAGE = 500
VIEWS_KEPT = 8  # views cached, for a few tabs with different filters


class ReviewSession:
    def __init__(self, output: Path, images: Path | None = None) -> None:
        """Lock the output (OutputBusy when another review or a caption job holds it), read it and replay the journal."""
        self.output = output
        self._lock = OutputLock(output, "review") if output.is_dir() else OutputLock(output)
        try:
            self._open(output, images)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, output: Path, images: Path | None) -> None:
        self.items: list[Item] = read_output(output)
        self.journal = Journal(journal_path(output))
        self.images = (images or (output if output.is_dir() else output.parent)).absolute()
        self.models = list(dict.fromkeys(c.model for item in self.items[:1] for c in item.candidates))
        self.tags = model_tags(self.models)  # short names for the page; the full name is its tooltip
        self._index = {item.key: index for index, item in enumerate(self.items)}
        self._scores: list[float] | None = None  # disagreement per item, computed on first use
        self._views: OrderedDict[tuple, list[int]] = OrderedDict()
        self._mutex = threading.Lock()
        self._asked: JsonlSink | None = None  # answers of "ask another model", opened at the first
        if asked_path(output).exists():
            self._asked = JsonlSink(asked_path(output), lock=False)
            for record in self._asked.records():
                if record.file in self._index:
                    self._merge(self._index[record.file], Candidate(record.model, record.caption, record.error))

    # -- reading ----------------------------------------------------------------------------------------------

    def view(self, filter: str = "all", order: str = "file", query: str = "", offset: int = 0, limit: int = 50,
             fresh: bool = False) -> dict:
        """One page of the view; `fresh` recomputes its membership (a filter such as `unreviewed` is a snapshot
        otherwise, so the reviewer's position does not shift under them as they decide)."""
        if filter not in FILTERS:
            raise ValueError(f"filter must be one of {', '.join(FILTERS)}, not {filter!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"offset must be at least 0 and limit 1 to {MAX_PAGE}")
        with self._mutex:
            key = (filter, order, query.strip().lower())
            if fresh or key not in self._views:
                self._views[key] = self._members(*key)
            self._views.move_to_end(key)
            while len(self._views) > VIEWS_KEPT:
                self._views.popitem(last=False)
            members = self._views[key]
            page = [self._describe(index) for index in members[offset:offset + limit]]
            return {"total": len(members), "offset": offset, "items": page, "progress": self._progress()}

    def progress(self) -> dict:
        with self._mutex:
            return self._progress()

    def index_of(self, key: str) -> int:
        if key not in self._index:
            raise KeyError(f"no image {key!r} in {self.output}")
        return self._index[key]

    def image_path(self, index: int) -> Path | None:
        """The picture of item `index`, when it is an image file inside the images' folder."""
        if not 0 <= index < len(self.items):
            return None
        path = (self.images / self.items[index].key).resolve()
        if not path.is_relative_to(self.images.resolve()) or not is_image_path(path) or not path.is_file():
            return None
        return path

    # -- deciding ---------------------------------------------------------------------------------------------

    def decide(self, key: str, action: str, model: str | None = None, text: str | None = None) -> dict:
        """Record a decision (on disk before this returns); KeyError for an unknown image, ValueError for a bad one."""
        with self._mutex:
            index = self.index_of(key)
            item = self.items[index]
            if action == "choose":
                found = [c for c in item.candidates if c.model == model and c.caption is not None]
                if not found:
                    raise ValueError(f"{key!r} has no caption from model {model!r}")
                text = found[0].caption
            elif action == "edit":
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("an edited caption needs some text; reject the image instead")
            elif action == "reject":
                model, text = None, None
            else:
                raise ValueError(f"action must be choose, edit or reject, not {action!r}")
            self.journal.record(Decision(key, action, model, text, time.time()))
            return {"item": self._describe(index), "progress": self._progress()}

    def undo(self) -> dict:
        with self._mutex:
            undone = self.journal.undo()
            index = None if undone is None else self._index.get(undone.key)
            return {"item": None if index is None else self._describe(index), "progress": self._progress()}

    def add_candidate(self, key: str, candidate: Candidate) -> dict:
        """One more caption for an image (asked of a served model), on disk before this returns; KeyError for an
        unknown image."""
        with self._mutex:
            index = self.index_of(key)
            if self._asked is None:
                self._asked = JsonlSink(asked_path(self.output), lock=False)
            record = Record(key, candidate.model, candidate.caption, candidate.error)
            self._asked.write([(ImageRef(None, self.images, key), record)])
            self._merge(index, candidate)
            return {"item": self._describe(index), "progress": self._progress()}

    def close(self) -> None:
        if self._asked is not None:
            self._asked.close()
        self.journal.close()
        self._lock.release()

    def _merge(self, index: int, candidate: Candidate) -> None:
        item = self.items[index]
        others = tuple(c for c in item.candidates if c.model != candidate.model)
        self.items[index] = Item(item.key, (*others, candidate))
        if self._scores is not None:
            self._scores[index] = disagreement(self.items[index])
        if candidate.model not in self.models:
            self.models.append(candidate.model)
            self.tags = model_tags(self.models)

    # -- inside -----------------------------------------------------------------------------------------------

    def _members(self, filter: str, order: str, query: str) -> list[int]:
        decided = self.journal.decided()
        keep = {
            "all": lambda item: True,
            "unreviewed": lambda item: item.key not in decided,
            "reviewed": lambda item: item.key in decided,
            "rejected": lambda item: item.key in decided and decided[item.key].action == "reject",
            "errors": lambda item: item.has_error,
        }[filter]
        members = [index for index, item in enumerate(self.items) if keep(item)
                   and (not query or _matches(item, decided.get(item.key), query))]
        if order == "disagreement":
            scores = self._disagreements()
            members.sort(key=lambda index: -scores[index])  # stable: ties keep the files' order
        return members

    def _disagreements(self) -> list[float]:
        if self._scores is None:
            self._scores = [disagreement(item) for item in self.items]
        return self._scores

    def _describe(self, index: int) -> dict:
        item = self.items[index]
        decision = self.journal.decision(item.key)
        return {
            "index": index, "key": item.key, "disagreement": round(disagreement(item), 3),
            "candidates": [{"model": c.model, "tag": self.tags.get(c.model, c.model), "caption": c.caption, "error": c.error,
                            "length": None if c.caption is None else len(c.caption), "pieces": pieces}
                           for c, pieces in zip(item.candidates, marked(item))],
            "decision": None if decision is None else {"action": decision.action, "model": decision.model,
                                                       "text": decision.text},
        }

    def _progress(self) -> dict:
        decided = self.journal.decided()
        reviewed = sum(1 for key in decided if key in self._index)
        rejected = sum(1 for key, d in decided.items() if key in self._index and d.action == "reject")
        now = time.time()
        recent = [at for at in self.journal.times if now - at <= RATE_WINDOW]
        minutes = max((now - recent[0]) / 60, 1.0) if recent else 1.0
        latest = self.journal.latest()
        return {"reviewed": reviewed, "rejected": rejected, "total": len(self.items),
                "per_minute": round(len(recent) / minutes, 1),
                "latest": None if latest is None else self._index.get(latest.key)}  # the item to resume after


def _matches(item: Item, decision: Decision | None, query: str) -> bool:
    texts = [item.key, *(c.caption or "" for c in item.candidates), *(c.error or "" for c in item.candidates)]
    if decision is not None and decision.text:
        texts.append(decision.text)
    return any(query in text.lower() for text in texts)
