"""Lightning-native checkpoints: kill -9 and resume, the resumable loaders, fractional epochs under DDP, FSDP export.

The kill tests use bench/kill_resume.py (which runs 3 random kills per stage); each stage here is killed once, at a
point that leaves a checkpoint behind and forces the rerun to skip trained batches of a partly trained epoch.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("kill_resume", REPO / "bench" / "kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- loaders
def _fitting_trainer(epoch: int, done: int, world: int = 1, rank: int = 0) -> SimpleNamespace:
    from lightning.pytorch.trainer.states import TrainerFn

    progress = SimpleNamespace(current=SimpleNamespace(processed=epoch, ready=done))
    batches = SimpleNamespace(current=SimpleNamespace(ready=done))
    return SimpleNamespace(world_size=world, global_rank=rank, state=SimpleNamespace(fn=TrainerFn.FITTING),
                           fit_loop=SimpleNamespace(epoch_progress=progress,
                                                    epoch_loop=SimpleNamespace(batch_progress=batches)))


def test_training_order_is_a_function_of_seed_and_epoch_and_a_resume_skips_the_trained_batches():
    from gag_lightning.data.loaders import train_loader

    data = list(range(23))
    batches = lambda trainer: [b.tolist() for b in train_loader(data, 4, seed=5, collate_fn=torch.tensor,  # noqa: E731
                                                                 trainer=trainer)]
    epoch1 = batches(_fitting_trainer(epoch=1, done=0))
    assert sorted(i for b in epoch1 for i in b) == data and len(epoch1) == 6
    assert epoch1 == batches(_fitting_trainer(epoch=1, done=0))  # no global RNG involved
    assert epoch1 != batches(_fitting_trainer(epoch=0, done=0))
    torch.manual_seed(0)
    assert batches(_fitting_trainer(epoch=1, done=2)) == epoch1[2:]  # resumed after 2 batches of epoch 1
    assert batches(_fitting_trainer(epoch=1, done=6)) == epoch1  # a finished epoch is never skipped whole
    # under DDP every rank takes its share of the same permutation; len() is this rank's batches
    shares = [train_loader(data, 4, seed=5, collate_fn=torch.tensor, trainer=_fitting_trainer(1, 0, 2, r))
              for r in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    dealt = [i for s in shares for b in s for i in b.tolist()]
    assert set(dealt) == set(data) and len(dealt) == 24  # padded to a multiple of the world size, like Lightning's


def test_rng_state_travels_in_a_weights_only_checkpoint():
    import random

    import numpy as np

    from gag_lightning.callbacks import rng_state, set_rng_state

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    buffer = io.BytesIO()
    torch.save({"rng": rng_state()}, buffer)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# ---------------------------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize(("stage", "kill"), [
    ("dapt", ("train", 7)),  # mid epoch 2: last.ckpt at step 6, one batch of epoch 2 to skip
    ("sft", ("val", 6)),     # during the validation closing epoch 1: resumes from step 4 and validates step 6 again
    ("gag", ("train", 8)),   # accumulation 2 over 9 batches an epoch, validation every 3 steps: last.ckpt at step 7
])
def test_kill_9_resumes_from_the_last_checkpoint_to_a_bit_identical_artifact(tmp_path, stage, kill):
    bench = _bench()  # the killed run is a subprocess; the uninterrupted run and the rerun run here, on one thread
    reference = bench.reference_run(stage, tmp_path, here=True)
    row = bench.kill_and_resume(stage, tmp_path, kill, reference, "killed", here=True)
    assert list(row["last_ckpt_step"]) == [stage] and 0 < row["last_ckpt_step"][stage] <= kill[1], row
    assert row["resumed_at"] == row["last_ckpt_step"], row  # "resuming <stage> from <last.ckpt> at step N"
    assert row["max_abs_diff"] == 0.0, row
    assert row["checkpoints_left"] == [], "keep_checkpoints=false removes them once the artifact is finished"
    if stage == "gag":
        assert row["base_in_checkpoint"] is False, "the frozen base never goes into a checkpoint"


# ---------------------------------------------------------------------------------------------- distributed
def _train(args: list[str], tmp_path: Path, name: str, extra_path: Path | None = None,
           timeout: int = 420) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(REPO / "train.py"), "experiment=smoke", "print_config=false",
           f"paths.artifacts={tmp_path / name}", f"hydra.run.dir={tmp_path / ('run-' + name)}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _sft_folder(root: Path) -> Path:
    return _bench().stage_folder(root, "sft")


# 48 records, batch 4: 12 batches an epoch in one process, 6 per rank with two; 1.5 epochs
FRACTIONAL = ["stage=sft", "sft.init_from=base", "sft.datamodule.max_train_records=48", "sft.report_before_after=false",
              "domain.budget.sft.max_steps=-1", "domain.budget.sft.max_epochs=1.5"]
TWO_CPU_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2"]


@pytest.fixture(scope="module")
def ddp_sft(tmp_path_factory) -> Path:
    """SFT for 1.5 epochs with two gloo processes (DDP), checkpoints kept: the artifact root."""
    tmp = tmp_path_factory.mktemp("ddp")
    proc = _train([*FRACTIONAL, *TWO_CPU_PROCESSES, "trainer.strategy=ddp", "keep_checkpoints=true"], tmp, "ddp")
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    return tmp / "ddp"


def test_fractional_epochs_count_the_batches_of_each_rank_under_ddp(tmp_path, ddp_sft):
    _train(FRACTIONAL, tmp_path, "single")
    single = json.loads((_sft_folder(tmp_path / "single") / "manifest.json").read_text())["global_step"]
    ddp = json.loads((_sft_folder(ddp_sft) / "manifest.json").read_text())["global_step"]
    assert single == 18  # ceil(1.5 * 12)
    assert ddp == single / 2  # 1.5 epochs of the 6 batches each rank holds (it was 2 epochs before)


CPU_FSDP = '''
import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, FullyShardedDataParallel, StateDictType


def _full_state_dict_context(module, world_size, rank0_only=True):
    """Lightning's full state-dict context without offload_to_cpu: the parameters are on the CPU already, and torch
    crashes (segfault cloning a freed unsharded parameter) when asked to offload CPU FSDP parameters to the CPU."""
    return FullyShardedDataParallel.state_dict_type(
        module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


lightning_fsdp._get_full_state_dict_context = _full_state_dict_context


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU processes (gloo). Lightning refuses the FSDPStrategy class itself without a
    GPU accelerator (not a subclass), and torch's FSDP needs the CPU named as its device (Lightning passes None)."""

    def _setup_model(self, model):
        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
'''


def test_fsdp_export_is_the_gathered_full_model_on_two_cpu_processes(tmp_path, ddp_sft):
    """FSDP (2 gloo processes, full sharding) trains the same steps as DDP; the export is the full state dict
    Lightning gathered into the best checkpoint, not rank 0's shards, and equals the DDP run's model."""
    from safetensors.torch import load_file

    from gag_lightning.callbacks import trained_state

    (tmp_path / "cpufsdp.py").write_text(CPU_FSDP)
    _train([*FRACTIONAL, *TWO_CPU_PROCESSES, "keep_checkpoints=true", "++trainer.strategy={_target_: "
            "cpufsdp.CPUFSDPStrategy, sharding_strategy: FULL_SHARD, state_dict_type: full}"], tmp_path, "fsdp",
           extra_path=tmp_path)
    folders = {"ddp": _sft_folder(ddp_sft), "fsdp": _sft_folder(tmp_path / "fsdp")}
    exported = {name: load_file(folder / "model.safetensors") for name, folder in folders.items()}
    manifest = json.loads((folders["fsdp"] / "manifest.json").read_text())
    ckpt = folders["fsdp"].with_name(folders["fsdp"].name + ".ckpt")
    best = ckpt / "best.ckpt" if (ckpt / "best.ckpt").is_file() else ckpt / "last.ckpt"
    full = trained_state(best, "model.")
    assert set(exported["fsdp"]) <= set(full) and exported["fsdp"]
    for name, tensor in exported["fsdp"].items():  # every tensor whole (not a 1/2 shard) and as trained
        assert tensor.shape == full[name].shape and torch.equal(tensor, full[name].to(tensor.dtype)), name
    assert manifest["global_step"] == 9
    assert set(exported["fsdp"]) == set(exported["ddp"])
    for name in exported["ddp"]:
        torch.testing.assert_close(exported["fsdp"][name], exported["ddp"][name], atol=1e-5, rtol=0)
