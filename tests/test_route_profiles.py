"""Per-route settings: two specialist routes from two tiny domains (demo, demo_bio) on one tiny base, each
prompting exactly as its own domain's GAG stage trained, whatever domain the command is composed with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gag_lightning.errors import GAGError, MissingArtifactError, SchemaMismatchError
from tests.conftest import ROOT, compose

DOMAINS = ("demo", "demo_bio")


def _routes(two: dict, domain: str = "demo", **extra_entries: str) -> list[str]:
    """Route overrides: general + one route per tiny domain, each with its preset and its trained adapter."""
    out = [f"domain={domain}", f"paths.artifacts={two['artifacts']}", "router.domains.current=null"]
    for d in DOMAINS:
        entry = extra_entries.get(d, f"{{domain: {d}, adapter: '{two['adapter'][d]}'}}")
        out.append(f"+router.domains.{d}={entry}")
    return out


@pytest.fixture(scope="module")
def answerer(tiny_two_domains):
    from gag_lightning.routing.answer import RouteAnswerer

    cfg = compose(["experiment=smoke", "print_config=false", f"paths.cache_dir={ROOT / '.cache'}",
                   "paths.output_dir=/tmp/gag-route-profiles", *_routes(tiny_two_domains)], "route")
    return RouteAnswerer(cfg)


def _trained_prompts(two: dict, domain: str, tokenizer, n: int = 6) -> list[tuple[str, list[int], list[int]]]:
    """(question, GAG prompt ids, background prompt ids) of the first train records, built by the training code:
    the GAG DataModule as run_gag builds it, the background store the memory stage wrote."""
    from gag_lightning.memory.bank import BackgroundStore
    from gag_lightning.stages.gag.datamodule import GAGDataModule
    from gag_lightning.stages.gag.runner import expected_schema
    from gag_lightning.upstream import memory_bank_dir

    cfg = compose(two["cfg"][domain])
    bank = memory_bank_dir(cfg, "train")
    dm = GAGDataModule(bank, tokenizer, instruction=cfg.domain.instruction, request_text=cfg.domain.request_text,
                       val_source="none", max_length=int(cfg.gag.max_length), seed=cfg.seed,
                       enable_thinking=bool(cfg.gag.get("enable_thinking", False)), expect=expected_schema(cfg))
    dm.setup("fit")
    metas = dm.open_bank().metas()
    manifest = json.loads((bank.parent / "manifest.json").read_text())
    store = BackgroundStore.open(Path(manifest["inputs"]["backgrounds"]) / "train")
    bg = {row["question"]: row["prompt_ids"] for row in store.read_all()}
    out = []
    for ex in dm.sets["train"].examples[:n]:
        q = metas[dm.positions["train"][ex.row]]["question"]
        out.append((q, ex.input_ids[: ex.num_prompt], bg[q]))
    return out


def test_each_route_prompts_exactly_as_its_own_gag_stage_trained(answerer, tiny_two_domains, monkeypatch) -> None:
    from gag_lightning.eval import harness as harness_module
    from gag_lightning.routing import answerer as answer_module

    trained = {d: _trained_prompts(tiny_two_domains, d, answerer.tokenizer) for d in DOMAINS}
    for d in DOMAINS:
        questions = [q for q, _, _ in trained[d]]
        # the prompts the route renders ...
        assert answerer.answer_prompts(d, questions) == [p for _, p, _ in trained[d]]
        assert answerer.route(d).background_prompts(questions) == [b for _, _, b in trained[d]]
        # ... are not the other domain's (different instruction and request text)
        other = "demo_bio" if d == "demo" else "demo"
        assert answerer.answer_prompts(other, questions[:1]) != [trained[d][0][1]]

        # and they are what answering decodes from: spy on both decoding calls
        seen: dict[str, list] = {"answer": [], "background": []}

        def spy(kind, real, seen=seen):
            def wrapped(model, tokenizer, prompts, *args, **kwargs):
                seen[kind].extend(list(p) for p in prompts)
                return real(model, tokenizer, prompts, *args, **kwargs)
            return wrapped

        monkeypatch.setattr(harness_module, "generate_batched", spy("answer", harness_module.generate_batched))
        monkeypatch.setattr(answer_module, "generate_batched", spy("background", answer_module.generate_batched))
        answers = answerer.answer_route(d, questions)
        monkeypatch.undo()
        assert [a.route for a in answers] == [d] * len(questions)
        assert seen["answer"] == [p for _, p, _ in trained[d]]
        assert seen["background"] == [b for _, _, b in trained[d]]


def test_route_settings_come_from_the_route_artifacts_and_preset(answerer, tiny_two_domains) -> None:
    from gag_lightning.routing.profiles import load_domain_preset

    for d in DOMAINS:
        p = answerer.profiles[d]
        train_cfg = compose(tiny_two_domains["cfg"][d])
        preset = load_domain_preset(d)
        assert p.instruction == preset.instruction == train_cfg.domain.instruction
        assert p.request_text == train_cfg.domain.request_text
        # the smoke run built its memories with 16-token backgrounds and answers of 12 tokens; the artifacts record
        # it and win over the preset's own lengths
        assert p.background.max_new_tokens == 16 != preset.background_max_new_tokens
        assert p.answer_max_new_tokens == 12 != preset.answer_max_new_tokens
        assert p.background.system_prompt == train_cfg.domain.background_system_prompt
        assert p.compression.slots == int(train_cfg.memory.compression.slots)
        assert p.sources["instruction"] == "gag manifest" and p.sources["background"] == "backgrounds manifest"
        assert p.expert_dir == tiny_two_domains["expert"][d] and p.adapter_dir == tiny_two_domains["adapter"][d]
        assert answerer.decoding(d).max_new_tokens == 12
    assert answerer.profiles["demo"].request_text != answerer.profiles["demo_bio"].request_text
    assert answerer.profiles["general"].instruction == "You are a helpful assistant."


def test_composed_domain_does_not_leak_into_other_routes(compose_cfg, tiny_two_domains) -> None:
    from gag_lightning.routing.answer import resolve_profiles

    described = {}
    for composed in DOMAINS:
        cfg = compose_cfg(["experiment=smoke", *_routes(tiny_two_domains, composed)], "route")
        described[composed] = {n: p.describe() for n, p in resolve_profiles(cfg).items()}
    assert described["demo"] == described["demo_bio"]


def test_composed_route_finds_its_artifacts_by_key(compose_cfg, tiny_two_domains) -> None:
    from gag_lightning.routing.answer import resolve_profiles

    cfg = compose_cfg(["experiment=smoke", "domain=demo_bio", f"paths.artifacts={tiny_two_domains['artifacts']}"],
                      "route")
    profiles = resolve_profiles(cfg)
    assert set(profiles) == {"general", "demo_bio"}
    assert profiles["demo_bio"].adapter_dir == tiny_two_domains["adapter"]["demo_bio"]
    assert profiles["demo_bio"].sources["adapter"] == "composed domain demo_bio artifacts"


def test_preset_route_without_artifacts_says_how_to_build_them(compose_cfg, tiny_two_domains) -> None:
    from gag_lightning.routing.answer import resolve_profiles

    # the preset's own budgets (not smoke's) key its artifacts: none were built with them
    cfg = compose_cfg(["experiment=smoke", *_routes(tiny_two_domains, demo_bio="{domain: demo_bio}")], "route")
    with pytest.raises(MissingArtifactError, match=r"python train.py stage=\w+ model=tiny domain=demo_bio"):
        resolve_profiles(cfg)


def test_routes_whose_artifacts_disagree_are_refused(compose_cfg, tiny_two_domains, tmp_path) -> None:
    from gag_lightning.routing.answer import RouteAnswerer, resolve_profiles

    two = tiny_two_domains
    # demo's adapter with demo_bio's expert: its memories were built by another expert
    cfg = compose_cfg(["experiment=smoke", *_routes(two, demo=(
        f"{{domain: demo, adapter: '{two['adapter']['demo']}', expert: '{two['expert']['demo_bio']}'}}"))], "route")
    with pytest.raises(SchemaMismatchError, match=r"route 'demo' is refused.*expert.*fingerprint"):
        resolve_profiles(cfg)

    # an adapter whose config no longer matches its training bank's schema
    bad = tmp_path / "bad-adapter"
    shutil.copytree(two["adapter"]["demo_bio"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["memory_schema"]["slots"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(config))
    cfg = compose_cfg(["experiment=smoke", *_routes(two, demo_bio=f"{{domain: demo_bio, adapter: '{bad}'}}")], "route")
    with pytest.raises(SchemaMismatchError, match=r"route 'demo_bio' is refused.*slots"):
        resolve_profiles(cfg)

    # an adapter trained on another base
    other = tmp_path / "other-base"
    shutil.copytree(two["adapter"]["demo"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model"] = "some-other-base@0123456789abcdef"
    (other / "adapter_config.json").write_text(json.dumps(config))
    cfg = compose_cfg(["experiment=smoke", *_routes(two, demo=f"{{domain: demo, adapter: '{other}'}}")], "route")
    with pytest.raises(SchemaMismatchError, match=r"route 'demo' is refused.*some-other-base"):
        RouteAnswerer(cfg)


def test_unknown_route_key_is_refused(compose_cfg) -> None:
    from gag_lightning.routing.profiles import route_entries

    cfg = compose_cfg(["experiment=smoke", "+router.domains.x={domain: demo, adaptor: /tmp/a}"], "route")
    with pytest.raises(GAGError, match=r"router.domains.x: unknown key\(s\) \['adaptor'\]"):
        route_entries(cfg)


def test_three_routes_config_expands_each_preset(compose_cfg) -> None:
    from gag_lightning.routing.profiles import expand_router
    from gag_lightning.routing.run import dataset_routes, route_specs

    for composed in ("demo", "demo_bio", "materials"):
        cfg = compose_cfg([f"domain={composed}", "router=three_routes"], "route")
        specs = route_specs(expand_router(cfg))
        assert [s.name for s in specs] == ["general", "demo", "demo_bio"]
        pools = {s.name: s.pool for s in specs}
        # a domain's offline pool: its router-only phrasings and its train questions (its own preset's)
        data = ROOT / "data"
        assert pools["demo_bio"] == (data / "demo_bio" / "router" / "demo_bio.jsonl", data / "demo_bio" / "train.jsonl")
        assert pools["demo"] == (data / "demo" / "router" / "demo.jsonl", data / "demo" / "train.jsonl")
        assert pools["general"] == (data / "demo" / "router" / "general.jsonl",)
        table = dataset_routes(specs)
        assert table["demo"] == "demo" and table["demo_bio"] == "demo_bio" and table["nq"] == "general"
        assert str(cfg.router.test_set).endswith("demo_bio/mixed_online_3routes.jsonl")


def test_a_mixed_batch_is_answered_in_one_base_pass(answerer, tiny_two_domains, monkeypatch) -> None:
    """The server's path: the experts write their rows' memories, then one base pass answers every route's rows,
    each with its own route's prompt and adapter, as if each route were answered on its own."""
    from gag_lightning.routing import answerer as answer_module

    qs, routes = [], []
    for d in DOMAINS:
        for q, _, _ in _trained_prompts(tiny_two_domains, d, answerer.tokenizer, n=3):
            qs.append(q)
            routes.append(d)
    qs += ["What is the capital of France?", "Who wrote Hamlet?"]
    routes += ["general", "general"]
    order = [4, 0, 6, 3, 1, 7, 5, 2]  # routes interleaved in the batch
    qs, routes = [qs[i] for i in order], [routes[i] for i in order]

    calls: list[tuple[object, list]] = []

    def spy(real):
        def wrapped(model, tokenizer, prompts, *args, **kwargs):
            calls.append((model, [list(p) for p in prompts]))
            return real(model, tokenizer, prompts, *args, **kwargs)
        return wrapped

    # the experts' background passes go through generate_batched, the base's one pass through greedy_shrinking
    monkeypatch.setattr(answer_module, "generate_batched", spy(answer_module.generate_batched))
    monkeypatch.setattr(answer_module, "greedy_shrinking", spy(answer_module.greedy_shrinking))
    mixed = answerer.answer_mixed_batch(qs, routes)
    monkeypatch.undo()
    base_calls = [c for c in calls if c[0] is answerer.base]
    assert len(base_calls) == 1 and len(calls) == 3  # two experts' background passes, one base pass
    expected = [answerer.answer_prompts(r, [q])[0] for q, r in zip(qs, routes, strict=True)]
    assert base_calls[0][1] == expected
    assert [a.route for a in mixed] == routes
    alone = answerer.answer(qs, routes)  # each route in a pass of its own
    assert [a.text for a in mixed] == [a.text for a in alone]
    assert [a.background for a in mixed] == [a.background for a in alone]
    short = answerer.answer_mixed_batch(qs, routes, [2] * len(qs))
    assert all(a.new_tokens <= 2 for a in short)
    assert all(not a.finished for a, b in zip(short, mixed, strict=True) if b.new_tokens > 2)
