"""Peer methods timed like ``generate()``: transformers' assisted generation with prompt lookup."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel

from medusa_lora.generation import GenerationOutput, GenerationStats

PROMPT_LOOKUP_TOKENS = 10


class _FirstTokenClock:
    """A streamer that notes when the first new token arrives (transformers first puts the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


@torch.inference_mode()
def prompt_lookup_generate(
    model: PreTrainedModel | PeftModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    num_tokens: int = PROMPT_LOOKUP_TOKENS,
) -> GenerationOutput:
    """Greedy ``model.generate(..., prompt_lookup_num_tokens=num_tokens)`` on token ids, with our stats.

    ``accepted_lengths`` stays empty: transformers does not report its steps.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    eos = list(eos_token_ids)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        prompt_lookup_num_tokens=num_tokens,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,
    )
    clock = _FirstTokenClock()
    start = time.perf_counter()
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        streamer=clock,
    )
    tokens = output[0, input_ids.shape[1] :].tolist()  # on the clock: a CUDA sync, as in generate()
    wall = time.perf_counter() - start
    stats = GenerationStats(
        new_tokens=len(tokens),
        prompt_tokens=input_ids.shape[1],
        wall_time_s=wall,
        time_to_first_token_s=(clock.first_token_at or start + wall) - start,
    )
    return GenerationOutput(tokens, stats)
