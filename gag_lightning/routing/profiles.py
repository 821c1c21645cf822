"""What each route answers with, and where every setting comes from (METHOD.md section 6).

A domain route answers with *its own* domain's settings: the instruction and request line its GAG adapter was
trained with, the background prompt (system prompt, style, length) its memories were built with, the
compression schema of those memories, its answer length, its expert and its adapter. Nothing is taken from the
domain the command happens to be composed with, unless that domain *is* the route (the `current` route).

Sources, in order of authority:

1. the metadata saved with the route's artifacts: the adapter's ``adapter_config.json`` (memory schema, base),
   the gag manifest (instruction, request text, training bank, and for adapters trained since the routes
   landed a ``route`` block with the answer length), the memory and backgrounds manifests of that bank (expert,
   background prompt settings, stop ids, expert dtype). These are what the adapter was trained on, so they win;
2. the route's own domain preset, ``router.domains.<key>.domain: <name>`` (``conf/domain/<name>.yaml``, resolved
   in its own context: ``${domain.name}`` is that preset's name), which also locates the artifacts
   (``<paths.artifacts>/<model>/<preset name>/gag-<hash>``, keyed exactly as ``train.py domain=<name>`` keys them)
   and gives the answer length when the artifacts do not record it;
3. explicit per-route keys: ``expert``, ``adapter``, ``artifacts`` (another artifacts root), ``answer_max_new_tokens``.

A route whose artifacts disagree with each other (the expert is not the one the adapter's memories were built
with, the training bank's schema is not the adapter's, the adapter was trained on another base) is refused
with a message naming the mismatch. Adding or removing a route stays a config change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gag_lightning.artifacts import read_manifest
from gag_lightning.errors import GAGError, MissingArtifactError, SchemaMismatchError
from gag_lightning.memory.background import BackgroundConfig
from gag_lightning.memory.extract import CompressionConfig
from gag_lightning.prompts import GENERAL_INSTRUCTION, GENERAL_REQUEST_TEXT
from gag_lightning.routing.presets import (
    ROUTE_KEYS,
    expand_router,
    load_domain_preset,
    route_config,
    route_entries,
)

log = logging.getLogger(__name__)

GENERAL = "general"
_COMPRESSION_FIELDS = ("layer_keys", "slots", "pooling", "temperature", "dtype")

__all__ = [
    "GENERAL",
    "ROUTE_KEYS",
    "RouteProfile",
    "expand_router",
    "general_profile",
    "load_domain_preset",
    "route_config",
    "route_entries",
    "route_metadata",
    "route_profile",
]


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# ------------------------------------------------------------------------------------------- the profile
@dataclass
class RouteProfile:
    """Everything one route answers with; ``sources`` says where each setting came from."""

    name: str
    instruction: str
    request_text: str
    answer_max_new_tokens: int
    domain: str | None = None  # the domain preset (or the composed domain) the route belongs to
    dataset_names: list[str] = field(default_factory=list)
    background: BackgroundConfig | None = None
    stop_ids: list[int] | None = None  # the expert's stop ids as the memory stage used them
    compression: CompressionConfig | None = None
    expert_dir: Path | None = None
    expert_dtype: str = "float32"
    expert_fingerprint: str | None = None
    adapter_dir: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def is_general(self) -> bool:
        return self.adapter_dir is None

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (reports, /v1/models)."""
        out: dict[str, Any] = {
            "route": self.name, "domain": self.domain, "dataset_names": list(self.dataset_names),
            "instruction": self.instruction, "request_text": self.request_text,
            "answer_max_new_tokens": self.answer_max_new_tokens, "sources": dict(self.sources),
        }
        if not self.is_general:
            out.update(expert=str(self.expert_dir), adapter=str(self.adapter_dir),
                       expert_fingerprint=self.expert_fingerprint, expert_dtype=self.expert_dtype,
                       background=asdict(self.background) if self.background else None,
                       compression=asdict(self.compression) if self.compression else None)
        return out


def general_profile(cfg: DictConfig, entry: Mapping[str, Any] | None = None) -> RouteProfile:
    """The general route: the base alone, METHOD.md section 6's instruction and request."""
    entry = entry or {}
    n = entry.get("answer_max_new_tokens")
    source = "router.domains.general.answer_max_new_tokens"
    if n is None:
        n, source = cfg.eval.decoding.max_new_tokens, "eval.decoding.max_new_tokens"
    return RouteProfile(name=str(entry.get("name") or GENERAL), instruction=GENERAL_INSTRUCTION,
                        request_text=GENERAL_REQUEST_TEXT, answer_max_new_tokens=int(n),
                        dataset_names=list(entry.get("dataset_names") or []),
                        sources={"instruction": "METHOD.md section 6", "request_text": "METHOD.md section 6",
                                 "answer_max_new_tokens": source})


def route_metadata(cfg: DictConfig) -> dict[str, Any]:
    """What the gag stage records for routing (manifest ``route`` block): the settings an answering route needs
    that no other artifact records."""
    return {"domain": str(cfg.domain.name), "dataset_names": [str(n) for n in cfg.domain.get("dataset_names") or []],
            "instruction": str(cfg.domain.instruction), "request_text": str(cfg.domain.request_text),
            "answer_max_new_tokens": int(cfg.domain.answer_max_new_tokens)}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _artifact_chain(adapter_dir: Path) -> dict[str, Any]:
    """What the adapter's artifacts record about how it was trained (empty entries where a manifest is absent)."""
    from gag_lightning.models.adapter import ADAPTER_CONFIG

    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise MissingArtifactError(f"{cfg_path} not found: {adapter_dir} is not a trained GAG adapter folder "
                                   "(run the 'gag' stage, or point router.domains.<key>.adapter at one)")
    chain: dict[str, Any] = {"adapter_config": _read_json(cfg_path)}
    gag = read_manifest(adapter_dir) or {}
    chain["gag"] = gag
    bank = (gag.get("inputs") or {}).get("train_bank")
    if bank:
        bank_dir = Path(str(bank))
        chain["train_bank"] = bank_dir
        memory = read_manifest(bank_dir.parent) or {}
        chain["memory"] = memory
        bg_root = (memory.get("inputs") or {}).get("backgrounds")
        backgrounds = read_manifest(bg_root) if bg_root else None
        settings = ((backgrounds or {}).get("settings") or {}).get(bank_dir.name)
        if settings:
            chain["background_settings"] = settings
    return chain


def _background_from_settings(settings: Mapping[str, Any]) -> BackgroundConfig:
    return BackgroundConfig(prompt_style=str(settings.get("prompt_style") or "reference"),
                            system_prompt=str(settings.get("system_prompt") or ""),
                            instruction=str(settings.get("instruction") or ""),
                            max_new_tokens=int(settings["max_new_tokens"]),
                            do_sample=bool(settings.get("do_sample", False)),
                            temperature=float(settings.get("temperature", 1.0)),
                            top_p=float(settings.get("top_p", 1.0)),
                            enable_thinking=bool(settings.get("enable_thinking", False)),
                            seed=int(settings.get("seed", 0)))


def _background_diffs(have: BackgroundConfig, want: BackgroundConfig) -> list[str]:
    names = ["prompt_style", "max_new_tokens", "enable_thinking", "do_sample"]
    names.append("system_prompt" if have.prompt_style == "reference" else "instruction")
    return [f"{n}: artifacts {getattr(have, n)!r}, preset {getattr(want, n)!r}" for n in names
            if getattr(have, n) != getattr(want, n)]


def _hidden_size(model_dir: Path) -> int | None:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    data = _read_json(path)
    size = data.get("hidden_size") or (data.get("text_config") or {}).get("hidden_size")
    return int(size) if size else None


def route_profile(cfg: DictConfig, key: str, entry: Mapping[str, Any]) -> RouteProfile:
    """Resolve one domain route's settings and artifacts (see the module docstring) and check that they agree."""
    from gag_lightning.models.loading import fingerprint_dir

    name = str(entry.get("name") or key)
    if name == GENERAL:
        return general_profile(cfg, entry)
    preset_name = entry.get("domain")
    composed = not preset_name and name == str(cfg.domain.name)
    rcfg = route_config(cfg, entry) if (preset_name or composed) else None
    where = f"route '{name}'"
    preset_label = (f"preset {preset_name}" if preset_name else f"composed domain {cfg.domain.name}") if rcfg else None
    sources: dict[str, str] = {}

    # ---- the adapter (explicit, or this route's gag artifact) and what its artifacts record
    if entry.get("adapter"):
        # finished artifacts only (an unfinished one is refused unless allow_unfinished=true)
        from gag_lightning.fingerprints import upstream_folder

        adapter_dir = upstream_folder(cfg, f"router.domains.{key}.adapter", entry["adapter"])[0]
        sources["adapter"] = f"router.domains.{key}.adapter"
    elif rcfg is not None:
        from gag_lightning.upstream import gag_adapter_dir

        adapter_dir = gag_adapter_dir(rcfg)
        sources["adapter"] = f"{preset_label} artifacts"
    else:
        raise GAGError(f"{where} names no domain preset and no trained adapter: set router.domains.{key}.domain="
                       f"<preset in conf/domain> (its artifacts are found like train.py finds them), or "
                       f"router.domains.{key}.adapter=/path/to/gag-adapter")
    chain = _artifact_chain(adapter_dir)
    acfg = chain["adapter_config"]
    gag_key = (chain["gag"].get("config") or {})
    recorded = chain["gag"].get("route") or {}

    # ---- instruction and request text: what the adapter was trained with
    def pick(setting: str, from_artifacts: Any, artifact_label: str) -> Any:
        preset_value = rcfg.domain.get(setting) if rcfg is not None else None
        if from_artifacts is not None:
            sources[setting] = artifact_label
            if preset_value is not None and str(preset_value) != str(from_artifacts):
                log.warning("%s: %s differs between its artifacts (%r, used) and %s (%r)", where, setting,
                            from_artifacts, preset_label, preset_value)
            return from_artifacts
        if preset_value is None:
            raise GAGError(f"{where}: the adapter {adapter_dir} records no {setting} (no gag manifest) and the route "
                           f"names no domain preset; set router.domains.{key}.domain=<preset>")
        sources[setting] = str(preset_label)
        return preset_value

    instruction = str(pick("instruction", gag_key.get("instruction"), "gag manifest"))
    request_text = str(pick("request_text", gag_key.get("request_text"), "gag manifest"))

    # ---- answer length: the route entry, the adapter's route block, the route's preset
    if entry.get("answer_max_new_tokens") is not None:
        answer_len, sources["answer_max_new_tokens"] = int(entry["answer_max_new_tokens"]), f"router.domains.{key}"
    elif recorded.get("answer_max_new_tokens") is not None:
        answer_len, sources["answer_max_new_tokens"] = int(recorded["answer_max_new_tokens"]), "gag manifest route"
    elif rcfg is not None:
        answer_len, sources["answer_max_new_tokens"] = int(rcfg.domain.answer_max_new_tokens), str(preset_label)
    else:
        raise GAGError(f"{where}: no answer length: set router.domains.{key}.domain=<preset> or "
                       f"router.domains.{key}.answer_max_new_tokens=N")

    # ---- background prompt: the settings the memory stage generated the training backgrounds with
    preset_bg = None
    if rcfg is not None:
        preset_bg = BackgroundConfig.from_mapping(_container(rcfg.memory.generation), seed=int(rcfg.seed))
    bg_settings = chain.get("background_settings")
    if bg_settings:
        background = _background_from_settings(bg_settings)
        sources["background"] = "backgrounds manifest"
        if preset_bg is not None:
            diffs = _background_diffs(background, preset_bg)
            if diffs:
                log.warning("%s: the background settings its memories were built with differ from %s (the "
                            "artifacts' are used): %s", where, preset_label, "; ".join(diffs))
    elif preset_bg is not None:
        background, sources["background"] = preset_bg, str(preset_label)
    else:
        raise GAGError(f"{where}: the adapter {adapter_dir} records no background settings (no memory/backgrounds "
                       f"manifests) and the route names no domain preset; set router.domains.{key}.domain=<preset>")

    # ---- compression: the adapter's memory schema is what it reads
    schema = dict(acfg.get("memory_schema") or {})
    if schema:
        compression = CompressionConfig(**{f: schema[f] for f in _COMPRESSION_FIELDS if f in schema})
        sources["compression"] = "adapter memory schema"
        if rcfg is not None:
            configured = CompressionConfig.from_mapping(_container(rcfg.memory.compression))
            diffs = [f"{f}: adapter {getattr(compression, f)!r}, preset {getattr(configured, f)!r}"
                     for f in _COMPRESSION_FIELDS if getattr(compression, f) != getattr(configured, f)]
            if diffs:
                log.warning("%s: the adapter's memory schema differs from %s's compression settings (the "
                            "adapter's are used): %s", where, preset_label, "; ".join(diffs))
    elif rcfg is not None:
        compression = CompressionConfig.from_mapping(_container(rcfg.memory.compression))
        sources["compression"] = str(preset_label)
    else:
        raise GAGError(f"{where}: the adapter {adapter_dir} records no memory schema; set "
                       f"router.domains.{key}.domain=<preset>")

    # ---- the expert: explicit, the one the memory stage used, or this route's memory expert
    memory_inputs = (chain.get("memory") or {}).get("inputs") or {}
    if entry.get("expert"):
        from gag_lightning.fingerprints import upstream_folder

        expert_dir = upstream_folder(cfg, f"router.domains.{key}.expert", entry["expert"], external_ok=True)[0]
        sources["expert"] = f"router.domains.{key}.expert"
    elif memory_inputs.get("expert"):
        expert_dir, sources["expert"] = Path(str(memory_inputs["expert"])), "memory manifest"
    elif rcfg is not None:
        from gag_lightning.upstream import memory_expert_path

        expert_dir, sources["expert"] = memory_expert_path(rcfg), str(preset_label)
    else:
        raise GAGError(f"{where}: no expert: set router.domains.{key}.expert=/path/to/sft-expert")
    if not (expert_dir / "config.json").is_file():
        raise MissingArtifactError(f"{where}: expert {expert_dir} is not a model directory (no config.json)")
    expert_fp = fingerprint_dir(expert_dir)
    dtype = (bg_settings or {}).get("model_dtype")
    if dtype is None:
        dtype = str(rcfg.memory.generation.get("model_dtype") or rcfg.model.dtype) if rcfg is not None else "float32"
    stop_ids = [int(i) for i in bg_settings["stop_ids"]] if bg_settings and bg_settings.get("stop_ids") else None

    profile = RouteProfile(
        name=name, instruction=instruction, request_text=request_text, answer_max_new_tokens=answer_len,
        domain=str(preset_name or (cfg.domain.name if composed else recorded.get("domain") or "")) or None,
        dataset_names=[str(n) for n in (entry.get("dataset_names") or recorded.get("dataset_names") or [])],
        background=background, stop_ids=stop_ids, compression=compression, expert_dir=expert_dir,
        expert_dtype=str(dtype), expert_fingerprint=expert_fp, adapter_dir=adapter_dir, sources=sources)
    check_route(profile, chain)
    return profile


def check_route(profile: RouteProfile, chain: Mapping[str, Any]) -> None:
    """Refuse a route whose expert, training bank, adapter and memory schema do not belong together."""
    where = f"route '{profile.name}'"
    acfg = chain["adapter_config"]
    schema = dict(acfg.get("memory_schema") or {})
    problems = []
    want_fp = schema.get("expert_fingerprint")
    if want_fp and profile.expert_fingerprint != want_fp:
        problems.append(f"expert: {profile.expert_dir} has fingerprint {profile.expert_fingerprint}, but the "
                        f"adapter's memories were built by expert {want_fp}")
    bg_fp = (chain.get("background_settings") or {}).get("expert_fingerprint")
    if bg_fp and want_fp and bg_fp != want_fp:
        problems.append(f"backgrounds: written by expert {bg_fp}, the adapter's memory schema names {want_fp}")
    hidden = _hidden_size(profile.expert_dir) if profile.expert_dir else None
    if hidden is not None and hidden != int(acfg.get("expert_hidden", hidden)):
        problems.append(f"expert hidden size: {profile.expert_dir} has {hidden}, the adapter reads "
                        f"{acfg.get('expert_hidden')}")
    if schema:
        if int(schema.get("slots", acfg.get("slots"))) != int(acfg.get("slots", schema.get("slots"))):
            problems.append(f"slots: adapter {acfg.get('slots')}, its memory schema {schema.get('slots')}")
        keys = list(acfg.get("layer_keys") or [])
        if keys and list(schema.get("layer_keys") or keys) != keys:
            problems.append(f"layer keys: adapter {keys}, its memory schema {schema.get('layer_keys')}")
    bank_dir = chain.get("train_bank")
    if bank_dir is not None and schema and (Path(bank_dir) / "schema.json").is_file():
        bank_schema = _read_json(Path(bank_dir) / "schema.json")
        for f in ("expert_fingerprint", "layer_keys", "slots", "hidden_size", "pooling", "temperature", "dtype"):
            if f in bank_schema and f in schema and bank_schema[f] != schema[f]:
                problems.append(f"memory bank {bank_dir}: {f} {bank_schema[f]!r}, the adapter's schema {schema[f]!r}")
    if problems:
        raise SchemaMismatchError(f"{where} is refused, its artifacts disagree: " + "; ".join(problems)
                                  + f" (adapter {profile.adapter_dir}). Point the route at the expert and adapter "
                                  "of one training run (router.domains.<key>.expert / .adapter), or retrain.")


def check_base(profile: RouteProfile, base_identity: str) -> None:
    """Refuse an adapter trained on another base than the shared one."""
    if profile.adapter_dir is None:
        return
    from gag_lightning.models.adapter import ADAPTER_CONFIG

    have = _read_json(profile.adapter_dir / ADAPTER_CONFIG).get("base_model")
    if have and have != base_identity:
        raise SchemaMismatchError(f"route '{profile.name}' is refused: its adapter {profile.adapter_dir} was trained "
                                  f"on base {have}, the shared base is {base_identity}; every route must use the "
                                  "base its adapter was trained on")
