"""The serving engine: batched, streaming generation for a `KopruForConditionalGeneration` of any strategy.

A pre-allocated (static) key/value cache, one decode step with fixed shapes that torch.compile can capture whole,
per-request sampling on device (`kopru.generation.sampling`), stop strings and streaming text
(`kopru.generation.streaming`). `kopru.generation.reference.generate` is the simple loop it is tested against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedModel, StaticCache

from kopru.connectors.cross_attention import CONTEXT_KWARG, check_blocks_ran
from kopru.generation.sampling import Sampler, SamplingParams
from kopru.generation.streaming import IncrementalDetokenizer, StopStringMatcher
from kopru.llm import context_window
from kopru.messages import end_of_turn_ids


@dataclass
class StreamEvent:
    index: int  # which request in the batch
    text: str  # new decoded text since the last event for this index ("" allowed)
    finish_reason: str | None  # None while running; "stop" (eos or stop string) or "length" at the end
    completion_tokens: int | None = None  # on the final event: tokens generated for this request


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the generated ids (eos not included)


def decode_step(llm: PreTrainedModel, cache_argument: str, tokens: torch.Tensor, positions: torch.Tensor,
                key_valid: torch.Tensor, key_index: torch.Tensor, cache: StaticCache, additive_mask: bool,
                extra: dict) -> torch.Tensor:
    """One token per row through the LLM with the static cache; fixed shapes, no host synchronisation.

    `tokens`, `positions` [B, 1]; `key_valid` [B, S] marks the cache slots that hold a real (non-padding) token or
    will hold a generated one; `key_index` [S] = arange(S). The slot written now is the cache's own running
    length, read on device. Returns float logits [B, V].
    """
    written = cache.layers[0].cumulative_length
    visible = (key_valid & (key_index <= written)).unsqueeze(1).unsqueeze(1)  # [B, 1, 1, S]
    mask = _attention_mask(visible, additive_mask, llm.dtype)
    out = llm(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
              **{cache_argument: cache}, **extra)
    return out.logits[:, -1].float()


def _attention_mask(visible: torch.Tensor, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask for SDPA; the eager attention implementation adds its mask to the scores instead."""
    if not additive:
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


@dataclass
class _Slot:
    """The pre-allocated state for one (batch size, cache length): reused by every batch of that shape."""

    cache: StaticCache
    key_index: torch.Tensor  # [S]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # static image K/V buffers (cross_attention)


@dataclass
class _Row:
    index: int
    params: SamplingParams
    prompt_tokens: int
    max_new_tokens: int
    detokenizer: IncrementalDetokenizer
    stopper: StopStringMatcher
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class GenerationEngine:
    """Batched, streaming generation for a `KopruForConditionalGeneration` of any strategy.

    Prefill runs the prompt (images encoded once; for cross_attention every block's image keys/values computed
    once and copied into a pre-allocated buffer) into a static key/value cache. Each decode step is
    `decode_step`: fixed shapes, the cache written in place at its device-side length, the mask built on
    device; with `compile=True` it is `torch.compile`d (CUDA graphs on GPU: mode "reduce-overhead"). Sampling
    runs on device; the host reads one token per row per step (for stop checks and streaming) while the next
    step is already queued.

    Caches are kept per (batch size, cache length) bucket and reused; batch sizes round up to a power of two
    (extra rows are empty prompts) and cache lengths to a power of two, so a compiled step sees few shapes.
    One call at a time: `stream` holds a lock while it runs.
    """

    MIN_CACHE = 64
    KEPT_SLOTS = 4

    def __init__(self, model, processor, max_batch_size: int = 8, max_seq_len: int | None = None,
                 compile: bool = False) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, found {max_batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.llm = model.llm
        self.max_batch_size = max_batch_size
        limit = context_window(self.llm.config)
        if max_seq_len is None and limit is None:
            raise ValueError("the LLM's config names no maximum length (max_position_embeddings); give max_seq_len")
        if max_seq_len is not None and limit is not None and max_seq_len > limit:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the LLM's {limit} positions")
        self._window = max_seq_len or limit
        self.device = next(self.llm.parameters()).device
        eos = [*_as_ids(getattr(self.llm.generation_config, "eos_token_id", None)),
               *_as_ids(self.llm.config.eos_token_id), *_as_ids(self.tokenizer.eos_token_id)]
        # A chat model ends its turn with the template's end-of-turn token (Llama 3's <|eot_id|>, ChatML's
        # <|im_end|>), which need not be eos: without it, generation runs on into an invented next turn.
        self.eos_ids = sorted(set(eos) | set(_end_of_turn_ids(processor)))
        self._eos_set = set(self.eos_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or [0])[0]
        self._cache_argument = model._cache_argument
        self._additive_mask = self.llm.config._attn_implementation == "eager"
        self._slots: OrderedDict[tuple[int, int, int], _Slot] = OrderedDict()
        self._lock = threading.Lock()
        self._warm_keys: set[tuple] = set()
        self.compiled = compile
        self._step = decode_step
        if compile:
            # One compiled graph per (batch, cache length) bucket; more than dynamo's default 8 may be needed.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._step = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)

    # --------------------------------------------------------------------------------------------- public
    @property
    def vocab_size(self) -> int:
        """Rows of the LLM's output layer: the token ids generation can pick from."""
        return self.llm.get_output_embeddings().weight.shape[0]

    @property
    def context_window(self) -> int:
        """Prompt (images expanded) + answer tokens one sequence may hold."""
        return self._window

    def count_prompt_tokens(self, prompt: str, images: list) -> int:
        """LLM positions the prompt takes, images expanded; checks that the images match its placeholders."""
        ordered = self.processor._images_in_order([prompt], [list(images)])
        counts = [self.processor.count(image) for image in ordered]  # per image: sizes matter at high resolution
        return len(self.tokenizer(self.processor.expand(prompt, counts), add_special_tokens=False)["input_ids"])

    def complete(self, prompts: list[str], images: list[list[Image.Image]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_tokens: list[int] | None = None) -> list[Completion]:
        texts = [""] * len(prompts)
        rows: dict[int, _Row] = {}
        for event in self._stream(prompts, images, params, rows, prompt_tokens):
            texts[event.index] += event.text
        return [Completion(text, rows[index].finish_reason, rows[index].prompt_tokens, rows[index].completion_tokens,
                           rows[index].token_ids) for index, text in enumerate(texts)]

    def stream(self, prompts: list[str], images: list[list[Image.Image]],
               params: SamplingParams | list[SamplingParams] | None = None,
               prompt_tokens: list[int] | None = None) -> Iterator[StreamEvent]:
        """Events as tokens arrive; each request ends with exactly one event whose finish_reason is set.

        Prompts are formatted text (see `format_chat`) holding one image placeholder per image; they are
        tokenised as they are (no special tokens added). Raises ValueError before generating anything when a
        prompt does not fit the context window or its images do not match its placeholders.

        prompt_tokens: what `count_prompt_tokens` gave for these prompts, when the caller has counted them already
        (the server does, to admit a request), so they are not tokenised a second time before the batch is
        encoded; the encoded batch is checked against them."""
        return self._stream(prompts, images, params, {}, prompt_tokens)

    # ------------------------------------------------------------------------------------------- internals
    def _stream(self, prompts, images, params, rows: dict, prompt_tokens: list[int] | None = None
                ) -> Iterator[StreamEvent]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = [list(per_prompt) for per_prompt in (images if images is not None else [[] for _ in prompts])]
        if len(images) != len(prompts):
            raise ValueError(f"expected one list of images per prompt ({len(prompts)}), found {len(images)}")
        params = params if params is not None else SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"expected one SamplingParams per prompt ({len(prompts)}), found {len(params)}")
        if prompt_tokens is not None and len(prompt_tokens) != len(prompts):
            raise ValueError(f"expected one prompt token count per prompt ({len(prompts)}), found {len(prompt_tokens)}")
        lengths = (list(prompt_tokens) if prompt_tokens is not None else
                   [self.count_prompt_tokens(p, i) for p, i in zip(prompts, images, strict=True)])
        for index, length in enumerate(lengths):
            if length == 0:
                raise ValueError(f"prompt {index} is empty; expected at least one token to continue from")
            if length >= self._window:
                raise ValueError(
                    f"prompt {index} takes {length} tokens (images expanded) but the context window is "
                    f"{self._window}; expected at most {self._window - 1}, to leave room for an answer"
                )
        return self._run_chunks(prompts, images, params, lengths, rows)

    def _run_chunks(self, prompts, images, params, lengths, rows) -> Iterator[StreamEvent]:
        with self._lock:
            for start in range(0, len(prompts), self.max_batch_size):
                stop = start + self.max_batch_size
                yield from self._run_batch(start, prompts[start:stop], images[start:stop], params[start:stop],
                                           lengths[start:stop], rows)

    def _slot(self, batch: int, length: int, cross_kv_shapes: list[tuple] | None) -> _Slot:
        key = (batch, length, cross_kv_shapes[0][2] if cross_kv_shapes else 0)
        if key in self._slots:
            self._slots.move_to_end(key)
            slot = self._slots[key]
        else:
            while len(self._slots) >= self.KEPT_SLOTS:
                self._slots.popitem(last=False)
            cross_kv = None
            if cross_kv_shapes:
                cross_kv = [tuple(torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(2))
                            for shape, dtype in ((s[:4], s[4]) for s in cross_kv_shapes)]
                for keys, values in cross_kv:
                    torch._dynamo.mark_static_address(keys)
                    torch._dynamo.mark_static_address(values)
            slot = _Slot(StaticCache(config=self.llm.config, max_cache_len=length),
                         torch.arange(length, device=self.device), cross_kv)
            self._slots[key] = slot
        for layer in slot.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()
        return slot

    def _run_batch(self, offset, prompts, images, params, lengths, all_rows) -> Iterator[StreamEvent]:
        inputs = self.processor(prompts, images, padding_side="left", add_special_tokens=False)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        encoded = attention_mask.sum(dim=1).tolist()
        if encoded != list(lengths):
            raise ValueError(f"the prompts were counted as {list(lengths)} tokens but encode to {encoded}; expected "
                             "the counts count_prompt_tokens gives for the same prompts and images")
        budget = self.generation_budget(input_ids.shape[1], params)
        rows = []
        for index, length in enumerate(lengths):
            prompt_ids = input_ids[index, input_ids.shape[1] - length:].tolist()
            rows.append(_Row(offset + index, params[index], length, min(params[index].max_new_tokens, budget),
                             IncrementalDetokenizer(self.tokenizer, prompt_ids), StopStringMatcher(params[index].stop)))
            all_rows[offset + index] = rows[-1]
        active = rows
        steps = self.stream_token_ids(input_ids, attention_mask, inputs.get("pixel_values"), params,
                                      image_sizes=inputs.get("image_sizes"))
        try:
            for tokens in steps:
                still = []
                for row in active:
                    event = self._advance(row, tokens[row.index - offset])
                    if event is not None:
                        yield event
                    if row.finish_reason is None:
                        still.append(row)
                active = still
                if not active:
                    return
        finally:
            steps.close()

    def _guards(self, warm_key: tuple) -> contextlib.AbstractContextManager:
        """Once a shape has run compiled, skip re-checking all of dynamo's guards on every step (half a millisecond
        per step on CPU, more than a small model's compute): only the guards that tell the compiled shapes apart
        are evaluated. Safe because every other input of `decode_step` is fixed for the engine's lifetime (same
        modules, same mask kind, the cache and image buffers at fixed addresses), and a shape not seen before
        runs with every guard (and compiles)."""
        if not self.compiled or warm_key not in self._warm_keys:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    def generation_budget(self, prompt_length: int, params: list[SamplingParams]) -> int:
        """New tokens a batch padded to `prompt_length` may generate: what it asks for, within the context window."""
        return min(max(p.max_new_tokens for p in params), self._window - prompt_length)

    @torch.inference_mode()
    def stream_token_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         pixel_values: torch.Tensor | None, params: list[SamplingParams],
                         image_sizes: torch.Tensor | None = None) -> Iterator[list[int]]:
        """The token-level engine: left-padded inputs (as `KopruProcessor(..., padding_side="left")` gives) in,
        one list per step out, holding each row's new token, for `generation_budget` steps; stop iterating
        when done (eos and stop strings are the caller's business). Used by `stream` and by the benchmarks."""
        real = input_ids.shape[0]
        if len(params) != real:
            raise ValueError(f"expected one SamplingParams per row ({real}), found {len(params)}")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generation expects left-padded prompts: found padding at the end of a row")
        batch = real if not self.compiled else min(_next_power_of_two(real), max(self.max_batch_size, real))
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        if batch > real:  # empty rows (all padding) keep the compiled shapes few
            input_ids = torch.cat([input_ids, input_ids.new_full((batch - real, input_ids.shape[1]), self.pad_id)])
            attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(batch - real, input_ids.shape[1])])
            params = params + [SamplingParams(max_new_tokens=1)] * (batch - real)
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.device, self.model.vision.encoder.dtype)
        prompt_length = input_ids.shape[1]
        budget = self.generation_budget(prompt_length, params)
        if budget < 1:
            raise ValueError(f"the prompts take {prompt_length} positions; the context window is {self._window}, "
                             "which leaves no room for an answer")
        cache_length = min(max(_next_power_of_two(prompt_length + budget), self.MIN_CACHE), self._window)
        sampling = Sampler.build(params, input_ids, attention_mask, self.vocab_size)

        # ---- prefill: images encoded, the prompt written into the static cache, the first token sampled
        embeds, extra = self.model.prepare_inputs(input_ids, pixel_values, image_sizes=image_sizes)
        context = extra.get(CONTEXT_KWARG)
        cross_shapes = None
        if context is not None:
            cross_shapes = [(*keys.shape[:2], _next_power_of_two(keys.shape[2]), keys.shape[3], keys.dtype)
                            for keys, _ in context.keys_values]
        slot = self._slot(batch, cache_length, cross_shapes)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        key_valid = torch.ones(batch, cache_length, dtype=torch.bool, device=self.device)
        key_valid[:, :prompt_length] = attention_mask.bool()
        query_index = torch.arange(prompt_length, device=self.device).unsqueeze(1)
        visible = (slot.key_index <= query_index) & key_valid[:, None, :]
        # A padding row sees itself, so that no attention row is empty (which would give NaN).
        visible = (visible | (slot.key_index == query_index)).unsqueeze(1)
        out = self.llm(inputs_embeds=embeds, attention_mask=_attention_mask(visible, self._additive_mask, embeds.dtype),
                       position_ids=positions, use_cache=True, logits_to_keep=1,
                       **{self._cache_argument: slot.cache}, **extra)
        check_blocks_ran(extra)
        step_extra = {}
        if context is not None:
            # Every new token comes after all of the prompt's images; the image K/V go to the static buffers.
            for (keys, values), (static_keys, static_values) in zip(context.keys_values, slot.cross_kv, strict=True):
                static_keys.zero_()
                static_values.zero_()
                static_keys[:, :, :keys.shape[2]] = keys
                static_values[:, :, :values.shape[2]] = values
            image_of_position, unseen_visible = context.image_of_position, context.unseen_visible
            if image_of_position is not None:  # images of different sizes: the buffer's extra positions are padding
                extra_positions = slot.cross_kv[0][0].shape[2] - image_of_position.shape[1]
                image_of_position = F.pad(image_of_position, (0, extra_positions), value=-1)
                if unseen_visible is not None:  # rows_without_image "attend_all": nor do rows without an image
                    unseen_visible = F.pad(unseen_visible, (0, extra_positions), value=False)
            padded = dataclasses.replace(context, keys_values=slot.cross_kv, image_of_position=image_of_position,
                                         unseen_visible=unseen_visible)
            step_extra[CONTEXT_KWARG] = padded.for_positions(context.images_per_sample.unsqueeze(1))
        tokens = sampling.next_tokens(out.logits[:, -1].float())
        del out, embeds, extra, context
        next_position = positions[:, -1:] + 1

        # ---- decode: queue step n + 1 on the device, then read token n on the host. On CUDA token n is copied
        # to pinned memory before step n + 1 is queued, so reading it waits for that copy only, not for the step.
        warm_key = (batch, cache_length, tuple(slot.cross_kv[0][0].shape) if step_extra else None)
        on_cuda = self.device.type == "cuda"
        host = torch.empty(batch, dtype=torch.long, pin_memory=True) if on_cuda else None
        for step in range(budget):
            copied = None
            if on_cuda:
                host.copy_(tokens, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            pending = tokens
            if step + 1 < budget:
                if self.compiled and on_cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                if CONTEXT_KWARG in step_extra:
                    step_extra[CONTEXT_KWARG].ran = []
                with self._guards(warm_key):
                    logits = self._step(self.llm, self._cache_argument, tokens.unsqueeze(1), next_position, key_valid,
                                        slot.key_index, slot.cache, self._additive_mask, step_extra)
                self._warm_keys.add(warm_key)
                tokens = sampling.next_tokens(logits)
                next_position = next_position + 1
            if copied is not None:
                copied.synchronize()
                yield host.tolist()[:real]
            else:
                yield pending.tolist()[:real]

    def _advance(self, row: _Row, token: int) -> StreamEvent | None:
        """Take one generated token for `row`; the event to emit, if any."""
        if token in self._eos_set and not row.params.ignore_eos:
            row.finish_reason = "stop"
            return StreamEvent(row.index, row.stopper.feed(row.detokenizer.flush())[0] + row.stopper.finish(), "stop",
                               row.completion_tokens)
        row.token_ids.append(token)
        piece, stopped = row.stopper.feed(row.detokenizer.add(token))
        if stopped:
            row.finish_reason = "stop"
            return StreamEvent(row.index, piece, "stop", row.completion_tokens)
        if row.completion_tokens >= row.max_new_tokens:
            tail, stopped = row.stopper.feed(row.detokenizer.flush())
            row.finish_reason = "stop" if stopped else "length"
            return StreamEvent(row.index, piece + tail + ("" if stopped else row.stopper.finish()), row.finish_reason,
                               row.completion_tokens)
        return StreamEvent(row.index, piece, None) if piece else None


def _end_of_turn_ids(processor) -> list[int]:

    config = getattr(processor, "config", None)
    return end_of_turn_ids(processor) if config is not None and hasattr(processor, "tokenizer") else []


def _as_ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _next_power_of_two(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


