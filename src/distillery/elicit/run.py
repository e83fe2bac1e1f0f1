"""``distillery generate``: one elicitation method, end to end, resumable, into one directory.

``output_dir`` ends up holding:

- ``records.jsonl``: the SFT "messages" records that passed every filter (the training data);
- ``preferences.jsonl``: "prompt/chosen/rejected" records (feedback);
- ``rejects.jsonl``: everything that was not kept, with the phase or filter and the reason;
- ``summary.json``: counts per phase and per filter, tokens used, seconds;
- ``work/``: the phase files (resume from here) and ``cache.sqlite`` (the response cache).

Run it again after a kill and it picks up where it stopped; run it again after it finished and
it re-applies the filters from the phase files without asking the teacher anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distillery.config import ConfigError, config_hash, dump_config
from distillery.elicit.config import GenerateJobConfig
from distillery.elicit.context import ElicitContext, MethodResult
from distillery.elicit.curation import run_curation
from distillery.elicit.expansion import run_expansion
from distillery.elicit.feedback import run_feedback
from distillery.elicit.filters import FilterReport, run_filters
from distillery.elicit.seeds import load_seeds
from distillery.elicit.self_knowledge import run_self_knowledge
from distillery.outputs import claim_dir
from distillery.records import read_jsonl, write_json_atomic, write_jsonl_atomic
from distillery.teachers import Teacher, build_teacher
from distillery.teachers.base import TeacherError
from distillery.teachers.phases import ResponseCache

console = Console(stderr=True)


RUNNERS = {"expansion": run_expansion, "curation": run_curation, "feedback": run_feedback,
           "self_knowledge": run_self_knowledge}
# keys that only re-select from the phase files: changing them needs no new requests
ASSEMBLY_KEYS = {"feedback": {"min_margin", "pairs", "chosen_from_correction"},
                 "self_knowledge": {"keep_per_problem", "min_pass_rate", "max_pass_rate"}}


def _method_runner(cfg: GenerateJobConfig):  # noqa: ANN202
    """The method's run function and its config section."""
    if cfg.method == "labeling":
        return _label_all, None
    if cfg.method in RUNNERS:
        return RUNNERS[cfg.method], getattr(cfg, cfg.method)
    raise ConfigError(
        "method 'feature' is the teacher's top-k log-probabilities, which `distillery capture` "
        "stores (docs/logit_cache.md): generate the records with method: labeling, then run "
        "distillery capture on output_dir/records.jsonl")


def _label_all(ctx: ElicitContext) -> MethodResult:
    path, summary = ctx.label(ctx.seeds, phase="labeled", method="labeling")
    return MethodResult(records=path, phases=[summary])


def _fingerprint(cfg: GenerateJobConfig) -> str:
    """What decides the phase files (not the filters, which re-run from them for free)."""
    section = getattr(cfg, cfg.method, None)
    if section is not None:
        section = section.model_dump(exclude=ASSEMBLY_KEYS.get(cfg.method, set()))
    return config_hash(cfg.method, cfg.teacher, cfg.student, cfg.seeds, cfg.sampling, cfg.labeling, section)


def _check_work_dir(work_dir: Path, fingerprint: str, config_text: str) -> None:
    marker = work_dir / "fingerprint.json"
    if marker.exists():
        old = json.loads(marker.read_text())
        if old["fingerprint"] != fingerprint:
            raise ConfigError(
                f"{work_dir.parent} holds a generate run made with a different method, teacher, "
                "seeds or sampling (its config is in config.yaml there). Resuming would mix two "
                "configs in one dataset: use another output_dir, or delete that one to start over."
                " (Changing only `filters` is fine: it re-filters without new requests.)")
        return
    # a new generate run: its output_dir (records.jsonl, config.yaml) must not be a user's folder
    claim_dir(work_dir.parent, "distillery generate", "choose another output_dir, or move the files out of it")
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"fingerprint": fingerprint})
    (work_dir.parent / "config.yaml").write_text(config_text)


def _eval_texts(cfg: GenerateJobConfig) -> list[str] | None:
    d = cfg.decontaminate
    if d is None or cfg.filters.decontaminate_n is None:
        return None
    return [s.prompt for s in load_seeds(d.task, d.path, d.split, d.num, d.seed)]


def run_generate(cfg: GenerateJobConfig, show_progress: bool = True,
                 teacher: Teacher | None = None, student: Teacher | None = None) -> dict:
    """Run ``cfg.method``; write records, rejects and summary into ``cfg.output_dir``.

    ``teacher``/``student`` override the configured backends (tests, notebooks that already
    hold a model). Returns the summary that is also written to ``summary.json``.
    """
    out = Path(cfg.output_dir)
    work = out / "work"
    t0 = time.perf_counter()
    runner, method_cfg = _method_runner(cfg)  # validates the method section before any work
    _check_work_dir(work, _fingerprint(cfg), dump_config(cfg))
    seeds = load_seeds(cfg.seeds.task, cfg.seeds.path, cfg.seeds.split, cfg.seeds.num,
                       cfg.seeds.seed) if cfg.seeds else []
    eval_texts = _eval_texts(cfg)
    teacher = teacher or build_teacher(cfg.teacher)
    if student is None and cfg.student is not None:
        student = build_teacher(cfg.student)
    cache = ResponseCache(Path(cfg.cache_path) if cfg.cache_path else work / "cache.sqlite") if cfg.cache else None
    ctx = ElicitContext(seeds=seeds, teacher=teacher, params=cfg.sampling.params(cfg.labeling.samples),
                        work_dir=work, labeling=cfg.labeling, filters=cfg.filters, student=student,
                        cache=cache, show_progress=show_progress,
                        grader=cfg.seeds.task.grader if cfg.seeds is not None and cfg.seeds.task is not None else None)
    try:
        result = runner(ctx) if method_cfg is None else runner(ctx, method_cfg)
    finally:
        if cache is not None:
            cache.close()
    summary = _finish(cfg, result, eval_texts, out)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["tokens"] = {"teacher": {"prompt": teacher.stats.prompt_tokens, "completion": teacher.stats.tokens,
                                     "retries": teacher.stats.retries, "failed_requests": teacher.stats.failures}}
    if student is not None:
        summary["tokens"]["student"] = {"prompt": student.stats.prompt_tokens,
                                        "completion": student.stats.tokens}
    write_json_atomic(out / "summary.json", summary)
    _check_failures(cfg, result, out)
    return summary


def _check_failures(cfg: GenerateJobConfig, result: MethodResult, out: Path) -> None:
    """Raise when more than ``max_failure_rate`` of the requests got no answer (always when
    none got one), after every file is written: what succeeded is kept, and a re-run sends the
    retryable failures again."""
    total = sum(p.total for p in result.phases)
    failed = sum(p.failed for p in result.phases)
    if failed == 0 or (failed < total and failed / total <= cfg.max_failure_rate):
        return
    retryable = sum(p.retryable for p in result.phases)
    what = (f"none of the {total} requests got an answer" if failed == total else
            f"{failed} of {total} requests ({failed / total:.0%}) got no answer, more than "
            f"max_failure_rate={cfg.max_failure_rate:g}")
    raise TeacherError(
        f"teacher {cfg.teacher.model}: {what}. The reasons are in {out / 'rejects.jsonl'}; "
        f"{retryable} of the failures are retryable (server down, timeouts, 5xx, 429): run the "
        "same command again to retry them. The records made so far are kept in "
        f"{out / 'records.jsonl'}.")


def _finish(cfg: GenerateJobConfig, result: MethodResult, eval_texts: list[str] | None, out: Path) -> dict:
    """Filter the method's output into the final files; gather every reject with its reason."""
    rejects = []
    for phase in result.phases:
        path = out / "work" / f"{phase.name}.rejects.jsonl"
        if path.exists():
            rejects += [{**r, "stage": phase.name} for r in read_jsonl(path)]
    summary: dict = {"method": cfg.method, "teacher": cfg.teacher.model,
                     "phases": [vars(p) for p in result.phases], "notes": result.notes, "filters": {}}
    for kind, path in (("records", result.records), ("preferences", result.preferences)):
        if path is None:
            continue
        grader = cfg.seeds.task.grader if cfg.seeds is not None and cfg.seeds.task is not None else None
        report: FilterReport = run_filters(read_jsonl(path), cfg.filters, eval_texts, grader)
        write_jsonl_atomic(out / f"{kind}.jsonl", report.kept)
        rejects += [{"id": r["record"].get("id"), "stage": f"filter:{r['filter']}", "reason": r["reason"],
                     "record": r["record"]} for r in report.rejected]
        summary["filters"][kind] = report.to_dict()
        summary[kind] = len(report.kept)
    write_jsonl_atomic(out / "rejects.jsonl", rejects)
    summary["rejects"] = len(rejects)
    return summary




def print_summary(summary: dict) -> None:
    """The end-of-run table: requests, records and rejects per phase, then per filter."""
    table = Table(title=f"generate: {summary['method']} ({summary['seconds']} s)")
    for col in ("phase / filter", "requests", "cached", "resumed", "kept", "rejected", "reasons"):
        left = col in ("phase / filter", "reasons")
        table.add_column(col, justify="left" if left else "right", no_wrap=col != "reasons")
    for p in summary["phases"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(p["reject_reasons"].items()))
        table.add_row(p["name"], str(p["requests"]), str(p["cached"]), str(p["resumed"]),
                      str(p["records"]), str(p["rejects"]), reasons)
    for kind, rep in summary["filters"].items():
        for name, n in rep["rejected"].items():
            table.add_row(f"filter:{name}", "", "", "", "", str(n), "")
        table.add_row(f"[bold]{kind}.jsonl", "", "", "", f"[bold]{rep['kept']}",
                      str(rep["total"] - rep["kept"]), "")
    console.print(table)
    t = summary["tokens"]["teacher"]
    console.print(f"teacher tokens: {t['prompt']} prompt + {t['completion']} completion; "
                  f"retries {t['retries']}, failed requests {t['failed_requests']}")
