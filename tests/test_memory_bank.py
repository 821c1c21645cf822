"""MemoryBank and BackgroundStore: round trips, crash-safe resume, schema refusal, no pickle."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gag_lightning.memory.bank as bank_module
from gag_lightning.errors import GAGError, MissingArtifactError, RecordError, SchemaMismatchError
from gag_lightning.memory.bank import BackgroundStore, MemoryBank, MemorySchema, settings_fingerprint

REPO = Path(__file__).resolve().parents[1]
SHAPE = (2, 3, 8)  # K, S, H


def schema(**overrides: object) -> MemorySchema:
    base = dict(expert_fingerprint="expert-abc", layer_keys=["last", "minus2"], slots=3, hidden_size=8)
    base.update(overrides)
    return MemorySchema(**base)  # type: ignore[arg-type]


def records(indices: list[int]) -> tuple[list[dict], torch.Tensor]:
    metas = [
        {
            "index": i,
            "id": f"q{i}",
            "question": f"question {i}?",
            "answer": f"answer {i} — ünïcode",
            "background": f"background text {i}",
            "num_generated_tokens": 10 + i,
        }
        for i in indices
    ]
    mems = torch.stack([torch.linspace(-9, 9, 48).view(SHAPE) * ((i % 7) + 1) / 7 for i in indices])
    return metas, mems


def assert_only_safe_files(folder: Path) -> None:
    for path in folder.iterdir():
        assert path.suffix in {".json", ".jsonl", ".safetensors"}, path
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"


# ---------------------------------------------------------------- MemoryBank


def test_round_trip_ordered_by_index(tmp_path: Path) -> None:
    sch = schema()
    bank = MemoryBank.open_for_writing(tmp_path / "bank", sch)
    m1, x1 = records([3, 4, 5])
    m0, x0 = records([0, 1, 2])
    bank.write_shard(m1, x1)  # out of index order on purpose
    bank.write_shard(m0, x0)
    assert bank.done_indices() == {0, 1, 2, 3, 4, 5}

    read = MemoryBank.open(tmp_path / "bank")
    assert read.schema == sch and len(read) == 6
    assert read.indices() == [0, 1, 2, 3, 4, 5]
    _, expected = records([0, 1, 2, 3, 4, 5])
    mems = read.memories()
    assert mems.dtype == torch.float32 and mems.shape == (6, *SHAPE)
    assert torch.allclose(mems, expected, atol=1e-2)  # float16 storage
    assert torch.equal(mems, expected.half().float())
    meta, mem = read[4]
    assert meta["answer"] == "answer 4 — ünïcode" and meta["num_generated_tokens"] == 14
    assert mem.dtype == torch.float32 and torch.equal(mem, expected[4].half().float())
    assert read.memories(dtype=None).dtype == torch.float16
    assert [m["id"] for m in read.metas()] == [f"q{i}" for i in range(6)]
    assert json.loads((tmp_path / "bank" / "schema.json").read_text())["slots"] == 3
    assert_only_safe_files(tmp_path / "bank")


def test_float32_storage_is_exact(tmp_path: Path) -> None:
    bank = MemoryBank.open_for_writing(tmp_path, schema(dtype="float32"))
    metas, mems = records([0, 1])
    bank.write_shard(metas, mems)
    assert torch.equal(MemoryBank.open(tmp_path).memories(), mems)


def test_shards_are_plain_safetensors(tmp_path: Path) -> None:
    bank = MemoryBank.open_for_writing(tmp_path, schema())
    shard = bank.write_shard(*records([7, 8]))
    assert shard.name == "shard-r000-000000.safetensors"
    tensors = load_file(shard)
    assert set(tensors) == {"memories", "indices"}
    assert tensors["indices"].dtype == torch.int64 and tensors["indices"].tolist() == [7, 8]
    assert tensors["memories"].dtype == torch.float16 and tensors["memories"].shape == (2, *SHAPE)
    lines = shard.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["index"] for line in lines] == [7, 8]


def test_no_pickle_anywhere_in_the_code() -> None:
    source = Path(bank_module.__file__).read_text()
    for banned in ("import pickle", "torch.save", "torch.load("):
        assert banned not in source


def _write_all(folder: Path, chunks: list[list[int]]) -> None:
    bank = MemoryBank.open_for_writing(folder, schema())
    done = bank.done_indices()
    for chunk in chunks:
        todo = [i for i in chunk if i not in done]
        if todo:
            bank.write_shard(*records(todo))


def _same_bank(a: Path, b: Path) -> None:
    ra, rb = MemoryBank.open(a), MemoryBank.open(b)
    assert ra.metas() == rb.metas()
    assert torch.equal(ra.memories(), rb.memories())
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def test_resume_after_leftovers_of_a_kill(tmp_path: Path) -> None:
    chunks = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    _write_all(tmp_path / "clean", chunks)

    folder = tmp_path / "killed"
    bank = MemoryBank.open_for_writing(folder, schema())
    bank.write_shard(*records(chunks[0]))
    # a kill after the metadata was renamed in, while the tensors were still a temp file
    metas, _ = records(chunks[1])
    (folder / "shard-r000-000001.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas))
    (folder / ".shard-r000-000001.safetensors.tmp").write_bytes(b"\x00partial")
    (folder / ".shard-r000-000002.jsonl.tmp").write_text('{"index": 8')
    assert MemoryBank.open(folder).indices() == [0, 1, 2, 3]  # readers ignore uncommitted shards

    resumed = MemoryBank.open_for_writing(folder, schema())
    assert resumed.done_indices() == {0, 1, 2, 3}
    assert not (folder / "shard-r000-000001.jsonl").exists()
    _write_all(folder, chunks)
    _same_bank(tmp_path / "clean", folder)
    assert_only_safe_files(folder)


_KILL_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import gag_lightning.memory.bank as bm
sys.path.insert(0, {tests!r})
from test_memory_bank import records, schema
bank = bm.MemoryBank.open_for_writing({folder!r}, schema())
bank.write_shard(*records([0, 1, 2, 3]))
real = bm.atomic_write_bytes  # the one atomic write (artifacts.atomic_write_bytes)
def dying(path, data, tmp=None):
    if str(tmp).endswith(".safetensors.tmp"):
        with open(tmp, "wb") as handle:
            handle.write(data[: len(data) // 2])
        os._exit(9)  # no finally blocks, no cleanup: like SIGKILL
    real(path, data, tmp=tmp)
bm.atomic_write_bytes = dying
bank.write_shard(*records([4, 5, 6, 7]))
"""


def test_resume_after_a_real_kill_mid_shard(tmp_path: Path) -> None:
    chunks = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    _write_all(tmp_path / "clean", chunks)
    folder = tmp_path / "killed"
    script = _KILL_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), folder=str(folder))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    names = {p.name for p in folder.iterdir()}
    assert ".shard-r000-000001.safetensors.tmp" in names and "shard-r000-000001.jsonl" in names

    _write_all(folder, chunks)
    _same_bank(tmp_path / "clean", folder)


def test_schema_mismatch_is_refused_naming_the_field(tmp_path: Path) -> None:
    MemoryBank.open_for_writing(tmp_path, schema()).write_shard(*records([0]))
    with pytest.raises(SchemaMismatchError, match=r"slots: bank has 3, requested 4"):
        MemoryBank.open_for_writing(tmp_path, schema(slots=4))
    with pytest.raises(SchemaMismatchError, match="pooling") as info:
        MemoryBank.open_for_writing(tmp_path, schema(pooling="adaptive_avg", layer_keys=["last", "minus4"]))
    assert "layer_keys" in str(info.value)
    with pytest.raises(SchemaMismatchError, match="expert_fingerprint"):
        MemoryBank.open_for_writing(tmp_path, schema(expert_fingerprint="other"))
    assert len(MemoryBank.open(tmp_path)) == 1  # nothing was appended


def test_reader_check_names_asked_vs_held(tmp_path: Path) -> None:
    MemoryBank.open_for_writing(tmp_path, schema()).write_shard(*records([0]))
    with pytest.raises(SchemaMismatchError, match=r"hidden_size: bank holds 8, asked for 2048"):
        MemoryBank.open(tmp_path, expect={"hidden_size": 2048, "slots": 3})
    bank = MemoryBank.open(tmp_path, expect={"slots": 3, "layer_keys": ("last", "minus2")})
    with pytest.raises(SchemaMismatchError, match=r"layer_keys: bank holds \['last', 'minus2'\]"):
        bank.check(layer_keys=["last", "minus2", "minus4", "minus6"])
    with pytest.raises(ValueError, match="unknown memory schema field"):
        bank.check(slot=3)
    bank.check(temperature=1, expert_fingerprint="expert-abc")


def test_wrong_memory_shape_is_refused(tmp_path: Path) -> None:
    bank = MemoryBank.open_for_writing(tmp_path, schema())
    metas, mems = records([0, 1])
    with pytest.raises(SchemaMismatchError, match="hidden_size=8"):
        bank.write_shard(metas, mems[..., :4])
    with pytest.raises(ValueError, match="one meta per memory"):
        bank.write_shard(metas[:1], mems)
    with pytest.raises(ValueError, match="NaN"):
        bank.write_shard(metas, torch.full_like(mems, float("nan")))


def test_invalid_schema_values() -> None:
    with pytest.raises(ValueError, match="layer key"):
        schema(layer_keys=["last", "minus3"])
    with pytest.raises(ValueError, match="dtype"):
        schema(dtype="int8")


def test_two_ranks_read_as_one_ordered_bank(tmp_path: Path) -> None:
    r0 = MemoryBank.open_for_writing(tmp_path, schema(), rank=0)
    r1 = MemoryBank.open_for_writing(tmp_path, schema(), rank=1)
    r1.write_shard(*records([1, 3]))
    r0.write_shard(*records([0, 2]))
    r1.write_shard(*records([5]))
    r0.write_shard(*records([4]))
    assert (tmp_path / "shard-r001-000001.safetensors").is_file()
    bank = MemoryBank.open(tmp_path)
    assert bank.indices() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(bank.memories(), records(list(range(6)))[1].half().float())
    assert MemoryBank.open_for_writing(tmp_path, schema(), rank=1).done_indices() == set(range(6))


def test_duplicates_are_refused(tmp_path: Path) -> None:
    writer = MemoryBank.open_for_writing(tmp_path, schema(), rank=0)
    writer.write_shard(*records([0, 1]))
    with pytest.raises(GAGError, match="already in memory bank"):
        writer.write_shard(*records([1, 2]))
    with pytest.raises(GAGError, match="already in memory bank"):
        writer.write_shard(*records([5, 5]))
    MemoryBank.open_for_writing(tmp_path, schema(), rank=1).write_shard(*records([2]))
    # another rank that did not know about index 1
    other = MemoryBank.open_for_writing(tmp_path, schema(), rank=2)
    other._known.clear()
    other.write_shard(*records([1]))
    with pytest.raises(GAGError, match=r"record index 1 appears twice.*shard-r000-000000.*shard-r002-000000"):
        MemoryBank.open(tmp_path)


def test_missing_bank_is_a_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(MissingArtifactError, match="stage=memory"):
        MemoryBank.open(tmp_path / "nowhere")


def test_recover_cleans_other_ranks_debris(tmp_path: Path) -> None:
    MemoryBank.open_for_writing(tmp_path, schema(), rank=0).write_shard(*records([0]))
    (tmp_path / "shard-r003-000000.jsonl").write_text("{}\n")
    (tmp_path / ".shard-r003-000001.safetensors.tmp").write_bytes(b"x")
    MemoryBank.open_for_writing(tmp_path, schema(), rank=0)  # leaves rank 3's files alone
    assert (tmp_path / "shard-r003-000000.jsonl").exists()
    removed = MemoryBank.recover(tmp_path)
    assert sorted(p.name for p in removed) == [
        ".shard-r003-000001.safetensors.tmp",
        "shard-r003-000000.jsonl",
    ]
    assert_only_safe_files(tmp_path)


# ---------------------------------------------------------------- BackgroundStore

SETTINGS = {
    "expert_fingerprint": "expert-abc",
    "background_system_prompt": "You are an expert.",
    "max_new_tokens": 640,
    "decoding": {"do_sample": False, "eos_token_ids": [2, 7]},
}


def bg(index: int, **extra: object) -> dict:
    rec = {
        "index": index,
        "id": f"q{index}",
        "question": f"question {index}?",
        "answer": f"answer {index}",
        "background": f"generated background {index} ✓",
        "token_ids": [index, index + 1, index + 2],
        "finished": index % 2 == 0,
    }
    rec.update(extra)
    return rec


def test_background_round_trip(tmp_path: Path) -> None:
    store = BackgroundStore.open_for_writing(tmp_path, SETTINGS)
    store.append([bg(2), bg(0)])
    store.append([bg(1)])
    read = BackgroundStore.open(tmp_path, expect={"max_new_tokens": 640})
    assert read.settings == SETTINGS
    assert read.done_indices() == {0, 1, 2}
    assert read.read_all() == [bg(0), bg(1), bg(2)]
    assert read.fingerprint == settings_fingerprint(dict(SETTINGS)) == store.fingerprint
    assert settings_fingerprint({**SETTINGS, "max_new_tokens": 768}) != read.fingerprint
    assert_only_safe_files(tmp_path)


def test_background_settings_mismatch_refused(tmp_path: Path) -> None:
    BackgroundStore.open_for_writing(tmp_path, SETTINGS).append([bg(0)])
    with pytest.raises(SchemaMismatchError, match=r"max_new_tokens: store has 640, requested 768"):
        BackgroundStore.open_for_writing(tmp_path, {**SETTINGS, "max_new_tokens": 768})
    with pytest.raises(SchemaMismatchError, match="background_system_prompt"):
        BackgroundStore.open(tmp_path, expect={"background_system_prompt": "other"})
    # a tuple and a list are the same after JSON; that must not count as a difference
    BackgroundStore.open_for_writing(
        tmp_path, {**SETTINGS, "decoding": {"do_sample": False, "eos_token_ids": (2, 7)}}
    )


def test_background_truncated_last_line_recovered(tmp_path: Path) -> None:
    store = BackgroundStore.open_for_writing(tmp_path, SETTINGS)
    store.append([bg(0), bg(1)])
    store.append([bg(2)])
    path = tmp_path / "backgrounds-r000.jsonl"
    good = path.read_bytes()
    with path.open("ab") as handle:  # a kill mid-append of record 3
        handle.write(json.dumps(bg(3)).encode()[:25])
    # a reader (maybe while the writer is still appending) skips the unfinished line, file untouched
    assert BackgroundStore.open(tmp_path).done_indices() == {0, 1, 2}
    assert path.read_bytes() != good

    resumed = BackgroundStore.open_for_writing(tmp_path, SETTINGS)
    assert path.read_bytes() == good
    assert resumed.done_indices() == {0, 1, 2}
    resumed.append([bg(3)])
    assert [r["index"] for r in BackgroundStore.open(tmp_path).read_all()] == [0, 1, 2, 3]


def test_background_garbage_tail_after_newline_recovered(tmp_path: Path) -> None:
    BackgroundStore.open_for_writing(tmp_path, SETTINGS).append([bg(0)])
    path = tmp_path / "backgrounds-r000.jsonl"
    good = path.read_bytes()
    with path.open("ab") as handle:  # a crash can leave zero-filled blocks
        handle.write(b"\x00" * 50 + b"\n" + b'{"index": 1, "id"')
    BackgroundStore.open_for_writing(tmp_path, SETTINGS)
    assert path.read_bytes() == good


_BG_KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from gag_lightning.memory.bank import BackgroundStore
from test_memory_bank import SETTINGS, bg
store = BackgroundStore.open_for_writing({folder!r}, SETTINGS)
store.append([bg(0), bg(1)])
data = "".join(__import__("json").dumps(bg(i)) + "\\n" for i in (2, 3)).encode()
with open(store.path, "ab") as handle:
    handle.write(data[: len(data) - 40])
    handle.flush()
os._exit(9)
"""


def test_background_resume_after_a_real_kill(tmp_path: Path) -> None:
    script = _BG_KILL_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), folder=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    store = BackgroundStore.open_for_writing(tmp_path, SETTINGS)
    assert store.done_indices() == {0, 1, 2}  # record 2 was complete, record 3 cut
    store.append([bg(3)])
    assert BackgroundStore.open(tmp_path).read_all() == [bg(0), bg(1), bg(2), bg(3)]


def test_background_two_ranks_and_duplicates(tmp_path: Path) -> None:
    BackgroundStore.open_for_writing(tmp_path, SETTINGS, rank=1).append([bg(1), bg(3)])
    r0 = BackgroundStore.open_for_writing(tmp_path, SETTINGS, rank=0)
    assert r0.done_indices() == {1, 3}
    r0.append([bg(0), bg(2)])
    assert [r["index"] for r in BackgroundStore.open(tmp_path).read_all()] == [0, 1, 2, 3]
    with pytest.raises(GAGError, match="already in background store"):
        r0.append([bg(3)])
    with open(tmp_path / "backgrounds-r002.jsonl", "w") as handle:  # a rank unaware of the others
        handle.write(json.dumps(bg(2)) + "\n")
    with pytest.raises(GAGError, match=r"record index 2 appears twice.*backgrounds-r000.jsonl:2"):
        BackgroundStore.open(tmp_path).read_all()


def test_background_record_validation(tmp_path: Path) -> None:
    store = BackgroundStore.open_for_writing(tmp_path, SETTINGS)
    with pytest.raises(RecordError, match="finished"):
        store.append([bg(0, finished="yes")])
    with pytest.raises(RecordError, match="token_ids"):
        store.append([bg(0, token_ids=[1, "2"])])
    bad = bg(0)
    del bad["background"]
    with pytest.raises(RecordError, match="background"):
        store.append([bad])
    assert not (tmp_path / "backgrounds-r000.jsonl").exists()  # validated before anything is written


def test_background_missing_store(tmp_path: Path) -> None:
    with pytest.raises(MissingArtifactError, match="background store"):
        BackgroundStore.open(tmp_path / "nowhere")


def test_atomic_schema_write_leaves_no_temp(tmp_path: Path) -> None:
    MemoryBank.open_for_writing(tmp_path / "a", schema())
    BackgroundStore.open_for_writing(tmp_path / "b", SETTINGS)
    for folder in (tmp_path / "a", tmp_path / "b"):
        assert [p.name for p in folder.iterdir()] == ["schema.json"]
