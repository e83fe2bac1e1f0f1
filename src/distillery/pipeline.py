"""``distillery run``: the stand-alone jobs in order, fingerprinted and resumable.

teacher → ``generate`` → ``capture`` (optional) → each student's train job → evaluation → report.
Each stage records a fingerprint of its filled-in job config and of its inputs in
``<run_dir>/stages/<stage>.json`` once it has finished (:class:`~distillery.evaluate.stages.Stage`);
a re-run skips a stage whose outputs exist under the same fingerprint and redoes it (and what
depends on it) otherwise. The stages themselves are the commands' own functions
(``run_generate``, ``run_capture``, ``run_train_job``, the evaluation stages): this module only
orders them. Speed is measured again on every run, so the tokens/s of all models come from one
process.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from rich.console import Console

from distillery.capture import run_capture
from distillery.config import (
    ConfigError,
    TaskConfig,
    TrainJobConfig,
    config_hash,
    dump_config,
    load_config,
)
from distillery.elicit.run import print_summary, run_generate
from distillery.errors import MissingInputError
from distillery.evaluate.stages import (
    Stage,
    compare_models,
    evaluate_all,
    judge_all,
    lm_eval_all,
    task_name,
    write_eval_report,
)
from distillery.models import merge_adapter, read_meta
from distillery.models.gguf import cached_conversion, read_template
from distillery.objective_registry import get_objective
from distillery.outputs import claim_dir, read_marker, remove_dir, replace_dir
from distillery.records import read_jsonl
from distillery.run_config import RunConfig
from distillery.train.checkpoint import latest_checkpoint
from distillery.train.finetune_teacher import files_signature
from distillery.train.job import checkpoint_dir, run_train_job
from distillery.train.objectives import describe

console = Console(stderr=True)


def prepare_teacher(cfg: RunConfig, run_dir: Path) -> tuple[Path, str]:
    """The teacher's directory and fingerprint: ``teacher.path`` (or ``teacher.gguf`` converted
    into the cache) with ``teacher.adapter`` merged into ``<run_dir>/teacher``; else
    ``teacher.path`` if it fits the task, else trained by ``teacher.recipe`` into
    ``<run_dir>/teacher``."""
    if cfg.teacher.gguf is not None or cfg.teacher.adapter is not None:
        return _adapted_teacher(cfg, run_dir)
    shipped = Path(cfg.teacher.path) if cfg.teacher.path else None
    if shipped is not None and (shipped / "config.json").is_file():
        meta_task = read_meta(shipped).get("task")
        # read through today's schema: keys added since the teacher was trained take their defaults
        if meta_task is None or TaskConfig.model_validate(meta_task) == cfg.task:
            console.print(f"teacher: using {shipped}")
            return shipped, config_hash(str(shipped.resolve()), read_meta(shipped))
        if not cfg.teacher.recipe:
            raise ConfigError(f"teacher.path {shipped} was trained on another task config and teacher.recipe "
                             "is empty: give a teacher for this task, or a recipe to train one")
        console.print(f"teacher: {shipped} was trained on another task config; training a new one")
    if not cfg.teacher.recipe:
        raise MissingInputError(f"teacher.path {shipped} holds no model (no config.json) and teacher.recipe "
                                "is empty: give a model directory")
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


def _adapted_teacher(cfg: RunConfig, run_dir: Path) -> tuple[Path, str]:
    """A converted GGUF and/or a model directory, with the LoRA adapter merged when one is given."""
    t = cfg.teacher
    if t.gguf is not None:
        console.rule(f"teacher: {t.gguf}")
        base = cached_conversion(t.gguf, chat_template=read_template(t.chat_template),
                                 say=console.print)
        base_fp = config_hash((read_marker(base) or {}).get("source", {}).get("sha256"),
                              (read_marker(base) or {}).get("options"))
    else:
        base = Path(str(t.path))
        base_fp = config_hash(str(base.resolve()), files_signature(base))
    if t.adapter is None:
        return base, base_fp
    adapter = Path(t.adapter)
    out = run_dir / "teacher"
    fp = config_hash(base_fp, sorted((f.name, _file_fp(f)) for f in adapter.iterdir() if f.is_file())
                     if adapter.is_dir() else str(adapter))
    stage = Stage(run_dir, "teacher")
    if not stage.done(fp, out / "config.json"):
        console.print(f"teacher: merging the adapter {adapter} into {base}")
        tmp = run_dir / "teacher.tmp"
        remove_dir(tmp, RUN, RUN_HINT)
        claim_dir(tmp, RUN, RUN_HINT, fingerprint=fp)
        merge_adapter(base, adapter, tmp, meta={"base": str(base), "adapter": str(adapter)})
        replace_dir(tmp, out, RUN, RUN_HINT)
        stage.finish(fp)
    return out, fp


RUN = "distillery run"
RUN_HINT = "move it away, or choose another run_dir"


def _claim(directory: Path, fingerprint: str) -> None:
    """Make ``directory`` the output of a stage under ``fingerprint`` (kept in its marker).

    The same fingerprint (an interrupted stage) is kept, so that the stage resumes; a directory
    the run made under another fingerprint is stale and removed (it is the run's own); anything
    else that is not empty is the user's, and never deleted (:mod:`distillery.outputs`).
    """
    marker = read_marker(directory)
    if marker is not None and marker.get("fingerprint") == fingerprint:
        return
    remove_dir(directory, RUN, RUN_HINT)
    claim_dir(directory, RUN, RUN_HINT, fingerprint=fingerprint)


def generate_stage(cfg: RunConfig, run_dir: Path, teacher_dir: Path, teacher_fp: str) -> tuple[Path, str]:
    """``generate`` into ``<run_dir>/generate``; returns the records file and its fingerprint."""
    job = cfg.generate_job(teacher_dir)
    out = Path(job.output_dir)
    fp = config_hash(job, teacher_fp)
    stage = Stage(run_dir, "generate")
    if not stage.done(fp, out / "summary.json"):
        _claim(out, fp)
        console.rule(f"generate: {job.method} with {job.teacher.backend} teacher {job.teacher.model}")
        print_summary(run_generate(job))
        stage.finish(fp, records=sum(1 for _ in (out / "records.jsonl").open()))
    return out / "records.jsonl", fp


def capture_stage(cfg: RunConfig, run_dir: Path, teacher_dir: Path, data_fp: str) -> tuple[Path, str] | None:
    """``capture`` of the generated records into ``<run_dir>/capture``, when configured."""
    job = cfg.capture_job(teacher_dir)
    if job is None:
        return None
    out = Path(job.output_dir)
    fp = config_hash(job, data_fp)
    stage = Stage(run_dir, "capture")
    if not stage.done(fp, out / "manifest.json"):
        _claim(out, fp)
        console.rule(f"capture: teacher top-{job.k} over {job.data.path}")
        run_capture(job)
        stage.finish(fp)
    return out, fp


def train_stage(cfg: RunConfig, run_dir: Path, teacher_dir: Path, teacher_fp: str,
                upstream: dict[str, str]) -> dict[str, tuple[Path, str]]:
    """Each student's train job; skip finished ones. ``upstream``: fingerprint of each file or
    directory a student may read (the generated records, the capture)."""
    out: dict[str, tuple[Path, str]] = {}
    for name in cfg.students:
        job = cfg.student_job(name, teacher_dir)
        inputs = [job.data.path, job.teacher_cache]
        fp = config_hash(job, teacher_fp, [upstream.get(str(p)) or (p and _file_fp(Path(p))) for p in inputs])
        stage = Stage(run_dir, f"train_{name}")
        if not stage.done(fp, Path(job.output_dir) / "config.json"):
            console.rule(f"train {name}: {describe(job.train.objective)}")
            result = run_train_job(job, resume=_resumable(job, run_dir / "stages" / f"train_{name}.started", fp))
            stage.finish(fp, seconds=result.seconds, final_loss=result.final_loss)
        out[name] = (Path(job.output_dir), fp)
    return out


def _resumable(job: TrainJobConfig, started: Path, fingerprint: str) -> bool:
    """Whether a student continues from its checkpoints (``train.checkpoint.every``): yes when a
    run under the same fingerprint left them; checkpoints of the run's own student made under
    another fingerprint are stale and removed. ``started`` records the fingerprint of the run
    that began writing them."""
    ckpt = checkpoint_dir(job)
    same = started.is_file() and started.read_text() == fingerprint
    if latest_checkpoint(ckpt) is not None and not same and started.is_file():
        # the run's own checkpoints, from another config
        remove_dir(ckpt, RUN, "move it away, or set the student's train.checkpoint.dir elsewhere")
    started.parent.mkdir(parents=True, exist_ok=True)
    started.write_text(fingerprint)
    return same and latest_checkpoint(ckpt) is not None


def _file_fp(path: Path) -> str | None:
    """Content hash of a user's data file: the same records train to the same student."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def run_pipeline(cfg: RunConfig) -> dict:
    """Run every stage into ``cfg.run_dir``; returns metrics.json's content."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    start = time.perf_counter()

    teacher_dir, teacher_fp = prepare_teacher(cfg, run_dir)
    records, gen_fp = generate_stage(cfg, run_dir, teacher_dir, teacher_fp)
    upstream = {str(records): gen_fp, str(records.with_name("preferences.jsonl")): gen_fp}
    captured = capture_stage(cfg, run_dir, teacher_dir, gen_fp)
    if captured is not None:
        upstream[str(captured[0])] = captured[1]
    students = train_stage(cfg, run_dir, teacher_dir, teacher_fp, upstream)

    models = {"teacher": (teacher_dir, teacher_fp), **students}
    results = evaluate_all(cfg.task, cfg.eval, run_dir, models)
    judged = judge_all(cfg.eval, run_dir, results, "teacher")
    lm = lm_eval_all(cfg.eval, run_dir, models)
    metrics = write_report(cfg, run_dir, teacher_dir, results, judged, lm)
    console.print(f"done in {time.perf_counter() - start:.0f}s: {run_dir / 'report.md'}")
    return metrics


# --------------------------------------------------------------------------- the report


def baseline_student(cfg: RunConfig) -> str | None:
    """The student the others are compared with, paired: the first trained on the task's ground
    truth, else the first whose objective needs no teacher (plain SFT on the teacher's text)."""
    names = [n for n in cfg.students if cfg.students[n].train.steps > 0]  # not an untrained baseline
    on_task = [n for n in names if cfg.students[n].data.source == "task"]
    objectives = {n: cfg.students[n].train.objective for n in names}
    needs = {n: get_objective(o.name).needs_for(o) for n, o in objectives.items()}
    no_teacher = [n for n in names if needs[n].live_teacher == "no" and not needs[n].cache]
    return (on_task or no_teacher or [None])[0]


def write_report(cfg: RunConfig, run_dir: Path, teacher_dir: Path, results: dict[str, dict],
                 judged: dict | None = None, lm_eval: dict | None = None) -> dict:
    """metrics.json (scorecard, pitfall checks, judge, lm-eval), the plots, report.md and report.html."""
    comparisons = compare_models(results, "teacher", cfg.eval, baseline=baseline_student(cfg))
    jobs = {name: cfg.student_job(name, teacher_dir) for name in cfg.students}
    header, notes = _report_sections(cfg, comparisons, results, teacher_dir, jobs)
    train_data = sorted({j.data.path for j in jobs.values() if j.data.path and Path(j.data.path).is_file()})
    return write_eval_report(run_dir, cfg.eval, results, task=task_name(cfg.task), reference="teacher",
                             comparisons=comparisons, judged=judged or {}, lm_eval=lm_eval or {},
                             header=header, notes=[notes], train_data=train_data or None,
                             model_dirs={"teacher": str(teacher_dir),
                                         **{n: j.output_dir for n, j in jobs.items()}})


def _describe_model(job: TrainJobConfig) -> str:
    m = job.model
    fresh = ", weights re-initialised at random (its architecture only)" if m.init == "random" else ""
    if m.path:
        return f"`{m.path}`" + (" with LoRA" if job.train.lora is not None else "") + fresh
    if m.prune:
        p = m.prune
        kept = [f"{p.layers} layers ({p.method})" if p.layers else
                f"{p.keep_ratio:.0%} of the layers ({p.method})" if p.keep_ratio else "",
                f"{p.mlp_ratio:.0%} of the MLP channels" if p.mlp_ratio else "",
                f"{p.heads} heads" if p.heads else "", f"{p.hidden} hidden" if p.hidden else ""]
        return f"`{p.source}` pruned to " + ", ".join(k for k in kept if k) + fresh
    return f"{m.num_layers} layers × {m.hidden_size} hidden from random weights"


def _describe_data(cfg: RunConfig, name: str, job: TrainJobConfig) -> str:
    source = cfg.students[name].data.source
    if job.data.task is not None:
        target = "the canonical chain" if job.data.target == "chain" else "the final answer only (`#answer`)"
        return f"ground-truth problems of the task, assistant turn = {target}"
    if str(job.data.path) == str(cfg.records_path()) or source == "preferences":
        return (f"the records the teacher wrote ({cfg.generate.method}; the teacher never saw the answers)"
                if source != "preferences" else "the teacher's preference pairs")
    return f"`{job.data.path}`"


def _report_sections(cfg: RunConfig, comparisons: dict, results: dict, teacher_dir: Path,
                     jobs: dict[str, TrainJobConfig]) -> tuple[str, str]:
    """The header and the pipeline's own narrative (kept in report_notes.md); the headline is
    the scorecard that :func:`~distillery.evaluate.report.build_report` writes."""
    held_out = ("from task.eval_path (its overlap with the training file is not checked)"
                if cfg.task.name == "jsonl" and cfg.task.eval_path
                else "disjoint from training by construction: the split is decided by each problem's hash")
    header = (f"# distillery report: {cfg.run_dir}\n\nTask: `{task_name(cfg.task)}`, {cfg.eval.num_problems} "
              f"held-out problems ({held_out}), greedy decoding.")
    body = ["## What distillation bought", ""]
    for key, c in comparisons.items():
        if "accuracy_diff" not in c:
            continue
        lo, hi = c["ci95"]
        sign = "+" if c["accuracy_diff"] >= 0 else ""
        body.append(f"- **{key}**: {sign}{100 * c['accuracy_diff']:.1f} points, paired bootstrap 95% CI "
                    f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" + (" (excludes 0)" if lo > 0 or hi < 0 else " (includes 0)"))
    body += ["", "![accuracy](accuracy.png)", "", "## How each model was made", ""]
    body.append(f"- **teacher**: `{teacher_dir}`.")
    for name, job in jobs.items():
        t = job.train
        body.append(f"- **{name}**: {_describe_model(job)}, {t.steps} steps of {describe(job.train.objective)} at batch "
                    f"{t.batch_size}, on {_describe_data(cfg, name, job)}.")
    records = cfg.records_path()
    if records.is_file():
        recs = read_jsonl(records)
        no_ans = sum(r["meta"].get("parsed_answer") is None for r in recs)
        body.append(f"- Teacher-written data: {len(recs)} records, {no_ans} without a parsable answer.")
    body += ["", "## Answer-format failures", "",
             "`no answer` counts outputs where the task's grader found no final answer; they are scored "
             "wrong, and listed apart from wrong answers.", ""]
    for name, r in results.items():
        wrong = sum(1 for i in r["items"] if i["answer"] is not None and not i["correct"])
        body.append(f"- {name}: {r['no_answer']} no answer, {wrong} wrong answer, "
                    f"{sum(i['correct'] for i in r['items'])} correct")
    body += ["", "## Samples (first 5 held-out problems)", ""]
    first = results["teacher"]["items"]
    for idx in range(min(5, len(first))):
        body.append(f"- `{first[idx]['prompt']}` → reference `{first[idx]['reference']}`")
        for name, r in results.items():
            it = r["items"][idx]
            body.append(f"  - {name}: `{it['output']}` {'✓' if it['correct'] else '✗'}")
    body += ["", "![training loss](loss_curves.png)", "",
             "Speed: decode tokens/s at batch 1 over the first "
             f"{cfg.eval.speed_prompts} held-out prompts, measured for all models in the same process "
             "on this run; batched tokens/s is the throughput of the evaluation batches "
             f"(batch {cfg.eval.batch_size}). Files: `metrics.json`, `eval/*.json` (every output), `config.yaml`."]
    return header, "\n".join(body)
