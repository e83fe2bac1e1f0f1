"""LossSpec: validation, the mix, and the config shape a user writes."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from distillery.losses import LossSpec, distillation_loss


def test_config_block_from_the_docs():
    spec = LossSpec.model_validate(
        {"divergence": "jsd", "beta": 0.5, "temperature": 2.0, "form": "fused", "chunk_tokens": 1024}
    )
    (term,) = spec.terms()
    assert term.name == "jsd" and term.params == {"beta": 0.5, "normalize": False}
    assert spec.resolved_ce_weight == 0.0 and term.weight == 1.0


def test_unknown_divergence_lists_valid_names():
    with pytest.raises(ValidationError, match="valid names: akl, forward_kl, jsd, reverse_kl"):
        LossSpec(divergence="kl")
    with pytest.raises(ValidationError, match="valid names"):
        LossSpec(mix=[{"divergence": "nope"}])


@pytest.mark.parametrize(
    "bad",
    [
        {"unknown_field": 1},
        {"kd_ratio": 0.5, "ce_weight": 0.5},
        {"kd_ratio": 0.5, "mix": [{"divergence": "tvd"}]},
        {"divergence": "forward_kl", "beta": 0.5},
        {"divergence": "jsd", "alpha": 0.1},
        {"mix": []},
        {"mix": [{"divergence": "tvd"}], "divergence": "jsd"},
        {"mix": [{"divergence": "tvd", "beta": 0.1}]},
        {"temperature": 0.0},
        {"kd_ratio": 1.5},
        {"form": "chunked"},
        {"tail_policy": "drop"},
        {"reduction": "batch"},
        {"chunk_tokens": 0},
    ],
)
def test_invalid_specs_are_refused(bad):
    with pytest.raises(ValidationError):
        LossSpec.model_validate(bad)


def test_scale_by_t2_multiplies_divergences_not_ce():
    spec = LossSpec(temperature=3.0, scale_by_t2=True, kd_ratio=0.25)
    (term,) = spec.terms()
    assert term.weight == pytest.approx(0.25 * 9) and spec.resolved_ce_weight == pytest.approx(0.75)


def test_missing_inputs_are_explained():
    z = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="needs labels"):
        distillation_loss(LossSpec(kd_ratio=0.5), student_logits=z, teacher_logits=z)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        distillation_loss(LossSpec(), student_logits=z)
    with pytest.raises(ValueError, match="exactly one way"):
        distillation_loss(LossSpec(form="fused"), student_hidden=torch.randn(2, 3), lm_head_weight=torch.randn(5, 3))
