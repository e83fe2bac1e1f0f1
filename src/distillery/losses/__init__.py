"""Distillation losses: divergences, the CE mix, dense / sparse / fused-linear forms, feature and
relation losses, cross-tokenizer losses (ULD, vocabulary mapping). The training loop calls :func:`distillation_loss` with a :class:`LossSpec`."""

from distillery.losses.api import distillation_loss, fused_kd_loss_from_model, lm_head_inputs
from distillery.losses.cross_tokenizer import (
    cross_tokenizer_per_position,
    map_teacher_to_student,
    move_span_mass,
    take_span_mass,
    uld_distance,
)
from distillery.losses.divergences import (
    REGISTRY,
    Divergence,
    available_divergences,
    forward_kl,
    get_divergence,
    register,
)
from distillery.losses.feature import FeatureDistiller, cosine_gram, feature_loss, relation_loss
from distillery.losses.fused import (
    TeacherHidden,
    TeacherLogits,
    TeacherTopK,
    fused_linear_kd,
)
from distillery.losses.reduce import reduce_per_token, resolve_mask, token_weights
from distillery.losses.spec import LossSpec, MixTerm
from distillery.losses.terms import Term, make_term

__all__ = [
    "REGISTRY",
    "Divergence",
    "FeatureDistiller",
    "LossSpec",
    "MixTerm",
    "TeacherHidden",
    "TeacherLogits",
    "TeacherTopK",
    "Term",
    "available_divergences",
    "cosine_gram",
    "cross_tokenizer_per_position",
    "feature_loss",
    "distillation_loss",
    "forward_kl",
    "fused_kd_loss_from_model",
    "fused_linear_kd",
    "get_divergence",
    "lm_head_inputs",
    "make_term",
    "map_teacher_to_student",
    "move_span_mass",
    "reduce_per_token",
    "register",
    "relation_loss",
    "resolve_mask",
    "take_span_mass",
    "token_weights",
    "uld_distance",
]
