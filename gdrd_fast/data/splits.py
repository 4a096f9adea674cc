"""Identification splits from a text file (gallery/probe for CMC, train/test for the linear probe).

Format, one entry per line; blank lines and lines starting with '#' are ignored:

    <part> <item> [<label>]

part  : gallery | probe | train | test
item  : a dataset index (an integer) or an image path relative to the dataset root ('/'-separated,
        no whitespace)
label : an integer identity; optional: when absent it is taken from the dataset.

Example:
    # UCCS-style protocol
    train   alice/0001.png  0
    test    alice/0002.png  0
    gallery 17
    probe   42
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

PARTS = ("gallery", "probe", "train", "test")


@dataclass
class SplitEntry:
    item: int | str
    label: int | None


@dataclass
class IdentificationSplit:
    """Entries per part, in file order."""
    parts: dict[str, list[SplitEntry]] = field(default_factory=lambda: {p: [] for p in PARTS})

    def resolve(self, part: str, dataset) -> tuple[Tensor, Tensor]:
        """(dataset indices, labels) of one part. Paths are looked up in dataset.samples; missing
        labels come from dataset.targets."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        entries = self.parts[part]
        if not entries:
            raise ValueError(f"the split has no {part!r} entries")
        by_path = None
        indices, labels = [], []
        for e in entries:
            if isinstance(e.item, int):
                if not 0 <= e.item < len(dataset):
                    raise ValueError(f"{part} index {e.item} is outside the dataset (size {len(dataset)})")
                index = e.item
            else:
                if by_path is None:
                    by_path = {Path(p).as_posix(): i for i, (p, _) in enumerate(dataset.samples)}
                if e.item not in by_path:
                    raise ValueError(f"{part} path {e.item!r} is not in the dataset")
                index = by_path[e.item]
            indices.append(index)
            labels.append(int(dataset.targets[index]) if e.label is None else e.label)
        return torch.tensor(indices, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def read_split_file(path: str | os.PathLike) -> IdentificationSplit:
    split = IdentificationSplit()
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"{path}:{number}"
        if len(fields) not in (2, 3):
            raise ValueError(f"{where}: expected '<part> <item> [<label>]', got {raw!r}")
        part, item = fields[0], fields[1]
        if part not in PARTS:
            raise ValueError(f"{where}: part must be one of {PARTS}, got {part!r}")
        label = None
        if len(fields) == 3:
            try:
                label = int(fields[2])
            except ValueError:
                raise ValueError(f"{where}: label must be an integer, got {fields[2]!r}") from None
        if item.lstrip("-").isdigit():
            item = int(item)
            if item < 0:
                raise ValueError(f"{where}: index must be >= 0, got {item}")
        split.parts[part].append(SplitEntry(item, label))
    if not any(split.parts.values()):
        raise ValueError(f"{path}: no entries")
    return split
