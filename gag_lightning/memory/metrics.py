"""The numbers the memory stage puts in its manifests: what each store holds and what it cost.

`bank_metrics` reports the bytes per record next to the K*S*H_e*itemsize floor of a memory, so that a bank
growing beyond its tensors plus metadata shows in every manifest.
"""

from __future__ import annotations

from typing import Any

from gag_lightning.artifacts import MANIFEST
from gag_lightning.data.records import QARecord
from gag_lightning.errors import GAGError
from gag_lightning.memory.bank import MemoryBank
from gag_lightning.memory.files import STORAGE_DTYPES
from gag_lightning.memory.store import BackgroundStore

__all__ = ["background_metrics", "bank_metrics"]


def background_metrics(store: BackgroundStore, records: list[QARecord], generated_before: set[int],
                        seconds: float | None) -> dict[str, Any]:
    wanted = {r.index for r in records}
    rows = [r for r in store.read_all() if r["index"] in wanted]
    missing = sorted(wanted - {r["index"] for r in rows})
    if missing:
        raise GAGError(f"background store {store.folder} lacks {len(missing)} record(s) (e.g. index {missing[0]}) "
                       "after generation; rerun the stage to finish it")
    lengths = [len(r["token_ids"]) for r in rows]
    new = [r for r in rows if r["index"] not in generated_before]
    out: dict[str, Any] = {
        "records": len(rows),
        "empty_questions": sum(1 for r in records if not r.question.strip()),
        "empty_backgrounds": sum(1 for n in lengths if n == 0),
        "finished_fraction": sum(1 for r in rows if r["finished"]) / len(rows),
        "mean_generated_tokens": sum(lengths) / len(rows),
        "generated_this_run": len(new),
    }
    if seconds and new:
        out["records_per_s"] = len(new) / seconds
        out["tokens_per_s"] = sum(len(r["token_ids"]) for r in new) / seconds
    return out


def bank_metrics(bank: MemoryBank, records: list[QARecord], made_before: set[int], seconds: float | None,
                  backgrounds: list[dict[str, Any]]) -> dict[str, Any]:
    indices = bank.indices()
    wanted = sorted(r.index for r in records)
    if indices != wanted:
        missing = sorted(set(wanted) - set(indices))
        raise GAGError(f"memory bank {bank.folder} holds {len(indices)} records, expected {len(wanted)} "
                       f"(missing e.g. {missing[:5]}); rerun the stage to finish it")
    sizes = {"safetensors": 0, "jsonl": 0, "json": 0}
    for path in bank.folder.iterdir():
        suffix = path.suffix.lstrip(".")
        if path.is_file() and suffix in sizes and path.name != MANIFEST:
            sizes[suffix] += path.stat().st_size
    n = len(indices)
    k, s, h = bank.schema.shape
    itemsize = STORAGE_DTYPES[bank.schema.dtype].itemsize
    new = n - len(made_before & set(wanted))
    tokens = sum(len(b["token_ids"]) for b in backgrounds if b["index"] not in made_before)
    lengths = [len(b["token_ids"]) for b in backgrounds]
    out: dict[str, Any] = {
        "records": n,
        "empty_questions": sum(1 for r in records if not r.question.strip()),
        "empty_backgrounds": sum(1 for x in lengths if x == 0),
        "mean_generated_tokens": sum(lengths) / max(len(lengths), 1),
        "bytes_per_record": sum(sizes.values()) / n,
        "tensor_bytes_per_record": sizes["safetensors"] / n,
        "metadata_bytes_per_record": (sizes["jsonl"] + sizes["json"]) / n,
        "memory_floor_bytes_per_record": k * s * h * itemsize,
        "extracted_this_run": new,
    }
    if seconds and new:
        out["records_per_s"] = new / seconds
        out["tokens_per_s"] = tokens / seconds
    return out
