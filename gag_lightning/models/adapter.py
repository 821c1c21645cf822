"""The GAG injection adapter (METHOD.md section 4).

A record's latent memory ``[K, S, H_e]`` (K expert layers, S slots) is fused across layers per slot
(``LayerMixer``), mapped into the frozen base model's embedding space (``Projector``) and written over the
input embeddings at the S ``<GAG>`` placeholder positions (``inject``; the placeholder is an existing spare
special token or a mark outside the vocabulary, never a new token: ``prompts.choose_placeholder``). ``SemanticHead`` only serves the
auxiliary semantic loss during training.

Only this module trains; the base model is reached solely through ``inputs_embeds``, so any Hugging Face
causal LM works and nothing of the base is ever saved. The adapter computes in fp32 whatever precision the
base runs in: it handles S vectors per record, so the cost is negligible, and bf16 would quantise the
small learned layer-mix logits and gated updates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gag_lightning.errors import GAGError
from gag_lightning.prompts import GAG_TOKEN

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT_VERSION = 1

FUSION_MODES = ("learned", "uniform", "single")
PROJECTOR_KINDS = ("gated_residual", "mlp2x_gelu")
MIX_CLAMP = 10.0


class InjectionError(GAGError, ValueError):
    """The prompt's ``<GAG>`` placeholders and the memory vectors do not line up."""


# --------------------------------------------------------------------------------------------------------
# Layer mixer
# --------------------------------------------------------------------------------------------------------
class LayerMixer(nn.Module):
    """Per-slot convex combination of the K expert layers.

    Each slot gets its own mix because early slots (start of the background) and late slots may profit
    from different depths. The logits start at zero, i.e. a uniform mean, so training starts from the
    ``uniform`` ablation and can only move away from it when that helps.
    """

    def __init__(self, num_slots: int, num_layers: int, mode: str = "learned", layer_index: int = 0) -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {mode!r}; expected one of {FUSION_MODES}")
        if num_slots < 1 or num_layers < 1:
            raise ValueError(f"num_slots and num_layers must be >= 1, got {num_slots} and {num_layers}")
        if mode == "single" and not -num_layers <= layer_index < num_layers:
            raise ValueError(f"layer_index {layer_index} out of range for {num_layers} layers")
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.mode = mode
        self.layer_index = layer_index % num_layers
        if mode == "learned":
            self.logits = nn.Parameter(torch.zeros(num_slots, num_layers))
        else:
            self.register_parameter("logits", None)

    def weights(self) -> Tensor:
        """The effective mix ``[S, K]`` (rows sum to 1), for logging and for ``forward``."""
        if self.mode == "learned":
            return torch.softmax(self.logits.float().clamp(-MIX_CLAMP, MIX_CLAMP), dim=-1)
        if self.mode == "uniform":
            return torch.full((self.num_slots, self.num_layers), 1.0 / self.num_layers)
        w = torch.zeros(self.num_slots, self.num_layers)
        w[:, self.layer_index] = 1.0
        return w

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the logits in [-10, 10]; called after every optimizer step so they cannot drift unboundedly."""
        if self.logits is not None:
            self.logits.clamp_(-MIX_CLAMP, MIX_CLAMP)

    def forward(self, memory: Tensor) -> Tensor:
        """``memory [B, K, S, H]`` -> ``[B, S, H]``."""
        if memory.dim() != 4:
            raise ValueError(f"memory must be [B, K, S, H], got shape {tuple(memory.shape)}")
        _, k, s, _ = memory.shape
        if (k, s) != (self.num_layers, self.num_slots):
            raise ValueError(
                f"memory has K={k} layers and S={s} slots, the mixer expects "
                f"K={self.num_layers} and S={self.num_slots}"
            )
        if self.mode == "uniform":
            return memory.mean(dim=1)
        if self.mode == "single":
            return memory[:, self.layer_index]
        w = self.weights().to(memory.dtype)
        return torch.einsum("sk,bksh->bsh", w, memory)

    def extra_repr(self) -> str:
        return f"slots={self.num_slots}, layers={self.num_layers}, mode={self.mode!r}"


# --------------------------------------------------------------------------------------------------------
# Projector and semantic head
# --------------------------------------------------------------------------------------------------------
class Projector(nn.Module):
    """Maps fused expert states ``[..., H_e]`` to base embeddings ``[..., H_b]``.

    ``gated_residual``: ``base = W_in LN_in(m)`` is a plain linear map (a good first guess of the
    embedding), and a gated MLP on ``LN(base)`` adds a correction only where the gate opens.
    ``mlp2x_gelu``: the LLaVA-style two-layer MLP, kept as an ablation.
    """

    def __init__(
        self, in_dim: int, out_dim: int, kind: str = "gated_residual", hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector kind {kind!r}; expected one of {PROJECTOR_KINDS}")
        self.kind = kind
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.ln_in = nn.LayerNorm(in_dim)
        if kind == "gated_residual":
            hidden = hidden_dim or out_dim
            self.hidden_dim = hidden
            self.w_in = nn.Linear(in_dim, out_dim)
            self.ln = nn.LayerNorm(out_dim)
            self.w1 = nn.Linear(out_dim, hidden)
            self.w2 = nn.Linear(hidden, out_dim)
            self.w_gate = nn.Linear(out_dim, out_dim)
        else:
            # The hidden size is H_b by definition here; ``hidden_dim`` is ignored so a projector sweep can
            # switch kinds without also unsetting ``projector_hidden``.
            self.hidden_dim = out_dim
            self.w1 = nn.Linear(in_dim, out_dim)
            self.w2 = nn.Linear(out_dim, out_dim)

    def forward(self, m: Tensor) -> Tensor:
        x = self.ln_in(m)
        if self.kind == "mlp2x_gelu":
            return self.w2(F.gelu(self.w1(x), approximate="none"))
        base = self.w_in(x)
        n = self.ln(base)
        update = self.w2(F.gelu(self.w1(n), approximate="none"))
        gate = torch.sigmoid(self.w_gate(n))
        return base + gate * update

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class SemanticHead(nn.Module):
    """Maps the base's pooled answer state into the text encoder's space for the semantic loss.

    A separate head (rather than comparing raw states) lets the base keep its own geometry: only the
    direction after this small MLP has to agree with the encoder.
    """

    def __init__(self, base_dim: int, sem_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(base_dim, base_dim)
        self.w2 = nn.Linear(base_dim, sem_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="none"))


# --------------------------------------------------------------------------------------------------------
# Config and adapter
# --------------------------------------------------------------------------------------------------------
@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter without its training config (stored as JSON next to it).

    ``base_model`` and ``memory_schema`` are not used for computation: they let a later stage refuse an
    adapter trained for another base model or on memories built with other settings. ``placeholder``
    (``Placeholder.to_dict``) is how training marked the slot positions, reused by evaluation and routing;
    ``selection`` says which split chose the saved adapter (``val_source``, ``val_split``).
    """

    expert_hidden: int
    base_hidden: int
    slots: int = 4
    layers: int = 4
    layer_keys: list[str] = field(default_factory=lambda: ["last", "minus2", "minus4", "minus6"])
    fusion: str = "learned"
    layer_index: int = 0
    projector: str = "gated_residual"
    projector_hidden: int | None = None
    semantic_dim: int | None = None
    slot_dropout: float = 0.0
    base_model: str | None = None
    memory_schema: dict[str, Any] = field(default_factory=dict)
    placeholder: dict[str, Any] | None = None
    selection: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer_keys = list(self.layer_keys)
        self.memory_schema = dict(self.memory_schema or {})
        self.selection = dict(self.selection or {})
        if self.layer_keys and len(self.layer_keys) != self.layers:
            raise ValueError(f"{len(self.layer_keys)} layer_keys given for layers={self.layers}")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {self.fusion!r}; expected one of {FUSION_MODES}")
        if self.projector not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector {self.projector!r}; expected one of {PROJECTOR_KINDS}")
        if not 0.0 <= self.slot_dropout < 1.0:
            raise ValueError(f"slot_dropout must be in [0, 1), got {self.slot_dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build from a dict, ignoring unknown keys (e.g. ``format_version``) so newer files still load."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class GAGAdapter(nn.Module):
    """Layer mixer + projector (+ optional semantic head): the only trainable part of GAG."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.mixer = LayerMixer(config.slots, config.layers, config.fusion, config.layer_index)
        self.projector = Projector(
            config.expert_hidden, config.base_hidden, config.projector, config.projector_hidden
        )
        self.semantic_head = (
            SemanticHead(config.base_hidden, config.semantic_dim) if config.semantic_dim else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.ln_in.weight.dtype

    def slot_dropout(self, mixed: Tensor) -> Tensor:
        """Zero whole fused slots with probability p, in training mode only.

        No 1/(1-p) rescaling: the projector starts with a LayerNorm, which would undo any rescaling of a
        surviving slot, and a dropped slot must look the same at every p (a zero vector, which LN_in maps
        to a learned "empty slot" embedding) for the base to learn to ignore it.
        """
        p = self.config.slot_dropout
        if not self.training or p <= 0.0:
            return mixed
        keep = torch.rand(mixed.shape[:-1], device=mixed.device) >= p
        return mixed * keep.unsqueeze(-1).to(mixed.dtype)

    def project(self, memory: Tensor) -> Tensor:
        """``memory [B, K, S, H_e]`` -> slot vectors ``[B, S, H_b]`` in the adapter's dtype (fp32).

        Autocast is disabled here so that mixed-precision training still runs the adapter in fp32.
        """
        memory = memory.to(self.dtype)
        with torch.autocast(device_type=memory.device.type, enabled=False):
            mixed = self.mixer(memory)
            mixed = self.slot_dropout(mixed)
            return self.projector(mixed)

    forward = project

    def semantic(self, pooled: Tensor) -> Tensor:
        """Semantic head on pooled base states ``[B, H_b]`` (upcast to fp32)."""
        if self.semantic_head is None:
            raise GAGError("this adapter has no semantic head (semantic_dim is 0/None)")
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.semantic_head(pooled.to(self.dtype))

    def clamp_(self) -> None:
        """Post-optimizer-step hook: clamp the layer-mix logits to [-10, 10]."""
        self.mixer.clamp_()

    def layer_weights(self) -> Tensor:
        """The softmaxed layer mix ``[S, K]`` for logging."""
        return self.mixer.weights().detach()


# --------------------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------------------
def inject(inputs_embeds: Tensor, input_ids: Tensor, gag_token_id: int, slot_vectors: Tensor) -> Tensor:
    """Return a copy of ``inputs_embeds [B, T, H_b]`` with row b's ``<GAG>`` positions replaced by
    ``slot_vectors[b] [S, H_b]`` in order.

    Out of place so the (frozen) embedding output is never modified and autograd reaches the slot vectors.
    Every row must contain exactly S placeholders: a silent partial injection (e.g. a prompt truncated
    through its knowledge line) would train or evaluate on the wrong input.
    """
    if inputs_embeds.dim() != 3 or input_ids.dim() != 2 or slot_vectors.dim() != 3:
        raise ValueError(
            "expected inputs_embeds [B, T, H], input_ids [B, T], slot_vectors [B, S, H]; got "
            f"{tuple(inputs_embeds.shape)}, {tuple(input_ids.shape)}, {tuple(slot_vectors.shape)}"
        )
    b, t, h = inputs_embeds.shape
    if tuple(input_ids.shape) != (b, t):
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} does not match inputs_embeds {(b, t, h)}")
    if slot_vectors.shape[0] != b or slot_vectors.shape[2] != h:
        raise ValueError(
            f"slot_vectors shape {tuple(slot_vectors.shape)} does not match batch {b} and hidden size {h}"
        )
    num_slots = slot_vectors.shape[1]
    mask = input_ids == gag_token_id
    counts = mask.sum(dim=1).tolist()
    for row, n in enumerate(counts):
        if n != num_slots:
            raise InjectionError(
                f"row {row}: found {n} {GAG_TOKEN} tokens (id {gag_token_id}) but {num_slots} memory "
                f"vectors; the prompt must contain exactly one {GAG_TOKEN} per memory slot"
            )
    source = slot_vectors.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
    # masked_scatter fills masked positions in row-major order, i.e. row by row and left to right, which
    # with exactly S positions per row is slot order.
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), source.reshape(-1, h))


def injected_embeddings(base: Any, adapter: GAGAdapter, input_ids: Tensor, memory: Tensor,
                        gag_token_id: int) -> tuple[Tensor, Tensor]:
    """(inputs_embeds with the projected slots at the ``<GAG>`` positions, slots ``[B, S, H_b]`` fp32).

    The one injection path, shared by training and every GAG system of the evaluation harness. The placeholder
    positions are looked up as id 0 (a mark id is outside the vocabulary; either way the row is overwritten).
    """
    embeds = base.get_input_embeddings()(input_ids.masked_fill(input_ids == gag_token_id, 0))
    slots = adapter.project(memory.to(input_ids.device))
    return inject(embeds, input_ids, gag_token_id, slots), slots


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "GAG_TOKEN",
    "AdapterConfig",
    "GAGAdapter",
    "InjectionError",
    "LayerMixer",
    "Projector",
    "SemanticHead",
    "inject",
    "injected_embeddings",
]
