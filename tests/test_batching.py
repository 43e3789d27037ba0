"""Batching: padded batches give the per-sample losses, the modality-length sampler's guarantees, and packed
rows that behave exactly like the samples alone."""

from __future__ import annotations

import random

import pytest
import torch

from kopru.data.batching import LengthGroupedSampler, collate, collate_packed, pack
from kopru.data.encoding import IGNORE_INDEX, EncodedSample, SampleEncoder
from kopru.data.sample import Sample


def conversations(make_image) -> list[Sample]:
    """Samples with 1, 0 and 2 images, of different lengths."""
    return [
        Sample([{"role": "user", "content": "<image>\nwhat colour is the shape?"},
                {"role": "assistant", "content": "red"}], [make_image(0)], id="one"),
        Sample([{"role": "user", "content": "how many squares are there?"},
                {"role": "assistant", "content": "there are two green triangles in the picture"},
                {"role": "user", "content": "ortadaki şekil ne renk?"},
                {"role": "assistant", "content": "yeşil."}], id="text"),
        Sample([{"role": "user", "content": "<image> and <image>: which has a blue square?"},
                {"role": "assistant", "content": "the quick brown fox"}], [make_image(1), make_image(2)], id="two"),
    ]


def encode(processor, samples: list[Sample]) -> list[EncodedSample]:
    return SampleEncoder(processor).encode_all(samples)


def alone(model, sample: EncodedSample, labels: bool = False):
    pixels = sample.pixel_values if sample.num_images else None
    return model(sample.input_ids[None], pixel_values=pixels, labels=sample.labels[None] if labels else None)


def weighted_loss(model, encoded: list[EncodedSample]) -> torch.Tensor:
    """Mean over all predicted tokens, from one forward pass per sample."""
    total, count = torch.zeros(()), 0
    for sample in encoded:
        tokens = int((sample.labels[1:] != IGNORE_INDEX).sum())  # the loss predicts labels[1:]
        total = total + alone(model, sample, labels=True).loss * tokens
        count += tokens
    return total / count


@pytest.fixture(scope="module")
def llama(build):
    return build("projection", llm="llama")


# ----------------------------------------------------------------------------------------------- collate
@torch.no_grad()
def test_collate_loss_is_the_token_weighted_mean_of_the_samples(llama, make_image) -> None:
    model, processor = llama
    encoded = encode(processor, conversations(make_image))
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    lengths = [sample.length for sample in encoded]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == 3
    torch.testing.assert_close(model(**batch).loss, weighted_loss(model, encoded), atol=1e-5, rtol=1e-5)


def test_collate_of_text_only_samples_has_no_pixel_values(llama, make_image) -> None:
    _, processor = llama
    batch = collate(encode(processor, conversations(make_image)[1:2]), processor.tokenizer.pad_token_id)
    assert "pixel_values" not in batch


# ----------------------------------------------------------------------------------------------- sampler
def _dataset(size: int, images: int, seed: int = 0) -> tuple[list[int], list[bool]]:
    rng = random.Random(seed)
    has_image = [True] * images + [False] * (size - images)
    rng.shuffle(has_image)
    return [rng.randint(5, 500) for _ in range(size)], has_image


def _epoch(lengths, has_image, batch_size, seed, epoch, replicas=1) -> list[list[list[int]]]:
    """Batches of each rank for one epoch."""
    ranks = []
    for rank in range(replicas):
        sampler = LengthGroupedSampler(lengths, has_image, batch_size, seed, num_replicas=replicas, rank=rank)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
        assert len(ranks[-1]) == len(sampler)
    return ranks


def test_sampler_is_a_permutation_with_one_modality_per_batch() -> None:
    lengths, has_image = _dataset(103, images=61)
    for epoch in range(3):
        (batches,) = _epoch(lengths, has_image, 8, seed=1, epoch=epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(103))
        assert all(len(batch) <= 8 for batch in batches)
        assert all(len({has_image[i] for i in batch}) == 1 for batch in batches)
        assert all([lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
                   for batch in batches)


def test_sampler_is_deterministic_per_seed_and_epoch() -> None:
    lengths, has_image = _dataset(50, images=20)
    assert _epoch(lengths, has_image, 4, seed=3, epoch=1) == _epoch(lengths, has_image, 4, seed=3, epoch=1)
    assert _epoch(lengths, has_image, 4, seed=3, epoch=1) != _epoch(lengths, has_image, 4, seed=3, epoch=2)
    assert _epoch(lengths, has_image, 4, seed=3, epoch=1) != _epoch(lengths, has_image, 4, seed=4, epoch=1)


def test_replicas_partition_the_indices() -> None:
    lengths, has_image = _dataset(66, images=36)  # both modalities divisible by 3 replicas
    ranks = _epoch(lengths, has_image, 4, seed=0, epoch=0, replicas=3)
    assert sorted(i for batches in ranks for batch in batches for i in batch) == list(range(66))
    for step in zip(*ranks, strict=True):  # same number of batches; same size and modality at each step
        assert len({len(batch) for batch in step}) == 1
        assert len({has_image[i] for batch in step for i in batch}) == 1


def test_replicas_pad_uneven_modalities_like_distributed_sampler() -> None:
    lengths, has_image = _dataset(31, images=17)
    ranks = _epoch(lengths, has_image, 4, seed=0, epoch=0, replicas=3)
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert set(seen) == set(range(31))
    assert len(seen) - 31 == (-17 % 3) + (-14 % 3)  # per modality, fewer than num_replicas repeats
    assert len({len(batches) for batches in ranks}) == 1


# ----------------------------------------------------------------------------------------------- packing
def _fake(length: int, name: str) -> EncodedSample:
    return EncodedSample(torch.zeros(length, dtype=torch.long), torch.zeros(length, dtype=torch.long),
                         torch.empty(0, 3, 4, 4), id=name)


def test_pack_is_first_fit_decreasing() -> None:
    samples = [_fake(n, str(n)) for n in (2, 6, 4, 5, 3)]
    groups = pack(samples, max_length=10)
    assert [[s.length for s in group] for group in groups] == [[6, 4], [2, 5, 3]]  # input order kept in a row
    with pytest.raises(ValueError, match="max_length=5"):
        pack(samples, max_length=5)


@torch.no_grad()
@pytest.mark.parametrize("llm", ["llama", "gpt2", "qwen2"])
@pytest.mark.slow
def test_packed_rows_match_the_samples_alone(build, make_image, llm: str) -> None:
    model, processor = build("projection", llm=llm)
    encoded = encode(processor, conversations(make_image))
    groups = [[encoded[0], encoded[1]], [encoded[2]]]  # the second row is padded
    batch = collate_packed(groups, processor.tokenizer.pad_token_id)
    assert batch["attention_mask"].shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    logits = model(**batch).logits
    for row, group in enumerate(groups):
        start = 0
        for sample in group:
            expected = alone(model, sample).logits[0]
            torch.testing.assert_close(logits[row, start:start + sample.length], expected, atol=1e-5, rtol=1e-5)
            start += sample.length
    torch.testing.assert_close(model(**batch).loss, weighted_loss(model, encoded), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_loss_never_predicts_a_sample_from_the_one_before(llama, make_image) -> None:
    model, processor = llama
    config = processor.config
    image_ids = torch.tensor([config.image_token_id, config.image_start_token_id, config.image_end_token_id])
    # Every text token labelled, each sample's first token included: only the packing can keep the last token
    # of one sample from being trained to predict the first token of the next.
    encoded = [
        EncodedSample(s.input_ids, s.input_ids.masked_fill(torch.isin(s.input_ids, image_ids), IGNORE_INDEX),
                      s.pixel_values, s.id)
        for s in encode(processor, conversations(make_image))
    ]
    batch = collate_packed([encoded], processor.tokenizer.pad_token_id)
    starts = torch.tensor([0, encoded[0].length, encoded[0].length + encoded[1].length])
    assert (batch["labels"][0, starts] == IGNORE_INDEX).all()
    assert batch["position_ids"][0, starts].tolist() == [0, 0, 0]
    torch.testing.assert_close(model(**batch).loss, weighted_loss(model, encoded), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.slow
def test_packed_samples_do_not_attend_to_each_other(llama, make_image) -> None:
    model, processor = llama
    first, second = encode(processor, conversations(make_image)[:2])
    changed = EncodedSample(first.input_ids.clone(), first.labels, first.pixel_values, "changed")
    text = changed.input_ids < processor.config.image_token_id  # leave the image positions as they are
    changed.input_ids[text] = (changed.input_ids[text] + 7) % processor.config.image_token_id

    def second_logits(batch: dict) -> torch.Tensor:
        return model(**batch).logits[0, first.length:]

    pad = processor.tokenizer.pad_token_id
    reference = second_logits(collate_packed([[first, second]], pad))
    torch.testing.assert_close(second_logits(collate_packed([[changed, second]], pad)), reference, atol=1e-6, rtol=0)
    # Sanity check of the check: with a plain causal mask the change does reach the second sample.
    plain = collate_packed([[changed, second]], pad)
    plain["attention_mask"] = torch.ones_like(plain["input_ids"])
    assert not torch.allclose(second_logits(plain), reference, atol=1e-3)


@torch.no_grad()
def test_additive_float_mask_for_eager_attention(build, make_image) -> None:
    model, processor = build("projection", llm="llama")
    model.llm.set_attn_implementation("eager")
    encoded = encode(processor, conversations(make_image))
    batch = collate_packed([encoded], processor.tokenizer.pad_token_id, mask_dtype=torch.float32)
    torch.testing.assert_close(model(**batch).loss, weighted_loss(model, encoded), atol=1e-5, rtol=1e-5)


def test_packing_refuses_cross_attention(build, make_image) -> None:
    _, processor = build("cross_attention")
    encoded = encode(processor, conversations(make_image))
    with pytest.raises(ValueError, match="cross_attention"):
        pack(encoded, max_length=4096)
    with pytest.raises(ValueError, match="cross_attention"):
        collate_packed([encoded], processor.tokenizer.pad_token_id)
