"""PPR online routing (METHOD.md section 6): route a query to the domain whose nearest prototype is closest.

s_d(x) = max_p cos(g(x), p) over domain d's prototypes; route = argmax_d s_d. Optional safe fallback:
a specialist route whose lead over the runner-up is below ``margin`` goes to ``general`` instead.
Domains are plug-and-play: adding or removing a bank changes nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gag_lightning.errors import GAGError, SchemaMismatchError
from gag_lightning.routing.encoder import QueryEncoder
from gag_lightning.routing.prototypes import PrototypeBank

__all__ = ["RouteDecision", "PrototypeRouter"]


@dataclass(frozen=True)
class RouteDecision:
    """One query's route and why.

    ``best`` is the argmax domain and ``second`` the runner-up (None with a single domain); ``domain`` is
    the final route, which differs from ``best`` only when the margin fallback sent it to general.
    """

    domain: str
    scores: dict[str, float]
    best: str
    second: str | None
    fell_back: bool

    @property
    def best_score(self) -> float:
        return self.scores[self.best]

    @property
    def second_score(self) -> float | None:
        return None if self.second is None else self.scores[self.second]

    @property
    def margin(self) -> float | None:
        """Lead of the best domain over the runner-up (None with a single domain)."""
        s = self.second_score
        return None if s is None else self.best_score - s


class PrototypeRouter:
    """Holds one prototype bank per domain (all from the same encoder) and routes embeddings.

    Domain order is ``general`` first, then the other domains in the order they were added; exact score
    ties go to the earlier domain, so ties favour the safe general route.
    """

    def __init__(
        self,
        encoder_fingerprint: str,
        dim: int,
        margin: float | None = None,
        general_domain: str = "general",
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if margin is not None and not margin >= 0:
            raise ValueError(f"margin must be >= 0 or None, got {margin}")
        self.encoder_fingerprint = encoder_fingerprint
        self.dim = int(dim)
        self.margin = None if margin is None else float(margin)
        self.general_domain = general_domain
        self._banks: dict[str, PrototypeBank] = {}
        self._cache: tuple[Tensor, list[tuple[int, int]]] | None = None

    @classmethod
    def from_banks(
        cls,
        banks: Iterable[PrototypeBank],
        margin: float | None = None,
        general_domain: str = "general",
    ) -> PrototypeRouter:
        """Build a router whose encoder identity is taken from the first bank; all must agree."""
        banks = list(banks)
        if not banks:
            raise GAGError("PrototypeRouter.from_banks needs at least one bank")
        router = cls(banks[0].encoder_fingerprint, banks[0].dim, margin=margin, general_domain=general_domain)
        for bank in banks:
            router.add_bank(bank)
        return router

    # ----------------------------------------------------------------------------------------- banks
    @property
    def domains(self) -> list[str]:
        """Domains in scoring order: general first, then insertion order."""
        names = list(self._banks)
        if self.general_domain in self._banks:
            names.remove(self.general_domain)
            names.insert(0, self.general_domain)
        return names

    @property
    def banks(self) -> dict[str, PrototypeBank]:
        return {d: self._banks[d] for d in self.domains}

    def __contains__(self, domain: object) -> bool:
        return domain in self._banks

    def __len__(self) -> int:
        return len(self._banks)

    def add_bank(self, bank: PrototypeBank, replace: bool = False) -> None:
        """Plug in a domain; its bank must come from this router's encoder (same fingerprint and dim)."""
        if bank.encoder_fingerprint != self.encoder_fingerprint or bank.dim != self.dim:
            raise SchemaMismatchError(
                f"prototype bank for domain '{bank.domain}' was built with encoder "
                f"'{bank.encoder_fingerprint}' (dim {bank.dim}), but this router uses encoder "
                f"'{self.encoder_fingerprint}' (dim {self.dim}); rebuild the bank with the router's encoder"
            )
        if bank.domain in self._banks and not replace:
            raise GAGError(
                f"domain '{bank.domain}' already has a prototype bank; remove it first or pass replace=True"
            )
        self._banks[bank.domain] = bank
        self._cache = None

    def remove_bank(self, domain: str) -> PrototypeBank:
        """Unplug a domain and return its bank; the other domains' scores are unaffected."""
        if domain not in self._banks:
            raise KeyError(f"no prototype bank for domain '{domain}'; known domains: {self.domains}")
        self._cache = None
        return self._banks.pop(domain)

    def _matrix(self) -> tuple[Tensor, list[tuple[int, int]]]:
        """All prototypes stacked [sum k, D] with each domain's row range, in ``domains`` order."""
        if self._cache is None:
            mats, spans, start = [], [], 0
            for d in self.domains:
                p = self._banks[d].prototypes
                mats.append(p)
                spans.append((start, start + p.shape[0]))
                start += p.shape[0]
            self._cache = (torch.cat(mats, dim=0), spans)
        return self._cache

    # --------------------------------------------------------------------------------------- scoring
    def scores(self, emb: Tensor) -> Tensor:
        """Per-domain max cosine, [N, n_domains] in ``domains`` order (one matmul for all banks)."""
        if not self._banks:
            raise GAGError("the router has no prototype banks; add at least the 'general' bank")
        if emb.ndim == 1:
            emb = emb.unsqueeze(0)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise SchemaMismatchError(
                f"query embeddings have shape {tuple(emb.shape)}, expected [N, {self.dim}] "
                f"for encoder '{self.encoder_fingerprint}'"
            )
        protos, spans = self._matrix()
        x = F.normalize(emb.detach().to(torch.float32), p=2, dim=1)
        sims = x @ protos.to(x.device).T
        if sims.shape[0] == 0:
            return sims.new_zeros((0, len(spans)))
        return torch.stack([sims[:, a:b].amax(dim=1) for a, b in spans], dim=1)

    def route(self, emb: Tensor) -> list[RouteDecision]:
        """Argmax routing with the optional margin fallback to general; one decision per row."""
        if self.general_domain not in self._banks:
            raise GAGError(
                f"the router has no '{self.general_domain}' bank; PPR routes unmatched queries to the "
                f"general domain, so build and add its prototype bank (known domains: {self.domains})"
            )
        s = self.scores(emb)
        names = self.domains
        n = s.shape[1]
        best_idx = torch.argmax(s, dim=1)  # first maximal index: ties go to the earlier domain
        if n > 1:
            masked = s.clone()
            masked.scatter_(1, best_idx.unsqueeze(1), float("-inf"))
            second_idx = torch.argmax(masked, dim=1)
        s_list = s.cpu().tolist()
        best_list = best_idx.cpu().tolist()
        second_list = second_idx.cpu().tolist() if n > 1 else [None] * len(best_list)
        out = []
        for row, b, sec in zip(s_list, best_list, second_list, strict=True):
            scores = dict(zip(names, (float(v) for v in row), strict=True))
            best = names[b]
            second = None if sec is None else names[sec]
            fell_back = (
                self.margin is not None
                and best != self.general_domain
                and second is not None
                and scores[best] - scores[second] < self.margin
            )
            domain = self.general_domain if fell_back else best
            out.append(
                RouteDecision(domain=domain, scores=scores, best=best, second=second, fell_back=fell_back)
            )
        return out

    def route_texts(
        self, encoder: QueryEncoder, texts: Sequence[str], batch_size: int = 64
    ) -> list[RouteDecision]:
        """Encode and route; refuses an encoder other than the one the banks were built with."""
        if encoder.fingerprint != self.encoder_fingerprint or encoder.dim != self.dim:
            raise SchemaMismatchError(
                f"encoder '{encoder.fingerprint}' (dim {encoder.dim}) is not the one the prototype banks "
                f"were built with ('{self.encoder_fingerprint}', dim {self.dim})"
            )
        return self.route(encoder.encode(texts, batch_size=batch_size))
