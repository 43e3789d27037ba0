"""Sampling: the parameters of a request and the one sampler both generation loops use.

`Sampler` turns a batch's last-position logits into tokens on the device: repetition penalty (HF's rule),
temperature, top-k (ties with the k-th kept, as HF), top-p, and a draw by exponential race from each row's own
generator, so that a seeded request samples the same tokens whatever it is batched with; temperature 0 is greedy.
The reference loop (`kopru.generation.reference.generate`) and the engine (`kopru.generation.engine`) both call it,
so a sampling option is added here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
