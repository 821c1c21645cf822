"""Every stage x domain x hardware preset composes and resolves; the entry point prints the config."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT

STAGES = sorted(p.stem for p in (ROOT / "conf" / "stage").glob("*.yaml"))
HARDWARE = sorted(p.stem for p in (ROOT / "conf" / "hardware").glob("*.yaml"))
DOMAINS = sorted(p.stem for p in (ROOT / "conf" / "domain").glob("*.yaml") if not p.stem.startswith("_"))
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in (ROOT / "conf" / "logger").glob("*.yaml"))


def _resolve(cfg) -> dict:
    node = OmegaConf.to_container(cfg, resolve=False)
    node.pop("hydra", None)  # hydra:* interpolations only resolve inside a Hydra run
    return OmegaConf.to_container(OmegaConf.create(node), resolve=True)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("hardware", HARDWARE)
def test_stage_x_hardware_composes_on_demo(compose_cfg, stage, hardware):
    extra = ["hydra/launcher=submitit_slurm"] if hardware == "slurm" else []
    cfg = compose_cfg([f"stage={stage}", "domain=demo", f"hardware={hardware}", *extra])
    resolved = _resolve(cfg)
    assert resolved["run_stages"], "a stage config must say which stages run"
    for name in resolved["run_stages"]:
        assert name in resolved, f"stage {stage}: no config node for '{name}'"
    assert resolved["trainer"]["accelerator"] in ("cpu", "gpu")


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("model", MODELS)
def test_domain_x_model_composes(compose_cfg, domain, model):
    resolved = _resolve(compose_cfg(["stage=pipeline", f"domain={domain}", f"model={model}"]))
    for key in ("name", "knowledge_base", "train", "test", "instruction", "background_system_prompt", "request_text"):
        assert resolved["domain"][key] not in (None, ""), f"domain {domain} lacks {key}"
    for enc in ("semantic", "sts", "bertscore", "router"):
        assert enc in resolved["model"]["encoders"]


@pytest.mark.parametrize("logger", LOGGERS)
def test_loggers_compose(compose_cfg, logger):
    resolved = _resolve(compose_cfg([f"logger={logger}"]))
    assert all("_target_" in node for node in resolved["logger"].values())


def test_new_domain_from_command_line(compose_cfg, tmp_path):
    cfg = compose_cfg(["domain.name=mydomain", f"domain.train={tmp_path}/t.jsonl", f"domain.test={tmp_path}/s.jsonl",
                       f"domain.knowledge_base={tmp_path}/kb.jsonl"])
    resolved = _resolve(cfg)
    assert resolved["domain"]["name"] == "mydomain"
    assert resolved["sft"]["datamodule"]["train"] == f"{tmp_path}/t.jsonl"
    assert resolved["dapt"]["datamodule"]["knowledge_base"] == f"{tmp_path}/kb.jsonl"


def test_reference_hyperparameters_for_paper_domains(compose_cfg):
    mat = _resolve(compose_cfg(["domain=materials", "model=qwen3"]))
    assert mat["dapt"]["module"]["lr"] == 5e-5 and mat["dapt"]["datamodule"]["block_size"] == 1024
    assert mat["sft"]["module"]["lr"] == 5e-6 and mat["sft"]["trainer"]["max_epochs"] == 3
    adj = _resolve(compose_cfg(["domain=adjuvant", "model=qwen3"]))
    assert adj["sft"]["module"]["lr"] == 4e-6 and adj["sft"]["trainer"]["max_epochs"] == 1.5
    assert adj["sft"]["module"]["warmup_ratio"] == 0.05


def test_train_py_prints_composed_config():
    out = subprocess.run([sys.executable, "train.py", "--cfg", "job", "experiment=smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stage_name:" in out.stdout and "name: tiny" in out.stdout


def test_artifact_folders_follow_data_content_not_location(compose_cfg, tmp_path):
    import shutil

    from gag_lightning.keys import artifact_dir

    src = ROOT / "data" / "demo"
    copies = []
    for name in ("a", "b"):
        dst = tmp_path / name
        dst.mkdir()
        for file in ("knowledge_base.jsonl", "train.jsonl", "test.jsonl"):
            shutil.copy(src / file, dst / file)
        copies.append(dst)

    def cfg_for(folder):
        return compose_cfg(["experiment=smoke", f"domain.knowledge_base={folder / 'knowledge_base.jsonl'}",
                            f"domain.train={folder / 'train.jsonl'}", f"domain.test={folder / 'test.jsonl'}"])

    stages = ("dapt", "sft", "backgrounds", "memory", "gag", "eval")
    first, second = cfg_for(copies[0]), cfg_for(copies[1])
    assert [artifact_dir(first, s) for s in stages] == [artifact_dir(second, s) for s in stages]
    # an edited test file changes the SFT artifact (its report is on the test split) and everything downstream
    with (copies[1] / "test.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"input": "One more question?", "output": "One more answer."}\n')
    edited = cfg_for(copies[1])
    assert artifact_dir(edited, "dapt") == artifact_dir(first, "dapt")
    assert all(artifact_dir(edited, s) != artifact_dir(first, s) for s in stages[1:])
