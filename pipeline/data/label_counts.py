"""Per-split label counts of a shard set: what `auto` loss weights and the no-label checks use.

Counted while the shards are written and stored in the manifest (`label_counts`), so a run
reads them without touching the shards; a shard set written before they existed is counted
from its small columns (label, expansions, valid) once, on demand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

WINDOW = 105


@dataclass
class LabelCounts:
    windows: int = 0
    labeled: int = 0
    classes: list[int] = field(default_factory=lambda: [0, 0])
    span_windows: int = 0       # labeled windows with an expansion
    in_span_bars: int = 0       # valid bars inside an expansion (span positives)
    out_span_bars: int = 0      # valid bars of span windows outside it (span negatives)

    def add(self, label, start, end, valid) -> None:
        label, start, end = (np.asarray(a, np.int64) for a in (label, start, end))
        valid = np.asarray(valid).astype(bool).reshape(len(label), WINDOW)
        labeled = label >= 0
        window = labeled & (start >= 0)
        self.windows += len(label)
        self.labeled += int(labeled.sum())
        for c in range(len(self.classes)):
            self.classes[c] += int((label == c).sum())
        pos = np.arange(WINDOW)[None, :]
        inside = (pos >= start[:, None]) & (pos <= end[:, None])
        bars = valid & window[:, None]
        self.span_windows += int(window.sum())
        self.in_span_bars += int((bars & inside).sum())
        self.out_span_bars += int((bars & ~inside).sum())

    def to_dict(self) -> dict:
        return asdict(self)


def count_chunks(counts: dict[str, LabelCounts], split: str, columns: dict) -> None:
    counts.setdefault(split, LabelCounts()).add(columns["label"], columns["expansion_start"],
                                                columns["expansion_end"], columns["valid"])


def label_counts(uri: str, manifest: dict) -> dict[str, dict]:
    """{split: LabelCounts as a dict}: from the manifest, or counted from the shards."""
    if "label_counts" in manifest:
        return manifest["label_counts"]
    from pipeline.data.manifest import shard_uri
    from pipeline.data.shard_check import _open
    from pipeline.data.shards import binary_view
    counts: dict[str, LabelCounts] = {}
    for shard in manifest["shards"]:
        table = _open(shard_uri(uri, shard)).read(
            columns=["label", "expansion_start", "expansion_end", "valid"])
        valid = binary_view(table.column("valid"), np.uint8, (WINDOW,))
        count_chunks(counts, shard["split"], {k: table.column(k).to_numpy() for k in
                                              ("label", "expansion_start", "expansion_end")}
                     | {"valid": valid})
    return {split: c.to_dict() for split, c in counts.items()}
