"""Metrics over sampled answers and multiple choice: pass@k (Chen et al. 2021) and each option's
log-likelihood under a causal LM.

Grading one answer (extract → normalize → compare: numeric, exact, symbolic, f1, ...) lives in
:mod:`distillery.answers`; this module holds what needs several samples or the model itself.
:func:`pass_at_k` / :func:`pass_at_1` give per-item figures for ``eval.samples``, and
:func:`multiple_choice_loglik` is the scorer ``eval`` hands the ``multiple_choice`` grader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch

__all__ = ["MultipleChoice", "multiple_choice_loglik", "pass_at_1", "pass_at_k"]


# --------------------------------------------------------------------------- sampled answers


def pass_at_k(samples_correct: Sequence[Sequence[bool]], k: int) -> list[float]:
    """Per item, the unbiased pass@k estimate from its n samples (c of them correct):
    ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021), the chance that k samples drawn without
    replacement from the n include a correct one.
    """
    out = []
    for i, samples in enumerate(samples_correct):
        n, c = len(samples), sum(bool(s) for s in samples)
        if n < k:
            raise ValueError(f"item {i} has {n} samples; pass@{k} needs at least {k}")
        out.append(1.0 - math.comb(n - c, k) / math.comb(n, k))
    return out


def pass_at_1(samples_correct: Sequence[Sequence[bool]]) -> list[float]:
    """Per item, the fraction of its n samples that are correct: open-r1's pass@1 (averaged
    over n samples per problem); the benchmark figure is the mean of these, with
    ``bootstrap_ci`` over items for its interval.
    """
    if any(len(s) == 0 for s in samples_correct):
        i = next(i for i, s in enumerate(samples_correct) if len(s) == 0)
        raise ValueError(f"item {i} has no samples: pass@1 needs at least one per item")
    return pass_at_k(samples_correct, 1)


# --------------------------------------------------------------------------- multiple choice


class MultipleChoice(NamedTuple):
    """The option picked, and each option's log-likelihood: summed over its tokens, and
    divided by the option's length in UTF-8 bytes (lm-evaluation-harness's ``acc_norm``)."""

    best_index: int
    logliks: list[float]
    normalized: list[float]


def multiple_choice_loglik(
    model: Any, tokenizer: Any, prompt: str, options: Sequence[str],
    select: Literal["sum", "normalized"] = "sum",
) -> MultipleChoice:
    """Score each option as a continuation of ``prompt`` under a causal LM; pick the best.

    As lm-evaluation-harness does, ``prompt + option`` is tokenized whole and the option's
    tokens are those past the prompt's own tokens (so merges at the boundary match what the
    model would read). ``select`` picks by summed ("sum", lm-eval ``acc``) or byte-normalized
    ("normalized", ``acc_norm``) log-likelihood; the latter does not favour short options.
    """
    if not options:
        raise ValueError("multiple_choice_loglik needs at least one option")
    if select not in ("sum", "normalized"):
        raise ValueError(f"select must be 'sum' or 'normalized', got {select!r}")
    context = tokenizer(prompt)["input_ids"]
    if not context:
        raise ValueError("the prompt encodes to no tokens and the tokenizer adds no BOS: "
                         "give a non-empty prompt, so the first option token has a context")
    rows, starts = [], []
    for j, option in enumerate(options):
        ids = tokenizer(prompt + option)["input_ids"]
        if len(ids) <= len(context) or not option:
            raise ValueError(f"option {j} ({option!r}) adds no tokens to the prompt")
        rows.append(ids)
        starts.append(len(context))
    logliks = _continuation_logliks(model, rows, starts, tokenizer.pad_token_id or 0)
    normalized = [ll / len(o.encode("utf-8")) for ll, o in zip(logliks, options)]
    scores = logliks if select == "sum" else normalized
    return MultipleChoice(max(range(len(options)), key=scores.__getitem__), logliks, normalized)


@torch.no_grad()
def _continuation_logliks(model: Any, rows: list[list[int]], starts: list[int], pad_id: int) -> list[float]:
    """Sum of log p(token | tokens before it) over ``row[start:]`` for each row (one batch,
    right-padded; logits ``[options, seq, vocab]`` are reduced in float32)."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    token_lp = logprobs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
    return [float(token_lp[i, s - 1 : len(r) - 1].sum()) for i, (r, s) in enumerate(zip(rows, starts))]
