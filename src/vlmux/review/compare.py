"""Where the models disagree: a score per image (1 less the mean word overlap of its captions, Jaccard over
lower-cased words) for "strongest disagreement first", and each caption's words marked where most other captions
lack them (with two models: where the other lacks them), for the page's highlight."""
from __future__ import annotations

import re
from itertools import combinations

from vlmux.review.records import Item

WORD = re.compile(r"\w+")
PIECE = re.compile(r"\w+|\W+")


def words(text: str) -> frozenset[str]:
    return frozenset(word.lower() for word in WORD.findall(text))


def disagreement(item: Item) -> float:
    """0 when every caption has the same words, 1 when no two share a word; 0 with fewer than two captions."""
    sets = [words(c.caption) for c in item.candidates if c.caption is not None]
    pairs = list(combinations(sets, 2))
    if not pairs:
        return 0.0
    return 1.0 - sum(len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs) / len(pairs)


def marked(item: Item) -> list[list[tuple[str, bool]] | None]:
    """Per candidate, its text in pieces, each flagged True where it is a word more than half of the other captions
    lack (so two models agreeing against a third keep their words plain); None for a candidate without a caption."""
    sets = [words(c.caption) if c.caption is not None else None for c in item.candidates]
    result = []
    for index, candidate in enumerate(item.candidates):
        if candidate.caption is None:
            result.append(None)
            continue
        others = [s for i, s in enumerate(sets) if i != index and s is not None]
        result.append([(piece, WORD.fullmatch(piece) is not None
                        and sum(piece.lower() not in s for s in others) * 2 > len(others))
                       for piece in PIECE.findall(candidate.caption)])
    return result
