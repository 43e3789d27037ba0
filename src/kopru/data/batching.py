"""Encoded samples -> batches: right-padded batches, LLaVA's modality-length grouping, and sequence packing.

Packing puts several samples in one row. transformers 5 offers two ways to keep them apart
(`masking_utils.create_causal_mask`):

- position_ids that restart at 0, with `attention_mask=None`: the packed-sequence detection
  (`find_packed_sequence_indices`) only runs when there is no cache either, and Llama / Qwen2 / GPT-2 create a
  `DynamicCache` whenever `use_cache` is on, which is their config default even in training. The samples
  then silently attend to each other.
- a 4-D mask [rows, 1, L, L]: `_preprocess_mask_arguments` returns it as it is, cache or not. For the sdpa
  attention (the default on CPU and GPU) a boolean mask means True = may attend, passed straight to
  `torch.nn.functional.scaled_dot_product_attention`.

`collate_packed` uses the 4-D mask (block-diagonal causal), and also gives position_ids restarting at 0 for
each sample so rotary / learned positions are those of the sample alone. "eager" attention adds the mask to the
scores, so it needs `mask_dtype=` the model's float dtype (0 = attend, the dtype's minimum = not); flash-attention
ignores 4-D masks and is not supported here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import cycle, islice

import torch
from torch.utils.data import Sampler

from kopru.connectors import strategy_class
from kopru.data.encoding import IGNORE_INDEX, EncodedSample
from kopru.high_resolution_processing import pad_stack


# ------------------------------------------------------------------------------------------------ padding
def collate(encoded: Sequence[EncodedSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding) and, when any, pixel_values in
    sample order (the order the model fills the image placeholders in, row by row)."""
    if not encoded:
        raise ValueError("collate needs at least one encoded sample, found none")
    rows, width = len(encoded), max(sample.length for sample in encoded)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, sample in enumerate(encoded):
        input_ids[row, : sample.length] = sample.input_ids
        labels[row, : sample.length] = sample.labels
        attention_mask[row, : sample.length] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return _with_pixels(batch, encoded)


def _with_pixels(batch: dict[str, torch.Tensor], encoded: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
    with_images = [sample for sample in encoded if sample.num_images]
    if not with_images:
        return batch
    if with_images[0].image_sizes is None:
        batch["pixel_values"] = torch.cat([sample.pixel_values for sample in with_images])
        return batch
    # anyres / dynamic resolution: images differ in views or size; zero padded as the processor pads them.
    batch["pixel_values"] = pad_stack([image for sample in with_images for image in sample.pixel_values])
    batch["image_sizes"] = torch.cat([sample.image_sizes for sample in with_images])
    return batch


# ------------------------------------------------------------------------------------------------ sampler
class LengthGroupedSampler(Sampler[list[int]]):
    """LLaVA's modality-length grouping, as a batch sampler: `DataLoader(dataset, batch_sampler=sampler)`.

    Each epoch, image and text-only samples are shuffled separately and cut into megabatches of
    `batch_size * num_replicas` (never mixing the two); each megabatch is sorted by length (longest first) and
    the megabatches are shuffled together. Replica r takes every num_replicas-th sample of each megabatch
    (ranks 0..R-1 get the longest, then the next R, ...), so replicas run batches of similar lengths and the
    same modality at each step. All replicas compute the same order from (seed, epoch): call `set_epoch`.

    Every index appears exactly once per epoch across replicas, except that, like DistributedSampler
    (drop_last=False), each modality's last megabatch is padded with that modality's first indices of the
    epoch up to a multiple of num_replicas (fewer than num_replicas repeats per modality), so that every
    replica runs the same number of batches of the same sizes. The last batch of each modality may be short.
    """

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, seed: int,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if len(lengths) != len(has_image):
            raise ValueError(f"expected one has_image per length ({len(lengths)}), found {len(has_image)}")
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"expected batch_size >= 1, num_replicas >= 1 and 0 <= rank < num_replicas, found {batch_size}, "
                f"{num_replicas}, {rank}"
            )
        self.lengths = [int(length) for length in lengths]
        self.has_image = torch.as_tensor(has_image, dtype=torch.bool)
        self.batch_size, self.seed, self.num_replicas, self.rank = batch_size, seed, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def megabatches(self) -> list[list[int]]:
        """This epoch's megabatches, the same on every replica."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        size = self.batch_size * self.num_replicas
        megabatches = []
        for modality in (self.has_image, ~self.has_image):
            indices = modality.nonzero().flatten()
            order = indices[torch.randperm(len(indices), generator=generator)].tolist()
            for start in range(0, len(order), size):
                megabatches.append(self._sorted(self._pad(order[start:start + size], order)))
        shuffle = torch.randperm(len(megabatches), generator=generator).tolist()
        return [megabatches[i] for i in shuffle]

    def _pad(self, megabatch: list[int], order: list[int]) -> list[int]:
        missing = -len(megabatch) % self.num_replicas
        return megabatch + list(islice(cycle(order), missing))

    def _sorted(self, megabatch: list[int]) -> list[int]:
        return sorted(megabatch, key=lambda index: -self.lengths[index])  # stable: ties keep the shuffled order

    def __iter__(self) -> Iterator[list[int]]:
        for megabatch in self.megabatches():
            yield megabatch[self.rank::self.num_replicas]

    def __len__(self) -> int:
        size = self.batch_size * self.num_replicas
        images = int(self.has_image.sum())
        return -(-images // size) + -(-(len(self.lengths) - images) // size)


# ------------------------------------------------------------------------------------------------ packing
def pack(encoded: Sequence[EncodedSample], max_length: int) -> list[list[EncodedSample]]:
    """Greedy first-fit decreasing: longest first, each into the first row with room. Within a row the samples
    keep their input order. For spliced strategies only (see `collate_packed`)."""
    _check_packable(encoded)
    too_long = [(sample.id, sample.length) for sample in encoded if sample.length > max_length]
    if too_long:
        raise ValueError(f"expected samples of at most max_length={max_length} tokens to pack, found {too_long[:5]}")
    bins = _FirstFit(len(encoded), max_length)
    rows: dict[int, list[int]] = {}
    for index in sorted(range(len(encoded)), key=lambda i: -encoded[i].length):
        row = bins.place(encoded[index].length)
        rows.setdefault(row, []).append(index)
    return [[encoded[i] for i in sorted(rows[row])] for row in sorted(rows)]


class _FirstFit:
    """A max segment tree over the rows' free space: the leftmost row with room in O(log n)."""

    def __init__(self, rows: int, capacity: int) -> None:
        self.leaves = 1 << max(rows - 1, 0).bit_length()
        self.free = [capacity] * (2 * self.leaves)  # unopened rows are empty, so they have full room

    def place(self, length: int) -> int:
        node = 1
        while node < self.leaves:
            node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
        row = node - self.leaves
        self.free[node] -= length
        while node > 1:
            node //= 2
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
        return row


def collate_packed(groups: Sequence[Sequence[EncodedSample]], pad_token_id: int,
                   mask_dtype: torch.dtype = torch.bool) -> dict[str, torch.Tensor]:
    """One row per group: concatenated ids and labels, position_ids restarting at 0 for each sample, and a
    block-diagonal causal 4-D attention_mask [rows, 1, L, L] (see the module docstring).

    The label of each sample's first token is -100: the loss shifts labels left, so otherwise the previous
    sample's last token would be trained to predict it. Row padding is a segment of its own (positions from 0,
    labels -100), so no query row of the mask is empty (sdpa gives NaN for those).
    """
    if not groups or not all(groups):
        raise ValueError("collate_packed needs non-empty groups of encoded samples")
    flat = [sample for group in groups for sample in group]
    _check_packable(flat)
    width = max(sum(sample.length for sample in group) for group in groups)
    input_ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    segments = torch.zeros((len(groups), width), dtype=torch.long)
    for row, group in enumerate(groups):
        start = 0
        for segment, sample in enumerate(group):
            end = start + sample.length
            input_ids[row, start:end] = sample.input_ids
            labels[row, start:end] = sample.labels
            labels[row, start] = IGNORE_INDEX
            position_ids[row, start:end] = torch.arange(sample.length)
            segments[row, start:end] = segment
            start = end
        position_ids[row, start:] = torch.arange(width - start)
        segments[row, start:] = len(group)
    batch = {"input_ids": input_ids, "attention_mask": _block_causal_mask(segments, mask_dtype),
             "position_ids": position_ids, "labels": labels}
    return _with_pixels(batch, flat)


def _block_causal_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _check_packable(encoded: Sequence[EncodedSample]) -> None:
    for sample in encoded:
        if not strategy_class(sample.strategy).splices_into_text:
            raise ValueError(
                f"cannot pack samples encoded for the {sample.strategy!r} strategy (sample {sample.id!r}): its "
                "image visibility counts images from the start of the row, so a packed sample would see the "
                "images of the samples before it; use collate() for it, packing is for spliced strategies "
                "(projection, qformer)"
            )


__all__ = ["LengthGroupedSampler", "collate", "collate_packed", "pack"]
