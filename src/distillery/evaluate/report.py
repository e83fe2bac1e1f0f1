"""The run report: metrics.json (stable shape), report.md, and PNG plots."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from distillery.errors import CorruptFileError, DataError, MissingInputError
from distillery.evaluate.lm_eval_adapter import format_lm_eval  # noqa: E402
from distillery.evaluate.pitfalls import Pitfall, format_pitfalls, run_pitfall_checks  # noqa: E402
from distillery.evaluate.stats import bootstrap_ratio  # noqa: E402
from distillery.files import read_json, read_text  # noqa: E402
from distillery.records import read_jsonl, write_json_atomic  # noqa: E402

MODEL_KEYS = ("accuracy", "ci95", "tokens_per_s", "params")


def write_metrics(path: Path, models: dict[str, dict], task: str, n_eval: int, extra: dict) -> dict:
    """``{"models": {name: {accuracy, ci95, tokens_per_s, params, ...}}, "task", "n_eval", ...}``."""
    metrics = {
        "models": {name: {k: v for k, v in m.items() if k != "items"} for name, m in models.items()},
        "task": task,
        "n_eval": n_eval,
        **extra,
    }
    write_json_atomic(path, metrics)
    return metrics


def plot_accuracy(models: dict[str, dict], path: Path) -> None:
    """Bar chart of accuracy per model with its 95% CI as error bars."""
    names = list(models)
    acc = [100 * models[n]["accuracy"] for n in names]
    err = [
        [100 * (models[n]["accuracy"] - models[n]["ci95"][0]) for n in names],
        [100 * (models[n]["ci95"][1] - models[n]["accuracy"]) for n in names],
    ]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    bars = ax.bar(names, acc, yerr=err, capsize=6, color=["#4c72b0", "#dd8452", "#55a868", "#8172b3"][: len(names)])
    for bar, a in zip(bars, acc):
        ax.text(bar.get_x() + bar.get_width() / 2, 1, f"{a:.1f}%", ha="center", va="bottom", color="white")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy with bootstrap 95% CI")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_losses(histories: dict[str, list[dict]], path: Path) -> None:
    """One panel per training stage (teacher, each student): ``loss`` per step, and the
    cross entropy on assistant tokens (``ce``) where the objective logs it apart."""
    stages = {name: hist for name, hist in histories.items() if hist}
    cols = max(1, min(3, len(stages)))
    rows = max(1, -(-len(stages) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=120, squeeze=False)
    for ax, (name, hist) in zip(axes.flat, stages.items()):
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["loss"] for h in hist], label="loss")
        if any("ce" in h for h in hist):
            ax.plot([h["step"] for h in hist if "ce" in h], [h["ce"] for h in hist if "ce" in h], label="ce", alpha=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    if not stages:
        axes.flat[0].text(0.5, 0.5, "no train_log.jsonl in this run", ha="center", va="center")
    fig.suptitle("Training loss of each stage")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_report_md(path: Path, metrics: dict, sections: list[str]) -> None:
    """report.md: the scorecard table first, then the sections the pipeline supplies."""
    rows = [
        "| model | params | accuracy | 95% CI | no answer | tokens/s (batch 1) | tokens/s (batched) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, m in metrics["models"].items():
        rows.append(
            f"| {name} | {m['params']:,} | {_pct(m['accuracy'])} | [{_pct(m['ci95'][0])}, {_pct(m['ci95'][1])}] "
            f"| {m.get('no_answer', 0)} / {m.get('n', metrics['n_eval'])} | {m['tokens_per_s']:,.0f} "
            f"| {m.get('tokens_per_s_batched', 0):,.0f} |"
        )
    text = "\n".join(sections[:1] + ["", *rows, "", *sections[1:]]) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------- the scorecard


def decode_rate(m: dict) -> float:
    """A model's batch-1 decode tokens/s: the speed probe's figure, else metrics.json's older key."""
    return float(m.get("decode_tokens_per_s_batch1", m["tokens_per_s"]))


def scorecard(
    models: dict[str, dict], items: dict[str, list[dict]] | None = None, comparisons: dict | None = None,
    teacher: str = "teacher", resamples: int = 10000, seed: int = 0,
) -> dict[str, dict]:
    """Per student: accuracy retention with its 95% CI, speed-up and memory ratio vs ``teacher``.

    * retention = student accuracy / teacher accuracy; the interval is the paired bootstrap of
      the ratio (:func:`bootstrap_ratio`: items resampled jointly) from the per-item
      ``correct`` flags in ``items`` when both models have them, else metrics.json's
      ``comparisons["<student> / teacher"]``, else none;
    * speed-up = student batch-1 decode tokens/s ÷ the teacher's;
    * memory ratio = teacher ``peak_memory_mb`` ÷ the student's (None without the probe).
    """
    items = items or {}
    t = models[teacher]
    out = {}
    for name, m in models.items():
        if name == teacher:
            continue
        retention = _retention(name, teacher, items, comparisons or {}, resamples, seed)
        mem = (t["peak_memory_mb"] / m["peak_memory_mb"]
               if m.get("peak_memory_mb") and t.get("peak_memory_mb") else None)
        row = {"retention": retention[0] if retention else None,
               "retention_ci95": list(retention[1:]) if retention else None,
               "speedup": decode_rate(m) / decode_rate(t), "memory_ratio": mem,
               "params_ratio": t["params"] / m["params"]}
        row["sentence"] = scorecard_sentence(name, row, "the teacher" if teacher == "teacher" else teacher)
        out[name] = row
    return out


def _retention(
    name: str, teacher: str, items: dict[str, list[dict]], comparisons: dict, resamples: int, seed: int
) -> tuple[float, float, float] | None:
    if name in items and teacher in items:
        a = [float(i["correct"]) for i in items[name]]
        b = [float(i["correct"]) for i in items[teacher]]
        return bootstrap_ratio(a, b, resamples, seed=seed) if sum(b) > 0 else None
    c = comparisons.get(f"{name} / {teacher}")
    return (c["accuracy_ratio"], *c["ci95"]) if c else None


def scorecard_sentence(name: str, row: dict, reference: str = "the teacher") -> str:
    """"student keeps 53.5% [49.1%, 58.0%] of the teacher's accuracy at 2.3× the speed and 7.3× less memory"."""
    if row["retention"] is None:
        keep = f"has no retention figure ({reference} scored 0%)"
    else:
        lo, hi = row["retention_ci95"]
        keep = f"keeps {_pct(row['retention'])} [{_pct(lo)}, {_pct(hi)}] of {reference}'s accuracy"
    mem = f"{row['memory_ratio']:.1f}× less memory" if row["memory_ratio"] else f"{row['params_ratio']:.1f}× fewer parameters"
    return f"{name} {keep} at {row['speedup']:.1f}× the speed and {mem}"


def plot_retention(card: dict[str, dict], path: Path) -> None:
    """Each student at (speed-up, retention) with the retention's 95% CI as a vertical bar."""
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, row in card.items():
        if row["retention"] is None:
            continue
        r, (lo, hi) = 100 * row["retention"], row["retention_ci95"]
        ax.errorbar([row["speedup"]], [r], yerr=[[r - 100 * lo], [100 * hi - r]], fmt="o", capsize=5, label=name)
        ax.annotate(name, (row["speedup"], r), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.axvline(1, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("speed-up vs teacher (batch-1 decode tokens/s)")
    ax.set_ylabel("accuracy kept (% of teacher)")
    ax.set_title("Retention vs speed-up (95% CI)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_judge(judge: dict[str, dict], path: Path) -> None:
    """Win rate of model A per judged pair (``pairwise_summary``) with its 95% CI."""
    pairs = [(k, v["win_rate"]) for k, v in judge.items() if v.get("win_rate", {}).get("rate") is not None]
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(pairs) + 1.6), dpi=120)
    for y, (_, w) in enumerate(pairs):
        ax.errorbar([100 * w["rate"]], [y], xerr=[[100 * (w["rate"] - w["lo"])], [100 * (w["hi"] - w["rate"])]],
                    fmt="o", capsize=5)
    ax.set_yticks(range(len(pairs)), [k for k, _ in pairs])
    ax.axvline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 100)
    ax.set_xlabel("win rate of the first model (%; ties count ½)")
    ax.set_title("Judge win rates (95% CI)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown sections

NOTES_FILE = "report_notes.md"  # the pipeline's narrative sections, kept so `distillery report` can re-include them


def _mb(x: float | None) -> str:
    return f"{x:,.1f}" if x is not None else "n/a"


def speed_rows(models: dict[str, dict]) -> list[list[str]]:
    """Per model: params, TTFT (ms), decode tokens/s at batch 1 and batched, peak memory (MB, source)."""
    rows = []
    for name, m in models.items():
        ttft = f"{1000 * m['ttft_s']:.1f}" if "ttft_s" in m else "n/a"
        batched = f"{m['decode_tokens_per_s_batched']:,.0f}" if "decode_tokens_per_s_batched" in m else "n/a"
        mem = _mb(m.get("peak_memory_mb")) + (f" ({m['peak_memory_source']})" if "peak_memory_source" in m else "")
        rows.append([name, f"{m['params']:,}", ttft, f"{decode_rate(m):,.0f}", batched, mem])
    return rows


NO_CARD = "Only the reference model was evaluated: there is nothing to compare it with."
JUDGE_HEAD = ["pair", "win rate", "95% CI", "n", "length-controlled", "position bias"]
GRADE_HEAD = ["model", "mean grade (1-10)", "95% CI", "graded", "unparsed", "failed"]


def _maybe_pct(x: float | None) -> str:
    return _pct(x) if x is not None else "n/a"


def judge_rows(judge: dict[str, dict]) -> list[list[str]]:
    """Per judged pair (``pairwise_summary``): win rate, CI, pairs, length-controlled rate, position bias."""
    rows = []
    for key, v in judge.items():
        w = v["win_rate"]
        ci = f"[{_pct(w['lo'])}, {_pct(w['hi'])}]" if w["rate"] is not None else "n/a"
        lc = (v.get("length_controlled") or {}).get("rate")
        rows.append([key, _maybe_pct(w["rate"]), ci, str(w["n"]), _maybe_pct(lc), _maybe_pct(v.get("position_bias_rate"))])
    return rows


def grade_rows(grades: dict[str, dict]) -> list[list[str]]:
    """Per model (``grade_summary``): mean pointwise grade with its CI and what went ungraded."""
    rows = []
    for name, g in grades.items():
        mean = f"{g['mean_score']:.2f}" if g["mean_score"] is not None else "n/a"
        ci = f"[{g['ci95'][0]:.2f}, {g['ci95'][1]:.2f}]" if g["mean_score"] is not None else "n/a"
        rows.append([name, mean, ci, f"{g['graded']} / {g['n']}", str(g["unparsed"]), str(g["failed"])])
    return rows


SPEED_HEAD = ["model", "params", "TTFT (ms)", "decode tok/s (batch 1)", "decode tok/s (batched)", "peak memory (MB)"]


def markdown_sections(metrics: dict, card: dict[str, dict], pitfalls: list[Pitfall], plots: dict[str, str]) -> list[str]:
    """Scorecard, speed table, pitfall checks, lm-eval and judge tables, plots: report.md's body."""
    out = ["## Scorecard\n\n" + ("\n".join(f"- **{row['sentence']}**" for row in card.values()) or NO_CARD)]
    table = ["| " + " | ".join(SPEED_HEAD) + " |", "|---|" + "---:|" * (len(SPEED_HEAD) - 1)]
    table += ["| " + " | ".join(r) + " |" for r in speed_rows(metrics["models"])]
    out.append("## Speed and size\n\n" + "\n".join(table) + "\n\nTTFT: prefill + first token at batch 1; decode "
               "rates exclude the first token; peak memory from CUDA's allocator, or an estimate "
               "(weights + KV cache of the batched probe) on CPU.")
    out.append(format_pitfalls(pitfalls).rstrip())
    lm = format_lm_eval(metrics["models"])
    if lm:
        out.append(lm.rstrip())
    if metrics.get("judge"):
        rows = ["## Judge", "", "| " + " | ".join(JUDGE_HEAD) + " |", "|---|---:|---|---:|---:|---:|"]
        rows += ["| " + " | ".join(r) + " |" for r in judge_rows(metrics["judge"])]
        out.append("\n".join(rows) + "\n\nWin rate of the first model, each pair judged in both orders "
                   "(ties and order-dependent verdicts count ½); length-controlled: the rate at equal answer lengths.")
    if metrics.get("judge_pointwise"):
        rows = ["## Judge grades", "", "| " + " | ".join(GRADE_HEAD) + " |", "|---|---:|---|---:|---:|---:|"]
        rows += ["| " + " | ".join(r) + " |" for r in grade_rows(metrics["judge_pointwise"])]
        out.append("\n".join(rows))
    out.append("## Plots\n\n" + "\n\n".join(f"![{title}]({name})" for name, title in plots.items()))
    return out


# --------------------------------------------------------------------------- the self-contained HTML

CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}.scorecard{font-size:1.15rem;font-weight:600}
.warning{background:#fff3cd;border-left:4px solid #e0a800;padding:.5rem 1rem;margin:.5rem 0}
.ok{color:#2d6a2d}figure{margin:1rem 0}img{max-width:100%;border:1px solid #eee}"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _notes_html(text: str) -> str:
    """The pipeline's narrative markdown, in the few forms it uses: headings, list items, paragraphs."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("!["):
            continue  # images are embedded in the plots section
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.lstrip().startswith("- "):
            out.append(f"<li>{html.escape(line.lstrip()[2:])}</li>")
        else:
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)


def render_html(metrics: dict, card: dict[str, dict], pitfalls: list[Pitfall], plots: dict[Path, str],
                title: str, notes: str = "") -> str:
    """The whole report as one HTML page: plots are base64 PNG data URIs, CSS inline, no script."""
    e = html.escape
    models = metrics["models"]
    acc_rows = [[n, _pct(m["accuracy"]), f"[{_pct(m['ci95'][0])}, {_pct(m['ci95'][1])}]",
                 f"{m.get('no_answer', 0)} / {m.get('n', metrics['n_eval'])}"] for n, m in models.items()]
    parts = [f"<h1>{e(title)}</h1>", f"<p>Task: <code>{e(str(metrics['task']))}</code>, {metrics['n_eval']} held-out items.</p>",
             '<section id="scorecard"><h2>Scorecard</h2>'
             + ("".join(f'<p class="scorecard">{e(row["sentence"])}</p>' for row in card.values())
                or f"<p>{e(NO_CARD)}</p>") + "</section>",
             '<section id="accuracy"><h2>Accuracy (bootstrap 95% CI)</h2>'
             + _table(["model", "accuracy", "95% CI", "no answer"], acc_rows) + "</section>",
             '<section id="speed"><h2>Speed and size</h2>' + _table(SPEED_HEAD, speed_rows(models)) + "</section>",
             '<section id="pitfalls"><h2>Pitfall checks</h2>'
             + "".join(f'<p class="{p.severity}"><b>{e(p.kind.replace("_", " "))}</b>: {e(p.message)}</p>'
                       for p in sorted(pitfalls, key=lambda p: not p.warning))
             + ("" if pitfalls else "<p>No pitfall checks ran.</p>") + "</section>"]
    lm_rows = [[n, task, metric, f"{r['value']:.3f}", f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r.get("ci95") else "n/a"]
               for n, m in models.items() for task, ms in (m.get("lm_eval") or {}).items() for metric, r in ms.items()]
    if lm_rows:
        parts.append('<section id="lm-eval"><h2>lm-evaluation-harness</h2>'
                     + _table(["model", "task", "metric", "value", "95% CI"], lm_rows) + "</section>")
    if metrics.get("judge"):
        parts.append('<section id="judge"><h2>Judge</h2>' + _table(JUDGE_HEAD, judge_rows(metrics["judge"])) + "</section>")
    if metrics.get("judge_pointwise"):
        parts.append('<section id="judge-grades"><h2>Judge grades</h2>'
                     + _table(GRADE_HEAD, grade_rows(metrics["judge_pointwise"])) + "</section>")
    parts.append('<section id="plots"><h2>Plots</h2>' + "".join(
        f'<figure><img alt="{e(cap)}" src="{_data_uri(p)}"><figcaption>{e(cap)}</figcaption></figure>'
        for p, cap in plots.items()) + "</section>")
    if notes:
        parts.append(f'<section id="notes">{_notes_html(notes)}</section>')
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


# --------------------------------------------------------------------------- from a run directory


def _read_object(path: Path, fix: str) -> dict:
    """The JSON object in ``path``; a torn file (a kill or a full disk outside distillery's
    atomic writes, a hand edit) is an error naming it, with ``fix``."""
    value = read_json(path, what=fix)
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path}: must hold a JSON object {{...}}: {fix}")
    return value


def saved_eval_settings(run_dir: Path) -> dict:
    """The ``eval`` section of ``run_dir/config.yaml`` (the run's own settings, so a rebuilt
    report's intervals match the first one); {} when the run has no config.yaml. A file that is
    not UTF-8 YAML with a mapping at the top is an error naming it and its line."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise CorruptFileError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', None) or exc}): "
                               "fix or delete the file (without it the report uses the default "
                               "eval settings)") from None
    evaluation = data.get("eval", {}) if isinstance(data, dict) else None
    if not isinstance(evaluation, dict):
        raise CorruptFileError(f"{path}: must be a mapping with an `eval` mapping, as `distillery "
                               "run` writes it: fix or delete the file")
    return evaluation


def load_items(run_dir: Path, names: list[str]) -> dict[str, list[dict]]:
    """Per-item results ``eval/<name>.json["items"]`` of the models that have them."""
    out = {}
    for name in names:
        path = run_dir / "eval" / f"{name}.json"
        if path.is_file():
            out[name] = _read_object(path, "rerun the eval to rewrite it").get("items") or []
    return {n: v for n, v in out.items() if v}


def load_train_logs(run_dir: Path, model_dirs: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Each training stage's ``train_log.jsonl``: the run's own teacher (``teacher/``), then
    ``students/<name>/``; or, given ``model_dirs`` (``distillery eval``), each model's directory."""
    if model_dirs:
        dirs = [(name, Path(d)) for name, d in model_dirs.items()]
    else:
        dirs = [("teacher", run_dir / "teacher")] + [(d.name, d) for d in sorted((run_dir / "students").glob("*"))]
    return {name: read_jsonl(d / "train_log.jsonl") for name, d in dirs if (d / "train_log.jsonl").is_file()}


def _position_bias(judge: dict[str, dict]) -> tuple[float | None, int | None]:
    """The judge's position-bias rate pooled over every judged pair (weighted by pairs)."""
    judged = [v for v in judge.values() if v.get("position_bias_rate") is not None]
    n = sum(v.get("position_bias_n") or 0 for v in judged)
    if not judged:
        return None, None
    if n == 0:  # an older metrics.json without the counts
        return judged[0]["position_bias_rate"], None
    return sum(v["position_bias_rate"] * (v.get("position_bias_n") or 0) for v in judged) / n, n


def _train_files(run_dir: Path, metrics: dict) -> list[Path]:
    """The training records to check contamination against: metrics.json's ``train_data``
    (``distillery eval``), else the run's own ``data/*.jsonl`` (rejects left out)."""
    if metrics.get("train_data"):
        return [Path(p) for p in metrics["train_data"]]
    data = sorted((run_dir / "data").glob("*.jsonl")) if (run_dir / "data").is_dir() else []
    return [p for p in data if not p.name.endswith(".rejects.jsonl")]


def _pitfalls(run_dir: Path, metrics: dict, items: dict[str, list[dict]], thresholds: Any = None) -> list[Pitfall]:
    """Every pitfall check whose inputs the run directory holds; ``thresholds``: an
    ``eval.pitfalls`` section (or its dict), else the checks' defaults."""
    t = thresholds.model_dump() if hasattr(thresholds, "model_dump") else dict(thresholds or {})
    limits = {k: t[k] for k in ("contamination_threshold", "format_threshold", "position_bias_threshold") if k in t}
    if "contamination_n" in t:
        limits["n"] = t["contamination_n"]
    rate, pairs = _position_bias(metrics.get("judge") or {})
    complete = len(items) == len(metrics["models"])
    data = _train_files(run_dir, metrics)
    first = next(iter(items.values()), None)
    return run_pitfall_checks(
        models={n: {"items": v} for n, v in items.items()} if complete else None,
        train_records=[r for p in data for r in read_jsonl(p)] if data and first else None,
        eval_items={str(i["id"]): i["prompt"] for i in first} if data and first else None,
        position_bias_rate=rate, position_bias_n=pairs, **limits,
    )


def build_report(run_dir: str | Path, header: str | None = None, resamples: int = 10000, seed: int = 0,
                 thresholds: Any = None) -> dict:
    """Rebuild the report from ``run_dir/metrics.json`` (+ ``eval/*.json``, train logs, data): no evaluation.

    The scorecard compares every model to ``metrics["reference"]`` (default ``teacher``);
    ``thresholds``: the pitfall checks' ``eval.pitfalls`` settings (default: the checks' own).

    Writes the plots (``accuracy.png``, ``retention.png``, ``loss_curves.png``, ``judge.png``
    when metrics.json has ``judge``), ``report.md``, ``report.html``, and adds ``scorecard`` and
    ``pitfalls`` to metrics.json (every other key kept as it was). Returns the metrics.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise MissingInputError(f"{path} not found: give a run directory that `distillery run` wrote")
    metrics = _read_object(path, "rerun `distillery run` or `distillery eval` to rewrite it")
    for key, kind in (("models", dict), ("task", str), ("n_eval", int)):
        if not isinstance(metrics.get(key), kind):
            raise CorruptFileError(f"{path}: needs {key!r} ({kind.__name__}), as `distillery run` "
                                   "writes it: rerun the run or eval to rewrite the file")
    reference = metrics.get("reference", "teacher")
    if reference not in metrics.get("models", {}):
        raise DataError(f"{path} has no models.{reference} entry: the scorecard compares the other models to it")
    items = load_items(run_dir, list(metrics["models"]))
    card = scorecard(metrics["models"], items, metrics.get("comparisons"), teacher=reference,
                     resamples=resamples, seed=seed)
    pitfalls = _pitfalls(run_dir, metrics, items, thresholds)
    metrics["scorecard"], metrics["pitfalls"] = card, [p.to_dict() for p in pitfalls]
    write_json_atomic(path, metrics)

    plots = {"accuracy.png": "accuracy with 95% CI"}
    plot_accuracy(metrics["models"], run_dir / "accuracy.png")
    if card:  # one model alone has nothing to retain
        plot_retention(card, run_dir / "retention.png")
        plots["retention.png"] = "retention vs speed-up"
    plot_losses(load_train_logs(run_dir, metrics.get("model_dirs")), run_dir / "loss_curves.png")
    plots["loss_curves.png"] = "training loss of each stage"
    if metrics.get("judge"):
        plot_judge(metrics["judge"], run_dir / "judge.png")
        plots["judge.png"] = "judge win rates"
    title = f"distillery report: {run_dir}"
    header = header or f"# {title}\n\nTask: `{metrics['task']}`, {metrics['n_eval']} held-out items."
    notes = (run_dir / NOTES_FILE).read_text() if (run_dir / NOTES_FILE).is_file() else ""
    body = [*markdown_sections(metrics, card, pitfalls, plots)] + ([notes] if notes else [])
    sections = [header] + [b.rstrip() + "\n" for b in body]  # a blank line between sections
    write_report_md(run_dir / "report.md", metrics, sections)
    page = render_html(metrics, card, pitfalls, {run_dir / k: v for k, v in plots.items()}, title, notes)
    tmp = run_dir / "report.html.tmp"
    tmp.write_text(page)
    tmp.replace(run_dir / "report.html")
    return metrics
