"""Evaluate a model on held-out problems: greedy answers, accuracy with CI, speed, size."""

from __future__ import annotations

from rich.progress import Progress

from distillery.config import EvalConfig
from distillery.evaluate.speed import measure_speed
from distillery.evaluate.stats import bootstrap_ci
from distillery.tasks import Problem, extract_answer, normalize_answer
from distillery.teachers import HFTeacher, SamplingParams
from distillery.train.data import prompt_text


def evaluate_model(
    teacher: HFTeacher, problems: list[Problem], cfg: EvalConfig, progress: Progress | None = None
) -> dict:
    """Accuracy (with a bootstrap 95% CI), answer-format failures, tokens/s and parameters.

    Decoding is greedy. The speed probe's figures (:func:`probe_speed`: ``tokens_per_s`` = decode
    speed at batch 1, what a user waiting on one answer sees, ``ttft_s``,
    ``decode_tokens_per_s_batched``, ``peak_memory_mb``, ``params``) are measured on
    ``cfg.speed_prompts`` prompts; ``tokens_per_s_batched`` is the throughput of the evaluation
    batches themselves.
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
        **probe_speed(teacher, problems, cfg),
        "tokens_per_s_batched": batched_tps,
        "no_answer": no_answer,
        "n": len(problems),
        "items": items,
    }


def probe_speed(teacher: HFTeacher, problems: list[Problem], cfg: EvalConfig) -> dict:
    """:func:`distillery.evaluate.speed.measure_speed` on the first ``cfg.speed_prompts`` problems,
    rendered as the model sees them, ``cfg.max_new_tokens`` tokens each, batched probe at
    ``cfg.batch_size``; ``tokens_per_s`` (metrics.json's batch-1 figure) is its batch-1 decode rate."""
    convs = [[{"role": "user", "content": p.prompt}] for p in problems[: cfg.speed_prompts]]
    prompts = [prompt_text(c, teacher.tokenizer) for c in convs]
    probe = measure_speed(teacher.model, teacher.tokenizer, prompts, max(cfg.max_new_tokens, 2), cfg.batch_size)
    return {"tokens_per_s": probe["decode_tokens_per_s_batch1"], **probe}
