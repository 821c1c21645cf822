"""The evaluation harness: every system answers the same test questions through one decoding path.

Systems (METHOD.md sections 5 and 7):

* ``base``           - the base alone. Prompt: the instruction, ``GENERAL_REQUEST_TEXT`` ("Please
                       answer the following question.") and the question. The GAG request text ("... based on
                       the knowledge provided.") would refer to knowledge that is not there, so the base gets
                       the general route's request (METHOD.md section 6) with the domain's instruction.
* ``expert_context`` - the expert's generated background as text on the base prompt's "Knowledge:" line.
* ``rag``            - the same prompt with the top-k retrieved knowledge-base passages (one per line) as the
                       knowledge (gag_lightning.baselines.rag retrieves them; they come in as ``retrieved``).
* ``gag``            - the base prompt with S ``<GAG>`` slots carrying the record's memory.
* ``gag_shuffled``   - the same, with memories permuted across records by a seeded derangement (no record
                       keeps its own): if it scores like ``gag``, the slots carry style, not knowledge.
* ``expert``         - optional: the SFT expert answering with its Stage II prompt.
* ``lora``           - the LoRA baseline: the base with a LoRA trained on the train QA, prompted like ``base``. peft
                       puts the LoRA inside the base's layers; it is switched off for every other system.

Every prompt comes from ``prompts.build_messages`` (the builder Stage II, Stage III and the LoRA baseline train
with; the record's own instruction wins over the domain's), so a record gets the same prompt ids here as in
training. All base systems call ``generate_batched`` with one ``DecodingConfig`` and never generate the slot
placeholder token (METHOD.md section 8: the reference decoded its routes differently). Empty predictions are
kept and scored 0 by the scorers.

Scores per record: ``fact_acc`` (METHOD.md section 5b: a gold alias of the fact is in the answer; None when the
record has no ``answers``), ``token_f1`` against the reference, then BERTScore F1 and STS, which reward form
(and ``em`` where gold answers exist). fact_acc is the headline: every table starts with it, with a bootstrap
95% CI, and ``gag`` is compared with every other system by a paired bootstrap over the same records.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from gag_lightning.errors import GAGError
from gag_lightning.eval.facts import fact_match, token_f1
from gag_lightning.eval.generation import DecodingConfig, Generation, generate_batched, plan_batches
from gag_lightning.eval.metrics import has_answer, is_empty_prediction, summarize_scores
from gag_lightning.eval.report import SCORE_KEYS
from gag_lightning.prompts import (
    DEFAULT_REQUEST_TEXT,
    GENERAL_REQUEST_TEXT,
    PromptSettings,
    build_messages,
    encode_prompt,
    stop_token_ids,
)

SYSTEMS = ("base", "expert", "expert_context", "rag", "lora", "gag", "gag_shuffled")
GAG_SYSTEMS = ("gag", "gag_shuffled")
# system -> the prompts.build_messages use it answers with
PROMPT_USE = {"base": "plain", "lora": "plain", "expert": "sft", "expert_context": "context", "rag": "rag",
              "gag": "gag", "gag_shuffled": "gag"}
BOOTSTRAP = {"n_resamples": 1000, "seed": 0}  # METHOD.md section 5b: 1,000 resamples of records


class Scorer(Protocol):
    def score(self, preds: Sequence[str], refs: Sequence[str]) -> list[float]: ...


@dataclass
class EvalItem:
    """One test record: what every system is asked, and what it is scored against."""

    id: str
    question: str
    reference: str
    background: str = ""
    instruction: str = ""  # the record's own; empty: the harness's (domain) instruction
    answers: list[str] | None = None  # gold aliases of the fact: enable fact_acc (and has-answer EM)


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation ``p`` of ``range(n)`` with ``p[i] != i`` for every i (needs n >= 2).

    Rejection sampling of uniform permutations: about e tries on average, and the result is uniform over
    derangements (unlike a cyclic shift, which would pair neighbours in the file's order).
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 records, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    ar = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=gen)
        if not bool((perm == ar).any()):
            return perm.tolist()


def items_from_metas(metas: Sequence[Mapping[str, Any]]) -> list[EvalItem]:
    """EvalItems from memory-bank metadata (id, question, answer, background; optional ``instruction`` and gold
    ``answers``). The domain instruction is the harness's: ``prompts.record_instruction`` decides per prompt."""
    items = []
    for meta in metas:
        answers = meta.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        items.append(EvalItem(id=str(meta.get("id", meta.get("index"))), question=str(meta["question"]),
                              reference=str(meta["answer"]), background=str(meta.get("background") or ""),
                              instruction=str(meta.get("instruction") or ""),
                              answers=list(answers) if isinstance(answers, list) else None))
    return items


class EvalHarness:
    """Builds each system's prompts (and injection) and decodes them all with one ``DecodingConfig``."""

    def __init__(
        self,
        base: Any,
        tokenizer: Any,
        decoding: DecodingConfig,
        *,
        adapter: Any = None,
        gag_token_id: int | None = None,
        memories: Tensor | None = None,
        request_text: str = DEFAULT_REQUEST_TEXT,
        base_request_text: str = GENERAL_REQUEST_TEXT,
        instruction: str = "",
        expert: Any = None,
        expert_tokenizer: Any = None,
        shuffle_seed: int = 0,
        enable_thinking: bool = False,
        retrieved: Mapping[str, Sequence[str]] | None = None,
        retrieval_summary: Mapping[str, Any] | None = None,
        lora: Any = None,
        share_prefix: bool = True,
    ) -> None:
        self.base = base
        self.tokenizer = tokenizer
        self.decoding = decoding
        self.adapter = adapter
        self.gag_token_id = gag_token_id
        self.memories = memories
        self.request_text = request_text
        self.base_request_text = base_request_text
        self.settings = PromptSettings(instruction, request_text, base_request_text)
        self.expert = expert
        self.expert_tokenizer = expert_tokenizer
        self.shuffle_seed = shuffle_seed
        self.enable_thinking = enable_thinking
        # encode the prompt prefix a batch shares (system prompt, instruction, request) once per batch: the same
        # tokens up to float rounding, much less prefill on a CPU (generation.shared_prefix_batch)
        self.share_prefix = share_prefix
        self.lora = lora  # a peft model wrapping `base` in place (stages.lora.runner.load_lora)
        self.stop_ids = stop_token_ids(tokenizer, getattr(base, "generation_config", None))
        # a real placeholder token is never generated by any base system (a mark id cannot be generated)
        self.suppress_ids = [gag_token_id] if gag_token_id is not None and gag_token_id >= 0 else []
        self.permutation: list[int] | None = None
        self._prompts: dict[str, tuple[Sequence[EvalItem], list[list[int]]]] = {}  # system -> (items, prompt ids)
        self.retrieved = retrieved  # record id -> retrieved passages, best first (the rag system)
        self.retrieval_summary = dict(retrieval_summary or {})

    # ------------------------------------------------------------------ prompts
    def messages(self, system: str, item: EvalItem) -> list[dict[str, str]]:
        """``item``'s prompt for ``system``, from the one prompt builder (``prompts.build_messages``)."""
        if system not in PROMPT_USE:
            raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")
        use = PROMPT_USE[system]
        knowledge = None
        if system == "expert_context":
            knowledge = item.background
        elif system == "rag":
            knowledge = self.rag_context(item)
        slots = self.num_slots if use == "gag" else 0
        return build_messages(use, item, self.settings, num_slots=slots, knowledge=knowledge)

    def user_text(self, system: str, item: EvalItem) -> str:
        return self.messages(system, item)[-1]["content"]

    def prompts(self, system: str, items: Sequence[EvalItem]) -> list[list[int]]:
        """Prompt ids per item: what the model is fed (and what training fed it for the same record)."""
        if system == "expert":
            tok = self.expert_tokenizer
            return [encode_prompt(tok, self.messages(system, it), self.enable_thinking) for it in items]
        placeholder = None
        if system in GAG_SYSTEMS:
            if self.gag_token_id is None:
                raise GAGError(f"system {system!r} needs the placeholder id of the slots (gag_token_id)")
            placeholder = self.gag_token_id
        return [encode_prompt(self.tokenizer, self.messages(system, it), self.enable_thinking, placeholder)
                for it in items]

    def rag_context(self, item: EvalItem) -> str:
        """The retrieved passages of ``item``, one per line, best first."""
        if self.retrieved is None or item.id not in self.retrieved:
            raise GAGError(f"system 'rag' has no retrieved passages for record {item.id!r}")
        return "\n".join(p.strip() for p in self.retrieved[item.id])

    @property
    def num_slots(self) -> int:
        if self.adapter is None:
            raise GAGError("the gag systems need a trained adapter")
        return int(self.adapter.config.slots)

    def added_prompt_tokens(self, system: str, items: Sequence[EvalItem]) -> float:
        """Prompt tokens a system adds to carry knowledge: S for GAG, the background's tokens for the
        expert context, the joined passages' tokens for RAG, 0 for the systems without knowledge."""
        if system in GAG_SYSTEMS:
            return float(self.num_slots)
        if system in ("expert_context", "rag"):
            texts = [it.background.strip() if system == "expert_context" else self.rag_context(it) for it in items]
            counts = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            return sum(counts) / max(len(counts), 1)
        return 0.0

    # ------------------------------------------------------------------ injection
    def _embed_fn(self, rows_to_memory: list[int]):
        from gag_lightning.models.adapter import injected_embeddings

        base, adapter, memories, gag_id = self.base, self.adapter, self.memories, self.gag_token_id

        def embed(ids: Tensor, mask: Tensor, rows: Sequence[int]) -> Tensor:
            memory = memories[torch.tensor([rows_to_memory[r] for r in rows], dtype=torch.long)]
            return injected_embeddings(base, adapter, ids, memory.float(), gag_id)[0]

        return embed

    # ------------------------------------------------------------------ generation
    def _lora_switch(self, system: str) -> AbstractContextManager:
        """The LoRA on for ``lora`` (and required), off for every other base system: with it off each layer
        computes exactly the plain base, so loading the baseline changes no other system's answers."""
        if system == "lora":
            if self.lora is None:
                raise GAGError("system 'lora' needs the LoRA baseline (stages.lora.runner.load_lora)")
            return nullcontext()
        return self.lora.disable_adapter() if self.lora is not None else nullcontext()

    def _cached_prompts(self, system: str, items: Sequence[EvalItem]) -> list[list[int]]:
        """``prompts(system, items)``, computed once per system and item list (a predict loop asks per batch)."""
        cached = self._prompts.get(system)
        if cached is None or cached[0] is not items:  # the cache holds the list, so its identity is never reused
            cached = self._prompts[system] = (items, self.prompts(system, items))
        return cached[1]

    def memory_mapping(self, system: str, n: int) -> list[int]:
        """Which record's memory each record's slots carry: its own for ``gag``, a seeded derangement for
        ``gag_shuffled`` (the same on every rank: a function of ``shuffle_seed`` and ``n``)."""
        if system == "gag":
            return list(range(n))
        self.permutation = derangement(n, self.shuffle_seed)
        return self.permutation

    def plan(self, system: str, items: Sequence[EvalItem]) -> list[list[int]]:
        """The batches of record indices ``generate`` decodes for ``system`` (sorted by prompt length, cut every
        ``decoding.batch_size``): decoding each of them with ``generate(..., rows=batch)``, in any order and on any
        rank, gives the same tokens as one ``generate`` over all items."""
        return plan_batches(self._cached_prompts(system, items), self.decoding.batch_size)

    def generate(self, system: str, items: Sequence[EvalItem], rows: Sequence[int] | None = None) -> list[Generation]:
        """Decode ``system`` on ``items`` (all of them, or only the records ``rows``, one planned batch), in the
        order given; the placeholder token is never generated."""
        if system not in SYSTEMS:
            raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")
        prompts = self._cached_prompts(system, items)
        rows = list(range(len(items))) if rows is None else list(rows)
        prompts = [prompts[r] for r in rows]
        if system == "expert":
            if self.expert is None:
                raise GAGError("system 'expert' needs the SFT expert model")
            stops = stop_token_ids(self.expert_tokenizer, getattr(self.expert, "generation_config", None))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with")
                return generate_batched(self.expert, self.expert_tokenizer, prompts, self.decoding, stops,
                                        share_prefix=self.share_prefix)
        embed_fn = None
        if system in GAG_SYSTEMS:
            if self.adapter is None or self.memories is None or self.gag_token_id is None:
                raise GAGError(f"system {system!r} needs an adapter, the memories and the <GAG> token id")
            if self.memories.shape[0] != len(items):
                raise GAGError(f"{self.memories.shape[0]} memories for {len(items)} records")
            mapping = self.memory_mapping(system, len(items))
            embed_fn = self._embed_fn([mapping[r] for r in rows])
        with warnings.catch_warnings(), self._lora_switch(system):
            # intended: prompts go in as embeddings, so penalties see only new tokens, for every system alike
            warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with")
            return generate_batched(self.base, self.tokenizer, prompts, self.decoding, self.stop_ids,
                                    embed_fn=embed_fn, share_prefix=self.share_prefix,
                                    suppress_ids=self.suppress_ids)

    # ------------------------------------------------------------------ the whole run
    def run(self, items: Sequence[EvalItem], systems: Sequence[str], scorers: Mapping[str, Scorer],
            progress: Any = None) -> EvalResult:
        """Decode and score every system in this process; rows keep every prediction, empty ones scored 0."""
        self.check_systems(items, systems)
        generations = {}
        for system in systems:
            if progress is not None:
                progress(system)
            generations[system] = self.generate(system, items)
        return self.score(items, systems, generations, scorers)

    @staticmethod
    def check_systems(items: Sequence[EvalItem], systems: Sequence[str]) -> None:
        if "gag_shuffled" in systems and len(items) < 2:
            raise GAGError("gag_shuffled needs at least 2 test records (a derangement of their memories)")

    def score(self, items: Sequence[EvalItem], systems: Sequence[str],
              generations: Mapping[str, Sequence[Generation]], scorers: Mapping[str, Scorer]) -> EvalResult:
        """Score every system's generations (one per item, in item order) and summarise: the second half of
        ``run``, which the eval stage calls on rank 0 once the ranks' predictions are gathered."""
        systems = list(systems)
        self.check_systems(items, systems)
        rows: list[dict[str, Any]] = []
        added: dict[str, float] = {}
        refs = [it.reference for it in items]
        for system in systems:
            gens = list(generations[system])
            if len(gens) != len(items):
                raise GAGError(f"system {system!r}: {len(gens)} generations for {len(items)} records")
            if system == "gag_shuffled":
                self.memory_mapping(system, len(items))
            preds = [g.text for g in gens]
            scores = {name: scorer.score(preds, refs) for name, scorer in scorers.items()}
            for i, (it, gen) in enumerate(zip(items, gens, strict=True)):
                row = {"system": system, "id": it.id, "question": it.question, "reference": it.reference,
                       "prediction": gen.text, "empty": is_empty_prediction(gen.text),
                       "finished": gen.finished, "new_tokens": len(gen.token_ids)}
                # no answers: n/a (None), never 0; an empty prediction scores 0 on both
                row["fact_acc"] = fact_match(gen.text, it.answers) if it.answers is not None else None
                row["token_f1"] = token_f1(gen.text, it.reference)
                for name, values in scores.items():
                    row[name] = 0.0 if row["empty"] else float(values[i])
                if it.answers is not None:
                    row["em"] = has_answer(gen.text, it.answers)
                if system == "gag_shuffled" and self.permutation is not None:
                    row["memory_of"] = items[self.permutation[i]].id
                rows.append(row)
            added[system] = self.added_prompt_tokens(system, items)
        summary = summarize_scores(rows, metrics=SCORE_KEYS, **BOOTSTRAP)
        for system in systems:
            summary[system]["added_prompt_tokens"] = added[system]
            members = [r for r in rows if r["system"] == system]
            summary[system]["finished_rate"] = sum(r["finished"] for r in members) / max(len(members), 1)
            summary[system]["mean_new_tokens"] = sum(r["new_tokens"] for r in members) / max(len(members), 1)
        if "rag" in systems:
            summary["rag"].update(self.retrieval_summary)
        settings = {"decoding": asdict(self.decoding), "stop_ids": self.stop_ids, "systems": systems,
                    "suppressed_ids": self.suppress_ids, "placeholder_id": self.gag_token_id,
                    "shuffle_seed": self.shuffle_seed, "instruction": self.settings.instruction,
                    "base_request_text": self.base_request_text,
                    "request_text": self.request_text, "num_records": len(items),
                    "bootstrap": {**BOOTSTRAP, "alpha": 0.05, "paired_with": "gag"}}
        if "rag" in systems:
            settings["rag"] = dict(self.retrieval_summary)
        return EvalResult(rows, summary, settings)


__all__ = [
    "SYSTEMS",
    "EvalHarness",
    "EvalItem",
    "EvalResult",
    "derangement",
    "items_from_metas",
]
