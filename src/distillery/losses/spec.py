"""``LossSpec``: the ``loss:`` block of a training config.

Example (YAML)::

    loss: {divergence: jsd, beta: 0.5, temperature: 2.0, form: fused, chunk_tokens: 256}

The mix is ``loss = ce_weight·CE + Σ_i w_i·D_i``:

* one divergence: ``divergence`` (+ ``beta``/``alpha``/``mu``) with weight ``kd_weight``
  (default 1.0), and ``ce_weight`` (default 0.0: pure distillation);
* ``kd_ratio: r`` is torchtune's shorthand for ``ce_weight = 1 − r`` and ``kd_weight = r``; it
  cannot be combined with ``ce_weight``/``kd_weight``/``mix`` (one way to say it, no silent
  override);
* ``mix: [{divergence, weight, beta?, alpha?, mu?, normalize?}, ...]`` lists several weighted
  divergences instead of ``divergence``.

``scale_by_t2: true`` multiplies every divergence weight (not the CE) by T², Hinton's
correction that keeps the soft-target gradients' size independent of T.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distillery.losses.divergences import available_divergences, get_divergence
from distillery.losses.terms import Term, make_term


def _check_name(name: str) -> str:
    get_divergence(name)  # raises ValueError listing the valid names
    return name


class MixTerm(BaseModel):
    """One weighted divergence of ``LossSpec.mix``."""

    model_config = ConfigDict(extra="forbid")

    divergence: str
    weight: float = Field(1.0, ge=0.0)
    beta: float | None = Field(None, ge=0.0, le=1.0)
    alpha: float | None = Field(None, ge=0.0, le=1.0)
    mu: float | None = Field(None, gt=0.0, lt=1.0)
    normalize: bool | None = None

    _check = field_validator("divergence")(classmethod(lambda cls, v: _check_name(v)))

    @model_validator(mode="after")
    def _params_fit(self) -> MixTerm:
        self.to_term()  # raises ValueError if the divergence takes none of the given parameters
        return self

    def to_term(self, scale: float = 1.0) -> Term:
        return make_term(
            self.divergence, self.weight * scale,
            beta=self.beta, alpha=self.alpha, mu=self.mu, normalize=self.normalize,
        )


class LossSpec(BaseModel):
    """How to compute the distillation loss; see the module doc and ``docs/losses.md``.

    Fields: ``divergence`` (a registered name: forward_kl, reverse_kl, symmetric_kl, jsd,
    skew_forward_kl, skew_reverse_kl, tvd, akl); ``beta`` (jsd, symmetric_kl; default 0.5);
    ``jsd_normalize`` (divide JSD by β(1−β)); ``alpha`` (skew KLs; default 0.1); ``mu`` (akl head
    mass; default 0.5); ``temperature`` (divides both sides' logits); ``scale_by_t2``; ``form``
    (dense | sparse | fused); ``chunk_tokens`` (fused: tokens per chunk; memory ≈ a few
    ``chunk_tokens × vocab`` float32 buffers + one lm_head-sized gradient); ``tail_policy``
    (sparse teacher: renormalize | tail_bucket | uniform_tail); ``reduction`` ("token": mean over
    all counted tokens of the batch; "sequence": mean within each sequence, then over sequences);
    ``ce_weight``, ``kd_weight``, ``kd_ratio``, ``mix`` (the mix, see the module doc).
    """

    model_config = ConfigDict(extra="forbid")

    divergence: str = "forward_kl"
    beta: float | None = Field(None, ge=0.0, le=1.0)
    alpha: float | None = Field(None, ge=0.0, le=1.0)
    mu: float | None = Field(None, gt=0.0, lt=1.0)
    jsd_normalize: bool = False
    temperature: float = Field(1.0, gt=0.0)
    scale_by_t2: bool = False
    form: Literal["dense", "sparse", "fused"] = "dense"
    chunk_tokens: int = Field(256, ge=1)
    tail_policy: Literal["renormalize", "tail_bucket", "uniform_tail"] = "tail_bucket"
    reduction: Literal["token", "sequence"] = "token"
    ce_weight: float | None = Field(None, ge=0.0)
    kd_weight: float | None = Field(None, ge=0.0)
    kd_ratio: float | None = Field(None, ge=0.0, le=1.0)
    mix: list[MixTerm] | None = None

    _check = field_validator("divergence")(classmethod(lambda cls, v: _check_name(v)))

    @model_validator(mode="after")
    def _consistent(self) -> LossSpec:
        if self.kd_ratio is not None and (
            self.ce_weight is not None or self.kd_weight is not None or self.mix is not None
        ):
            raise ValueError(
                "kd_ratio is a shorthand for ce_weight = 1 - kd_ratio and kd_weight = kd_ratio "
                "with one divergence; do not combine it with ce_weight, kd_weight or mix"
            )
        if self.mix is not None:
            if not self.mix:
                raise ValueError("mix must list at least one divergence")
            clash = {"divergence", "beta", "alpha", "mu", "kd_weight"} & self.model_fields_set
            if clash:
                raise ValueError(f"with mix, set {sorted(clash)} inside the mix entries instead")
        else:
            div = get_divergence(self.divergence)
            for name in ("beta", "alpha", "mu"):
                if getattr(self, name) is not None and name not in div.params:
                    raise ValueError(
                        f"divergence {self.divergence!r} takes no {name!r} "
                        f"(it takes {div.params or 'no parameters'})"
                    )
        return self

    @property
    def resolved_ce_weight(self) -> float:
        """The CE weight after the ``kd_ratio`` shorthand (default 0)."""
        if self.kd_ratio is not None:
            return 1.0 - self.kd_ratio
        return 0.0 if self.ce_weight is None else self.ce_weight

    @property
    def resolved_kd_weight(self) -> float:
        """The divergences' total weight after the ``kd_ratio`` shorthand, before any T² scaling."""
        if self.mix is not None:
            return sum(m.weight for m in self.mix)
        if self.kd_ratio is not None:
            return self.kd_ratio
        return 1.0 if self.kd_weight is None else self.kd_weight

    def terms(self) -> list[Term]:
        """The weighted divergences ``[(D_i, w_i, params)]``, with T² folded in if asked."""
        scale = self.temperature**2 if self.scale_by_t2 else 1.0
        if self.mix is not None:
            return [m.to_term(scale) for m in self.mix]
        weight = self.resolved_kd_weight
        normalize = self.jsd_normalize if self.divergence == "jsd" else None
        return [
            make_term(
                self.divergence, weight * scale,
                beta=self.beta, alpha=self.alpha, mu=self.mu, normalize=normalize,
            )
        ]


__all__ = ["LossSpec", "MixTerm", "available_divergences"]
