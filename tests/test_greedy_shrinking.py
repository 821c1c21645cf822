"""The server's batch decoder: greedy with the eval decoding's penalties, rows leaving the batch when done,
token for token what generate_batched (the eval harness's decoding) gives."""

from __future__ import annotations

from dataclasses import replace

from gag_lightning.eval.generation import DecodingConfig, generate_batched
from gag_lightning.prompts import render_prompt, stop_token_ids
from gag_lightning.routing.answer import greedy_shrinking


def _prompts(tokenizer) -> list[list[int]]:
    questions = ["What colour is Sylvorax-53?", "Who discovered the compound Veltrium oxide in the lab?",
                 "Capital of France?", "Describe the melting point of Ulmerix-41 and where it is produced."]
    return [tokenizer(render_prompt(tokenizer, [{"role": "user", "content": f"Answer concisely.\nQuestion: {q}"}]),
                      add_special_tokens=False)["input_ids"] for q in questions]


def test_greedy_shrinking_matches_generate_batched(base, tokenizer) -> None:
    base.eval()
    prompts = _prompts(tokenizer)
    stops = stop_token_ids(tokenizer, base.generation_config)
    decoding = DecodingConfig(max_new_tokens=12, repetition_penalty=1.05, no_repeat_ngram_size=3, batch_size=16)
    want = generate_batched(base, tokenizer, prompts, decoding, stops, share_prefix=True)
    got = greedy_shrinking(base, tokenizer, prompts, decoding, stops, [12] * len(prompts))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.finished for g in got] == [w.finished for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    # each row at its own length: the first tokens of its full answer, cut (not finished) where it was longer
    limits = [1, 5, 12, 3]
    short = greedy_shrinking(base, tokenizer, prompts, decoding, stops, limits)
    for s, w, n in zip(short, want, limits, strict=True):
        assert s.token_ids == w.token_ids[:n]
        assert s.finished == (w.finished and len(w.token_ids) < n)
    # plain greedy (no penalties) too, and a batch of one
    plain = replace(decoding, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert [g.token_ids for g in greedy_shrinking(base, tokenizer, prompts[:1], plain, stops, [12])] == \
        [g.token_ids for g in generate_batched(base, tokenizer, prompts[:1], plain, stops)]


def test_greedy_shrinking_never_emits_a_suppressed_id(base, tokenizer) -> None:
    """The base's slot placeholder token is suppressed as generate_batched suppresses it."""
    base.eval()
    prompts = _prompts(tokenizer)
    stops = stop_token_ids(tokenizer, base.generation_config)
    decoding = DecodingConfig(max_new_tokens=8, batch_size=16)
    free = greedy_shrinking(base, tokenizer, prompts, decoding, stops, [8] * len(prompts))
    banned = [free[0].token_ids[0]]  # the first row's first choice
    got = greedy_shrinking(base, tokenizer, prompts, decoding, stops, [8] * len(prompts), suppress_ids=banned)
    want = generate_batched(base, tokenizer, prompts, decoding, stops, share_prefix=True, suppress_ids=banned)
    assert all(banned[0] not in g.token_ids for g in got)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
