"""The routed GAG server: PPR routing + one shared frozen base + each domain's expert and adapter, behind an
OpenAI-compatible ``POST /v1/chat/completions`` on LitServe (``serve.py``).

``RoutedService`` is the whole model side and knows nothing of HTTP: it loads the router (building missing
banks, like ``route.py``), the base once and every domain route's expert and adapter (``routing.answer``), validates
a request body (``serving.protocol``: 4xx for anything it cannot honour, before batching) and answers a batch:
the batch's questions are routed in one encoder call, each domain route's expert writes its rows' backgrounds and
memories, and the shared base answers the whole batch in one pass, each row with its own route's prompt, adapter
and memories (``RouteAnswerer.answer_mixed_batch``). ``serving.api.ChatAPI`` is the LitServe adapter: LitServe's
dynamic batching (``max_batch_size``, ``batch_timeout``) collects concurrent requests into those batches; every
response carries, beside the standard chat.completion fields, the chosen ``route``, the per-route
``route_scores`` and the ``batch_size`` it was answered in. ``GET /v1/models`` lists the routed model and the
routes; ``GET /health`` is LitServe's own.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gag_lightning.serving.protocol import ChatQuery, chat_response, models_body, parse_chat_request

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

__all__ = ["CHAT_PATH", "MODELS_PATH", "RoutedService", "build_server", "route_descriptions", "serve"]


def _context_window(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def route_descriptions(profiles: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What /v1/models says about each route."""
    out = {}
    for name, p in profiles.items():
        out[name] = {"route": name, "domain": p.domain, "dataset_names": list(p.dataset_names),
                     "kind": "base" if p.is_general else "gag", "answer_max_new_tokens": p.answer_max_new_tokens,
                     "instruction": p.instruction}
    return out


class RoutedService:
    """Router + answerer for the server, loaded once per worker."""

    def __init__(self, cfg: DictConfig, device: Any = None) -> None:
        import torch

        from gag_lightning.routing.answerer import RouteAnswerer, resolve_profiles
        from gag_lightning.routing.banks import build_router, load_router_encoder, pick_device, route_specs
        from gag_lightning.routing.presets import expand_router

        self.cfg = cfg
        t0 = time.perf_counter()
        specs = route_specs(expand_router(cfg))
        self.encoder = load_router_encoder(cfg.model.encoders.router, cfg.paths.cache_dir, device=pick_device(cfg),
                                           dtype=str(cfg.router.get("dtype") or "float32"))
        self.router, _ = build_router(cfg, self.encoder, specs)
        dev = torch.device(str(device)) if device is not None and str(device) != "auto" else None
        self.answerer = RouteAnswerer(cfg, resolve_profiles(cfg, self.router.domains), device=dev)
        self.answerer.load_all()
        missing = [d for d in self.router.domains if d not in self.answerer.profiles]
        if missing:
            raise RuntimeError(f"routes {missing} have a bank but no answering profile")
        self.served_model = str(OmegaConf.select(cfg, "serve.model_name", default="gag-router"))
        self.base_context = _context_window(self.answerer.base)
        self.expert_context = {n: _context_window(r.expert) for n, r in self.answerer.routes.items()}
        self.batch_sizes: Counter[int] = Counter()
        log.info("[serve] routes %s ready in %.1fs (base context %s tokens)", self.router.domains,
                 time.perf_counter() - t0, self.base_context)

    # ------------------------------------------------------------------ requests
    @property
    def routes(self) -> list[str]:
        return list(self.router.domains)

    def count_tokens(self, question: str) -> int:
        return len(self.answerer.tokenizer(question, add_special_tokens=False)["input_ids"])

    def too_long(self, question: str, n_tokens: int, max_new_tokens: int | None) -> str | None:
        """Why the question does not fit some route's context windows (None: it fits every route)."""
        if self.base_context is not None and n_tokens >= self.base_context:
            return (f"the question has {n_tokens} tokens; the base model's context window is {self.base_context} "
                    "tokens. Shorten the message.")
        for name in self.routes:
            profile = self.answerer.profiles[name]
            answer = int(max_new_tokens or profile.answer_max_new_tokens)
            prompt = len(self.answerer.answer_prompts(name, [question])[0])
            if self.base_context is not None and prompt + answer > self.base_context:
                return (f"route '{name}': the prompt ({prompt} tokens) plus the answer ({answer} tokens) exceeds the "
                        f"base model's context window of {self.base_context} tokens. Shorten the message"
                        + (" or lower max_tokens." if max_new_tokens else "."))
            if not profile.is_general:
                route = self.answerer.route(name)
                window = self.expert_context.get(name)
                bg = len(route.background_prompts([question])[0]) + int(profile.background.max_new_tokens)
                if window is not None and bg > window:
                    return (f"route '{name}': the expert's background prompt plus its background ({bg} tokens) "
                            f"exceeds the expert's context window of {window} tokens. Shorten the message.")
        return None

    def parse(self, body: Any) -> ChatQuery:
        return parse_chat_request(body, self.served_model, self.routes, self.count_tokens, self.too_long)

    # ------------------------------------------------------------------ answering
    def predict(self, queries: Sequence[ChatQuery]) -> list[dict[str, Any]]:
        """Route the batch in one encoder call, answer it route by route, build the responses."""
        t0 = time.perf_counter()
        n = len(queries)
        self.batch_sizes[n] += 1
        decisions = self.router.route_texts(self.encoder, [q.question for q in queries],
                                            batch_size=int(self.cfg.router.batch_size))
        routes = [q.route or d.domain for q, d in zip(queries, decisions, strict=True)]
        answers = self.answerer.answer_mixed_batch([q.question for q in queries], routes,
                                                   [q.max_new_tokens for q in queries])
        out = []
        for q, d, route, ans in zip(queries, decisions, routes, answers, strict=True):
            q.prompt_tokens = len(self.answerer.answer_prompts(route, [q.question])[0])
            out.append(chat_response(q, ans.text, ans.finished, ans.new_tokens, route, d.scores, n,
                                     extra={"routing": {"best": d.best, "fell_back": d.fell_back,
                                                        "forced": q.route is not None}}))
        log.info("[serve] batch of %d request(s): %s in %.2fs", n,
                 dict(Counter(routes)), time.perf_counter() - t0)
        return out


def _bad_body_handler() -> Any:
    """FastAPI's body validation (not JSON, not an object) as a 400 with an OpenAI-style error body."""
    from fastapi.responses import JSONResponse

    from gag_lightning.serving.protocol import error_body

    async def handler(request: Any, exc: Any) -> Any:
        problems = "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "invalid body"
        return JSONResponse(status_code=400, content=error_body(
            f"the request body must be a JSON object (chat completion request): {problems}", code="invalid_json"))

    return handler


def build_server(cfg: DictConfig) -> Any:
    """The LitServer: the chat endpoint with dynamic batching, plus GET /v1/models (GET /health is LitServe's)."""
    import litserve as ls
    from fastapi.exceptions import RequestValidationError

    from gag_lightning.routing.answerer import resolve_profiles
    from gag_lightning.routing.banks import route_specs
    from gag_lightning.routing.presets import expand_router
    from gag_lightning.serving.api import ChatAPI

    node = cfg.serve
    # workers run outside Hydra: resolve the paths (${hydra:...}), keep every other interpolation, so that a route's
    # own domain preset still reaches the stage settings that read ${domain...} (routing.profiles.route_config)
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree["paths"] = OmegaConf.to_container(cfg.paths, resolve=True)
    # fail fast, before any worker starts: every route resolves (settings, artifacts agree) from the config alone
    names = [s.name for s in route_specs(expand_router(cfg))]
    profiles = resolve_profiles(cfg, names)
    api = ChatAPI(tree, max_batch_size=int(node.max_batch_size), batch_timeout=float(node.batch_timeout),
                  api_path=CHAT_PATH)
    timeout = node.get("timeout", 300)
    accelerator = "cuda" if str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda") else "cpu"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=int(node.workers_per_device),
                          timeout=False if timeout in (None, False) else float(timeout))
    body = models_body(str(node.model_name), route_descriptions(profiles), created=int(time.time()))

    async def list_models() -> dict[str, Any]:
        return body

    server.app.add_api_route(MODELS_PATH, list_models, methods=["GET"])
    server.app.add_exception_handler(RequestValidationError, _bad_body_handler())
    return server


def serve(cfg: DictConfig) -> None:
    node = cfg.serve
    server = build_server(cfg)
    log.info("[serve] http://%s:%s%s (model '%s'; routes: GET %s)", node.host, node.port, CHAT_PATH,
             node.model_name, MODELS_PATH)
    server.run(host=str(node.host), port=int(node.port), log_level=str(node.get("log_level", "info")),
               generate_client_file=False)
