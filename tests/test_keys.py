"""Artifact keys cover every input: each config leaf changes a stage key or is on the one allowlist; upstream folders
given by path enter by their manifest, and an unfinished one is refused."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gag_lightning.artifacts import MANIFEST, UNFINISHED, config_hash, read_manifest, unfinished_inputs
from gag_lightning.errors import UnfinishedArtifactError
from gag_lightning.keys import STAGES, artifact_dir, runtime_only, stage_hashes, stage_key

ROOT = Path(__file__).resolve().parents[1]

# leaves whose generic change (x + 1, "x" appended, a flipped bool) means nothing or is invalid: what to set instead
FINISHED = "<finished folder>"
SPECIAL = {
    "dapt.init_from": FINISHED, "gag.memory_dir": FINISHED, "gag.init_adapter": FINISHED, "eval.adapter": FINISHED,
    "eval.lora_adapter": FINISHED, "sft.init_from": "base", "memory.expert": "dapt", "memory.splits": ["train"],
    "eval.split": "test", "domain.dev": "/nonexistent/dev.jsonl", "sft.datamodule.dev": "/nonexistent/dev.jsonl",
    "*max_records": 3, "*max_train_records": 3, "*max_val_records": 3, "*max_blocks": 3, "*projector_hidden": 8,
}
# leaves that no stage of that configuration reads (shadowed by a literal of the experiment preset)
DEAD = {"experiment=smoke": {"domain.budget.lora.lr"}, "experiment=smoke debug=overfit_batches": {"domain.budget.lora.lr"}}
# settings under which conditionally read leaves are read: the KL term (kl_temperature) and the dense RAG
# retriever (the router encoder)
READ_ALL = ["gag.loss_weights.kl=0.5", "gag.recon_steps=2", "eval.rag.retriever=dense",
            "memory.generation.do_sample=true"]


def _hashes(cfg) -> dict[str, str]:
    return stage_hashes(cfg)  # every stage's key hash, upstream keys computed once


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node  # a list is one leaf


def _perturbed_value(path: str, value, finished: Path):
    for pattern, new in SPECIAL.items():
        if fnmatch.fnmatchcase(path, pattern):
            return str(finished) if new == FINISHED else new
    if value is None:
        raise AssertionError(f"{path} is null: add a meaningful other value to SPECIAL")
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.25
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, "extra" if not value or isinstance(value[-1], str) else value[-1] + 1]
    raise AssertionError(f"{path}: no perturbation for {type(value).__name__}")


def _with(cfg, path: str, value):
    """A copy of `cfg` with one leaf replaced (interpolations that read it see the new value)."""
    out = copy.deepcopy(cfg)
    parts = path.split(".")
    for i in range(1, len(parts)):  # a leaf under an interpolated node (model.base: ${.expert}): materialise it
        parent = OmegaConf.select(out, ".".join(parts[: i - 1])) if i > 1 else out
        if OmegaConf.is_interpolation(parent, parts[i - 1]):
            prefix = ".".join(parts[:i])
            OmegaConf.update(out, prefix, OmegaConf.to_container(OmegaConf.select(out, prefix), resolve=True),
                             merge=False)
    OmegaConf.update(out, path, value, merge=False)
    return out


@pytest.fixture
def finished(tmp_path) -> Path:
    """A folder with a manifest (and a config.json, so it is also a model directory)."""
    folder = tmp_path / "finished"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"stage": "x"}))
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("preset", ["", "experiment=smoke", "experiment=smoke debug=overfit_batches"])
def test_every_config_leaf_is_keyed_or_allowlisted(compose_cfg, finished, preset):
    overrides = preset.split()
    scenarios = [compose_cfg(overrides), compose_cfg([*overrides, *READ_ALL])]
    reference = [_hashes(cfg) for cfg in scenarios]
    assert reference[0] == {stage: config_hash(stage_key(scenarios[0], stage)) for stage in STAGES}
    leaves = dict(_leaves(OmegaConf.to_container(scenarios[0], resolve=True)))
    assert len(leaves) > 150
    unkeyed, leaking = [], []
    for path, value in leaves.items():
        if path in DEAD.get(preset, set()):
            continue
        new = _perturbed_value(path, value, finished)
        changed: set[str] = set()
        for cfg, ref in zip(scenarios, reference, strict=True):
            hashes = _hashes(_with(cfg, path, new))
            changed |= {s for s in STAGES if hashes[s] != ref[s]}
            if changed:
                break
        if runtime_only(path) and changed:
            leaking.append(f"{path} (allowlisted) changes {changed}")
        elif not runtime_only(path) and not changed:
            unkeyed.append(path)
    assert not unkeyed, f"leaves in no stage key and not in keys.RUNTIME_ONLY: {unkeyed}"
    assert not leaking, f"allowlisted leaves that change a key: {leaking}"


def test_encoder_overrides_build_new_gag_and_eval_folders(compose_cfg):
    ref = compose_cfg(["experiment=smoke"])
    folders = {s: artifact_dir(ref, s) for s in ("gag", "eval", "memory")}
    for override, rebuilt in [("model.encoders.semantic.seed=5", {"gag", "eval"}),
                              ("model.encoders.semantic.max_length=64", {"gag", "eval"}),
                              ("model.encoders.bertscore.seed=5", {"eval"}),
                              ("model.encoders.sts.hidden_size=48", {"eval"})]:
        cfg = compose_cfg(["experiment=smoke", override])
        assert {s for s in folders if artifact_dir(cfg, s) != folders[s]} == rebuilt, override
    # without the semantic loss the semantic encoder is not read: the adapter is the same
    no_sem = compose_cfg(["experiment=smoke", "gag.loss_weights.sem=0"])
    assert artifact_dir(compose_cfg(["experiment=smoke", "gag.loss_weights.sem=0", "model.encoders.semantic.seed=5"]),
                        "gag") == artifact_dir(no_sem, "gag")
    # the paper preset: encoders named by local paths
    qwen = compose_cfg(["model=qwen3"])
    for enc in ("bertscore", "sts"):
        other = compose_cfg(["model=qwen3", f"model.encoders.{enc}.path=/models/other-encoder"])
        assert artifact_dir(other, "eval") != artifact_dir(qwen, "eval")
        assert artifact_dir(other, "gag") == artifact_dir(qwen, "gag")
    other = compose_cfg(["model=qwen3", "model.encoders.semantic.path=/models/other-encoder"])
    assert artifact_dir(other, "gag") != artifact_dir(qwen, "gag")
    assert artifact_dir(other, "eval") != artifact_dir(qwen, "eval")


def _half_bank(root: Path) -> Path:
    """A memory folder as a killed memory stage leaves it: a bank's files, no manifest."""
    folder = root / "memory-0123456789"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "schema.json").write_text("{}")
    (folder / "train" / "shard-r000-000000.jsonl").write_text('{"index": 0}\n')
    return folder


def test_partial_memory_bank_by_path_is_refused(compose_cfg, tmp_path):
    from gag_lightning.stages.gag.runner import run_gag

    half = _half_bank(tmp_path)
    cfg = compose_cfg(["experiment=smoke", f"gag.memory_dir={half}"])
    for stage in ("gag", "eval"):  # every stage that reads it
        with pytest.raises(UnfinishedArtifactError, match=re.escape(f"gag.memory_dir={half}: the folder has no")):
            artifact_dir(cfg, stage)
    with pytest.raises(UnfinishedArtifactError, match="allow_unfinished=true"):
        run_gag(compose_cfg(["experiment=smoke", "stage=gag", f"gag.memory_dir={half}"]))
    # allowed explicitly: keyed by the folder's files (finishing it changes the key) and stamped
    allowed = compose_cfg(["experiment=smoke", f"gag.memory_dir={half}", "allow_unfinished=true"])
    before = artifact_dir(allowed, "gag")
    assert unfinished_inputs(stage_key(allowed, "eval")) == [str(half)]
    (half / "train" / "shard-r000-000000.safetensors").write_bytes(b"more records")
    assert artifact_dir(allowed, "gag") != before
    # finished: keyed by the manifest's content, not by where the folder is
    (half / MANIFEST).write_text(json.dumps({"stage": "memory", "created": "1"}))
    done = artifact_dir(compose_cfg(["experiment=smoke", f"gag.memory_dir={half}"]), "gag")
    moved = shutil.copytree(half, tmp_path / "elsewhere" / half.name)
    assert artifact_dir(compose_cfg(["experiment=smoke", f"gag.memory_dir={moved}"]), "gag") == done
    (moved / MANIFEST).write_text(json.dumps({"stage": "memory", "created": "2"}))  # rebuilt: another content
    assert artifact_dir(compose_cfg(["experiment=smoke", f"gag.memory_dir={moved}"]), "gag") != done
    assert UNFINISHED not in json.dumps(stage_key(compose_cfg(["experiment=smoke", f"gag.memory_dir={moved}"]), "gag"))


def test_unfinished_upstream_paths_are_refused_for_every_option(compose_cfg, tmp_path):
    """eval.adapter, gag.init_adapter, sft.init_from / dapt.init_from / memory.expert (an artifact of this project)."""
    adapter = tmp_path / "gag-0123456789"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    expert = tmp_path / "artifacts" / "smollm2" / "demo" / "sft-0123456789"  # under paths.artifacts
    expert.mkdir(parents=True)
    (expert / "config.json").write_text("{}")
    cases = [(f"eval.adapter={adapter}", "eval"), (f"gag.init_adapter={adapter}", "gag"),
             (f"sft.init_from={expert}", "sft"), (f"dapt.init_from={expert}", "dapt"),
             (f"memory.expert={expert}", "backgrounds")]
    for override, stage in cases:
        with pytest.raises(UnfinishedArtifactError, match="no manifest"):
            artifact_dir(compose_cfg([override]), stage)
    # a model directory made elsewhere (a downloaded checkpoint) is keyed by its files' fingerprint
    external = tmp_path / "downloads" / "my-model"
    external.mkdir(parents=True)
    (external / "config.json").write_text('{"a": 1}')
    first = artifact_dir(compose_cfg([f"dapt.init_from={external}"]), "dapt")
    (external / "config.json").write_text('{"a": 2}')
    assert artifact_dir(compose_cfg([f"dapt.init_from={external}"]), "dapt") != first


def test_unfinished_input_is_stamped_in_the_manifest(tmp_path):
    from gag_lightning.artifacts import write_manifest

    write_manifest(tmp_path, "gag", config={"memory_dir": {UNFINISHED: "/x/memory-1", "listing": "ab"}}, inputs={})
    manifest = read_manifest(tmp_path)
    assert manifest["allow_unfinished"] is True and manifest["unfinished_inputs"] == ["/x/memory-1"]
    write_manifest(tmp_path, "gag", config={"upstream": "cd"}, inputs={})
    assert "allow_unfinished" not in read_manifest(tmp_path)


def test_cli_refuses_a_partial_bank_without_a_traceback(tmp_path):
    half = _half_bank(tmp_path)
    cmd = [sys.executable, "train.py", "experiment=smoke", "stage=gag", f"gag.memory_dir={half}",
           f"paths.artifacts={tmp_path / 'artifacts'}", f"hydra.run.dir={tmp_path / 'run'}", "print_config=false"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert f"gag.memory_dir={half}: the folder has no manifest.json" in out.stderr


def test_full_error_reraises(monkeypatch):
    from gag_lightning.config_tree import run_reporting_errors
    from gag_lightning.errors import GAGError

    def fail(cfg):
        raise GAGError("bad input")

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(GAGError, match="bad input"):
        run_reporting_errors(fail, None)
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(SystemExit) as exit_:
        run_reporting_errors(fail, None)
    assert exit_.value.code == 1
