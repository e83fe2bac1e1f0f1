"""The CLI's error rule: a DistilleryError prints its message alone and exits 2; anything else
is a bug and keeps its traceback (docs/architecture.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import tiny_train_job
from distillery.cli import _Commands
from distillery.errors import DistilleryError, MissingInputError
from distillery.outputs import claim_dir
from distillery.train.checkpoint import checkpoint_name

ROOT = Path(__file__).resolve().parents[1]


def _app() -> typer.Typer:
    """A command group of the CLI's own class, with one command per kind of failure."""
    app = typer.Typer(cls=_Commands)
    sub = typer.Typer()
    app.add_typer(sub, name="sub")

    @app.command()
    def user(path: str) -> None:
        raise MissingInputError(f"{path} not found: give an existing file")

    @app.command()
    def bug() -> None:
        raise KeyError("an internal invariant broke")

    @sub.command("nested")
    def nested() -> None:
        raise DistilleryError("nested commands are covered too")

    return app


def test_a_distillery_error_is_its_message_and_exit_2():
    res = CliRunner().invoke(_app(), ["user", "/tmp/nope.jsonl"])
    assert res.exit_code == 2
    assert "error: /tmp/nope.jsonl not found: give an existing file" in res.output
    assert "Traceback" not in res.output
    nested = CliRunner().invoke(_app(), ["sub", "nested"])
    assert nested.exit_code == 2 and "nested commands are covered too" in nested.output


def test_any_other_exception_is_not_caught():
    res = CliRunner().invoke(_app(), ["bug"])
    assert res.exit_code == 1
    assert isinstance(res.exception, KeyError)  # propagates with its traceback


def _train(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillery.cli", "train", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def job(tmp_path):
    return lambda **data: tiny_train_job(tmp_path, **data)


def test_train_prints_a_bad_record_file_as_one_message(job, tmp_path):
    records = tmp_path / "records.jsonl"
    good = {"id": "a", "messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}
    records.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "messages": "1+2"}) + "\n")
    res = _train(job(data={"path": str(records)}))
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{records}: record 2: needs a non-empty \"messages\" list" in res.stderr
    assert "Traceback" not in res.stderr


def test_train_refuses_to_bury_unfinished_checkpoints_in_one_message(job, tmp_path):
    # what a killed run leaves: its marked checkpoint directory (distillery.outputs)
    claim_dir(tmp_path / "out.checkpoints", "distillery train", "")
    (tmp_path / "out.checkpoints" / checkpoint_name(10)).mkdir(parents=True)
    res = _train(job())
    assert res.returncode == 2, res.stderr[-2000:]
    assert "distillery train CONFIG --resume" in res.stderr and "Traceback" not in res.stderr
