"""route.py end to end with the tiny encoder: report files, bank reuse, foreign banks refused, plug-and-play."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gag_lightning.errors import GAGError, SchemaMismatchError
from gag_lightning.routing.prototypes import PrototypeBank
from gag_lightning.routing.run import answering_available, route_specs, run
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> dict:
    """One real `python route.py experiment=smoke` (the entry point, in a subprocess); tests reuse its banks."""
    tmp = tmp_path_factory.mktemp("route")
    artifacts, out = tmp / "artifacts", tmp / "out"
    cmd = [
        sys.executable,
        str(ROOT / "route.py"),
        "experiment=smoke",
        "print_config=false",
        f"paths.artifacts={artifacts}",
        f"paths.cache_dir={ROOT / '.cache'}",
        f"hydra.run.dir={out}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"artifacts": artifacts, "out": out, "stdout": proc.stdout + proc.stderr, "seconds": seconds}


def _cfg(compose_cfg, smoke_run, *overrides: str):  # type: ignore[no-untyped-def]
    return compose_cfg(["experiment=smoke", f"paths.artifacts={smoke_run['artifacts']}", *overrides], "route")


def _bank_files(artifacts: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(artifacts.rglob("*")) if p.is_file()}


def test_smoke_entry_point_writes_report_routes_and_banks(smoke_run) -> None:
    assert smoke_run["seconds"] < 120
    out = smoke_run["out"]
    report = json.loads((out / "routing_report.json").read_text())
    assert report["n"] == 116 and 0.0 <= report["micro_accuracy"] <= 1.0
    assert set(report["per_route_accuracy"]) == {"general", "demo"}
    assert report["confusion"]["labels"] == ["general", "demo"]
    assert sum(map(sum, report["confusion"]["matrix"])) == 116
    assert report["queries_per_s"] > 0
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "routes.jsonl").read_text().splitlines()]
    assert len(rows) == 116
    assert {"question", "dataset_name", "gold", "pred", "scores"} <= set(rows[0])
    assert {r["gold"] for r in rows} == {"general", "demo"}
    assert sum(r["gold"] == r["pred"] for r in rows) == report["correct"]
    assert "routing micro accuracy" in smoke_run["stdout"] and "queries/s" in smoke_run["stdout"]
    # one encoder folder holding one bank folder per route, each finished by its manifest
    (enc_dir,) = [p for p in (smoke_run["artifacts"] / "router").iterdir() if p.is_dir()]
    banks = sorted(p.name.rsplit("-", 1)[0] for p in enc_dir.iterdir() if p.is_dir())
    assert banks == ["demo", "general"]
    for p in enc_dir.iterdir():
        if p.is_dir():
            assert {"manifest.json", "bank.json", "prototypes.safetensors"} <= {f.name for f in p.iterdir()}


def test_second_run_reuses_banks(compose_cfg, smoke_run) -> None:
    before = _bank_files(smoke_run["artifacts"])
    result = run(_cfg(compose_cfg, smoke_run))
    assert {n: b["built"] for n, b in result["banks"].items()} == {"general": False, "demo": False}
    assert _bank_files(smoke_run["artifacts"]) == before
    first = json.loads((smoke_run["out"] / "routing_report.json").read_text())
    assert result["micro_accuracy"] == pytest.approx(first["micro_accuracy"])


def _foreign_bank(domain: str, dim: int) -> PrototypeBank:
    p = F.normalize(torch.randn(4, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return PrototypeBank(
        domain,
        p,
        "sentence_transformer|name=other|pool=mean|max_len=64|w=000000000000",
        dim=dim,
        k=4,
        pool_size=40,
    )


def test_bank_from_another_encoder_is_refused(compose_cfg, smoke_run, tmp_path) -> None:
    dim = PrototypeBank.load(next((smoke_run["artifacts"] / "router").glob("*/demo-*"))).dim
    # 1) a prebuilt bank given explicitly for a route
    folder = _foreign_bank("demo", dim).save(tmp_path / "foreign")
    cfg = _cfg(
        compose_cfg, smoke_run, f"router.domains.current.bank={folder}", "router.domains.current.pool=null"
    )
    with pytest.raises(SchemaMismatchError, match="another encoder"):
        run(cfg)
    # 2) a foreign bank copied into the folder reserved for this encoder
    art = tmp_path / "artifacts"
    shutil.copytree(smoke_run["artifacts"], art)
    (target,) = list((art / "router").glob("*/demo-*"))
    _foreign_bank("demo", dim).save(target)
    with pytest.raises(SchemaMismatchError, match="another encoder"):
        run(_cfg(compose_cfg, smoke_run, f"paths.artifacts={art}"))


def test_adding_a_domain_only_moves_routes_into_it(compose_cfg, smoke_run, tmp_path) -> None:
    before = _bank_files(smoke_run["artifacts"])
    base = run(_cfg(compose_cfg, smoke_run))
    rows_before = [json.loads(x) for x in (tmp_path / "out" / "routes.jsonl").read_text().splitlines()]
    # the new domain's pool: some of the test's general questions, so that some routes must move
    mixed = [json.loads(x) for x in (ROOT / "data" / "demo" / "mixed_online.jsonl").read_text().splitlines()]
    pool = tmp_path / "extra.jsonl"
    pool.write_text(
        "".join(json.dumps({"question": r["question"]}) + "\n" for r in mixed if r["dataset_name"] == "nq")
    )
    cfg = _cfg(compose_cfg, smoke_run, f"+router.domains.extra={{pool: '{pool}', dataset_names: [extra_qa]}}")
    added = run(cfg)
    assert added["banks"]["extra"]["built"] is True
    assert not added["banks"]["general"]["built"] and not added["banks"]["demo"]["built"]
    assert {k: v for k, v in _bank_files(smoke_run["artifacts"]).items() if k in before} == before
    rows_after = [json.loads(x) for x in (tmp_path / "out" / "routes.jsonl").read_text().splitlines()]
    changed = [(a, b) for a, b in zip(rows_before, rows_after, strict=True) if a["pred"] != b["pred"]]
    assert changed, "the new domain's pool holds test questions: some routes must move to it"
    assert all(b["pred"] == "extra" for _, b in changed)
    for a, b in zip(rows_before, rows_after, strict=True):  # the old domains' scores are untouched
        assert b["scores"]["general"] == pytest.approx(a["scores"]["general"], abs=1e-5)
        assert b["scores"]["demo"] == pytest.approx(a["scores"]["demo"], abs=1e-5)
    assert base["banks"].keys() == {"general", "demo"}


@pytest.fixture(scope="module")
def smoke_pipeline(smoke_run) -> dict:
    """The tiny pipeline (dapt -> eval) into the same artifacts, so routed answering has a domain path."""
    from gag_lightning.stages import run as run_pipeline
    from tests.conftest import compose

    cfg = compose(["experiment=smoke", "print_config=false", f"paths.artifacts={smoke_run['artifacts']}",
                   f"paths.output_dir={smoke_run['out'] / 'pipeline'}", f"paths.cache_dir={ROOT / '.cache'}"])
    run_pipeline(cfg)
    return smoke_run


def test_query_mode_prints_route_scores_and_answer(compose_cfg, smoke_pipeline, capsys) -> None:
    queries = "['What is the capital of France?','Who discovered the compound Veltrium oxide?']"
    result = run(_cfg(compose_cfg, smoke_pipeline, "mode=query", f"query={queries}"))
    assert [set(r["scores"]) for r in result["routes"]] == [{"general", "demo"}] * 2
    assert all(r["route"] in ("general", "demo") for r in result["routes"])
    assert len(result["answers"]) == 2 and all(isinstance(a, str) for a in result["answers"])
    assert "What is the capital of France?" in capsys.readouterr().out


def test_answer_mode_scores_per_dataset_and_general_matches_base(compose_cfg, smoke_pipeline, tmp_path) -> None:
    from dataclasses import replace

    from gag_lightning.eval.generation import generate_batched
    from gag_lightning.eval.settings import decoding_config
    from gag_lightning.models.base import load_base
    from gag_lightning.prompts import (
        GENERAL_INSTRUCTION,
        GENERAL_REQUEST_TEXT,
        plain_user_text,
        render_prompt,
        stop_token_ids,
    )

    assert answering_available()
    cfg = _cfg(compose_cfg, smoke_pipeline, "mode=answer", f"paths.output_dir={tmp_path}")
    result = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 116 and len(result["answers"]) == 116
    assert {r["system"] for r in rows} == {"routed", "oracle", "base"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())["systems"]
    groups = metrics["routed"]["groups"]
    assert "em" in groups["nq"] and "bertscore_f1" in groups["demo"] and "sts" in groups["demo"]
    assert groups["nq"]["fact_acc"] is not None and groups["demo"]["fact_acc"] is not None  # demo records carry aliases
    assert result["answer_metrics"]["nq"]["fact_acc"] == groups["nq"]["fact_acc"]
    assert set(metrics["oracle"]["groups"]) == set(metrics["base"]["groups"]) == set(groups)
    assert (tmp_path / "report.md").is_file() and (tmp_path / "answer_report.json").is_file()
    # the general route is the base alone with the general prompt, decoded the same way: decode its queries (the
    # routed and gold general queries, one pass, as the answering did) with the plain base and compare
    routes = [json.loads(x) for x in (tmp_path / "routes.jsonl").read_text().splitlines()]
    union = [i for i, r in enumerate(routes) if "general" in (r["pred"], r["gold"])]
    routed = [r for r in rows if r["system"] == "routed"]
    general = [i for i in union if routes[i]["pred"] == "general"]
    assert general, "the tiny router sent no query to general"
    base, tok, _, _ = load_base(cfg)
    prompts = [tok(render_prompt(tok, [{"role": "user", "content": plain_user_text(
        GENERAL_INSTRUCTION, GENERAL_REQUEST_TEXT, routed[i]["question"])}]), add_special_tokens=False)["input_ids"]
        for i in union]
    decoding = replace(decoding_config(cfg), max_new_tokens=int(cfg.router.domains.general.answer_max_new_tokens))
    alone = generate_batched(base.eval(), tok, prompts, decoding, stop_token_ids(tok, base.generation_config),
                             share_prefix=True)  # the harness's default: the same prefill, the same float rounding
    alone_by_index = dict(zip(union, (g.text for g in alone), strict=True))
    assert [alone_by_index[i] for i in general] == [routed[i]["prediction"] for i in general]


def test_query_mode_without_query(compose_cfg, smoke_run) -> None:
    with pytest.raises(GAGError, match="mode=query needs"):
        run(_cfg(compose_cfg, smoke_run, "mode=query"))


def test_route_specs_errors() -> None:
    with pytest.raises(GAGError, match="no 'general' route"):
        route_specs({"domains": {"demo": {"pool": "x.jsonl", "dataset_names": ["demo"]}}})
    with pytest.raises(GAGError, match="neither 'pool'"):
        route_specs({"domains": {"general": {"dataset_names": ["nq"]}}})
    with pytest.raises(GAGError, match="configured twice"):
        route_specs({"domains": {"general": {"pool": "g"}, "x": {"name": "general", "pool": "h"}}})
    specs = route_specs({"domains": {"general": {"pool": "g", "dataset_names": "nq"}, "off": None}})
    assert [(s.name, s.dataset_names) for s in specs] == [("general", ("nq",))]


@pytest.mark.parametrize("domain", ["demo", "demo_bio", "materials", "adjuvant"])
@pytest.mark.parametrize("model", ["smollm2", "tiny", "qwen3"])
def test_route_config_composes(compose_cfg, domain, model) -> None:
    from omegaconf import OmegaConf

    cfg = compose_cfg([f"domain={domain}", f"model={model}"], "route")
    router = OmegaConf.to_container(cfg.router, resolve=True)
    specs = route_specs(router)
    assert [s.name for s in specs] == ["general", domain]
    assert specs[1].dataset_names == tuple(cfg.domain.dataset_names)
    assert cfg.mode == "eval" and cfg.model.encoders.router.kind in ("sentence_transformers", "causal_lm")
    assert str(router["banks_dir"]).endswith("/router")


def test_unmapped_dataset_name_is_an_actionable_error(compose_cfg, smoke_run, tmp_path) -> None:
    test = tmp_path / "mixed.jsonl"
    test.write_text(json.dumps({"question": "q?", "answer": "a", "dataset_name": "weird_qa"}) + "\n")
    with pytest.raises(GAGError, match="weird_qa.*dataset_names"):
        run(_cfg(compose_cfg, smoke_run, f"router.test_set={test}"))


def test_routed_answers_report_fact_acc_per_dataset(tmp_path, monkeypatch) -> None:
    """No models: fact_acc per dataset beside EM and BERTScore, n/a for a specialist set without aliases."""
    from omegaconf import OmegaConf

    from gag_lightning.data.records import MixedRecord
    from gag_lightning.eval import settings as evaluate
    from gag_lightning.routing.answer import score_routed
    from gag_lightning.routing.run import answer_metrics

    class Fluent:  # a form score: high for anything long, whatever its facts
        def score(self, preds, refs):
            return [min(1.0, len(p.split()) / 5) for p in preds]

    monkeypatch.setattr(evaluate, "build_scorers", lambda cfg, device: {"bertscore_f1": Fluent(), "sts": Fluent()})
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu"},
                            "router": {"domains": {"general": {"dataset_names": ["nq"]}}}})
    records = [MixedRecord(0, "Capital of France?", ["Paris"], "nq"),
               MixedRecord(1, "Height?", ["1,412 m"], "nq"),
               MixedRecord(2, "When?", ["Qwenthar-74 was discovered in 1956."], "material", fact_answers=["1956"]),
               MixedRecord(3, "When?", ["Qwenthar-74 was discovered in 1956."], "material", fact_answers=["1956"]),
               MixedRecord(4, "Colour?", ["Xylanthor-87 is silvery grey in colour."], "adjuvant_qa")]
    answers = ["It is Paris.", "About 1412 m.", "It was 1956.", "Qwenthar-74 was discovered in 1987.", "Grey."]
    summary = score_routed(cfg, records, ["general", "general", "materials", "materials", "adjuvant"], answers, {},
                           tmp_path)
    groups = summary["routed"]["groups"]
    assert groups["nq"]["fact_acc"] == 1.0 and groups["nq"]["em"] == 0.5  # "1,412" vs "1412": EM misses it
    assert groups["material"]["fact_acc"] == 0.5 and groups["material"]["fact_acc_n"] == 2
    assert groups["material"]["bertscore_f1"] == pytest.approx((3 / 5 + 1.0) / 2)  # the wrong answer scores higher
    assert groups["adjuvant_qa"]["fact_acc"] is None and groups["adjuvant_qa"]["fact_acc_ci"] is None
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["fact_acc"] for r in rows] == [1.0, 1.0, 1.0, 0.0, None]
    report = (tmp_path / "report.md").read_text()
    assert "| routed/adjuvant_qa | n/a |" in report and "| routed/nq | 100.0 [100.0, 100.0] |" in report
    metrics = answer_metrics(tmp_path / "metrics.json")
    assert metrics["material"]["fact_acc"] == 0.5 and metrics["nq"]["em"] == 0.5
    assert metrics["all"]["fact_acc"] == pytest.approx(3 / 4) and metrics["adjuvant_qa"]["fact_acc"] is None
    assert answer_metrics(tmp_path / "missing.json") == {}
