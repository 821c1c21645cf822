"""One shared frozen base answering every route (METHOD.md section 6), each domain route with its own expert,
adapter and settings.

A ``RouteAnswerer`` holds **one** copy of the base and, per domain route, that route's ``RouteProfile``
(``routing.profiles``: its instruction, request text, background prompt, compression schema and answer length,
from its own preset or its artifacts' metadata, never from the domain the command was composed with) with its
expert and adapter (``DomainRoute``), loaded once on first use. The general route is the base alone with the
general prompt (the eval harness's ``base`` system); a domain route runs its expert to write backgrounds,
compresses them into memories exactly as the memory stage did (same prompts, decoding, stop ids, compression,
storage dtype) and lets the base answer with the memories injected (the harness's ``gag`` system), with the
instruction, request text and slot placeholder the adapter was trained with. ``answer_route`` answers one route's
queries through the eval harness (``route.py``); ``answer_mixed_batch`` answers a batch mixing routes in one base
pass (the server).
"""

from __future__ import annotations

import logging
import resource
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gag_lightning.data.records import QARecord
from gag_lightning.errors import GAGError
from gag_lightning.eval.generation import DecodingConfig, generate_batched
from gag_lightning.eval.harness import EvalHarness, EvalItem
from gag_lightning.eval.limits import check_prompts_fit
from gag_lightning.memory.background import background_prompt_ids
from gag_lightning.memory.extract import extract_memories
from gag_lightning.prompts import stop_token_ids
from gag_lightning.routing.decoding import greedy_shrinking
from gag_lightning.routing.profiles import (
    GENERAL,
    RouteProfile,
    check_base,
    general_profile,
    route_entries,
    route_profile,
)

log = logging.getLogger(__name__)

__all__ = ["DomainRoute", "RouteAnswerer", "RoutedAnswer", "peak_rss_bytes", "resolve_profiles", "rss_bytes"]


@dataclass
class RoutedAnswer:
    """One answer and how it was made."""

    text: str
    route: str
    background: str | None = None  # the expert's background (domain routes)
    finished: bool = True  # False: cut by the answer length
    new_tokens: int = 0


def _device(cfg: DictConfig) -> torch.device:
    from gag_lightning.eval.settings import eval_device

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


def rss_bytes() -> int | None:
    """Current resident set size (Linux /proc), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class DomainRoute:
    """A domain route, loaded: its expert (+ tokenizer, stop ids) and its adapter, for its profile."""

    def __init__(self, profile: RouteProfile, device: torch.device, base_tokenizer: Any) -> None:
        from gag_lightning.models.adapter_io import adapter_placeholder, load_adapter, selection_note
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
        from gag_lightning.eval.settings import decoding_config
        from gag_lightning.models.base import base_identity, load_base

        self.cfg = cfg
        self.device = device or _device(cfg)
        self.profiles = dict(profiles) if profiles is not None else resolve_profiles(cfg)
        if GENERAL not in self.profiles:
            self.profiles[GENERAL] = general_profile(cfg)
        self.rss_before_models = rss_bytes()
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
        from gag_lightning.models.adapter import injected_embeddings

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
