"""Generation, by concern:

- `sampling`: `SamplingParams` and `Sampler`, the one sampler of both loops (greedy, temperature, top-k / top-p,
  repetition penalty, a seed per request);
- `streaming`: `IncrementalDetokenizer` (text per token, never a split character) and `StopStringMatcher`;
- `reference`: `generate`, the simple DynamicCache loop behind `model.generate`, which the engine is tested against;
- `engine`: `GenerationEngine`, static cache + compiled decode step, batched and streaming (`kopru chat` / `serve`);
- `chat_format`: `format_chat`, chat messages to a prompt and its images.
"""

from kopru.generation.chat_format import format_chat
from kopru.generation.engine import Completion, GenerationEngine, StreamEvent, decode_step
from kopru.generation.reference import generate
from kopru.generation.sampling import Sampler, SamplingParams, apply_repetition_penalty, filter_top_k_top_p
from kopru.generation.streaming import IncrementalDetokenizer, StopStringMatcher

__all__ = [
    "Completion", "GenerationEngine", "IncrementalDetokenizer", "Sampler", "SamplingParams", "StopStringMatcher",
    "StreamEvent", "apply_repetition_penalty", "decode_step", "filter_top_k_top_p", "format_chat", "generate",
]
