"""Refuse a prompt that does not fit the model: prompt tokens + tokens to generate > max_position_embeddings.

Beyond its trained positions a model still "answers" (a 13,462-token query on a 2,048-position base decodes
garbage with exit status 0); an error naming the input is the useful outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gag_lightning.errors import ContextLengthError

_LIMIT_NAMES = ("max_position_embeddings", "n_positions", "max_sequence_length")


def max_positions(model: Any) -> int | None:
    """The number of positions the model was built for (its config's max_position_embeddings), or None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in _LIMIT_NAMES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_prompts_fit(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      labels: Sequence[str] | None = None) -> None:
    """Raise `ContextLengthError` for the first prompt whose length + `max_new_tokens` exceeds the model's positions.

    `labels[i]` names prompt i for the message (e.g. "<file>, line 7: field 'question'"); by default its 1-based
    position among the prompts."""
    limit = max_positions(model)
    if limit is None:
        return
    for i, prompt in enumerate(prompts):
        need = len(prompt) + int(max_new_tokens)
        if need > limit:
            where = labels[i] if labels is not None else f"prompt {i + 1} of {len(prompts)}"
            raise ContextLengthError(
                f"{where}: the prompt is {len(prompt)} tokens, and with max_new_tokens={int(max_new_tokens)} needs "
                f"{need} positions, more than the model's max_position_embeddings={limit}; shorten the input or "
                "lower max_new_tokens"
            )


__all__ = ["check_prompts_fit", "max_positions"]
