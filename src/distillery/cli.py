"""The ``distillery`` command: one typer app, each command a thin shell over a stage function."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from distillery.config import ConfigError, RunConfig, TrainJobConfig, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
app.add_typer(config_app, name="config")
console = Console(stderr=True)

DEFAULT_CONFIG = "configs/demo.yaml"


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


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def run(args: list[str] = typer.Argument(None, help="[CONFIG] [key.sub=value ...]")) -> None:
    """Run the whole pipeline (default: configs/demo.yaml, the built-in demo)."""
    _quiet_libraries()
    from distillery.pipeline import run_pipeline

    try:
        config_path, overrides = _split_args(args)
        if config_path is None and Path(DEFAULT_CONFIG).is_file():
            config_path = DEFAULT_CONFIG
        cfg = load_config(config_path, RunConfig, overrides)
    except ConfigError as exc:
        _fail(exc)
    run_pipeline(cfg)


@app.command()
def train(args: list[str] = typer.Argument(..., help="CONFIG [key.sub=value ...]")) -> None:
    """Train one model (teacher or student) from a train-job config; saves a HF directory."""
    _quiet_libraries()
    from distillery.train.job import run_train_job

    try:
        config_path, overrides = _split_args(args)
        if config_path is None:
            raise ConfigError("distillery train needs a config file")
        cfg = load_config(config_path, TrainJobConfig, overrides)
    except ConfigError as exc:
        _fail(exc)
    run_train_job(cfg)


@config_app.command("show")
def config_show(
    args: list[str] = typer.Argument(None, help="[CONFIG] [key.sub=value ...]"),
    kind: str = typer.Option("auto", help="run | train | auto (train if the file has output_dir)"),
) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    try:
        config_path, overrides = _split_args(args)
        schema = TrainJobConfig if kind == "train" or (kind == "auto" and _looks_like_train_job(config_path)) else RunConfig
        cfg = load_config(config_path, schema, overrides)
    except ConfigError as exc:
        _fail(exc)
    sys.stdout.write(dump_config(cfg))


def _looks_like_train_job(path: str | None) -> bool:
    """A train-job config has a top-level ``output_dir``; anything unreadable goes to load_config."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) if path else None
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "output_dir" in data


def main() -> None:
    app()


if __name__ == "__main__":
    main()
