"""The SFT DataModule: dynamic padding or boundary-respecting packing over `sft_dataset`.

Batches are built rank-aware (every rank gets the same number of micro-batches) and, by default,
grouped by length so that dynamic padding wastes little compute. Packed rows carry position ids
that restart at every sample; the model then builds a block-diagonal causal mask from them, so
packed samples never attend to each other and the loss equals the unpacked loss.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from arenaflow.data.sft import IGNORE_INDEX

log = logging.getLogger(__name__)


def prepare_examples(
    dataset: Any, max_length: int
) -> tuple[list[tuple[list[int], list[int]]], Counter]:
    """Truncate to `max_length` and drop examples with nothing to train on, counting every reason."""
    examples: list[tuple[list[int], list[int]]] = []
    counts: Counter = Counter()
    for row in dataset:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if len(ids) != len(labels) or not ids:
            counts["dropped_bad_shape"] += 1
            continue
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            counts["truncated"] += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):
            counts["dropped_no_trained_tokens"] += 1
            continue
        examples.append((ids, labels))
        counts["kept"] += 1
    return examples, counts


def pack_examples(lengths: Sequence[int], max_length: int, seed: int) -> list[list[int]]:
    """Greedy first-fit-decreasing packing of example indices into rows of at most `max_length`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    random.Random(seed).shuffle(rows)
    return rows


class SFTDataset(Dataset):
    """Items are rows: one example (dynamic padding) or several packed examples."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], rows: list[list[int]]) -> None:
        self.examples = examples
        self.rows = rows
        self.lengths = [sum(len(examples[i][0]) for i in row) for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> list[tuple[list[int], list[int]]]:
        return [self.examples[i] for i in self.rows[idx]]


class Collator:
    """Pads a batch of rows to its longest row (rounded up to `pad_to_multiple_of`)."""

    def __init__(self, pad_id: int, packed: bool, pad_to_multiple_of: int = 1) -> None:
        self.pad_id = pad_id
        self.packed = packed
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, batch: list[list[tuple[list[int], list[int]]]]) -> dict[str, torch.Tensor]:
        rows = []
        for parts in batch:
            ids = [t for p in parts for t in p[0]]
            # a part's first label is never trained unpacked (nothing precedes it); keep it so packed
            labels = [t for p in parts for t in (IGNORE_INDEX, *p[1][1:])]
            pos = [j for p in parts for j in range(len(p[0]))]
            rows.append((ids, labels, pos, [len(p[0]) for p in parts]))
        width = max(len(r[0]) for r in rows)
        width = math.ceil(width / self.multiple) * self.multiple
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        position = torch.zeros((n, width), dtype=torch.long)
        attn_sq = 0
        for b, (ids, lab, pos, seg) in enumerate(rows):
            k = len(ids)
            input_ids[b, :k] = torch.tensor(ids)
            labels[b, :k] = torch.tensor(lab)
            attention[b, :k] = 1
            position[b, :k] = torch.tensor(pos)
            # padding is its own segment (positions restart at 0) so it never joins a sample
            position[b, k:] = torch.arange(width - k)
            attn_sq += sum(s * s for s in seg)
        out = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention,
            "position_ids": position,
            "attn_sq": torch.tensor(attn_sq, dtype=torch.long),
        }
        if self.packed:
            out["packed"] = torch.tensor(1)
        return out


class RankBatchSampler(Sampler[list[int]]):
    """Micro-batches for one data-parallel rank; every rank gets the same number of batches.

    With `group_by_length`, indices are shuffled, cut into mega-batches, and sorted by length
    inside each, so a micro-batch holds similar lengths (little padding) while order stays random.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        mega_batch_mult: int = 50,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.mega = batch_size * world_size * mega_batch_mult
        self.epoch = 0
        self.skip = 0  # batches of this epoch already trained on (set by a resume)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next pass starts at batch `batches` of epoch `epoch` (the same order as before)."""
        self.epoch, self.skip = epoch, batches

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        idx = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(idx)
        if self.group_by_length:
            idx = [
                i
                for s in range(0, len(idx), self.mega)
                for i in sorted(idx[s : s + self.mega], key=lambda i: -self.lengths[i])
            ]
        step = self.batch_size * self.world_size
        total = len(self) * step
        idx = idx + idx[: total - len(idx)] if idx else idx  # wrap so every rank is full
        global_batches = [idx[s : s + step] for s in range(0, total, step)]
        if self.shuffle and self.group_by_length:
            rng.shuffle(global_batches)
        skip, self.skip = self.skip, 0
        for gb in global_batches[skip:]:
            yield gb[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


class ResumableLoader(DataLoader):
    """The training DataLoader, with the state Lightning checkpoints for a loader that has one:
    the epoch and how many of its micro-batches training has processed. Lightning restarts a plain
    loader's epoch from its first batch on resume, so a run killed mid-epoch trained on those
    batches twice (the resumed adapters of a 6-step LoRA run differed from an unkilled run's by up
    to 0.02); with this state it goes on with the next batch, as the unkilled run did."""

    def __init__(self, *args: Any, processed: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processed = processed

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches": self.processed()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.resume_at(int(state["epoch"]), int(state["batches"]))


class SFTDataModule(L.LightningDataModule):
    """`sft_dataset` (a DatasetDict saved to disk) -> padded or packed micro-batches per rank."""

    def __init__(
        self,
        data_dir: str | Path,
        pad_id: int,
        micro_batch_size: int,
        max_length: int,
        packing: bool = False,
        group_by_length: bool = True,
        pad_to_multiple_of: int = 8,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size
        self.max_length = max_length
        self.packing = packing
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.num_workers = num_workers
        self.datasets: dict[str, SFTDataset] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        from datasets import load_from_disk

        dd = load_from_disk(self.data_dir)
        if "train" not in dd:
            raise ValueError(
                f"{self.data_dir} has no 'train' split (found {list(dd)}); "
                "rematerialize sft_dataset or point train.data_uri at a DatasetDict"
            )
        for split in ("train", "validation"):
            if split not in dd:
                continue
            examples, counts = prepare_examples(
                dd[split].select_columns(["input_ids", "labels"]), self.max_length
            )
            lengths = [len(e[0]) for e in examples]
            if self.packing:
                rows = pack_examples(lengths, self.max_length, self.seed)
            else:
                rows = [[i] for i in range(len(examples))]
            self.datasets[split] = SFTDataset(examples, rows)
            counts["rows"] = len(rows)
            self.counts[split] = dict(counts)
            log.info("%s split: %s", split, dict(counts))
        if not self.datasets["train"].rows:
            raise ValueError(
                f"no trainable examples in {self.data_dir} (counts: {self.counts['train']}); "
                "check the data stage's drop reasons"
            )

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _processed(self) -> int:
        """Micro-batches of the current epoch the training loop has run (a checkpoint taken in
        on_train_batch_end counts the batch it follows)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[split]
        world, rank = self._rank()
        sampler = RankBatchSampler(
            ds.lengths,
            self.micro_batch_size,
            world,
            rank,
            seed=self.seed,
            shuffle=shuffle,
            group_by_length=self.group_by_length,
        )
        options = {
            "batch_sampler": sampler,
            "collate_fn": Collator(self.pad_id, self.packing, self.pad_to_multiple_of),
            "num_workers": self.num_workers,
        }
        if split == "train":
            return ResumableLoader(ds, processed=self._processed, **options)
        return DataLoader(ds, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.datasets.get("validation") or not self.datasets["validation"].rows:
            return []
        return self._loader("validation", shuffle=False)
