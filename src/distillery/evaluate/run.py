"""Evaluate a model on held-out problems: greedy answers, accuracy with CI, speed, size."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from rich.progress import Progress

from distillery.config import EvalConfig
from distillery.evaluate.stats import bootstrap_ci
from distillery.models import count_params
from distillery.tasks import Problem, extract_answer, normalize_answer
from distillery.teachers import HFTeacher, SamplingParams


def evaluate_model(
    teacher: HFTeacher, problems: list[Problem], cfg: EvalConfig, progress: Progress | None = None
) -> dict:
    """Accuracy (with a bootstrap 95% CI), answer-format failures, tokens/s and parameters.

    Decoding is greedy. ``tokens_per_s`` is decode speed at batch 1 (what a user waiting on one
    answer sees), measured on ``cfg.speed_prompts`` prompts; ``tokens_per_s_batched`` is the
    throughput of the evaluation batches themselves.
    """
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed)
    convs = [[{"role": "user", "content": p.prompt}] for p in problems]
    before = (teacher.stats.tokens, teacher.stats.seconds)
    outputs = teacher.generate(convs, params, progress=progress, batch_size=cfg.batch_size)
    batched_tps = (teacher.stats.tokens - before[0]) / max(teacher.stats.seconds - before[1], 1e-9)

    items, correct, no_answer = [], [], 0
    for problem, gens in zip(problems, outputs):
        answer = extract_answer(gens[0].text)
        ok = answer is not None and answer == normalize_answer(problem.reference)
        no_answer += answer is None
        correct.append(float(ok))
        items.append({"id": problem.id, "prompt": problem.prompt, "reference": problem.reference,
                      "output": gens[0].text, "answer": answer, "correct": ok})
    acc, lo, hi = bootstrap_ci(correct, cfg.bootstrap_resamples, seed=cfg.seed)
    return {
        "accuracy": acc,
        "ci95": [lo, hi],
        "tokens_per_s": measure_speed(teacher, problems, cfg),
        "params": count_params(teacher.model),
        "tokens_per_s_batched": batched_tps,
        "no_answer": no_answer,
        "n": len(problems),
        "items": items,
    }


def measure_speed(teacher: HFTeacher, problems: list[Problem], cfg: EvalConfig) -> float:
    """Batch-1 decode tokens/s on the first ``cfg.speed_prompts`` problems (see below)."""
    convs = [[{"role": "user", "content": p.prompt}] for p in problems[: cfg.speed_prompts]]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed)
    return batch1_tokens_per_s(teacher, convs, params)


def batch1_tokens_per_s(
    teacher: HFTeacher, convs: list[list[dict]], params: SamplingParams, repeats: int = 3
) -> float:
    """Decode tokens per second generating one prompt at a time (after one warm-up call).

    Every prompt decodes exactly ``params.max_new_tokens`` tokens (past the end token), so a
    model that answers in 3 tokens and one that writes a 30-token chain are timed on the same
    work: the per-call overhead does not make short answers look slow.
    The median of ``repeats`` passes is returned, so one pass slowed by another process on a
    shared machine does not set the figure.
    """
    params = replace(params, min_new_tokens=params.max_new_tokens, n=1)
    teacher.generate(convs[:1], params, batch_size=1)  # warm-up: first-call allocations
    rates = []
    for _ in range(repeats):
        tokens, start = 0, time.perf_counter()
        for conv in convs:
            tokens += teacher.generate([conv], params, batch_size=1)[0][0].num_tokens
        rates.append(tokens / (time.perf_counter() - start))
    return float(statistics.median(rates))


