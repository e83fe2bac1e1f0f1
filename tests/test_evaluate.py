"""Bootstrap intervals and the model evaluation record."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.config import EvalConfig
from distillery.evaluate import bootstrap_ci, bootstrap_ratio, evaluate_model, paired_bootstrap_diff
from distillery.tasks import Problem
from distillery.teachers import HFTeacher


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=200), st.integers(0, 1000))
def test_interval_contains_the_mean(values, seed):
    mean, lo, hi = bootstrap_ci(values, resamples=500, seed=seed)
    assert mean == pytest.approx(float(np.mean(values)))
    assert lo <= mean + 1e-12 and mean <= hi + 1e-12
    assert 0.0 <= lo <= hi <= 1.0


def test_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = (rng.random(2000) < 0.3).astype(float)
    mean, lo, hi = bootstrap_ci(x, resamples=4000)
    se = np.sqrt(mean * (1 - mean) / len(x))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_paired_difference_is_narrower_than_unpaired():
    rng = np.random.default_rng(1)
    a = (rng.random(500) < 0.5).astype(float)
    b = a.copy()
    flip = rng.random(500) < 0.1
    b[flip] = 1 - b[flip]
    diff, lo, hi = paired_bootstrap_diff(a, b, resamples=2000)
    _, alo, ahi = bootstrap_ci(a, resamples=2000)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert hi - lo < ahi - alo
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_diff(a, b[:-1])


def test_evaluate_model_scores_and_counts_format_failures(tiny_model_dir):
    teacher = HFTeacher.from_pretrained(tiny_model_dir, device="cpu")
    problems = [Problem(id=str(i), prompt=f"{i}+1", reference=str(i + 1)) for i in range(6)]
    cfg = EvalConfig(num_problems=6, batch_size=3, max_new_tokens=5, bootstrap_resamples=200, speed_prompts=2)
    res = evaluate_model(teacher, problems, cfg)
    assert res["n"] == 6 and len(res["items"]) == 6
    # a random model: every item is either a format failure or a scored answer
    assert res["no_answer"] == sum(i["answer"] is None for i in res["items"])
    assert res["accuracy"] == pytest.approx(np.mean([i["correct"] for i in res["items"]]))
    assert res["tokens_per_s"] > 0 and res["params"] > 0


def test_eval_samples_gives_averaged_pass_at_1_and_pass_at_k(demo_teacher, tmp_path, one_thread):
    """eval.samples = 4 on the demo teacher at temperature 1: accuracy is the mean over problems
    of the share of correct samples, pass@k the unbiased estimate from each problem's samples,
    and both reach metrics.json."""
    import json
    from math import comb

    from distillery.config import TaskConfig
    from distillery.evaluate.report import write_metrics
    from distillery.tasks import load_problems

    problems = load_problems(TaskConfig(num_operands=3, digits=2), "eval", 8, seed=0)
    cfg = EvalConfig(num_problems=8, batch_size=8, max_new_tokens=24, bootstrap_resamples=200,
                     speed_prompts=1, samples=4, pass_k=[1, 2, 4], temperature=1.5)
    res = evaluate_model(demo_teacher, problems, cfg)
    assert res["samples"] == 4 and all(len(i["samples"]) == 4 for i in res["items"])
    flags = [[s["correct"] for s in i["samples"]] for i in res["items"]]
    assert res["accuracy"] == pytest.approx(np.mean([np.mean(f) for f in flags]))
    assert res["no_answer"] == sum(s["status"] == "no_answer" for i in res["items"] for s in i["samples"])
    for k in (1, 2, 4):
        plain = np.mean([1.0 - comb(4 - sum(f), k) / comb(4, k) for f in flags])
        assert res["pass_at_k"][str(k)]["value"] == pytest.approx(plain)
    assert res["pass_at_k"]["1"]["value"] == pytest.approx(res["accuracy"])
    assert res["pass_at_k"]["1"]["value"] <= res["pass_at_k"]["2"]["value"] <= res["pass_at_k"]["4"]["value"]
    # sampling at temperature 1.5 differs between samples somewhere, and the teacher is good
    assert any(len({s["output"] for s in i["samples"]}) > 1 for i in res["items"])
    assert res["accuracy"] > 0.3
    metrics = write_metrics(tmp_path / "metrics.json", {"teacher": res}, task="t", n_eval=8, extra={})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["models"]["teacher"]["pass_at_k"] == metrics["models"]["teacher"]["pass_at_k"]


def test_multiple_choice_by_the_models_log_likelihood(demo_teacher, one_thread):
    """task.grader multiple_choice in eval: the options are whole chains (one right, two with a
    wrong final answer) and the pick is the demo teacher's likeliest option, whatever it wrote."""
    from dataclasses import replace

    from distillery.chat import prompt_text
    from distillery.config import TaskConfig
    from distillery.evaluate.grading import task_grader
    from distillery.evaluate.metrics import multiple_choice_loglik
    from distillery.tasks import load_problems

    cfg_task = TaskConfig(num_operands=3, digits=2, grader={"name": "multiple_choice"})
    problems = []
    for i, p in enumerate(load_problems(cfg_task, "eval", 6, seed=1)):
        wrong = [p.chain.replace(f"#{p.reference}", f"#{int(p.reference) + d}") for d in (1, -10)]
        options = [*wrong[: i % 3], p.chain, *wrong[i % 3 :]]
        problems.append(replace(p, reference="ABC"[i % 3], extra={"options": options}))
    cfg = EvalConfig(num_problems=6, batch_size=6, max_new_tokens=4, bootstrap_resamples=200, speed_prompts=1)
    grader = task_grader(cfg_task.grader, model=demo_teacher, problems=problems)
    res = evaluate_model(demo_teacher, problems, cfg, grader=grader)
    assert res["grader"] == "multiple_choice" and res["accuracy"] >= 5 / 6
    first = problems[0]
    direct = multiple_choice_loglik(demo_teacher.model, demo_teacher.tokenizer,
                                    prompt_text(first.messages, demo_teacher.tokenizer), first.extra["options"])
    assert res["items"][0]["answer"] == "ABC"[direct.best_index]


def test_eval_samples_config_is_checked():
    assert EvalConfig().sampling_temperature == 0.0 and EvalConfig(samples=3).sampling_temperature == 1.0
    with pytest.raises(ValueError, match="eval.pass_k holds 5"):
        EvalConfig(samples=4, pass_k=[1, 5])
    with pytest.raises(ValueError, match="eval.temperature is 0"):
        EvalConfig(samples=4, temperature=0)


def test_ratio_interval_against_a_plain_loop():
    rng = np.random.default_rng(2)
    teacher = (rng.random(300) < 0.9).astype(float)
    student = teacher * (rng.random(300) < 0.7)
    ratio, lo, hi = bootstrap_ratio(student, teacher, resamples=3000, seed=4)
    assert ratio == pytest.approx(student.mean() / teacher.mean())
    # the same resamples written the plain way
    idx = np.random.default_rng(4).integers(0, 300, size=(3000, 300))
    plain = [student[i].mean() / teacher[i].mean() for i in idx]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(plain, [0.025, 0.975])))
    assert lo < ratio < hi
    with pytest.raises(ValueError, match="undefined"):
        bootstrap_ratio(student, np.zeros(300))
