"""Routed mixed-domain answering (METHOD.md section 6): one shared frozen base, one expert + adapter per domain.

Queries are grouped by route and answered in batches: the general route is the base alone with the
general prompt; a domain route runs that domain's expert to write backgrounds, compresses them into
memories (the same code as the memory stage) and lets the base answer with the memory injected
(the same harness as the eval stage). Every route decodes through `generate_batched` with the same
settings, so the general answers are exactly what the base alone gives.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gag_lightning.artifacts import atomic_write_text
from gag_lightning.data.records import QARecord
from gag_lightning.errors import GAGError
from gag_lightning.eval.facts import fact_match, token_f1
from gag_lightning.eval.generation import DecodingConfig, generate_batched
from gag_lightning.eval.harness import EvalHarness, EvalItem
from gag_lightning.eval.limits import check_prompts_fit
from gag_lightning.eval.metrics import has_answer, is_empty_prediction, summarize_scores
from gag_lightning.eval.report import markdown_report
from gag_lightning.memory.background import BackgroundConfig, background_prompt_ids
from gag_lightning.memory.extract import CompressionConfig, extract_memories
from gag_lightning.models.adapter_io import adapter_placeholder, load_adapter, selection_note
from gag_lightning.models.loading import load_causal_lm, load_tokenizer
from gag_lightning.prompts import GENERAL_INSTRUCTION, GENERAL_REQUEST_TEXT, stop_token_ids

log = logging.getLogger(__name__)


@dataclass
class DomainPath:
    """What answering one domain needs, loaded once and reused for all its queries."""

    name: str
    expert: Any
    expert_tokenizer: Any
    adapter: Any
    instruction: str


def _domain_artifacts(cfg: DictConfig, route: str) -> tuple[Path, Path, str]:
    """(expert dir, adapter dir, instruction) of a route: the current domain's artifacts or explicit paths."""
    from gag_lightning.fingerprints import upstream_folder
    from gag_lightning.pipeline.memory import memory_expert_path
    from gag_lightning.stages.gag.runner import gag_adapter_dir

    if route == str(cfg.domain.name):
        return memory_expert_path(cfg), gag_adapter_dir(cfg, cfg.eval.get("adapter")), str(cfg.domain.instruction)
    domains = OmegaConf.to_container(cfg.router.domains, resolve=True) or {}
    for key, spec in domains.items():
        if spec and (spec.get("name") or key) == route:
            if not spec.get("expert") or not spec.get("adapter"):
                raise GAGError(f"route '{route}' has no trained artifacts for answering: set "
                               f"router.domains.{key}.expert=/path/to/sft-expert and "
                               f"router.domains.{key}.adapter=/path/to/gag-adapter")
            # finished artifacts only (an unfinished one is refused unless allow_unfinished=true)
            expert = upstream_folder(cfg, f"router.domains.{key}.expert", spec["expert"], external_ok=True)[0]
            adapter = upstream_folder(cfg, f"router.domains.{key}.adapter", spec["adapter"])[0]
            return expert, adapter, str(spec.get("instruction") or "")
    raise GAGError(f"route '{route}' is not configured under router.domains")


def decoding_config(cfg: DictConfig) -> DecodingConfig:
    from gag_lightning.eval.settings import decoding_config as eval_decoding

    return eval_decoding(cfg)


def _device(cfg: DictConfig) -> torch.device:
    from gag_lightning.eval.settings import eval_device

    return eval_device(cfg)


def build_memories(path: DomainPath, questions: Sequence[str], cfg: DictConfig,
                   labels: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Expert backgrounds and [N, K, S, H_e] memories for routed questions (METHOD.md section 3); `labels` name
    the questions in an error (a prompt longer than the expert's positions)."""
    gen_cfg = BackgroundConfig.from_mapping(OmegaConf.to_container(cfg.memory.generation, resolve=True),
                                            seed=int(cfg.seed))
    if path.instruction and gen_cfg.prompt_style == "sft":
        gen_cfg = BackgroundConfig(**{**gen_cfg.__dict__, "instruction": path.instruction})
    records = [QARecord(index=i, id=str(i), question=q, answer="") for i, q in enumerate(questions)]
    prompts = background_prompt_ids(path.expert_tokenizer, records, gen_cfg)
    check_prompts_fit(path.expert, prompts, gen_cfg.max_new_tokens, labels)
    decoding = DecodingConfig(max_new_tokens=gen_cfg.max_new_tokens, do_sample=gen_cfg.do_sample,
                              temperature=gen_cfg.temperature, top_p=gen_cfg.top_p,
                              batch_size=int(cfg.memory.generation.batch_size))
    stops = stop_token_ids(path.expert_tokenizer, getattr(path.expert, "generation_config", None))
    gens = generate_batched(path.expert, path.expert_tokenizer, prompts, decoding, stops)
    compression = CompressionConfig.from_mapping(OmegaConf.to_container(cfg.memory.compression, resolve=True))
    memories = []
    batch = int(cfg.memory.compression.batch_size)
    for start in range(0, len(prompts), batch):
        memories.append(extract_memories(path.expert, prompts[start: start + batch],
                                         [g.token_ids for g in gens[start: start + batch]], compression).cpu())
    return torch.cat(memories), [g.text for g in gens]


def answer_routed(cfg: DictConfig, questions: list[str], routes: list[str], records: Sequence[Any] | None = None,
                  out_dir: str | Path | None = None) -> list[str]:
    """Answer each question on its route; with `records` (the mixed test set) also score and write reports."""
    from gag_lightning.models.base import load_base

    if len(questions) != len(routes):
        raise GAGError(f"{len(questions)} questions but {len(routes)} routes")
    device = _device(cfg)
    base, tokenizer, placeholder, _ = load_base(cfg)
    base.to(device).eval()
    decoding = decoding_config(cfg)
    labels = _labels(cfg, records, len(questions))
    by_route: dict[str, list[int]] = defaultdict(list)
    for i, route in enumerate(routes):
        by_route[route].append(i)
    answers: list[str] = [""] * len(questions)
    backgrounds: dict[int, str] = {}
    notes: list[str] = []
    general = "general"
    for route, rows in by_route.items():
        qs = [questions[i] for i in rows]
        if route == general:
            # the base's placeholder id only for decoding: every route suppresses a placeholder token alike
            harness = EvalHarness(base, tokenizer, decoding, gag_token_id=placeholder.id,
                                  base_request_text=GENERAL_REQUEST_TEXT, instruction=GENERAL_INSTRUCTION)
            items = [EvalItem(id=str(i), question=q, reference="") for i, q in zip(rows, qs, strict=True)]
            check_prompts_fit(base, harness.prompts("base", items), decoding.max_new_tokens, [labels[i] for i in rows])
            gens = harness.generate("base", items)
        else:
            expert_dir, adapter_dir, instruction = _domain_artifacts(cfg, route)
            log.info("[answer] route %s: %d queries, expert %s, adapter %s", route, len(rows), expert_dir, adapter_dir)
            path = DomainPath(route, load_causal_lm(expert_dir, cfg.hardware.get("base_dtype", "float32")).to(device)
                              .eval(), load_tokenizer(expert_dir), load_adapter(adapter_dir, device=device).eval(),
                              instruction)
            note = selection_note(path.adapter.config)
            if note:
                notes.append(f"route {route}: {note}")
            memories, texts = build_memories(path, qs, cfg, labels=[labels[i] for i in rows])
            harness = EvalHarness(base, tokenizer, decoding, adapter=path.adapter,
                                  gag_token_id=adapter_placeholder(path.adapter.config, tokenizer).id,
                                  memories=memories, request_text=str(cfg.domain.request_text), instruction=instruction)
            items = [EvalItem(id=str(i), question=q, reference="") for i, q in zip(rows, qs, strict=True)]
            check_prompts_fit(base, harness.prompts("gag", items), decoding.max_new_tokens, [labels[i] for i in rows])
            gens = harness.generate("gag", items)
            for i, text in zip(rows, texts, strict=True):
                backgrounds[i] = text
            del path
        for i, gen in zip(rows, gens, strict=True):
            answers[i] = gen.text
    if records is not None and out_dir is not None:
        score_routed(cfg, records, routes, answers, backgrounds, Path(out_dir), notes)
    return answers


def _labels(cfg: DictConfig, records: Sequence[Any] | None, n: int) -> list[str]:
    """How an error names each routed question: the test file's 1-based line, or the query's position."""
    if records is not None:
        test_set = OmegaConf.select(cfg, "router.test_set", default="the mixed test set")
        return [f"{test_set}, line {getattr(r, 'line', None) or '?'}: field 'question'" for r in records]
    return [f"query {i + 1}" for i in range(n)]


def fact_aliases(record: Any, general_sets: set[str]) -> list[str] | None:
    """The gold aliases fact_acc checks: the record's explicit `answers`, else a general set's gold answer list
    (short answers by construction); None for a specialist record without `answers` (its `answer` is a reference
    text, not a fact to find verbatim), which makes its fact_acc n/a rather than 0."""
    explicit = getattr(record, "fact_answers", None)
    if explicit is not None:
        return list(explicit)
    if record.dataset_name in general_sets and record.answers:
        return list(record.answers)
    return None


def score_routed(cfg: DictConfig, records: Sequence[Any], routes: Sequence[str], answers: Sequence[str],
                 backgrounds: dict[int, str], out_dir: Path, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Per-dataset metrics: fact_acc (records with gold aliases) and token F1 for every set, has-answer EM for
    general sets, BERTScore F1 and STS for specialist sets. ``notes`` (an adapter selected on the test split)
    head report.md and sit in metrics.json."""
    from gag_lightning.eval.settings import build_scorers

    general_sets = set(OmegaConf.to_container(cfg.router.domains.general.dataset_names, resolve=True))
    specialist = [i for i, r in enumerate(records) if r.dataset_name not in general_sets]
    scores: dict[int, dict[str, float]] = defaultdict(dict)
    if specialist:
        scorers = build_scorers(cfg, _device(cfg))
        preds = [answers[i] for i in specialist]
        refs = [records[i].answers[0] for i in specialist]
        for name, scorer in scorers.items():
            for i, value in zip(specialist, scorer.score(preds, refs), strict=True):
                scores[i][name] = 0.0 if is_empty_prediction(answers[i]) else float(value)
    rows = []
    for i, rec in enumerate(records):
        row = {"system": "routed", "dataset_name": rec.dataset_name, "question": rec.question, "route": routes[i],
               "reference": rec.answers, "prediction": answers[i], "empty": is_empty_prediction(answers[i]),
               **scores.get(i, {})}
        aliases = fact_aliases(rec, general_sets)
        row["fact_acc"] = fact_match(answers[i], aliases) if aliases is not None else None
        row["token_f1"] = max((token_f1(answers[i], ref) for ref in rec.answers), default=0.0)
        if rec.dataset_name in general_sets:
            row["em"] = has_answer(answers[i], rec.answers)
        if i in backgrounds:
            row["background"] = backgrounds[i]
        rows.append(row)
    summary = summarize_scores(rows, by="dataset_name", metrics=("fact_acc", "token_f1", "bertscore_f1", "sts", "em"))
    per_dataset = summary["routed"].get("groups", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "predictions.jsonl",
                      "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    atomic_write_text(out_dir / "metrics.json", json.dumps({"systems": summary, "notes": list(notes)}, indent=2,
                                                           ensure_ascii=False))
    table = {f"routed/{name}": stats for name, stats in per_dataset.items()}
    table["routed/all"] = {k: v for k, v in summary["routed"].items() if k != "groups"}
    atomic_write_text(out_dir / "report.md", markdown_report(table, "routed mixed-domain answering", notes))
    from gag_lightning.eval.report import print_report

    print_report(table, "routed mixed-domain answering")
    return summary
