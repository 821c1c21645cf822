"""memory.extract=during_generation: one decoding pass gives the backgrounds and memories of the two-pass build."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_memory_stage as two_pass
import torch
from test_memory_stage import COMPRESSION, CONFIG, KEYS, MAX_NEW, Killed, make_store, rows, settings

from gag_lightning.errors import GAGError
from gag_lightning.eval.generation import DecodingConfig, generate_batched
from gag_lightning.memory.background import background_prompt_ids
from gag_lightning.memory.bank import BackgroundStore, MemoryBank, MemorySchema, settings_fingerprint
from gag_lightning.memory.compression import layer_indices
from gag_lightning.memory.decode import StreamingDecoder
from gag_lightning.memory.extract import CompressionConfig, build_memory_bank
from gag_lightning.memory.onepass import build_in_one_pass

# the module fixtures of the two-pass tests: the perturbed tiny expert, its records, and stop ids that make some
# records stop at once and others run to max_new_tokens
expert, records, stops = two_pass.expert, two_pass.records, two_pass.stops


def onepass(tmp: Path, expert, records, stops, batch_size: int, compression: CompressionConfig = COMPRESSION,
            name: str = "", **kw) -> tuple[BackgroundStore, MemoryBank]:
    model, tokenizer = expert
    bg, mem = tmp / f"bg{name}", tmp / f"mem{name}"
    schema = MemorySchema(expert_fingerprint="tiny-perturbed", layer_keys=list(compression.layer_keys),
                          slots=compression.slots, hidden_size=64, dtype=compression.dtype,
                          background_fingerprint=settings_fingerprint(settings(stops)))
    build_in_one_pass(model, tokenizer, records, bg, settings(stops), CONFIG, stops, mem, schema, compression,
                      batch_size=batch_size, progress=False, **kw)
    return BackgroundStore.open(bg), MemoryBank.open(mem)


@pytest.mark.parametrize("screen_head", [True, False])
def test_streaming_decoder_gives_the_tokens_of_batch_1_generate(expert, records, stops, screen_head) -> None:
    model, tokenizer = expert
    prompts = background_prompt_ids(tokenizer, records, CONFIG)
    one = generate_batched(model, tokenizer, prompts, DecodingConfig(max_new_tokens=MAX_NEW, batch_size=1), stops)
    for width, capture in ((1, ()), (3, layer_indices(KEYS)), (16, ())):
        got: dict[int, tuple[list[int], bool]] = {}

        def keep(ended, states, got=got) -> None:
            for e in ended:
                assert e.index not in got
                got[e.index] = (e.token_ids, e.finished)

        decoder = StreamingDecoder(model, dict(enumerate(prompts)), stops, MAX_NEW, width, capture=capture,
                                   pad_id=tokenizer.pad_token_id, screen_head=screen_head)
        assert (decoder.head is not None) == screen_head
        assert decoder.prefix > 0  # the system prompt is shared: attended to once for all rows
        decoder.run(sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i)), keep)
        assert [got[i] for i in range(len(prompts))] == [(g.token_ids, g.finished) for g in one], width


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_during_generation_equals_teacher_forced(tmp_path, expert, records, stops, batch_size) -> None:
    model, _ = expert
    two = make_store(tmp_path / "bg-two", expert, records, stops, batch_size=4)
    schema = MemorySchema(expert_fingerprint="tiny-perturbed", layer_keys=list(KEYS), slots=4, hidden_size=64,
                          dtype="float32", background_fingerprint=two.fingerprint)
    build_memory_bank(model, two.read_all(), tmp_path / "m-two", schema, COMPRESSION, batch_size=4, progress=False)
    forced = MemoryBank.open(tmp_path / "m-two")
    store, bank = onepass(tmp_path, expert, records, stops, batch_size)
    assert rows(store) == rows(two)  # the same backgrounds, row for row
    assert store.fingerprint == two.fingerprint
    assert bank.schema == forced.schema and bank.metas() == forced.metas()
    lengths = [m["num_generated_tokens"] for m in bank.metas()]
    assert 0 in lengths and MAX_NEW in lengths  # stopped at once, and cut by max_new_tokens, both covered
    torch.testing.assert_close(bank.memories(), forced.memories(), atol=1e-4, rtol=0)
    assert not torch.equal(bank.memories()[0], bank.memories()[1])


def test_kill_and_resume_finishes_the_same_bank(tmp_path, expert, records, stops) -> None:
    _, whole = onepass(tmp_path, expert, records, stops, 4, name="-whole")

    def kill_after(n: int):
        def hook(done: int) -> None:
            if done == n:
                raise Killed

        return hook

    half = CompressionConfig(layer_keys=KEYS, slots=4, dtype="float32")
    with pytest.raises(Killed):  # shard_size 3: some finished rows are in the store but not yet banked
        onepass(tmp_path, expert, records, stops, 4, half, shard_size=3, on_batch=kill_after(5))
    stored, banked = len(BackgroundStore.open(tmp_path / "bg")), len(MemoryBank.open(tmp_path / "mem"))
    assert 0 < banked < stored < len(records)
    store, bank = onepass(tmp_path, expert, records, stops, 4, half, shard_size=3)
    assert rows(store) == rows(BackgroundStore.open(tmp_path / "bg-whole"))
    assert bank.metas() == whole.metas()
    # in-flight rows are batched with other neighbours after a resume: equal up to float rounding, not bit for bit
    torch.testing.assert_close(bank.memories(), whole.memories(), atol=1e-4, rtol=0)


def test_sampling_is_refused(tmp_path, expert, records, stops) -> None:
    from dataclasses import replace

    model, tokenizer = expert
    with pytest.raises(GAGError, match="teacher_forced"):
        build_in_one_pass(model, tokenizer, records, tmp_path / "bg", settings(stops), replace(CONFIG, do_sample=True),
                          stops, tmp_path / "m", None, COMPRESSION)  # type: ignore[arg-type]


def test_extract_keys_the_memory_artifact_only_when_it_is_not_teacher_forced(compose_cfg) -> None:
    from gag_lightning.keys import artifact_dir, stage_key

    one = compose_cfg(["experiment=smoke"])
    assert one.memory.extract == "during_generation"  # the cpu preset's default
    two = compose_cfg(["experiment=smoke", "memory.extract=teacher_forced"])
    assert "extract" not in stage_key(two, "memory")  # a teacher-forced key is what it was before the option
    assert stage_key(one, "memory") == {**stage_key(two, "memory"), "extract": "during_generation"}
    assert artifact_dir(one, "memory") != artifact_dir(two, "memory")
    assert artifact_dir(one, "backgrounds") == artifact_dir(two, "backgrounds")  # the same backgrounds either way
    # the memory stage's own batch size, 64 on the CPU preset; evaluation keeps hardware.generation_batch_size
    assert one.memory.generation.batch_size == one.hardware.memory_batch_size
    assert one.eval.decoding.batch_size == one.hardware.generation_batch_size
