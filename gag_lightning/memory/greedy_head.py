"""Greedy next tokens without a full float32 output head: a bfloat16 screen, then float32 on the tokens that can win.

At batch 64 on a CPU the output head (vocabulary x hidden, 49152 x 576 for SmolLM2) is about a third of a decoding
step in float32, and greedy decoding only needs its argmax. CPUs with bfloat16 dot products run the same product
3x faster, and the rounding of that product is bounded: with u = 2^-8 (bfloat16's unit roundoff) and
gamma = H * 2^-24 (float32 accumulation over H terms),

    |bf16 logit_t - logit_t| <= B_t = (2u + u^2 + 3 gamma) * ||x|| * ||w_t|| + u / (1 - u) * |bf16 logit_t|

(inputs rounded to bfloat16, products accumulated in float32, the result rounded to bfloat16; Cauchy-Schwarz
bounds sum |x_i w_ti|; one more gamma covers the float32 head the answer is compared with). The true maximum is at
least the lower bound of the best screened token, so a token whose upper bound (taken at the row's largest ||w_t||
and |bf16 logit|) stays below it cannot win; the others, a few dozen, are scored again in float32 and the argmax is
taken among them. The answer is the float32 head's argmax up to float32 rounding (a tie within a few ulps
may resolve either way, as it does between two batch sizes of the plain head); a row whose candidates exceed
`max_candidates` gets the full float32 row.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ScreenedGreedyHead", "screening_supported"]

_U = 2.0**-8


def screening_supported(device: torch.device) -> bool:
    """bfloat16 matmuls pay off on CPUs with bfloat16 dot products (AVX512-BF16 or AMX); elsewhere use float32.
    (The answer is exact either way; this only decides whether the screen is faster.)"""
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


class ScreenedGreedyHead:
    """argmax over the vocabulary of `hidden @ weight.T (+ bias)` for float32 weights (see the module docstring).

    Holds a bfloat16 copy of the weight (half its size) next to the float32 one, which it only reads by row.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, max_candidates: int = 256) -> None:
        if weight.dtype != torch.float32:
            raise ValueError(f"the screened head is for float32 heads, got {weight.dtype}")
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.screen = self.weight.to(torch.bfloat16)
        self.norms = self.weight.norm(dim=1)
        self.max_norm = self.norms.max()
        self.max_candidates = int(max_candidates)
        gamma = weight.shape[1] * 2.0**-24
        self.rel = 2 * _U + _U * _U + 3 * gamma
        self.full_rows = 0  # rows that fell back to the float32 head (a profile's count)

    def logits(self, hidden: Tensor) -> Tensor:
        """The float32 head on every token (the fallback, and what the screen must agree with)."""
        out = hidden @ self.weight.T
        return out if self.bias is None else out + self.bias

    @torch.inference_mode()
    def argmax(self, hidden: Tensor) -> Tensor:
        """[B, H] float32 hidden states -> [B] greedy token ids."""
        hidden = hidden.float()
        n = hidden.shape[0]
        product = hidden.to(torch.bfloat16) @ self.screen.T  # [B, V] bfloat16
        screened = product if self.bias is None else product.float() + self.bias
        top, at = screened.max(dim=1)
        top = top.float()
        scale = hidden.norm(dim=1) * self.rel  # B_t = scale * ||w_t|| + c * |product_t|
        c = _U / (1 - _U)
        # the best screened token's lower bound is below the true maximum; a token whose upper bound cannot reach
        # it cannot win (its B_t taken at the largest ||w|| and |product| of the row: one comparison per token)
        largest = torch.maximum(product.amax(dim=1).float().abs(), product.amin(dim=1).float().abs())
        low = top - scale * self.norms[at] - c * product[torch.arange(n), at].float().abs()
        threshold = low - scale * self.max_norm - c * largest - 1e-30
        if screened.dtype == torch.bfloat16:  # compare in bfloat16, the threshold rounded down
            threshold = (threshold - threshold.abs() * 2.0**-7).to(torch.bfloat16)
        row, token = (screened >= threshold[:, None]).nonzero(as_tuple=True)  # row-major: tokens ascending
        out = torch.empty(n, dtype=torch.long, device=hidden.device)
        wide = torch.bincount(row, minlength=n) > self.max_candidates
        if bool(wide.any()):
            rows = wide.nonzero().flatten()
            out[rows] = self.logits(hidden[rows]).argmax(dim=1)
            self.full_rows += len(rows)
            keep = ~wide[row]
            row, token = row[keep], token[keep]
        if len(row):
            exact = (hidden[row] * self.weight[token]).sum(dim=1)
            if self.bias is not None:
                exact = exact + self.bias[token]
            best = torch.full((n,), float("-inf"), device=hidden.device).scatter_reduce(0, row, exact, "amax")
            win = exact == best[row]
            # ties: the first token, as torch.argmax
            first = torch.full((n,), self.weight.shape[0], dtype=torch.long, device=hidden.device)
            first = first.scatter_reduce(0, row[win], token[win], "amin")
            out[~wide] = first[~wide]
        return out
