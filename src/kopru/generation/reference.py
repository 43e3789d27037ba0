"""The reference generation loop: a DynamicCache, one token per step, nothing compiled; the engine is tested
against it.

Images are encoded once, at prefill. For `cross_attention` the image keys/values of every gated block are
computed then and reused by each decoding step (`ImageContext`), as is the decode-step visibility mask.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kopru.budget import check_generation_fits
from kopru.connectors.cross_attention import CONTEXT_KWARG, check_blocks_ran
from kopru.generation.sampling import Sampler, SamplingParams


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
