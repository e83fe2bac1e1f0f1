"""The loss mix: ``loss = ce_weight·CE + Σ_i w_i·D_i`` as a list of resolved terms."""

from __future__ import annotations

from dataclasses import dataclass, field

from distillery.losses.divergences import Divergence, get_divergence


@dataclass(frozen=True)
class Term:
    """One weighted divergence of the mix; ``params`` are the keyword arguments it takes."""

    divergence: Divergence
    weight: float
    params: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.divergence.name


def make_term(name: str, weight: float = 1.0, **params: object) -> Term:
    """A :class:`Term` for divergence ``name``; unknown parameter names raise ``ValueError``.

    ``params`` set to ``None`` are dropped (the divergence's default applies).
    """
    div = get_divergence(name)
    given = {k: v for k, v in params.items() if v is not None}
    extra = set(given) - set(div.params)
    if extra:
        raise ValueError(f"divergence {name!r} takes {div.params or 'no parameters'}, got {sorted(extra)}")
    return Term(div, float(weight), given)
