"""Routed answering (METHOD.md section 6): one shared frozen base, each domain route its own expert and adapter.

A ``RouteAnswerer`` holds **one** copy of the base and, per domain route, that route's ``RouteProfile``
(``routing.profiles``: its instruction, request text, background prompt, compression schema and answer length,
from its own preset or its artifacts' metadata, never from the domain the command was composed with) with its
expert and adapter, loaded once on first use. Queries are grouped by route and each group is answered in
batches: the general route is the base alone with the general prompt (the eval harness's ``base`` system); a
domain route runs its expert to write backgrounds, compresses them into memories exactly as the memory stage
did (same prompts, decoding, stop ids, compression, storage dtype) and lets the base answer with the memories
injected through the eval harness's ``gag`` system, with the instruction and request text the adapter was
trained with. Every route decodes through ``generate_batched`` with the eval stage's settings.

``answer_mixed`` is ``route.py mode=answer``: the mixed online test answered three ways (``routed``: the
router's route; ``oracle``: the gold route; ``base``: the base alone for every query), scored per dataset
(fact_acc, EM, token F1, BERTScore, STS), with the process's peak RSS beside the weights of one base plus
each route's expert and adapter.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gag_lightning.artifacts import atomic_write_text
from gag_lightning.data.records import QARecord
from gag_lightning.errors import GAGError
from gag_lightning.eval.facts import fact_match, token_f1
from gag_lightning.eval.generation import DecodingConfig, generate_batched
from gag_lightning.eval.harness import EvalHarness, EvalItem, markdown_report
from gag_lightning.eval.limits import check_prompts_fit
from gag_lightning.eval.metrics import has_answer, is_empty_prediction, summarize_scores
from gag_lightning.memory.background import background_prompt_ids
from gag_lightning.memory.extract import extract_memories
from gag_lightning.prompts import stop_token_ids
from gag_lightning.routing.profiles import (
    GENERAL,
    RouteProfile,
    check_base,
    general_profile,
    route_entries,
    route_profile,
)

log = logging.getLogger(__name__)

SYSTEMS = ("routed", "oracle", "base")
ANSWER_REPORT = "answer_report.json"

__all__ = [
    "ANSWER_REPORT",
    "DomainRoute",
    "RouteAnswerer",
    "RoutedAnswer",
    "answer_mixed",
    "answer_routed",
    "fact_aliases",
    "greedy_shrinking",
    "memory_report",
    "resolve_profiles",
    "score_routed",
    "score_systems",
]


@dataclass
class RoutedAnswer:
    """One answer and how it was made."""

    text: str
    route: str
    background: str | None = None  # the expert's background (domain routes)
    finished: bool = True  # False: cut by the answer length
    new_tokens: int = 0


def _device(cfg: DictConfig) -> torch.device:
    from gag_lightning.pipeline.evaluate import eval_device

    return eval_device(cfg)


def resolve_profiles(cfg: DictConfig, names: Sequence[str] | None = None) -> dict[str, RouteProfile]:
    """Every configured route's profile (or only those in ``names``), general included."""
    entries = route_entries(cfg)
    profiles: dict[str, RouteProfile] = {}
    for key, entry in entries.items():
        name = str(entry.get("name") or key)
        if names is not None and name not in names:
            continue
        profiles[name] = route_profile(cfg, key, entry)
    if GENERAL not in profiles and (names is None or GENERAL in names):
        profiles[GENERAL] = general_profile(cfg)
    missing = sorted(set(names or []) - set(profiles))
    if missing:
        raise GAGError(f"route(s) {missing} are not configured under router.domains (configured: "
                       f"{sorted(str(e.get('name') or k) for k, e in entries.items())})")
    return profiles


def _param_bytes(module: Any) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _rss_bytes() -> int | None:
    """Current resident set size (Linux /proc), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class DomainRoute:
    """A domain route, loaded: its expert (+ tokenizer, stop ids) and its adapter, for its profile."""

    def __init__(self, profile: RouteProfile, device: torch.device, base_tokenizer: Any) -> None:
        from gag_lightning.models.adapter import adapter_placeholder, load_adapter, selection_note
        from gag_lightning.models.loading import load_causal_lm, load_tokenizer

        if profile.is_general:
            raise GAGError(f"route '{profile.name}' has no expert or adapter (it is the base alone)")
        self.profile = profile
        self.expert = load_causal_lm(profile.expert_dir, profile.expert_dtype).to(device).eval()
        self.expert.requires_grad_(False)
        self.expert_tokenizer = load_tokenizer(profile.expert_dir)
        self.adapter = load_adapter(profile.adapter_dir, device=device).eval()
        self.adapter.requires_grad_(False)
        # the slot placeholder the adapter was trained with, checked against the shared base's tokenizer
        self.placeholder = adapter_placeholder(self.adapter.config, base_tokenizer)
        self.selection_note = selection_note(self.adapter.config)
        self.stop_ids = list(profile.stop_ids or stop_token_ids(
            self.expert_tokenizer, getattr(self.expert, "generation_config", None)))

    def background_prompts(self, questions: Sequence[str]) -> list[list[int]]:
        """The expert's background prompt ids, rendered like the memory stage renders them."""
        records = [QARecord(index=i, id=str(i), question=q, answer="") for i, q in enumerate(questions)]
        return background_prompt_ids(self.expert_tokenizer, records, self.profile.background)

    def backgrounds(self, questions: Sequence[str], batch_size: int,
                    labels: Sequence[str] | None = None) -> tuple[list[list[int]], list[Any]]:
        """(prompt ids, generations): the memory stage's decoding (continuous batching, shared prefix); a prompt
        longer than the expert's positions is refused naming its ``labels`` entry."""
        bg = self.profile.background
        prompts = self.background_prompts(questions)
        check_prompts_fit(self.expert, prompts, bg.max_new_tokens, labels)
        decoding = DecodingConfig(max_new_tokens=bg.max_new_tokens, do_sample=bg.do_sample,
                                  temperature=bg.temperature, top_p=bg.top_p, batch_size=batch_size)
        if bg.do_sample:
            torch.manual_seed(int(bg.seed))
        gens = generate_batched(self.expert, self.expert_tokenizer, prompts, decoding, self.stop_ids,
                                share_prefix=True, continuous=True)
        return prompts, gens

    def memories(self, prompts: Sequence[Sequence[int]], gens: Sequence[Any], batch_size: int) -> torch.Tensor:
        """[N, K, S, H_e] memories, rounded through the bank's storage dtype like the memories it trained on."""
        from gag_lightning.memory.bank import STORAGE_DTYPES

        compression = self.profile.compression
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = extract_memories(self.expert, prompts[start: start + batch_size],
                                     [g.token_ids for g in gens[start: start + batch_size]], compression)
            out.append(chunk.cpu())
        memories = torch.cat(out) if out else torch.zeros(0)
        return memories.to(STORAGE_DTYPES[compression.dtype]).float()


class RouteAnswerer:
    """One shared frozen base; general and domain routes answered in batches, each with its own settings."""

    def __init__(self, cfg: DictConfig, profiles: Mapping[str, RouteProfile] | None = None,
                 device: torch.device | None = None) -> None:
        from gag_lightning.pipeline.evaluate import decoding_config
        from gag_lightning.pipeline.gag import base_identity, load_base

        self.cfg = cfg
        self.device = device or _device(cfg)
        self.profiles = dict(profiles) if profiles is not None else resolve_profiles(cfg)
        if GENERAL not in self.profiles:
            self.profiles[GENERAL] = general_profile(cfg)
        self.rss_before_models = _rss_bytes()
        # the base's own placeholder: suppressed in every route's decoding (a domain route marks its slots with the
        # placeholder its adapter recorded, DomainRoute.placeholder)
        self.base, self.tokenizer, self.placeholder, self.base_dir = load_base(cfg)
        self.base.to(self.device).eval()
        self.base_identity = base_identity(self.base_dir)
        for profile in self.profiles.values():
            check_base(profile, self.base_identity)
        self.decoding_template = decoding_config(cfg)
        self.background_batch = int(cfg.memory.generation.batch_size)
        self.compression_batch = int(cfg.memory.compression.batch_size)
        self.share_prefix = bool(cfg.eval.get("share_prefix", True))
        self.enable_thinking = bool(cfg.eval.get("enable_thinking", False))
        self.routes: dict[str, DomainRoute] = {}

    # ------------------------------------------------------------------ routes
    @property
    def names(self) -> list[str]:
        return list(self.profiles)

    def route(self, name: str) -> DomainRoute:
        """The loaded domain route (expert and adapter loaded on first use, then kept)."""
        if name not in self.profiles:
            raise GAGError(f"route '{name}' is not configured (routes: {self.names})")
        if name not in self.routes:
            profile = self.profiles[name]
            log.info("[answer] route %s: expert %s, adapter %s", name, profile.expert_dir, profile.adapter_dir)
            self.routes[name] = DomainRoute(profile, self.device, self.tokenizer)
        return self.routes[name]

    def load_all(self) -> None:
        for name, profile in self.profiles.items():
            if not profile.is_general:
                self.route(name)

    def decoding(self, name: str, max_new_tokens: int | None = None) -> DecodingConfig:
        """The eval stage's decoding with the route's own answer length (or ``max_new_tokens``)."""
        n = max_new_tokens or self.profiles[name].answer_max_new_tokens
        return replace(self.decoding_template, max_new_tokens=int(n))

    def notes(self) -> list[str]:
        """Report notes of the loaded routes (an adapter selected on its test split)."""
        return [f"route {n}: {r.selection_note}" for n, r in self.routes.items() if r.selection_note]

    @staticmethod
    def _items(questions: Sequence[str]) -> list[EvalItem]:
        # no per-item instruction: the harness's (the route's) applies, as prompts.record_instruction rules
        return [EvalItem(id=str(i), question=q, reference="") for i, q in enumerate(questions)]

    def harness(self, name: str, memories: torch.Tensor | None = None,
                max_new_tokens: int | None = None) -> EvalHarness:
        profile = self.profiles[name]
        decoding = self.decoding(name, max_new_tokens)
        if profile.is_general:
            # the base's placeholder id only for decoding: every route suppresses a placeholder token alike
            return EvalHarness(self.base, self.tokenizer, decoding, gag_token_id=self.placeholder.id,
                               base_request_text=profile.request_text, instruction=profile.instruction,
                               enable_thinking=self.enable_thinking, share_prefix=self.share_prefix)
        route = self.route(name)
        return EvalHarness(self.base, self.tokenizer, decoding, adapter=route.adapter,
                           gag_token_id=route.placeholder.id, memories=memories, request_text=profile.request_text,
                           instruction=profile.instruction, enable_thinking=self.enable_thinking,
                           share_prefix=self.share_prefix)

    def answer_prompts(self, name: str, questions: Sequence[str]) -> list[list[int]]:
        """The base's prompt ids for ``questions`` on route ``name`` (the GAG prompt with S slots on a domain
        route, the general prompt on the general route): exactly what ``answer_route`` decodes from."""
        system = "base" if self.profiles[name].is_general else "gag"
        return self.harness(name).prompts(system, self._items(questions))

    # ------------------------------------------------------------------ answering
    def answer_route(self, name: str, questions: Sequence[str], max_new_tokens: int | None = None,
                     labels: Sequence[str] | None = None) -> list[RoutedAnswer]:
        """Answer ``questions`` (one batched pass) on route ``name`` (answer length: the route's, or
        ``max_new_tokens``); a prompt longer than a model's positions is refused naming its ``labels`` entry."""
        if not questions:
            return []
        profile = self.profiles.get(name)
        if profile is None:
            raise GAGError(f"route '{name}' is not configured (routes: {self.names})")
        items = self._items(questions)
        if profile.is_general:
            harness = self.harness(name, max_new_tokens=max_new_tokens)
            check_prompts_fit(self.base, harness.prompts("base", items), harness.decoding.max_new_tokens, labels)
            gens = harness.generate("base", items)
            return [RoutedAnswer(g.text, name, None, g.finished, len(g.token_ids)) for g in gens]
        route = self.route(name)
        harness = self.harness(name, None, max_new_tokens)
        check_prompts_fit(self.base, harness.prompts("gag", items), harness.decoding.max_new_tokens, labels)
        prompts, backgrounds = route.backgrounds([it.question for it in items], self.background_batch, labels)
        harness.memories = route.memories(prompts, backgrounds, self.compression_batch)
        gens = harness.generate("gag", items)
        return [RoutedAnswer(g.text, name, b.text, g.finished, len(g.token_ids))
                for g, b in zip(gens, backgrounds, strict=True)]

    def answer(self, questions: Sequence[str], routes: Sequence[str],
               labels: Sequence[str] | None = None) -> list[RoutedAnswer]:
        """Answer each question on its route; the queries of one route are answered together."""
        if len(questions) != len(routes):
            raise GAGError(f"{len(questions)} questions but {len(routes)} routes")
        by_route: dict[str, list[int]] = defaultdict(list)
        for i, route in enumerate(routes):
            by_route[route].append(i)
        out: list[RoutedAnswer | None] = [None] * len(questions)
        for route, rows in by_route.items():
            sub = [labels[i] for i in rows] if labels is not None else None
            for i, ans in zip(rows, self.answer_route(route, [questions[i] for i in rows], labels=sub), strict=True):
                out[i] = ans
        return [a for a in out if a is not None]

    def answer_mixed_batch(self, questions: Sequence[str], routes: Sequence[str],
                           max_new_tokens: Sequence[int | None] | None = None) -> list[RoutedAnswer]:
        """Answer a batch whose questions go to several routes with **one** pass of the shared base.

        Each domain route's expert writes its rows' backgrounds and memories (one pass per expert, the experts
        differ, in parallel threads); then the base decodes every row together (``greedy_shrinking``: a row leaves the batch when it
        stops or reaches its own length, its ``max_new_tokens`` else its route's), each row with its own route's
        prompt and its own route's adapter applied to its memories (the general rows: plain embeddings). The
        server answers request batches this way; ``route.py`` answers each route's queries in a pass of their own
        through the eval harness (``answer_route``).
        """
        from gag_lightning.stages.gag import injected_embeddings

        n = len(questions)
        if len(routes) != n:
            raise GAGError(f"{n} questions but {len(routes)} routes")
        if not n:
            return []
        limits = [int((max_new_tokens or [None] * n)[i] or self.profiles[r].answer_max_new_tokens)
                  for i, r in enumerate(routes)]
        prompts: list[list[int]] = [[] for _ in range(n)]
        memory_of: dict[int, torch.Tensor] = {}
        backgrounds: dict[int, str] = {}
        by_route: dict[str, list[int]] = defaultdict(list)
        for i, route in enumerate(routes):
            if route not in self.profiles:
                raise GAGError(f"route '{route}' is not configured (routes: {self.names})")
            by_route[route].append(i)
        def prepare(route: str, rows: list[int]) -> None:
            profile = self.profiles[route]
            items = self._items([questions[i] for i in rows])
            if profile.is_general:
                rendered = self.harness(route).prompts("base", items)
            else:
                domain = self.route(route)
                bg_prompts, gens = domain.backgrounds([it.question for it in items], self.background_batch)
                memories = domain.memories(bg_prompts, gens, self.compression_batch)
                rendered = self.harness(route, memories).prompts("gag", items)
                for j, i in enumerate(rows):
                    memory_of[i], backgrounds[i] = memories[j], gens[j].text
            for i, p in zip(rows, rendered, strict=True):
                prompts[i] = p

        domain_routes = [r for r in by_route if not self.profiles[r].is_general]
        for route in domain_routes:
            self.route(route)  # load before the threads start
        if len(domain_routes) > 1:
            # each expert is its own model: their passes run side by side (one thread per route); on a small CPU
            # one pass's Python overhead overlaps the other's matrix products
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(domain_routes)) as pool:
                for future in [pool.submit(prepare, r, by_route[r]) for r in domain_routes]:
                    future.result()
        else:
            for route in domain_routes:
                prepare(route, by_route[route])
        for route in by_route:
            if self.profiles[route].is_general:
                prepare(route, by_route[route])
        adapters = {r: self.route(r).adapter for r in domain_routes}
        marks = {r: self.route(r).placeholder.id for r in domain_routes}
        base = self.base

        def embed(ids: torch.Tensor, mask: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
            out = base.get_input_embeddings()(ids.clamp(min=0))  # a mark id (-1) is overwritten below
            for route, adapter in adapters.items():
                sel = [j for j, r in enumerate(rows) if routes[r] == route]
                if sel:
                    memory = torch.stack([memory_of[rows[j]] for j in sel]).float()
                    index = torch.tensor(sel, device=ids.device)
                    out[index] = injected_embeddings(base, adapter, ids[index], memory, marks[route])[0].to(out.dtype)
            return out

        stops = stop_token_ids(self.tokenizer, getattr(self.base, "generation_config", None))
        gens = greedy_shrinking(self.base, self.tokenizer, prompts, self.decoding_template, stops, limits,
                                embed_fn=embed, share_prefix=self.share_prefix,
                                suppress_ids=self.placeholder.suppress_ids)
        return [RoutedAnswer(g.text, routes[i], backgrounds.get(i), g.finished, len(g.token_ids))
                for i, g in enumerate(gens)]

    def memory(self) -> dict[str, Any]:
        """Weights held by this answerer: one base, each loaded route's expert and adapter."""
        experts = {n: _param_bytes(r.expert) for n, r in self.routes.items()}
        adapters = {n: _param_bytes(r.adapter) for n, r in self.routes.items()}
        base = _param_bytes(self.base)
        return {"base_copies": 1, "base_bytes": base, "expert_bytes": experts, "adapter_bytes": adapters,
                "one_base_plus_routes_bytes": base + sum(experts.values()) + sum(adapters.values()),
                "rss_before_models_bytes": self.rss_before_models}


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


def memory_report(answerer: RouteAnswerer, rss_after_load: int | None = None) -> dict[str, Any]:
    """The answerer's weights beside this process's RSS: peak, and the growth from loading the models."""
    mem = answerer.memory()
    mem["peak_rss_bytes"] = _peak_rss_bytes()
    mem["rss_after_models_bytes"] = rss_after_load
    if rss_after_load is not None and mem["rss_before_models_bytes"] is not None:
        mem["models_rss_bytes"] = rss_after_load - mem["rss_before_models_bytes"]
    mib = 2**20
    parts = [f"1 base {mem['base_bytes'] / mib:.0f}"] + [
        f"{n}: expert {mem['expert_bytes'][n] / mib:.0f} + adapter {mem['adapter_bytes'][n] / mib:.1f}"
        for n in mem["expert_bytes"]]
    mem["summary"] = (f"peak RSS {mem['peak_rss_bytes'] / mib:.0f} MiB; models loaded "
                      + (f"+{mem['models_rss_bytes'] / mib:.0f} MiB RSS" if mem.get("models_rss_bytes") else "")
                      + f" vs weights {mem['one_base_plus_routes_bytes'] / mib:.0f} MiB ({'; '.join(parts)} MiB); "
                      f"a second base would add {mem['base_bytes'] / mib:.0f} MiB")
    return mem


# ------------------------------------------------------------------------------------------- mode=query
def answer_routed(cfg: DictConfig, questions: list[str], routes: list[str], records: Sequence[Any] | None = None,
                  out_dir: str | Path | None = None) -> list[str]:
    """Answer each question on its route (the routes it needs are loaded); with ``records`` and ``out_dir`` also
    score the answers as the ``routed`` system."""
    answerer = RouteAnswerer(cfg, resolve_profiles(cfg, sorted({*routes, GENERAL})))
    answers = answerer.answer(questions, routes, _labels(cfg, records, len(questions)))
    if records is not None and out_dir is not None:
        backgrounds = {i: a.background for i, a in enumerate(answers) if a.background is not None}
        score_routed(cfg, records, routes, [a.text for a in answers], backgrounds, Path(out_dir), answerer.notes())
    return [a.text for a in answers]


def _labels(cfg: DictConfig, records: Sequence[Any] | None, n: int) -> list[str]:
    """How an error names each routed question: the test file's 1-based line, or the query's position."""
    if records is not None:
        from omegaconf import OmegaConf

        test_set = OmegaConf.select(cfg, "router.test_set", default="the mixed test set")
        return [f"{test_set}, line {getattr(r, 'line', None) or '?'}: field 'question'" for r in records]
    return [f"query {i + 1}" for i in range(n)]


# ------------------------------------------------------------------------------------------- mode=answer
def answer_mixed(cfg: DictConfig, records: Sequence[Any], routed: Sequence[str], gold: Sequence[str],
                 out_dir: str | Path) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The mixed online test answered by the router's routes, by the gold routes and by the base alone.

    Routed and oracle answers come from one pass per route over the union of the queries either system sends
    there (a (route, question) pair is decoded once); the base-alone system is decoded on its own, so the general
    route's answers are compared with an independent base run. Writes predictions.jsonl, metrics.json,
    report.md and answer_report.json into ``out_dir``; returns (that report, {system: answer texts}).
    """
    out = Path(out_dir)
    questions = [r.question for r in records]
    configured = _configured(cfg)
    unknown = sorted({*routed, *gold} - configured)
    if unknown:
        log.warning("[answer] route(s) %s have no configured answering route: their queries get empty answers",
                    unknown)
    t0 = time.perf_counter()
    answerer = RouteAnswerer(cfg, resolve_profiles(cfg, sorted({*routed, *gold, GENERAL} & configured)))
    answerer.load_all()
    rss_after_load = _rss_bytes()
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    needed: dict[str, list[int]] = defaultdict(list)
    for i in range(len(records)):
        for route in dict.fromkeys((routed[i], gold[i])):
            if route in answerer.profiles:
                needed[route].append(i)
    labels = _labels(cfg, records, len(records))
    by_pair: dict[tuple[str, int], RoutedAnswer] = {}
    timings: dict[str, dict[str, float]] = {}
    for route, rows in needed.items():
        t = time.perf_counter()
        answers = answerer.answer_route(route, [questions[i] for i in rows], labels=[labels[i] for i in rows])
        for i, ans in zip(rows, answers, strict=True):
            by_pair[(route, i)] = ans
        timings[route] = {"queries": len(rows), "seconds": time.perf_counter() - t}
        log.info("[answer] route %s: %d queries in %.1fs", route, len(rows), timings[route]["seconds"])
    t = time.perf_counter()
    base_answers = answerer.answer_route(GENERAL, questions, labels=labels)
    timings["base_alone"] = {"queries": len(questions), "seconds": time.perf_counter() - t}
    answer_s = time.perf_counter() - t0

    def pick(routes: Sequence[str]) -> list[RoutedAnswer]:
        return [by_pair.get((r, i)) or RoutedAnswer("", r, None, False, 0) for i, r in enumerate(routes)]

    systems = {"routed": (list(routed), pick(routed)), "oracle": (list(gold), pick(gold)),
               "base": ([GENERAL] * len(records), base_answers)}
    notes = answerer.notes()
    summary = score_systems(cfg, records, systems, out, notes)
    general_rows = [i for i, r in enumerate(routed) if r == GENERAL]
    same = sum(systems["routed"][1][i].text == base_answers[i].text for i in general_rows)
    memory = memory_report(answerer, rss_after_load)
    groups = {s: summary[s].get("groups", {}) for s in SYSTEMS}
    report = {
        "systems": {s: {name: _headline(stats) for name, stats in g.items()} for s, g in groups.items()},
        "all": {s: _headline(summary[s]) for s in SYSTEMS},
        "routed_minus_oracle_fact_acc": {
            name: (None if stats.get("fact_acc") is None or groups["oracle"][name].get("fact_acc") is None
                   else stats["fact_acc"] - groups["oracle"][name]["fact_acc"])
            for name, stats in groups["routed"].items()},
        "notes": notes,
        "misrouted": sum(r != g for r, g in zip(routed, gold, strict=True)),
        "general_route_vs_base": {"queries": len(general_rows), "identical_answers": same},
        "routes": {n: p.describe() for n, p in answerer.profiles.items()},
        "memory": memory,
        "timing": {"load_s": load_s, "answer_s": answer_s, "per_route": timings},
    }
    atomic_write_text(out / ANSWER_REPORT, json.dumps(report, indent=2, ensure_ascii=False, default=str))
    _print_answer_report(report)
    return report, {name: [a.text for a in answers] for name, (_, answers) in systems.items()}


def _configured(cfg: DictConfig) -> set[str]:
    return {str(e.get("name") or k) for k, e in route_entries(cfg).items()} | {GENERAL}


def _headline(stats: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("n", "fact_acc", "fact_acc_ci", "em", "token_f1", "bertscore_f1", "sts")
    return {k: stats.get(k) for k in keys if k in stats}


def _print_answer_report(report: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * float(x):.1f}"

    table = Table(title="mixed-domain answering: routed vs oracle routing vs base alone (x100)")
    table.add_column("dataset")
    table.add_column("n", justify="right")
    for s in SYSTEMS:
        for m in ("fact_acc", "em", "bertscore_f1"):
            table.add_column(f"{s} {m}", justify="right")
    systems = report["systems"]
    for name in systems["routed"]:
        row = [name, str(systems["routed"][name].get("n"))]
        for s in SYSTEMS:
            stats = systems[s].get(name, {})
            row += [pct(stats.get(m)) for m in ("fact_acc", "em", "bertscore_f1")]
        table.add_row(*row)
    console = Console()
    console.print(table)
    g = report["general_route_vs_base"]
    console.print(f"general route vs base alone: {g['identical_answers']}/{g['queries']} identical answers; "
                  f"misrouted queries: {report['misrouted']}")
    console.print(report["memory"]["summary"])


# ------------------------------------------------------------------------------------------- scoring
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


def _general_sets(cfg: DictConfig) -> set[str]:
    from omegaconf import OmegaConf

    names = OmegaConf.select(cfg, "router.domains.general.dataset_names", default=None)
    return set(OmegaConf.to_container(names, resolve=True) if OmegaConf.is_config(names) else (names or []))


def score_systems(cfg: DictConfig, records: Sequence[Any],
                  systems: Mapping[str, tuple[Sequence[str], Sequence[RoutedAnswer]]],
                  out_dir: Path, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Per-dataset metrics of each system: fact_acc (records with gold aliases) and token F1 for every set,
    has-answer EM for general sets, BERTScore F1 and STS for specialist sets. Writes predictions.jsonl,
    metrics.json ({"systems": summary, "notes": notes}) and report.md; ``notes`` (an adapter selected on the test
    split) head the report."""
    from gag_lightning.pipeline.evaluate import build_scorers

    general_sets = _general_sets(cfg)
    specialist = [i for i, r in enumerate(records) if r.dataset_name not in general_sets]
    scorers = build_scorers(cfg, _device(cfg)) if specialist else {}
    rows = []
    for system, (routes, answers) in systems.items():
        texts = [a.text for a in answers]
        scores: dict[int, dict[str, float]] = defaultdict(dict)
        if specialist:
            preds = [texts[i] for i in specialist]
            refs = [records[i].answers[0] for i in specialist]
            for name, scorer in scorers.items():
                for i, value in zip(specialist, scorer.score(preds, refs), strict=True):
                    scores[i][name] = 0.0 if is_empty_prediction(texts[i]) else float(value)
        for i, rec in enumerate(records):
            row = {"system": system, "id": str(i), "dataset_name": rec.dataset_name, "question": rec.question,
                   "route": routes[i], "reference": rec.answers, "prediction": texts[i],
                   "empty": is_empty_prediction(texts[i]), **scores.get(i, {})}
            aliases = fact_aliases(rec, general_sets)
            row["fact_acc"] = fact_match(texts[i], aliases) if aliases is not None else None
            row["token_f1"] = max((token_f1(texts[i], ref) for ref in rec.answers), default=0.0)
            if rec.dataset_name in general_sets:
                row["em"] = has_answer(texts[i], rec.answers)
            if answers[i].background is not None:
                row["background"] = answers[i].background
            rows.append(row)
    paired = "oracle" if "oracle" in systems else None
    summary = summarize_scores(rows, by="dataset_name", metrics=("fact_acc", "token_f1", "bertscore_f1", "sts", "em"),
                               paired_with=paired)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "predictions.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    atomic_write_text(out_dir / "metrics.json", json.dumps({"systems": summary, "notes": list(notes)}, indent=2,
                                                           ensure_ascii=False))
    table = {}
    for system in systems:
        for name, stats in summary[system].get("groups", {}).items():
            table[f"{system}/{name}"] = stats
        table[f"{system}/all"] = {k: v for k, v in summary[system].items() if k != "groups"}
    atomic_write_text(out_dir / "report.md", markdown_report(table, "mixed-domain answering", notes))
    return summary


def score_routed(cfg: DictConfig, records: Sequence[Any], routes: Sequence[str], answers: Sequence[str],
                 backgrounds: Mapping[int, str], out_dir: Path, notes: Sequence[str] = ()) -> dict[str, Any]:
    """``score_systems`` for one system, ``routed``."""
    wrapped = [RoutedAnswer(a, r, backgrounds.get(i)) for i, (a, r) in enumerate(zip(answers, routes, strict=True))]
    return score_systems(cfg, records, {"routed": (list(routes), wrapped)}, Path(out_dir), notes)
