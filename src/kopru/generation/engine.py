"""Generation for all three strategies: left-padded batches, several images per prompt, greedy or sampled.

Images are encoded once, at prefill. For `cross_attention` the image keys/values of every gated block are
computed then and reused by each decoding step (`ImageContext`), as is the decode-step visibility mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache, PreTrainedModel, StaticCache

from kopru.budget import check_generation_fits
from kopru.connectors.cross_attention import CONTEXT_KWARG, check_blocks_ran
from kopru.llm import context_window
from kopru.messages import end_of_turn_ids, images_of, render_prompt, validate_messages


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    image_sizes: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Returns the new tokens [batch, <= max_new_tokens]; a finished row is filled with `pad_token_id`
    (default: the LLM config's pad id, else the first eos id, else 0). A row stops at `eos_token_id` (default:
    the LLM's generation config; `[]` never stops early). Tokens are chosen by `Sampler`, the engine's sampler:
    greedy unless `do_sample`; with one row and a generator seeded with s, the tokens the engine samples for a
    request with seed s.

    Prompts must be left padded (`processor(..., padding_side="left")`).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generation expects left-padded prompts: found padding at the end of a row")
    check_generation_fits(model, input_ids, attention_mask, max_new_tokens)  # refused before the model runs
    llm = model.llm
    if eos_token_id is None:
        eos_token_id = llm.generation_config.eos_token_id
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long, device=input_ids.device)
    params = SamplingParams(max_new_tokens=max(max_new_tokens, 1), temperature=temperature if do_sample else 0.0,
                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    batch = input_ids.shape[0]
    sampler = Sampler.build([params] * batch, input_ids, attention_mask, llm.get_output_embeddings().weight.shape[0],
                            generators=[generator] * batch)
    if pad_token_id is None:
        pad_token_id = llm.config.pad_token_id if llm.config.pad_token_id is not None else int(eos[0]) if len(eos) else 0

    embeds, extra = model.prepare_inputs(input_ids, pixel_values, image_sizes=image_sizes)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=llm.config)
    cache_kwargs = {model._cache_argument: cache}
    out = llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
              logits_to_keep=1, **cache_kwargs, **extra)
    check_blocks_ran(extra)
    step_extra = {}
    if CONTEXT_KWARG in extra:
        # Every new token comes after all of the prompt's images.
        context = extra[CONTEXT_KWARG]
        step_extra[CONTEXT_KWARG] = context.for_positions(context.images_per_sample.unsqueeze(1))

    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    next_position = position_ids[:, -1:] + 1
    tokens = []
    for _ in range(max_new_tokens):
        next_token = sampler.next_tokens(out.logits[:, -1].float())
        next_token = next_token.masked_fill(finished, pad_token_id)
        tokens.append(next_token)
        finished |= torch.isin(next_token, eos)
        if bool(finished.all()) or len(tokens) == max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        out = llm(input_ids=next_token.unsqueeze(1), attention_mask=attention_mask, position_ids=next_position,
                  use_cache=True, **cache_kwargs, **step_extra)
        next_position = next_position + 1
    if not tokens:
        return input_ids.new_zeros(batch, 0)
    return torch.stack(tokens, dim=1)


# ================================================================================================ engine
# A serving engine on top of the same model: a pre-allocated (static) key/value cache, one decode step with
# fixed shapes that torch.compile can capture whole, per-request sampling on device, stop strings and
# streaming text. `generate` above stays the simple reference loop the engine is tested against.


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # as HF's RepetitionPenaltyLogitsProcessor, over prompt + generated tokens
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    seed: int | None = None
    ignore_eos: bool = False  # keep going past eos (benchmarks that need exactly max_new_tokens)

    def __post_init__(self) -> None:
        problems = []
        # Written as "not (inside)": NaN compares False with everything and must fail every check, not pass it.
        if not self.max_new_tokens >= 1:
            problems.append(f"max_new_tokens >= 1 (found {self.max_new_tokens})")
        if not 0 <= self.temperature < math.inf:
            problems.append(f"a finite temperature >= 0 (found {self.temperature})")
        if not 0 <= self.top_k < 2**63:
            problems.append(f"0 <= top_k < 2**63 (found {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"0 < top_p <= 1 (found {self.top_p})")
        if not 0 < self.repetition_penalty < math.inf:
            problems.append(f"a finite repetition_penalty > 0 (found {self.repetition_penalty})")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:  # what torch.Generator.manual_seed takes
            problems.append(f"a seed within 64-bit signed integers (found {self.seed})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop strings to be non-empty strings (found {self.stop!r})")
        if problems:
            raise ValueError("invalid sampling parameters: expected " + "; ".join(problems))


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


class IncrementalDetokenizer:
    """Token ids in, text out, one token at a time, such that the pieces concatenate to the decoded whole.

    A byte-level BPE can split one character (Turkish "ş" is two UTF-8 bytes) across tokens: text is held back
    while its decoding ends in the replacement character. A few prompt tokens are decoded as left context, since
    SentencePiece-style tokenizers decode a leading word differently at the start of a text.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end is emitted as decoded)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""


class StopStringMatcher:
    """Accumulates text, cuts it at the first stop string (which may span tokens), and holds back only the tail
    that could still turn into one."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = list(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to emit now, whether a stop string was found)"""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            return self._emit(len(self.text)), True
        hold = 0
        for size in range(min(self.longest - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-size:]) for s in self.stop):
                hold = size
                break
        return self._emit(len(self.text) - hold), False

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return piece


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor, vectorised: a seen token's logit is divided by the penalty when
    positive, multiplied when negative. `seen` [B, V] bool, `penalty` [B, 1]."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row: keep the `top_k` best tokens (0 = all; tokens tied with the k-th stay, as in HF's
    TopKLogitsWarper), then the smallest set holding `top_p` of what is left; the rest become -inf.
    `top_k` [B] long, `top_p` [B] float. No host synchronisation."""
    vocab = logits.shape[-1]
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    keep_k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).unsqueeze(1)
    cut = ordered < ordered.gather(1, keep_k - 1)
    probs = ordered.masked_fill(cut, float("-inf")).softmax(-1)
    # Drop a token when the tokens ranked above it already hold top_p of the mass (the best one always stays).
    drop = (probs.cumsum(-1) - probs >= top_p.unsqueeze(1)) | cut
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


@dataclass
class Sampler:
    """The one sampler of both generation loops (the reference `generate` and the engine): per row, the repetition
    penalty (HF's rule), then temperature, top-k and top-p (`filter_top_k_top_p`), then a draw by exponential race
    from the row's own generator; temperature 0 is greedy, the argmax of the (penalised) logits. The sampling
    parameters of one batch are held as device tensors, with the state the penalty needs; a new sampling option is
    added here, once."""

    greedy_rows: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B, 1]
    top_k: torch.Tensor  # [B]
    top_p: torch.Tensor  # [B]
    penalty: torch.Tensor | None  # [B, 1], None when no row uses one
    seen: torch.Tensor | None  # [B, V] bool: tokens in the prompt or generated so far
    generators: list[torch.Generator | None]
    any_sampling: bool

    @classmethod
    def build(cls, params: list[SamplingParams], input_ids: torch.Tensor, attention_mask: torch.Tensor,
              vocab: int, generators: list[torch.Generator | None] | None = None) -> Sampler:
        """`params` one per row of the left-padded `input_ids` (the penalty counts the prompt's tokens);
        `generators` one per row (None: a generator seeded with each row's `seed`, the global RNG without one)."""
        device = input_ids.device
        batch = len(params)
        penalty = seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            penalty = torch.tensor([[p.repetition_penalty] for p in params], device=device, dtype=torch.float32)
            seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
            seen.scatter_(1, input_ids.clamp(max=vocab - 1), attention_mask.bool())
        if generators is None:
            generators = []
            for p in params:
                generator = None
                if p.seed is not None and p.temperature > 0:
                    generator = torch.Generator(device=device)
                    generator.manual_seed(p.seed)
                generators.append(generator)
        elif len(generators) != batch:
            raise ValueError(f"expected one generator (or None) per row ({batch}), found {len(generators)}")
        return cls(
            greedy_rows=torch.tensor([p.temperature == 0 for p in params], device=device),
            temperature=torch.tensor([[max(p.temperature, 1e-5)] for p in params], device=device),
            top_k=torch.tensor([p.top_k for p in params], device=device),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            penalty=penalty, seen=seen, generators=generators,
            any_sampling=any(p.temperature > 0 for p in params),
        )

    def next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] float logits -> [B] token ids, on device."""
        if self.penalty is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        tokens = logits.argmax(-1)
        if self.any_sampling:
            probs = filter_top_k_top_p(logits / self.temperature, self.top_k, self.top_p).softmax(-1)
            # Exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) draws from p, with a seed per row.
            noise = torch.empty_like(probs)
            for row, generator in enumerate(self.generators):
                noise[row].exponential_(generator=generator)
            tokens = torch.where(self.greedy_rows, tokens, (probs / noise).argmax(-1))
        if self.seen is not None:
            self.seen.scatter_(1, tokens.unsqueeze(1), True)
        return tokens


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
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        texts = [""] * len(prompts)
        rows: dict[int, _Row] = {}
        for event in self._stream(prompts, images, params, rows):
            texts[event.index] += event.text
        return [Completion(text, rows[index].finish_reason, rows[index].prompt_tokens, rows[index].completion_tokens,
                           rows[index].token_ids) for index, text in enumerate(texts)]

    def stream(self, prompts: list[str], images: list[list[Image.Image]],
               params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[StreamEvent]:
        """Events as tokens arrive; each request ends with exactly one event whose finish_reason is set.

        Prompts are formatted text (see `format_chat`) holding one image placeholder per image; they are
        tokenised as they are (no special tokens added). Raises ValueError before generating anything when a
        prompt does not fit the context window or its images do not match its placeholders."""
        return self._stream(prompts, images, params, {})

    # ------------------------------------------------------------------------------------------- internals
    def _stream(self, prompts, images, params, rows: dict) -> Iterator[StreamEvent]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = [list(per_prompt) for per_prompt in (images if images is not None else [[] for _ in prompts])]
        if len(images) != len(prompts):
            raise ValueError(f"expected one list of images per prompt ({len(prompts)}), found {len(images)}")
        params = params if params is not None else SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"expected one SamplingParams per prompt ({len(prompts)}), found {len(params)}")
        lengths = [self.count_prompt_tokens(p, i) for p, i in zip(prompts, images, strict=True)]
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


# ============================================================================================ chat format
def format_chat(processor, messages: list[dict], template: str = "chat") -> tuple[str, list[Image.Image]]:
    """Chat messages (`kopru.messages`: OpenAI-style, content a string or text / image parts) -> (the prompt
    with one image token per image, the images the parts carry, in order).

    "<image>" typed in string content is a placeholder whose image the caller passes itself. The prompt is
    rendered by `kopru.messages.render_prompt`: the tokenizer's chat template in the content form it expects,
    else Köprü's fallback template, with the generation prompt added; no training-only checks are run.
    """

    canonical = validate_messages(messages)
    return render_prompt(processor, canonical, template), images_of(canonical)
