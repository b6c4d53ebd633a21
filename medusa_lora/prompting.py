"""The prompt contract: how a prompt (text or chat turns) becomes the token ids ``generate()`` is given, and
which tokens end the model's turn.

Training, distillation, the eval, the CLI, the server and the benchmarks all go through ``PromptFormat``, so a
prompt is tokenised the same way everywhere: the chat template applied to the turns with
``add_generation_prompt=True`` (or the raw text), without added special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from transformers import PreTrainedTokenizerBase

from medusa_lora.errors import ConfigError

Message = dict[str, str]
Prompt = str | list[Message]  # a user message, or chat turns ending before the assistant's answer


@dataclass(frozen=True)
class PromptFormat:
    """Prompt -> token ids, and the end-of-turn ids that close an answer (what generation stops at)."""

    tokenizer: PreTrainedTokenizerBase
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        if self.use_chat_template and not self.tokenizer.chat_template:
            raise ConfigError(
                "the tokenizer has no chat template; use raw prompts (use_chat_template false / --no-chat-template)"
            )

    def text(self, prompt: Prompt) -> str:
        """The prompt as text: the template's turns plus the assistant header, or the raw text."""
        if not self.use_chat_template:
            if not isinstance(prompt, str):
                raise ConfigError("chat turns need the chat template (use_chat_template true)")
            return prompt
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)

    def encode(self, prompt: Prompt) -> list[int]:
        """The token ids ``generate()`` sees for ``prompt``."""
        return self.tokenizer(self.text(prompt), add_special_tokens=False).input_ids

    def encode_answer(self, completion: str) -> list[int]:
        """An assistant answer's ids, closed by the end-of-turn ids (what training labels)."""
        return self.tokenizer(completion, add_special_tokens=False).input_ids + self.end_ids

    @cached_property
    def end_ids(self) -> list[int]:
        """What closes an assistant turn: with a chat template, what it writes after an assistant message up
        to its first special token (``<|im_end|>`` for ChatML); else the tokenizer's EOS."""
        if self.use_chat_template:
            ids = _template_end_ids(self.tokenizer)
            if ids:
                return ids
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    def stop_ids(self, model_eos: Sequence[int] = ()) -> list[int]:
        """Tokens that end generation: the end of the assistant turn (its last id) and the model's EOS ids."""
        return sorted(set(self.end_ids[-1:]) | set(model_eos))


def _template_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    user = [{"role": "user", "content": "?"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "x"}], tokenize=False)
    if not full.startswith(prompt + "x"):
        return []
    suffix = tokenizer(full[len(prompt) + 1 :], add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids)
    for i, token in enumerate(suffix):
        if token in special:
            return suffix[: i + 1]
    return []
