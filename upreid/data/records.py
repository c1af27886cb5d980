"""Records and splits: the currency every parser, sampler and pipeline exchanges.

A record is ``(path, pid, camid)``. Training pids are relabelled to ``0..N-1``; query and gallery keep
the dataset's own pids (distractors keep pid 0, junk pid -1 is dropped by the parsers).
Unlabeled (pre-training) records carry ``pid = -1`` and ``camid = -1``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, List, NamedTuple, Optional, Sequence

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Record(NamedTuple):
    path: str
    pid: int
    camid: int


def relabel(records: Sequence[Record]) -> List[Record]:
    """Map pids to ``0..N-1`` in sorted order of the original pid (stable across runs)."""
    pids = sorted({r.pid for r in records})
    mapping = {p: i for i, p in enumerate(pids)}
    return [Record(r.path, mapping[r.pid], r.camid) for r in records]


def split_stats(records: Sequence[Record]) -> dict:
    pids = {r.pid for r in records}
    cams = {r.camid for r in records}
    return {"ids": len(pids), "images": len(records), "cameras": len(cams)}


@dataclasses.dataclass
class ReIDDataset:
    """The three splits of a labelled ReID dataset (or only ``train`` for an unlabeled one)."""

    name: str
    root: str
    train: List[Record]
    query: List[Record] = dataclasses.field(default_factory=list)
    gallery: List[Record] = dataclasses.field(default_factory=list)
    unlabeled: bool = False

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    def splits(self) -> Iterable[tuple]:
        yield "train", self.train
        if not self.unlabeled:
            yield "query", self.query
            yield "gallery", self.gallery

    def summary(self) -> str:
        """A small table: identities, images and cameras per split."""
        lines = [f"{self.name} ({self.root})",
                 f"  {'split':<8} | {'# ids':>7} | {'# images':>9} | {'# cameras':>9}",
                 "  " + "-" * 44]
        for split, recs in self.splits():
            s = split_stats(recs)
            ids = "-" if self.unlabeled else s["ids"]
            cams = "-" if self.unlabeled else s["cameras"]
            lines.append(f"  {split:<8} | {ids:>7} | {s['images']:>9} | {cams:>9}")
        return "\n".join(lines)

    def show_summary(self, printer=print) -> None:
        printer(self.summary())


def check_expected(name: str, split: str, found: int, expected: Optional[int], root: str) -> None:
    """Warn (not fail: partial copies are legitimate) when a complete copy should have another count."""
    if expected is not None and found != expected:
        log.warning("%s: found %d %s images under %s, a complete copy has %d; "
                    "the copy may be partial or modified", name, found, split, root, expected)
