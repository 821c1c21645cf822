"""A streaming greedy decoder for the memory stage: continuous batching with no drains, optional state capture.

The memory stage decodes thousands of backgrounds with one expert and one prompt template. Hugging Face
`generate` restarts per call, so a batcher built on it either waits for its slowest row or pays a restart
(and Python work per row) each time rows are swapped. This decoder owns the loop instead:

* `batch_size` rows are in flight at all times while prompts remain; a row that stops is reported at once through
  `on_finish` (the caller streams it to its store) and leaves the batch before the next step (the last rows of the
  batch move into the freed places: a copy of their KV cache, not of the whole cache); new prompts are admitted in
  groups (one prefill for several rows, the prompt prefix common to every record encoded once and
  its KV cache reused).
* the next token is the argmax of a screened output head where the CPU has bfloat16 dot products
  (memory/greedy_head.py: a bfloat16 product over the vocabulary, float32 on the few tokens that can still win; the
  float32 head's argmax at a third of its cost); elsewhere the model's own logits.
* the per-step bookkeeping (next token, stop test, lengths, which rows are done) is a handful of tensor ops over
  the batch; Python only runs per row when a row finishes or is admitted.
* with `capture` (hidden-state indices as in `output_hidden_states`), the states of those layers at the position
  where each generated token is the input are written into a per-slot buffer [slots, K, max_new, H] while
  decoding: only the configured layers, only the generated positions, nothing per step kept beyond that. A row
  cut by `max_new_tokens` rides one more step so its last token is fed too (the teacher-forced pass reads that
  position as well). The buffer of a finished row goes to the compressor and its slot is reused.

Rows of different lengths share one KV cache (memory/slab_cache.py: a step writes its column in place), aligned by
left padding (zeros in the cache, 0 in the attention mask); positions are counted on the mask, so a row computes
what it would alone, up to float rounding. Leading columns no row uses any more are trimmed whenever rows leave. Greedy only: sampling keeps the project's
`generate_batched` path (eval.generation), whose per-batch seeding a stream cannot reproduce.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gag_lightning.memory.greedy_head import ScreenedGreedyHead, screening_supported
from gag_lightning.memory.prefix_attention import shared_prefix
from gag_lightning.memory.slab_cache import SlabCache, fill_order, slab_layers

__all__ = ["Finished", "StreamingDecoder"]


@dataclass
class Finished:
    """One decoded row: its record index, generated tokens (stop excluded) and whether a stop token ended it."""

    index: int
    token_ids: list[int]
    finished: bool


#: Called with the rows that finished in one step, and their captured states per layer: a list of K tensors
#: [n, T, H] (row r uses positions 0 .. len(token_ids[r]) - 1), or None without capture.
FinishHook = Callable[[list[Finished], list[Tensor] | None], None]


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


class StreamingDecoder:
    """Greedy continuous-batching decoder over a fixed set of prompts (see the module docstring).

    `prompts` maps a record index to its prompt token ids (each at least 2 tokens long). `capture` lists hidden
    state indices (`compression.layer_indices`), in the order the compressor wants them, or is empty.
    `refill` is how many free slots trigger an admission while prompts remain (default batch_size // 4: one
    prefill for several rows costs about what one costs, and a stopped row waiting a few steps costs little).
    """

    def __init__(self, model: Any, prompts: dict[int, Sequence[int]], stop_ids: Sequence[int], max_new_tokens: int,
                 batch_size: int, capture: Sequence[int] = (), share_prefix: bool = True, pad_id: int = 0,
                 refill: int | None = None, screen_head: bool | None = None) -> None:
        if not stop_ids:
            raise ValueError("stop_ids is empty: the decoder would never stop")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        short = [i for i, p in prompts.items() if len(p) < 2]
        if short:
            raise ValueError(f"prompt(s) of record(s) {short[:5]} have fewer than 2 tokens")
        if not _full_attention_only(model):
            raise TypeError(f"{type(model).__name__} uses sliding-window attention layers; the streaming decoder "
                            "keeps full-attention caches only (use memory.extract=teacher_forced)")
        self.model = model
        self.prompts = {int(i): [int(t) for t in p] for i, p in prompts.items()}
        self.max_new = int(max_new_tokens)
        self.width = int(batch_size)
        self.capture = [int(i) for i in capture]
        self.pad_id = int(pad_id)
        self.refill = max(1, int(refill) if refill is not None else self.width // 4)
        self.prefill_rows = 16  # rows per prefill call: a few hundred tokens keep the matmuls at full speed
        self.device = next(model.parameters()).device
        self.stops = torch.tensor(sorted({int(s) for s in stop_ids}), device=self.device)
        # greedy tokens from the body's last hidden state through a screened head (memory/greedy_head.py), or
        # from the model's own logits; None: screened where the CPU has bfloat16 dot products
        self.head = _screened_head(model, screen_head)
        self.net = model.get_decoder() if self.head is not None else model
        params = inspect.signature(self.net.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.prefix = 0
        # the shared prefix is attended to once (memory/prefix_attention.py: the CPU's flash kernel); on other
        # devices every row keeps its own copy in its cache
        if share_prefix and len(self.prompts) > 1 and self.device.type == "cpu":
            from gag_lightning.eval.generation import shared_prefix_len

            # every row keeps at least one prompt token of its own before the last (its cache is never empty)
            shortest = min(len(p) for p in self.prompts.values())
            self.prefix = min(shared_prefix_len([p[:-1] for p in self.prompts.values()]), shortest - 2)
        self._prefix_layers: list[tuple[Tensor, Tensor]] | None = None
        self.steps = 0  # decoding steps run (a profile's denominator)

    # ------------------------------------------------------------------ model calls

    def _forward(self, ids: Tensor, mask: Tensor, cache: Any, hidden: bool, offset: int | None = None) -> Any:
        # positions count the row's own columns on the mask, after the shared prefix's
        offset = self.prefix if offset is None else offset
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:] + offset
        kw = {self.cache_name: cache if cache is not None else SlabCache()}
        if self.head is None:
            kw["logits_to_keep"] = 1
        return self.net(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        output_hidden_states=hidden, return_dict=True, **kw)

    def _next_tokens(self, out: Any) -> Tensor:
        if self.head is None:
            return out.logits[:, -1].argmax(dim=-1)
        return self.head.argmax(out.last_hidden_state[:, -1])

    def _encode_prefix(self) -> list[tuple[Tensor, Tensor]]:
        """Keys and values of the prompt prefix every row shares, [1, kv_heads, P, head_dim] per layer."""
        head = torch.tensor([next(iter(self.prompts.values()))[:self.prefix]], device=self.device)
        cache = _cache_of(self._forward(head, torch.ones_like(head), None, False, offset=0))
        return [(layer.keys, layer.values) for layer in slab_layers(cache)]

    def _admit(self, rows: list[int]) -> tuple[Any, Tensor, Tensor]:
        """KV cache and mask of the rows' own prompt tokens but the last ([padding | own], after the shared prefix),
        and their last prompt token (the first input of their decoding). `rows` come sorted by that length; they are
        encoded `prefill_rows` at a time, so that a group pads to its own longest row, not the batch's."""
        cache, mask = None, None
        for start in range(0, len(rows), self.prefill_rows):
            group = rows[start:start + self.prefill_rows]
            rests = [self.prompts[r][self.prefix:-1] for r in group]
            width = max(len(r) for r in rests)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            m_new = torch.zeros((len(group), width), dtype=torch.long)
            for k, rest in enumerate(rests):
                ids[k, width - len(rest):] = torch.tensor(rest, dtype=torch.long)
                m_new[k, width - len(rest):] = 1
            ids, m_new = ids.to(self.device), m_new.to(self.device)
            c_new = _cache_of(self._forward(ids, m_new, None, False))
            cache, mask = (c_new, m_new) if cache is None else _merge(cache, mask, c_new, m_new)
        last = torch.tensor([self.prompts[r][-1] for r in rows], dtype=torch.long, device=self.device)
        return cache, mask, last

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()
    def run(self, order: Sequence[int], on_finish: FinishHook) -> None:
        """Decode the prompts of `order` (admitted in that order) until every row has finished."""
        if not order:
            return
        if not self.prefix:
            self._loop(order, on_finish)
            return
        if self._prefix_layers is None:
            self._prefix_layers = self._encode_prefix()
        with shared_prefix(self.model, self._prefix_layers):
            self._loop(order, on_finish)

    def _loop(self, order: Sequence[int], on_finish: FinishHook) -> None:
        queue = [int(i) for i in order]
        dev, width, max_new, capture = self.device, self.width, self.max_new, bool(self.capture)
        tokens = torch.zeros((width, max_new), dtype=torch.long, device=dev)  # per slot
        buffer: Tensor | None = None  # [slots, K, max_new, H], allocated on the first captured step
        free = list(range(width))  # slots not in use
        rows: list[int] = []  # record index per batch row
        slot = torch.zeros(0, dtype=torch.long, device=dev)  # slot per batch row
        count = torch.zeros(0, dtype=torch.long, device=dev)  # tokens generated per batch row
        cache: Any = None
        mask = torch.zeros((0, 0), dtype=torch.long, device=dev)
        last = torch.zeros(0, dtype=torch.long, device=dev)
        alive = torch.zeros(0, dtype=torch.bool, device=dev)  # False: reported, leaves before the next step
        dead = 0
        while queue or dead < len(rows):
            if dead:
                # drop the reported rows before the next step (the last rows move into their places: a copy of
                # theirs, not of the cache), free their slots, and trim cache columns no row uses any more
                keep = fill_order(alive)
                free += slot[~alive].tolist()
                rows = [rows[j] for j in keep.tolist()]
                dead = 0
                if not rows:
                    cache, mask = None, mask[:0]
                    slot, count, last, alive = slot[:0], count[:0], last[:0], alive[:0]
                else:
                    cache.keep_rows(keep)
                    mask, slot, count, last, alive = mask[keep], slot[keep], count[keep], last[keep], alive[keep]
                    used = mask.any(dim=0).nonzero()
                    start = int(used[0]) if len(used) else 0
                    if start:
                        mask = mask[:, start:]
                        cache.trim_left(start)
            if queue and not dead and (len(free) >= self.refill or not rows):
                take = min(len(free), len(queue))
                new, queue = queue[:take], queue[take:]
                new.sort(key=lambda r: len(self.prompts[r]))  # prefill groups of similar lengths (see _admit)
                new_slots, free = free[:take], free[take:]
                c_new, m_new, l_new = self._admit(new)
                if rows:
                    cache, mask = _merge(cache, mask, c_new, m_new)
                else:
                    cache, mask = c_new, m_new
                rows += new
                slot = torch.cat([slot, torch.tensor(new_slots, dtype=torch.long, device=dev)])
                count = torch.cat([count, torch.zeros(len(new), dtype=torch.long, device=dev)])
                last = torch.cat([last, l_new])
                alive = torch.cat([alive, torch.ones(len(new), dtype=torch.bool, device=dev)])
            if not rows:
                continue
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            out = self._forward(last[:, None], mask, cache, capture)
            cache = _cache_of(out)
            self.steps += 1
            if capture:
                hidden = out.hidden_states
                states = torch.stack([hidden[i][:, -1] for i in self.capture], dim=1)  # [B, K, H]
                del hidden
                if buffer is None:
                    buffer = states.new_zeros((width, len(self.capture), max_new, states.shape[-1]))
                # the input of this step is generated token count-1 (count 0: the last prompt token, overwritten
                # at index 0 by the next step)
                buffer[slot, :, (count - 1).clamp(min=0)] = states
            nxt = self._next_tokens(out)
            del out  # its logits and hidden states would otherwise live through the next forward
            producing = alive & (count < max_new)  # alive and not: a row cut by max_new whose last token was fed
            at = count.clamp(max=max_new - 1)
            tokens[slot, at] = torch.where(producing, nxt, tokens[slot, at])
            stopped = producing & torch.isin(nxt, self.stops)
            count = count + producing.long()
            done = stopped | (alive & ~producing) if capture else stopped | (producing & (count >= max_new))
            last = nxt
            if not bool(done.any()):
                continue
            # rows finish: report them now (the caller streams them to its store); they leave before the next step
            lengths = (count - stopped.long()).tolist()
            done_rows = done.nonzero().flatten()
            done_list = done_rows.tolist()
            stopped_list = stopped.tolist()
            ended = [Finished(rows[j], tokens[slot[j], :lengths[j]].tolist(), bool(stopped_list[j]))
                     for j in done_list]
            states_out = None
            if capture and buffer is not None:
                longest = max(1, max(lengths[j] for j in done_list))
                done_slots = slot[done_rows]
                states_out = [buffer[done_slots, k, :longest] for k in range(len(self.capture))]
            on_finish(ended, states_out)
            alive = alive & ~done
            dead += len(done_list)


def _screened_head(model: Any, wanted: bool | None) -> ScreenedGreedyHead | None:
    """The screened greedy head over `model`'s output layer, where it applies (see StreamingDecoder)."""
    if wanted is False:
        return None
    head, body = model.get_output_embeddings(), getattr(model, "get_decoder", lambda: None)()
    usable = (isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32 and body is not None
              and body is not model)
    if wanted and not usable:
        raise ValueError(f"{type(model).__name__} has no float32 linear output head over a separate body to screen")
    if not usable or (wanted is None and not screening_supported(head.weight.device)):
        return None
    return ScreenedGreedyHead(head.weight, head.bias)


def _merge(cache: Any, mask: Tensor, c_new: Any, m_new: Tensor) -> tuple[Any, Tensor]:
    """Append new rows to the batch: left-pad the shorter of the two caches (and masks) to a common width."""
    target = max(mask.shape[1], m_new.shape[1])
    cache.append_rows(c_new, target)
    return cache, torch.cat([_pad_mask(mask, target), _pad_mask(m_new, target)])


def _pad_mask(m: Tensor, target: int) -> Tensor:
    n = target - m.shape[1]
    return m if n <= 0 else torch.cat([m.new_zeros((m.shape[0], n)), m], dim=1)


def _full_attention_only(model: Any) -> bool:
    """Whether every layer of `model` attends to the whole sequence (no sliding-window layers)."""
    config = getattr(model, "config", None)
    if config is None:
        return True
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return False
    return not (getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None))
