"""``distillery run``: teacher → synthetic data → students → evaluation → report, resumable.

Each stage records a fingerprint of the config it depends on (and of its inputs) in
``<run_dir>/stages/<stage>.json`` once it has finished; a re-run skips a stage whose outputs
exist under the same fingerprint and redoes it (and what depends on it) otherwise. Speed is
measured again on every run, so the tokens/s of all models always come from one process.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from rich.console import Console

from distillery.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    StudentConfig,
    TokenizerConfig,
    TrainJobConfig,
    config_hash,
    dump_config,
    load_config,
)
from distillery.elicit import label_problems
from distillery.evaluate.stages import (
    Stage,
    compare_models,
    evaluate_all,
    judge_all,
    lm_eval_all,
    task_name,
    write_eval_report,
)
from distillery.losses import LossSpec
from distillery.models import read_meta
from distillery.records import JsonlWriter, ground_truth_records, read_jsonl
from distillery.tasks import load_problems
from distillery.teachers import HFTeacher, SamplingParams
from distillery.train.job import run_train_job

console = Console(stderr=True)


def prepare_teacher(cfg: RunConfig, run_dir: Path) -> tuple[Path, str]:
    """The teacher's directory and fingerprint: the shipped one if it fits the task, else trained."""
    shipped = Path(cfg.teacher.path)
    task = cfg.task.model_dump(mode="json")
    if (shipped / "config.json").is_file():
        meta_task = read_meta(shipped).get("task")
        if meta_task is None or meta_task == task:
            console.print(f"teacher: using {shipped}")
            return shipped, config_hash(str(shipped.resolve()), read_meta(shipped))
        console.print(f"teacher: {shipped} was trained on another task config; training a new one")
        if not cfg.teacher.recipe:
            raise ValueError(
                f"teacher.path {shipped} was trained on another task config and teacher.recipe is "
                "empty: give a teacher for this task, or a recipe to train one"
            )
    if not cfg.teacher.recipe:
        raise FileNotFoundError(
            f"teacher.path {shipped} has no model and teacher.recipe is empty: give a model directory"
        )
    recipe = load_config(cfg.teacher.recipe, TrainJobConfig)
    recipe.data.task = cfg.task
    out = run_dir / "teacher"
    recipe.output_dir = str(out)
    fp = config_hash(recipe)
    stage = Stage(run_dir, "teacher")
    if not stage.done(fp, out / "config.json"):
        console.rule("teacher: training from the recipe " + cfg.teacher.recipe)
        run_train_job(recipe)
        stage.finish(fp)
    return out, fp


def write_ground_truth(problems: list, target: str, path: Path) -> None:
    writer = JsonlWriter(path)
    writer.write(ground_truth_records(problems, target))
    writer.finish()


def make_data(cfg: RunConfig, run_dir: Path, teacher_dir: Path, teacher_fp: str) -> dict[str, Path]:
    """Training records per student: ground truth from the task, or labeled by the teacher."""
    problems = load_problems(cfg.task, "train", cfg.generate.num_problems, seed=cfg.generate.seed)
    data_dir = run_dir / "data"
    paths: dict[str, Path] = {}
    for name, s in cfg.students.items():
        if s.data == "ground_truth":
            path = data_dir / f"ground_truth_{s.target}.jsonl"
            fp = config_hash(cfg.task, cfg.generate.num_problems, cfg.generate.seed, s.target)
            stage = Stage(run_dir, f"data_ground_truth_{s.target}")
            if not stage.done(fp, path):
                write_ground_truth(problems, s.target, path)
                stage.finish(fp, records=len(problems))
        else:
            path = data_dir / "teacher_labeled.jsonl"
            fp = config_hash(cfg.task, cfg.generate, teacher_fp)
            stage = Stage(run_dir, "data_teacher")
            if not stage.done(fp, path):
                # stale outputs (and a partial file a killed run left) were made under
                # another config: resuming them would mix two configs in one file
                rejects = path.with_name(path.stem + ".rejects.jsonl")
                for stale in (path, rejects):
                    stale.unlink(missing_ok=True)
                    stale.with_name(stale.name + ".partial").unlink(missing_ok=True)
                console.rule(f"elicit: teacher labels {len(problems)} problems")
                teacher = HFTeacher.from_pretrained(teacher_dir, batch_size=cfg.generate.batch_size)
                params = SamplingParams(
                    max_new_tokens=cfg.generate.max_new_tokens, temperature=cfg.generate.temperature,
                    top_p=cfg.generate.top_p, seed=cfg.generate.seed,
                )
                t0 = time.perf_counter()
                label_problems(problems, teacher, params, path)
                stage.finish(fp, records=len(problems), seconds=time.perf_counter() - t0)
        paths[name] = path
    return paths


def train_students(
    cfg: RunConfig, run_dir: Path, teacher_dir: Path, teacher_fp: str, data: dict[str, Path]
) -> dict[str, tuple[Path, str]]:
    """Train each student on its records (same architecture, same steps); skip finished ones."""
    out: dict[str, tuple[Path, str]] = {}
    for name, s in cfg.students.items():
        train_cfg = cfg.train.model_copy(update={"objective": s.objective})
        if s.cross_tokenizer is not None:
            train_cfg.cross_tokenizer = s.cross_tokenizer
        if s.kd_ratio is not None and train_cfg.loss is not None:
            given = train_cfg.loss.model_dump(exclude_unset=True)
            train_cfg.loss = LossSpec.model_validate({**given, "kd_ratio": s.kd_ratio})
        elif s.kd_ratio is not None:
            train_cfg.kd_ratio = s.kd_ratio
        job = TrainJobConfig(
            output_dir=str(run_dir / "students" / name),
            model=cfg.student,
            # the teacher's tokenizer unless the student brings its own
            tokenizer=s.tokenizer or TokenizerConfig(path=str(teacher_dir)),
            teacher=ModelConfig(path=str(teacher_dir), device=cfg.student.device) if s.objective == "logit_kd" else None,
            data=DataConfig(path=str(data[name]), num_examples=cfg.generate.num_problems),
            train=train_cfg,
        )
        # a student depends on the teacher (its tokenizer, its logits or its data)
        fp = config_hash(job, _file_fp(data[name]), teacher_fp)
        stage = Stage(run_dir, f"train_{name}")
        if not stage.done(fp, Path(job.output_dir) / "config.json"):
            console.rule(f"train {name}: {s.objective} on {s.data} ({s.target if s.data == 'ground_truth' else 'teacher text'})")
            result = run_train_job(job)
            stage.finish(fp, seconds=result.seconds, final_loss=result.final_loss)
        out[name] = (Path(job.output_dir), fp)
    return out


def _file_fp(path: Path) -> str:
    """Content hash of a data file: the same records train to the same student."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_pipeline(cfg: RunConfig) -> dict:
    """Run every stage of the demo pipeline into ``cfg.run_dir``; returns metrics.json's content."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    start = time.perf_counter()

    teacher_dir, teacher_fp = prepare_teacher(cfg, run_dir)
    data = make_data(cfg, run_dir, teacher_dir, teacher_fp)
    students = train_students(cfg, run_dir, teacher_dir, teacher_fp, data)
    models = {"teacher": (teacher_dir, teacher_fp), **students}
    results = evaluate_all(cfg.task, cfg.eval, run_dir, models)
    judged = judge_all(cfg.eval, run_dir, results, "teacher")
    lm = lm_eval_all(cfg.eval, run_dir, models)
    metrics = write_report(cfg, run_dir, results, data, teacher_dir, judged, lm)
    console.print(f"done in {time.perf_counter() - start:.0f}s: {run_dir / 'report.md'}")
    return metrics


def write_report(
    cfg: RunConfig, run_dir: Path, results: dict[str, dict], data: dict[str, Path], teacher_dir: Path,
    judged: dict | None = None, lm_eval: dict | None = None,
) -> dict:
    """metrics.json (scorecard, pitfall checks, judge, lm-eval), the plots, report.md and report.html."""
    # the baseline the other students are compared with, paired: the ground-truth student, else
    # the first one trained by plain SFT (e.g. on the teacher's text, against a KD student)
    base = next((n for n, s in cfg.students.items() if s.data == "ground_truth"),
                next((n for n, s in cfg.students.items() if s.objective == "sft"), None))
    comparisons = compare_models(results, "teacher", cfg.eval, baseline=base)
    header, *notes = _report_sections(cfg, comparisons, results, data, teacher_dir)
    return write_eval_report(run_dir, cfg.eval, results, task=task_name(cfg.task), reference="teacher",
                             comparisons=comparisons, judged=judged or {}, lm_eval=lm_eval or {},
                             header=header, notes=notes)


def _describe_objective(cfg: RunConfig, s: StudentConfig) -> str:
    if s.objective != "logit_kd":
        return s.objective
    spec = cfg.train.resolved_loss()
    ratio = s.kd_ratio if s.kd_ratio is not None else spec.kd_ratio
    mix = f"kd_ratio {ratio}" if ratio is not None else f"ce_weight {spec.resolved_ce_weight}"
    xt = s.cross_tokenizer
    across = f", across tokenizers by {xt.resolved_method} ({xt.mapping} mapping)" if xt is not None else ""
    return f"logit_kd ({spec.divergence}, {mix}, T={spec.temperature}, form {spec.form}{across})"


def _report_sections(
    cfg: RunConfig, comparisons: dict, results: dict, data: dict[str, Path], teacher_dir: Path
) -> list[str]:
    """The header and the pipeline's own narrative (kept in report_notes.md); the headline is
    the scorecard that :func:`~distillery.evaluate.report.build_report` writes."""
    m = results
    held_out = ("from task.eval_path (its overlap with the training file is not checked)"
                if cfg.task.name == "jsonl" and cfg.task.eval_path
                else "disjoint from training by construction: the split is decided by each problem's hash")
    lines = [f"# distillery report: {cfg.run_dir}", "", f"Task: `{task_name(cfg.task)}`, "
             f"{cfg.eval.num_problems} held-out problems ({held_out}), greedy decoding."]
    out = [lines[0] + "\n\n" + lines[2]]
    body = ["## What distillation bought", ""]
    for key, c in comparisons.items():
        if "accuracy_diff" not in c:
            continue
        lo, hi = c["ci95"]
        sign = "+" if c["accuracy_diff"] >= 0 else ""
        body.append(f"- **{key}**: {sign}{100 * c['accuracy_diff']:.1f} points, paired bootstrap 95% CI "
                    f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" + (" (excludes 0)" if lo > 0 or hi < 0 else " (includes 0)"))
    gt = next((n for n in cfg.students if cfg.students[n].data == "ground_truth"), None)
    dist = next((n for n in cfg.students if cfg.students[n].data == "teacher"), None)
    if gt and dist:
        separated = m[dist]["ci95"][0] > m[gt]["ci95"][1]
        body.append(f"- The 95% CIs of {dist} and {gt} {'do not overlap' if separated else 'overlap'}.")
    body += ["", "![accuracy](accuracy.png)", "", "## How each model was made", ""]
    body.append(f"- **teacher**: `{teacher_dir}` (trained on ground-truth problems with canonical reasoning chains).")
    for name, s in cfg.students.items():
        what = (f"ground-truth problems, assistant turn = {'the canonical chain' if s.target == 'chain' else 'the final answer only (`#answer`)'}"
                if s.data == "ground_truth" else "the same problems labeled by the teacher with its own reasoning chains (the teacher never saw the answers)")
        obj = _describe_objective(cfg, s)
        body.append(f"- **{name}**: {cfg.student.num_layers} layers × {cfg.student.hidden_size} hidden, {cfg.train.steps} steps of "
                    f"{obj} at batch {cfg.train.batch_size}, on {what}.")
    teacher_data = next((p for p in data.values() if p.name == "teacher_labeled.jsonl"), None)
    if teacher_data is not None and teacher_data.is_file():
        recs = read_jsonl(teacher_data)
        no_ans = sum(r["meta"].get("parsed_answer") is None for r in recs)
        body.append(f"- Teacher-written data: {len(recs)} records, {no_ans} without a parsable answer "
                    "(kept: the student learns the teacher's behaviour, errors included).")
    body += ["", "## Answer-format failures", "",
             "`no answer` counts outputs where the extractor found no `#answer`; they are scored wrong, "
             "and listed apart from wrong answers.", ""]
    for name, r in results.items():
        wrong = sum(1 for i in r["items"] if i["answer"] is not None and not i["correct"])
        body.append(f"- {name}: {r['no_answer']} no answer, {wrong} wrong answer, "
                    f"{sum(i['correct'] for i in r['items'])} correct")
    body += ["", "## Samples (first 5 held-out problems)", ""]
    for item_idx in range(min(5, len(results["teacher"]["items"]))):
        body.append(f"- `{results['teacher']['items'][item_idx]['prompt']}` → reference `{results['teacher']['items'][item_idx]['reference']}`")
        for name, r in results.items():
            it = r["items"][item_idx]
            body.append(f"  - {name}: `{it['output']}` {'✓' if it['correct'] else '✗'}")
    body += ["", "![training loss](loss_curves.png)", "",
             "Speed: decode tokens/s at batch 1 over the first "
             f"{cfg.eval.speed_prompts} held-out prompts, measured for all models in the same process "
             "on this run; batched tokens/s is the throughput of the evaluation batches "
             f"(batch {cfg.eval.batch_size}). Files: `metrics.json`, `eval/*.json` (every output), `config.yaml`."]
    out.append("\n".join(body))
    return out
