"""Evaluate a model on held-out problems: greedy (or sampled) answers graded by the task's
grader, accuracy with CI, pass@k, speed, size."""

from __future__ import annotations

from rich.progress import Progress

from distillery.answers import Grader, build_grader
from distillery.chat import prompt_text
from distillery.config import EvalConfig
from distillery.evaluate.metrics import pass_at_k
from distillery.evaluate.speed import measure_speed
from distillery.evaluate.stats import bootstrap_ci
from distillery.tasks import Problem, task_items
from distillery.teachers import HFTeacher, SamplingParams


def evaluate_model(
    teacher: HFTeacher, problems: list[Problem], cfg: EvalConfig, progress: Progress | None = None,
    grader: Grader | None = None,
) -> dict:
    """Accuracy (with a bootstrap 95% CI), answer-format failures, tokens/s and parameters.

    Decoding is greedy, or ``cfg.samples`` answers per problem at ``cfg.sampling_temperature``;
    every answer is graded by ``grader`` (the task's, :mod:`distillery.answers`; None: numeric).
    See :func:`grade_samples` for the figures. The speed probe's figures (:func:`probe_speed`: ``tokens_per_s`` = decode
    speed at batch 1, what a user waiting on one answer sees, ``ttft_s``,
    ``decode_tokens_per_s_batched``, ``peak_memory_mb``, ``params``) are measured on
    ``cfg.speed_prompts`` prompts; ``tokens_per_s_batched`` is the throughput of the evaluation
    batches themselves.
    """
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sampling_temperature,
                            n=cfg.samples, seed=cfg.seed)
    convs = [p.messages for p in problems]  # the task's turns, as training records hold them
    before = (teacher.stats.tokens, teacher.stats.seconds)
    outputs = teacher.generate(convs, params, progress=progress, batch_size=cfg.batch_size)
    batched_tps = (teacher.stats.tokens - before[0]) / max(teacher.stats.seconds - before[1], 1e-9)

    graded = grade_samples(problems, [[g.text for g in gens] for gens in outputs], cfg, grader)
    return {**graded, **probe_speed(teacher, problems, cfg), "tokens_per_s_batched": batched_tps}


def grade_samples(problems: list[Problem], outputs: list[list[str]], cfg: EvalConfig,
                  grader: Grader | None = None) -> dict:
    """Grade ``outputs[i]`` (the n sampled answers of problem i) and sum them up.

    ``accuracy``: the mean over problems of each problem's mean score over its samples
    (pass@1 averaged over n samples; the plain accuracy for one greedy answer), with its
    bootstrap 95% CI over problems. ``no_answer``: answers with no answer found, over all
    samples. With n > 1, ``pass_at_k``: for each k of ``cfg.pass_k``, the mean of the unbiased
    per-problem estimate ``1 - C(n-c, k) / C(n, k)`` and its CI. Each item keeps its first
    answer as ``output``/``answer``/``correct``, its mean as ``score``, and all n in ``samples``.
    """
    grader = grader or build_grader()
    flat = [(p, text) for p, texts in zip(problems, outputs, strict=True) for text in texts]
    verdicts = iter(grader.grade_all(task_items([p for p, _ in flat], [t for _, t in flat])))
    items, scores, flags, no_answer = [], [], [], 0
    for problem, texts in zip(problems, outputs):
        got = [next(verdicts) for _ in texts]
        no_answer += sum(v.status == "no_answer" for v in got)
        scores.append(sum(v.score for v in got) / len(got))
        flags.append([v.correct for v in got])
        item = {"id": problem.id, "prompt": problem.prompt, "reference": problem.reference,
                "output": texts[0], "answer": got[0].answer, "correct": got[0].correct,
                "status": got[0].status, "score": scores[-1]}
        if len(texts) > 1:
            item["samples"] = [{"output": t, **v.to_dict()} for t, v in zip(texts, got)]
        items.append(item)
    acc, lo, hi = bootstrap_ci(scores, cfg.bootstrap_resamples, seed=cfg.seed)
    out: dict = {"accuracy": acc, "ci95": [lo, hi], "no_answer": no_answer, "n": len(problems),
                 "samples": cfg.samples, "grader": grader.name}
    if cfg.samples > 1:
        out["pass_at_k"] = {}
        for k in cfg.pass_k:
            value, klo, khi = bootstrap_ci(pass_at_k(flags, k), cfg.bootstrap_resamples, seed=cfg.seed)
            out["pass_at_k"][str(k)] = {"value": value, "ci95": [klo, khi]}
    return {**out, "items": items}


def probe_speed(teacher: HFTeacher, problems: list[Problem], cfg: EvalConfig) -> dict:
    """:func:`distillery.evaluate.speed.measure_speed` on the first ``cfg.speed_prompts`` problems,
    rendered as the model sees them, ``cfg.max_new_tokens`` tokens each, batched probe at
    ``cfg.batch_size``; ``tokens_per_s`` (metrics.json's batch-1 figure) is its batch-1 decode rate."""
    convs = [p.messages for p in problems[: cfg.speed_prompts]]
    prompts = [prompt_text(c, teacher.tokenizer) for c in convs]
    probe = measure_speed(teacher.model, teacher.tokenizer, prompts, max(cfg.max_new_tokens, 2), cfg.batch_size)
    return {"tokens_per_s": probe["decode_tokens_per_s_batch1"], **probe}
