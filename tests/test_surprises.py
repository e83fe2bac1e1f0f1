"""Silent surprises (issue 18, item 7): each ends in a clear warning or error, never in a run
that quietly does something else than the user asked. Real files and real CLI subprocesses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.config import TrainJobConfig, load_config
from distillery.errors import DataError
from distillery.models import load_tokenizer
from distillery.models.lora import load_model_for_training
from distillery.records import read_jsonl, write_json_atomic, write_jsonl_atomic
from distillery.train import SFTDataset
from distillery.train.job import checkpoint_dir, training_parts
from distillery.train.loop import train_loop

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillery.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"})


def _strict_json(path: Path) -> object:
    """Parse as a strict JSON reader (jq, JavaScript) would: NaN/Infinity are not JSON."""
    def refuse(name: str) -> object:
        raise ValueError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _record(i: int, answer: str, prompt: str | None = None) -> dict:
    return {"id": f"r{i}", "messages": [{"role": "user", "content": prompt or f"{i}+{i}"},
                                        {"role": "assistant", "content": answer}]}


def _train_yaml(tmp_path: Path, records: Path, model_dir: Path, **train: object) -> Path:
    cfg = {"output_dir": str(tmp_path / "out"),
           "model": {"path": str(model_dir), "device": "cpu"},
           "data": {"path": str(records)},
           "train": {"objective": "sft", "steps": 2, "batch_size": 2, "max_seq_len": 32,
                     "warmup_steps": 0, **train}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_with_an_empty_config_is_an_error_naming_the_missing_keys(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    res = _cli("run", empty)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "missing required key 'teacher'" in res.stderr
    assert "missing required key 'students'" in res.stderr
    assert "Traceback" not in res.stderr


def test_records_longer_than_max_seq_len_are_counted_and_all_dropped_is_an_error(
        tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    # a 1 MB prompt: nothing of its answer survives the cut to 32 tokens
    records = [_record(i, f"{2 * i}") for i in range(5)] + [_record(9, "18", prompt="1+" * 500_000)]
    path = write_jsonl_atomic(tmp_path / "records.jsonl", records)
    res = _cli("train", _train_yaml(tmp_path, path, tiny_model_dir))
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("1 of 6 records are longer than train.max_seq_len=32 tokens (longest 1000005)"
            in res.stderr), res.stderr[-2000:]
    assert "1 have no assistant token left and are dropped from training" in res.stderr
    assert "training sft on 5 records" in res.stderr

    # only the long one: nothing is left to train on, which is an error naming the setting
    with pytest.raises(DataError, match=r"train.max_seq_len=32 \(all 1 records dropped\)"):
        SFTDataset(records[-1:], tiny_tokenizer, max_len=32)
    # a record cut but still trained on is counted too
    SFTDataset([_record(1, "2 " * 40)], tiny_tokenizer, max_len=32)
    assert "1 of 1 records are longer than train.max_seq_len=32" in capsys.readouterr().err


def test_empty_assistant_contents_are_left_out_with_a_warning_naming_file_and_count(
        tmp_path, tiny_model_dir):
    records = [_record(1, "2"), _record(2, ""), _record(3, "6"), _record(4, "  \n")]
    path = write_jsonl_atomic(tmp_path / "records.jsonl", records)
    res = _cli("train", _train_yaml(tmp_path, path, tiny_model_dir))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (f"{path}: 2 of 4 records have an empty assistant turn (records 2, 4): they are left "
            "out") in res.stderr
    assert "training sft on 2 records" in res.stderr

    write_jsonl_atomic(path, [records[1], records[3]])  # nothing but empty answers: an error
    res = _cli("train", _train_yaml(tmp_path, path, tiny_model_dir))
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{path}: 2 of 2 records have an empty assistant turn (records 1, 2): nothing to train on" \
        in res.stderr
    assert "Traceback" not in res.stderr


def test_json_writers_never_write_nan_or_infinity(tmp_path, capsys):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"loss": math.nan, "curve": [1.0, math.inf], "ok": 0.5})
    assert _strict_json(path) == {"loss": None, "curve": [1.0, None], "ok": 0.5}
    err = capsys.readouterr().err
    assert "2 value(s) not a finite number (loss, curve[1]) written as null" in err
    rows = tmp_path / "rows.jsonl"
    write_jsonl_atomic(rows, [{"x": -math.inf}])
    assert read_jsonl(rows) == [{"x": None}]


def test_resume_from_the_final_checkpoint_keeps_its_loss_in_distillery_json(tmp_path, tiny_model_dir):
    """A run killed after its last checkpoint but before the model was saved: `--resume`
    runs no step and must still write the run's final loss, as strict JSON."""
    records = [_record(i, f"{2 * i}") for i in range(8)]
    path = write_jsonl_atomic(tmp_path / "records.jsonl", records)
    config = _train_yaml(tmp_path, path, tiny_model_dir, steps=3)
    cfg = load_config(config, TrainJobConfig, [])
    model = load_model_for_training(cfg.model, None, seed=cfg.train.seed)
    dataset, collate, objective = training_parts(cfg, records, load_tokenizer(str(tiny_model_dir)),
                                                 model, None, show_progress=False)
    first = train_loop(model, objective, dataset, collate, cfg.train, show_progress=False,
                       checkpoint_dir=checkpoint_dir(cfg), run_config=cfg.model_dump(mode="json"))
    assert math.isfinite(first.final_loss)

    res = _cli("train", config, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    meta = _strict_json(tmp_path / "out" / "distillery.json")
    assert meta["resumed_from"] == 3
    assert meta["final_loss"] == pytest.approx(first.final_loss)


def _capture_yaml(tmp_path: Path, records: Path, model_dir: Path) -> Path:
    cfg = {"output_dir": str(tmp_path / "cache"), "data": {"path": str(records)},
           "teacher": {"backend": "hf", "model": str(model_dir), "device": "cpu", "batch_size": 8},
           "k": 4, "max_seq_len": 32, "shard_size": 2}
    path = tmp_path / "capture.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_capture_into_a_cache_of_other_records_is_refused(tmp_path, tiny_model_dir):
    records = [_record(i, f"{2 * i}") for i in range(5)]
    path = write_jsonl_atomic(tmp_path / "records.jsonl", records)
    config = _capture_yaml(tmp_path, path, tiny_model_dir)
    assert _cli("capture", config).returncode == 0
    manifest = _strict_json(tmp_path / "cache" / "manifest.json")
    assert len(manifest["extra"]["source"]["records"]) == 64  # the records' sha256

    again = _cli("capture", config)  # the same records: a resume with nothing to do
    assert again.returncode == 0, again.stderr[-2000:]
    manifest = _strict_json(tmp_path / "cache" / "manifest.json")  # extra.last_run: this resume's

    records[2]["messages"][1]["content"] = "a different answer, same id"
    write_jsonl_atomic(path, records)
    stale = _cli("capture", config)
    assert stale.returncode == 2, stale.stderr[-2000:]
    assert (f"cache at {tmp_path / 'cache'} was captured from other records or settings "
            "(records changed): use another output_dir or delete it") in stale.stderr
    assert "Traceback" not in stale.stderr
    assert _strict_json(tmp_path / "cache" / "manifest.json") == manifest  # the cache is untouched
