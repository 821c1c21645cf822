"""Token-alignment initialisation of the injection projector (a closed-form reconstruction warm-up).

Why: a randomly initialised projector gives the frozen base vectors it has never seen, and on a small
train set Stage III learns the answer's *form* long before it learns to *read* the slots (the demo's
fact checks: 0/40 carried). xRAG solves this with a long paraphrase pre-training in which the base must
regenerate the text behind the memory. Here the same goal is reached in closed form: the expert's
stabilised, layer-mixed state at a token position linearly predicts the base's *input embedding of that
token* (93% held-out nearest-token accuracy for SmolLM2-135M with the default four layers), so a ridge
regression from those features to the base's embeddings gives a projector whose output, for a slot that
pools one or a few tokens, is close to what the base would see if the background were written in its
prompt. Training then starts from a projector the base can already read instead of from noise.

The fit uses exactly the adapter's input path at initialisation: per-token states of the configured
layers -> `stabilise` (the memory bank's layer norm + clamp) -> the mixer's initial mix (uniform over the
layers, or the single configured layer) -> the projector's `ln_in` -> `w_in`. For `gated_residual` the
update branch starts at zero (`w2` zeroed), so the projector starts as exactly the fitted linear map.

It needs the expert and the base to share a tokenizer (the same token ids for the same text), which holds
for the paper's Qwen3-1.7B / Qwen3-8B pair and for the demo; otherwise use `gag.init=random`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gag_lightning.errors import GAGError
from gag_lightning.memory.compression import stabilise
from gag_lightning.memory.extract import teacher_forced_states
from gag_lightning.models.adapter import GAGAdapter

log = logging.getLogger(__name__)

INIT_MODES = ("random", "token_alignment")


@dataclass(frozen=True)
class AlignmentFit:
    """What the fit saw and how well it fits (reported in the gag manifest)."""

    tokens: int
    train_token_acc: float  # share of tokens whose projected vector is nearest (cosine) to its own embedding
    ridge: float


def mixed_token_features(adapter: GAGAdapter, layer_states: Tensor) -> Tensor:
    """``[n, K, H_e]`` per-token states -> ``[n, H_e]``: stabilised and mixed as the adapter does at init."""
    if layer_states.dim() != 3:
        raise ValueError(f"layer_states must be [n, K, H], got {tuple(layer_states.shape)}")
    x = stabilise(layer_states)
    mode = adapter.mixer.mode
    if mode == "single":
        return x[:, adapter.mixer.layer_index]
    # learned starts at zero logits: the uniform mix, like mode "uniform"
    weights = adapter.mixer.weights()[0].to(x.dtype) if mode == "learned" else None
    return x.mean(dim=1) if weights is None else torch.einsum("k,nkh->nh", weights, x)


@torch.no_grad()
def fit_projector(adapter: GAGAdapter, features: Tensor, targets: Tensor, ridge: float = 1.0) -> AlignmentFit:
    """Set ``w_in`` (and zero the update branch) so that ``projector(features) ~= targets`` by ridge regression.

    ``features [n, H_e]`` are mixed token features (`mixed_token_features`); ``targets [n, H_b]`` the base's
    input embeddings of the same tokens.
    """
    proj = adapter.projector
    if proj.kind != "gated_residual":
        raise GAGError(f"gag.init=token_alignment needs the gated_residual projector (its linear w_in); got "
                       f"{proj.kind!r}. Use gag.init=random with this projector.")
    if features.shape[0] != targets.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows for {targets.shape[0]} targets")
    if features.shape[0] < 2:
        raise GAGError("token alignment needs at least two tokens of text")
    ln = proj.ln_in
    x = F.layer_norm(features.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
    xa = torch.cat([x, x.new_ones((x.shape[0], 1))], dim=1).double()
    reg = torch.eye(xa.shape[1], dtype=xa.dtype) * ridge
    reg[-1, -1] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(xa.T @ xa + reg, xa.T @ targets.double())
    w = solution[:-1].T.to(proj.w_in.weight.dtype)
    b = solution[-1].to(proj.w_in.bias.dtype)
    proj.w_in.weight.copy_(w)
    proj.w_in.bias.copy_(b)
    proj.w2.weight.zero_()
    proj.w2.bias.zero_()
    pred = F.normalize(x @ w.T.float() + b.float(), dim=-1)
    tgt = F.normalize(targets.float(), dim=-1)
    # nearest among the distinct targets seen: a cheap, vocabulary-free check of the fit
    uniq, inverse = torch.unique(tgt, dim=0, return_inverse=True)
    acc = float(((pred @ uniq.T).argmax(dim=-1) == inverse).float().mean())
    return AlignmentFit(tokens=int(x.shape[0]), train_token_acc=acc, ridge=float(ridge))


@torch.no_grad()
def token_alignment_init(adapter: GAGAdapter, expert: object, base_embeddings: Tensor,
                         sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                         layer_keys: Sequence[str], ridge: float = 1.0, batch_size: int = 16) -> AlignmentFit:
    """Fit the projector on the expert's states over ``sequences`` (positions ``spans[i] = (start, end)``).

    The target of position t is the base's input embedding of the token *at* t (the input there), which the
    mixed last-layer states encode best; ``base_embeddings`` is the base's input embedding matrix.
    """
    if len(sequences) != len(spans):
        raise ValueError(f"{len(sequences)} sequences for {len(spans)} spans")
    feats: list[Tensor] = []
    ids: list[int] = []
    for start in range(0, len(sequences), batch_size):
        chunk = [list(s) for s in sequences[start:start + batch_size]]
        states = teacher_forced_states(expert, chunk, layer_keys)
        for row, (seq, (lo, hi)) in enumerate(zip(chunk, spans[start:start + batch_size], strict=True)):
            if hi <= lo:
                continue
            per_token = torch.stack([layer[row, lo:hi].float().cpu() for layer in states], dim=1)
            feats.append(mixed_token_features(adapter, per_token))
            ids.extend(seq[lo:hi])
    if not feats:
        raise GAGError("token alignment found no text tokens to fit on")
    vocab = base_embeddings.shape[0]
    if max(ids) >= vocab:
        raise GAGError(f"token id {max(ids)} is outside the base's {vocab}-row embedding: expert and base do not "
                       "share a tokenizer; use gag.init=random")
    targets = base_embeddings.detach().float().cpu()[torch.tensor(ids)]
    fit = fit_projector(adapter, torch.cat(feats), targets, ridge)
    log.info("[gag] token-alignment init: %d tokens, nearest-token accuracy of the fit %.3f", fit.tokens,
             fit.train_token_acc)
    return fit


__all__ = ["INIT_MODES", "AlignmentFit", "fit_projector", "mixed_token_features", "token_alignment_init"]
