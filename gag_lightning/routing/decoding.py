"""The server's batch decoder: greedy decoding of one request batch whose rows leave as soon as they are done."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gag_lightning.errors import GAGError
from gag_lightning.eval.generation import DecodingConfig

__all__ = ["greedy_shrinking"]


@torch.inference_mode()
def greedy_shrinking(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], decoding: DecodingConfig,
                     stop_ids: Sequence[int], limits: Sequence[int], embed_fn: Any = None,
                     share_prefix: bool = True, suppress_ids: Sequence[int] = ()) -> list[Any]:
    """Greedy decoding of one batch in which a row leaves as soon as it stops or reaches its own length.

    ``generate_batched``'s fixed batches compute every row until the longest one ends, and its continuous
    batching needs history-free logits processing; here the batch shrinks instead (the KV cache keeps the rows
    still going), and the repetition penalty and n-gram blocking see each row's generated tokens exactly as
    ``generate`` does when the prompt goes in as embeddings (the eval harness's decoding). One request batch
    of a server mixes short and long answers: the rows that are done stop costing compute. ``suppress_ids`` are
    never generated (the base's slot placeholder token), as in ``generate_batched``.
    """
    import inspect

    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    from gag_lightning.eval.generation import Generation, shared_prefix_batch, shared_prefix_len

    if decoding.do_sample:
        raise GAGError("greedy_shrinking decodes greedily; do_sample must be false")
    n = len(prompts)
    if not n:
        return []
    processors = LogitsProcessorList()
    if decoding.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(decoding.repetition_penalty)))
    if decoding.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(int(decoding.no_repeat_ngram_size)))
    stop_set = {int(t) for t in stop_ids}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stop_ids[0])
    device = next(model.parameters()).device
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out = model(use_cache=True, logits_to_keep=1, **({cache_name: cache} if cache is not None else {}), **kwargs)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out.logits[:, -1, :].float(), cache

    shared = shared_prefix_len(prompts) if share_prefix and n > 1 else 0
    ids, mask = shared_prefix_batch(prompts, shared, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    embeds = (embed_fn or (lambda i, m, r: model.get_input_embeddings()(i)))(ids, mask, list(range(n)))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    if shared:
        _, cache = forward(inputs_embeds=embeds[:1, :shared], attention_mask=mask[:1, :shared],
                           position_ids=positions[:1, :shared])
        cache.batch_repeat_interleave(n)
    logits, cache = forward(cache, inputs_embeds=embeds[:, shared:], attention_mask=mask,
                            position_ids=positions[:, shared:])
    history = torch.zeros((n, 0), dtype=torch.long, device=device)
    tokens: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    active = list(range(n))
    suppressed = torch.tensor(sorted({int(i) for i in suppress_ids if int(i) >= 0}), dtype=torch.long, device=device)
    for _ in range(max(limits)):
        if suppressed.numel():
            logits[:, suppressed] = float("-inf")
        nxt = processors(history, logits).argmax(dim=-1)
        keep = []
        for j, row in enumerate(active):
            token = int(nxt[j])
            if token in stop_set:
                finished[row] = True
                continue
            tokens[row].append(token)
            if len(tokens[row]) < int(limits[row]):
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, history, nxt = mask[index], history[index], nxt[index]
            active = [active[j] for j in keep]
        history = torch.cat([history, nxt[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits, cache = forward(cache, input_ids=nxt[:, None], attention_mask=mask,
                                position_ids=mask.sum(dim=-1, keepdim=True) - 1)
    return [Generation(tokenizer.decode(t, skip_special_tokens=True).strip(), t, f)
            for t, f in zip(tokens, finished, strict=True)]
