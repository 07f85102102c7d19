"""Examples -> padded batches with log-mel features, in a seeded order sharded across ranks.

The order of epoch e is `randperm(n, seed + e)`, padded to a multiple of the world size and dealt
round-robin to the ranks (like DistributedSampler), so a data position is just (epoch, micro-batch):
resuming needs no saved permutation and every rank runs the same number of steps.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..audio import load_audio
from ..features import log_mel_spectrogram, split_windows
from .records import IGNORE, Example


class AudioCache:
    """Decoded 16 kHz clips by path, least recently used first out, within a byte budget."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self.clips: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self.size = 0

    def windows(self, path: str) -> list[np.ndarray]:
        if path in self.clips:
            self.clips.move_to_end(path)
            return self.clips[path]
        windows = split_windows(load_audio(path))
        self.clips[path] = windows
        self.size += sum(w.nbytes for w in windows)
        while self.size > self.max_bytes and len(self.clips) > 1:
            _, old = self.clips.popitem(last=False)
            self.size -= sum(w.nbytes for w in old)
        return windows


class ExampleDataset(Dataset):
    """Item i: (i, example, the audio windows of each of its sequences)."""

    def __init__(self, examples: list[Example], cache_bytes: int = 256 * 2**20):
        self.examples = examples
        self.cache = AudioCache(cache_bytes)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        ex = self.examples[i]
        waves = [[self.cache.windows(path)[w] for path, w in seq.windows] for seq in ex.seqs]
        return i, ex, waves


@dataclass
class Collate:
    """Right-padded rows; DPO batches hold every chosen row first, then every rejected row."""

    pad_id: int
    n_mels: int
    split: str = "train"  # which reference-log-prob table a DPO batch indexes

    def __call__(self, items) -> dict:
        n_seqs = len(items[0][1].seqs)
        rows, waves = [], []
        for k in range(n_seqs):
            for _, ex, ex_waves in items:
                rows.append(ex.seqs[k])
                waves.extend(ex_waves[k])  # row-major, the order embed() fills <|AUDIO|> slots in
        T = max(len(r.ids) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r.ids)] = torch.tensor(r.ids)
            labels[i, : len(r.ids)] = torch.tensor(r.labels)
            mask[i, : len(r.ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                 "index": torch.tensor([i for i, _, _ in items]), "n_pairs": len(items), "split": self.split}
        if waves:
            batch["input_features"], batch["feature_attention_mask"] = log_mel_spectrogram(waves, self.n_mels)
        return batch


def n_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def shard_order(n: int, epoch: int, seed: int, rank: int, world: int, shuffle: bool = True) -> list[int]:
    """This rank's example indices for `epoch`; every rank gets the same count (a few repeat)."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    while len(order) % world:
        order.append(order[len(order) % n])
    return order[rank::world]


def micro_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    mine = shard_order(n, epoch, seed, rank, world)
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class BatchStream:
    """Endless micro-batches over epochs; `position` = (epoch, micro-batches taken in it) for resuming."""

    def __init__(self, dataset: ExampleDataset, collate: Collate, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, num_workers: int = 0, epoch: int = 0, offset: int = 0):
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.num_workers = num_workers
        self.epoch, self.offset = epoch, offset
        self._it = None

    @property
    def per_epoch(self) -> int:
        shard = -(-len(self.dataset) // self.world)
        return -(-shard // self.batch_size)

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.offset

    def _open(self):
        plan = micro_batches(len(self.dataset), self.batch_size, self.epoch, self.seed, self.rank, self.world)
        # Its own generator: opening a DataLoader otherwise draws from the global RNG (which drives
        # LoRA dropout), and a resumed run opens its loader at a different moment than a straight one.
        loader = DataLoader(self.dataset, batch_sampler=plan[self.offset :], collate_fn=self.collate,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(loader)

    def next(self) -> dict:
        if self.offset >= self.per_epoch:
            self.epoch, self.offset, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._it = self._open()
        batch = next(self._it)
        self.offset += 1
        return batch


def eval_batches(dataset: ExampleDataset, collate: Collate, batch_size: int, rank: int, world: int):
    """This rank's share of the held-out set, in file order, without repeats (sums are reduced later)."""
    mine = list(range(len(dataset)))[rank::world]
    plan = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return DataLoader(dataset, batch_sampler=plan, collate_fn=collate, generator=torch.Generator()) if plan else []


__all__ = ["AudioCache", "BatchStream", "Collate", "ExampleDataset", "eval_batches", "micro_batches", "n_targets",
           "shard_order"]
