"""A route's own domain preset (``router.domains.<key>.domain: <name>``), read without composing a second config.

A specialist route answers with its own domain's settings, whatever ``domain=`` the command is composed with, so
its preset (``conf/domain/<name>.yaml`` with its defaults list) is loaded and resolved in its own context here;
``route_entries`` / ``expand_router`` read ``router.domains`` and ``route_config`` gives the config a route's
stages were built with (to find its artifacts by their keys). Used by ``routing.profiles``, ``routing.banks``
and the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gag_lightning.errors import GAGError

#: keys a router.domains entry may hold
ROUTE_KEYS = ("name", "domain", "pool", "bank", "dataset_names", "artifacts", "expert", "adapter",
              "answer_max_new_tokens")

__all__ = ["ROUTE_KEYS", "expand_router", "load_domain_preset", "resolved_preset", "route_config", "route_entries"]


# ------------------------------------------------------------------------------------------- presets
def _conf_dir(cfg: DictConfig | None) -> Path:
    """The project's conf/ (the one the entry points compose from)."""
    root = OmegaConf.select(cfg, "paths.root_dir", default=None) if cfg is not None else None
    if root:
        candidate = Path(str(root)) / "conf"
        if (candidate / "domain").is_dir():
            return candidate
    return Path(__file__).resolve().parents[2] / "conf"


def _load_preset_node(group_dir: Path, name: str, chain: tuple[str, ...] = ()) -> DictConfig:
    """A group config with its own defaults list applied (`_default`, `_self_`; `_self_` last if absent)."""
    if name in chain:
        raise GAGError(f"domain preset defaults loop: {' -> '.join((*chain, name))}")
    path = group_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in group_dir.glob("*.yaml") if not p.stem.startswith("_"))
        raise GAGError(f"domain preset '{name}' not found ({path}); known presets: {known}")
    node = OmegaConf.load(path)
    defaults = node.pop("defaults", None) if isinstance(node, DictConfig) else None
    entries = list(defaults or [])
    if "_self_" not in entries:
        entries.append("_self_")
    merged = OmegaConf.create({})
    for entry in entries:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, node)
        elif isinstance(entry, str):
            merged = OmegaConf.merge(merged, _load_preset_node(group_dir, entry, (*chain, name)))
        else:
            raise GAGError(f"{path}: defaults entry {entry!r} is not supported for a route's domain preset")
    return merged


def load_domain_preset(name: str, cfg: DictConfig | None = None) -> DictConfig:
    """``conf/domain/<name>.yaml`` (with ``_default``), unresolved: resolve it where it is placed at ``domain``."""
    return _load_preset_node(_conf_dir(cfg) / "domain", str(name))


def resolved_preset(name: str, cfg: DictConfig) -> dict[str, Any]:
    """The preset resolved in its own context (``${domain.name}`` is its name, ``${paths...}`` this run's)."""
    ctx = OmegaConf.create({"paths": OmegaConf.to_container(cfg.paths, resolve=False),
                            "domain": load_domain_preset(name, cfg)})
    return OmegaConf.to_container(ctx.domain, resolve=True)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def route_entries(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """``router.domains`` as plain dicts (removed routes left out), unknown keys refused."""
    domains = _container(cfg.router.domains) or {}
    out = {}
    for key, entry in domains.items():
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            raise GAGError(f"router.domains.{key} must be a mapping (keys: {', '.join(ROUTE_KEYS)})")
        unknown = sorted(set(entry) - set(ROUTE_KEYS))
        if unknown:
            raise GAGError(f"router.domains.{key}: unknown key(s) {unknown}; a route takes {', '.join(ROUTE_KEYS)}")
        out[str(key)] = dict(entry)
    return out


def expand_router(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.router`` as a dict whose routes with a ``domain`` preset get the preset's pool and dataset names
    (unless the entry gives its own). What ``route_specs`` reads."""
    router = _container(cfg.router)
    domains = {}
    for key, entry in route_entries(cfg).items():
        preset = entry.get("domain")
        if preset:
            settings = resolved_preset(str(preset), cfg)
            entry.setdefault("name", key)
            if not entry.get("pool") and not entry.get("bank"):
                entry["pool"] = settings.get("router_pool")
            if not entry.get("dataset_names"):
                entry["dataset_names"] = settings.get("dataset_names")
        domains[key] = entry
    router["domains"] = domains
    return router


def route_config(cfg: DictConfig, entry: Mapping[str, Any]) -> DictConfig:
    """The config a route's stages were built with: this run's config with the route's domain preset in place
    of the composed one (so every stage setting that reads ``${domain...}`` reads the route's), and the route's
    artifacts root. A route without a preset is the composed domain's own route: ``cfg`` itself."""
    preset = entry.get("domain")
    artifacts = entry.get("artifacts")
    if not preset and not artifacts:
        return cfg
    tree = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(tree, False)
    if preset:
        tree.domain = load_domain_preset(str(preset), cfg)
    if artifacts:
        tree.paths.artifacts = str(artifacts)
    return tree
