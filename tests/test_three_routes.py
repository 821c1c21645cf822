"""route.py mode=answer over three routes (general + two tiny specialist domains) on one tiny base: routed vs
oracle vs base-alone answers per dataset, the confusion PNG beside the JSON report, one base in memory."""

from __future__ import annotations

import json

import pytest

from gag_lightning.routing.run import run
from tests.conftest import ROOT


def three_routes(two: dict) -> list[str]:
    """router=three_routes with the tiny domains' adapters (their smoke settings are recorded with them)."""
    return ["experiment=smoke", "router=three_routes", f"paths.artifacts={two['artifacts']}",
            f"+router.domains.demo.adapter={two['adapter']['demo']}",
            f"+router.domains.demo_bio.adapter={two['adapter']['demo_bio']}"]


@pytest.fixture(scope="module")
def answered(tiny_two_domains, tmp_path_factory) -> dict:
    from tests.conftest import compose

    out = tmp_path_factory.mktemp("three_routes")
    cfg = compose([*three_routes(tiny_two_domains), "mode=answer", "print_config=false",
                   f"paths.cache_dir={ROOT / '.cache'}", f"paths.output_dir={out}"], "route")
    return {"result": run(cfg), "out": out, "cfg": cfg}


def test_three_route_answer_report(answered) -> None:
    out, result = answered["out"], answered["result"]
    routing = json.loads((out / "routing_report.json").read_text())
    assert routing["confusion"]["labels"] == ["general", "demo", "demo_bio"] and routing["n"] == 172
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "answer_report.json").read_text())
    assert set(report["systems"]) == {"routed", "oracle", "base"}
    for system in ("routed", "oracle", "base"):
        groups = report["systems"][system]
        assert {"demo", "demo_bio", "nq", "webqa"} <= set(groups)
        assert groups["demo"]["n"] == groups["demo_bio"]["n"] == 56
        assert "fact_acc" in groups["demo_bio"] and "bertscore_f1" in groups["demo_bio"] and "em" in groups["nq"]
    metrics = json.loads((out / "metrics.json").read_text())["systems"]
    assert metrics["routed"]["paired_vs_oracle"]["n"] == 172
    assert result["answer_metrics"]["demo_bio"]["fact_acc"] == metrics["routed"]["groups"]["demo_bio"]["fact_acc"]
    # each route answers with its own settings, recorded in the report
    routes = report["routes"]
    assert routes["demo_bio"]["request_text"] != routes["demo"]["request_text"]
    assert routes["demo_bio"]["domain"] == "demo_bio" and routes["general"]["instruction"] == "You are a helpful assistant."


def test_routed_equals_oracle_where_routed_right_and_general_equals_base(answered) -> None:
    rows = [json.loads(x) for x in (answered["out"] / "predictions.jsonl").read_text().splitlines()]
    by = {s: [r for r in rows if r["system"] == s] for s in ("routed", "oracle", "base")}
    assert all(len(v) == 172 for v in by.values())
    routes = [json.loads(x) for x in (answered["out"] / "routes.jsonl").read_text().splitlines()]
    right = [i for i, r in enumerate(routes) if r["pred"] == r["gold"]]
    assert right, "the tiny router routed nothing right"
    # a (route, question) pair is decoded once: where routing is right, routed and oracle are the same answer
    assert all(by["routed"][i]["prediction"] == by["oracle"][i]["prediction"] for i in right)
    assert all(by["oracle"][i]["route"] == routes[i]["gold"] for i in range(172))
    # the general route is the base alone: the independent base-alone pass gives the same answers
    general = [i for i, r in enumerate(routes) if r["pred"] == "general"]
    assert general
    same = sum(by["routed"][i]["prediction"] == by["base"][i]["prediction"] for i in general)
    report = json.loads((answered["out"] / "answer_report.json").read_text())
    assert report["general_route_vs_base"] == {"queries": len(general), "identical_answers": same}
    assert same == len(general)
    diffs = report["routed_minus_oracle_fact_acc"]
    assert set(diffs) >= {"demo", "demo_bio"}


def test_one_base_in_memory(answered) -> None:
    memory = json.loads((answered["out"] / "answer_report.json").read_text())["memory"]
    assert memory["base_copies"] == 1
    assert set(memory["expert_bytes"]) == set(memory["adapter_bytes"]) == {"demo", "demo_bio"}
    total = memory["base_bytes"] + sum(memory["expert_bytes"].values()) + sum(memory["adapter_bytes"].values())
    assert memory["one_base_plus_routes_bytes"] == total
    assert memory["peak_rss_bytes"] > total
    assert "peak RSS" in memory["summary"] and "a second base would make" in memory["summary"]
