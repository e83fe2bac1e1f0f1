"""Bad input files and a full disk end in one message naming the file, and exit 2 (issue 18,
item 6): never a traceback. Each test writes the real bad file (or fills a real small
filesystem) and, where a command reads it, runs the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_train_job
from distillery.errors import CorruptFileError, DiskFullError, MissingInputError
from distillery.records import (
    JsonlWriter,
    RecordError,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"id": "a", "messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}
LATIN1 = "caf\u00e9".encode("latin-1")  # b"caf\xe9": not UTF-8


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillery.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def _one_message(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, every needle in stderr, and no traceback."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr[-3000:])


def _train_config(tmp_path: Path, **data) -> Path:
    return tiny_train_job(tmp_path, **data)



# --------------------------------------------------------------------------- text that is not UTF-8


def test_a_config_with_latin1_bytes_names_the_file_and_line(tmp_path):
    config = _train_config(tmp_path)
    text = config.read_bytes().replace(b"output_dir:", b"# " + LATIN1 + b"\noutput_dir:")
    config.write_bytes(text)
    line = text[: text.index(LATIN1)].count(b"\n") + 1
    _one_message(_cli("train", str(config)), f"{config}:{line}: not UTF-8 text (byte 0xe9")


def test_a_data_line_with_latin1_bytes_names_the_file_and_line(tmp_path):
    records = tmp_path / "records.jsonl"
    bad = json.dumps({**GOOD, "id": "b"}).encode().replace(b'"2"', b'"' + LATIN1 + b'"')
    records.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + bad + b"\n")
    with pytest.raises(RecordError, match=r"records\.jsonl:3: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        read_jsonl(records)
    _one_message(_cli("train", str(_train_config(tmp_path, data={"path": str(records)}))),
                 f"{records}:3: not UTF-8 text")


# --------------------------------------------------------------------------- JSONL lines that are not objects


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "an array"), ('"text"', "a string"),
                                            ("3", "a number"), ("null", "null")])
def test_a_jsonl_line_that_is_not_an_object_names_the_line(tmp_path, line, kind):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(RecordError, match=rf"records\.jsonl:2: each line must be a JSON object .*got {kind}$"):
        read_jsonl(records)


def test_train_reports_an_array_line_as_one_message(tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(GOOD) + "\n" + json.dumps([GOOD]) + "\n")
    _one_message(_cli("train", str(_train_config(tmp_path, data={"path": str(records)}))),
                 f"{records}:2: each line must be a JSON object", "got an array")


def test_run_reports_a_bad_student_record_file_as_one_message(tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(GOOD) + "\n" + json.dumps([GOOD]) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "teacher": {"path": str(ROOT / "assets" / "demo_teacher")},
        "task": {"name": "arithmetic", "num_operands": 3, "digits": [1, 2], "operations": ["+", "-"]},
        "generate": {"method": "labeling", "seeds": {"num": 4, "seed": 1},
                     "sampling": {"max_new_tokens": 8, "temperature": 0.0}},
        "defaults": {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                               "max_position_embeddings": 64},
                     "train": {"steps": 2, "batch_size": 4, "max_seq_len": 48}},
        "students": {"s": {"data": {"path": str(records)}, "train": {"objective": "sft"}}},
        "eval": {"num_problems": 4}}))
    _one_message(_cli("run", str(config)), f"{records}:2: each line must be a JSON object")


def test_a_seed_file_with_an_array_line_names_the_line(tmp_path):
    from distillery.elicit.seeds import SeedError, read_seed_file

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"prompt": "1+1"}\n["1+2"]\n')
    with pytest.raises(SeedError, match=r"seeds\.jsonl:2: each line must be a JSON object"):
        read_seed_file(seeds)


# --------------------------------------------------------------------------- model directories


@pytest.fixture
def truncated_model(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model whose model.safetensors lost its second half (an interrupted copy)."""
    model = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return model


def test_a_truncated_safetensors_file_is_named(truncated_model):
    from distillery.models import load_model
    from distillery.teachers import HFTeacher

    weights = truncated_model / "model.safetensors"
    with pytest.raises(CorruptFileError, match=rf"^{weights}: truncated or corrupt weights file"):
        load_model(str(truncated_model), device="cpu")
    with pytest.raises(CorruptFileError, match="truncated or corrupt weights file"):
        HFTeacher.from_pretrained(truncated_model, device="cpu")


def test_a_torn_config_json_is_named_with_its_line(tiny_model_dir, tmp_path):
    from distillery.models import load_tokenizer

    model = tmp_path / "torn"
    shutil.copytree(tiny_model_dir, model)
    text = (model / "tokenizer_config.json").read_text()
    (model / "tokenizer_config.json").write_text(text[: len(text) // 2])
    with pytest.raises(CorruptFileError, match=r"tokenizer_config\.json:\d+:\d+: not valid JSON"):
        load_tokenizer(str(model))


def test_serve_names_a_truncated_weights_file(truncated_model):
    _one_message(_cli("serve", str(truncated_model), "--port", "1", timeout=120),
                 f"{truncated_model / 'model.safetensors'}: truncated or corrupt weights file")


@pytest.mark.parametrize("missing", ["runs/no_such_run/students/s", "~/no_such_model", "./nope"])
def test_a_missing_model_directory_is_not_a_repo_id_error(missing):
    from distillery.models import load_model, load_tokenizer

    for load in (lambda p: load_model(p, device="cpu"), load_tokenizer):
        with pytest.raises(MissingInputError, match=rf"^model directory not found: {missing}$"):
            load(missing)


def test_a_hub_id_offline_says_nothing_is_downloaded():
    from distillery.models import load_tokenizer

    hub_id = f"no-such-org/model-{uuid.uuid4().hex[:8]}"  # never in the local cache
    with pytest.raises(MissingInputError, match="HF_HUB_OFFLINE is set, so nothing is downloaded"):
        load_tokenizer(hub_id)


def test_serve_names_a_missing_model_directory():
    res = _cli("serve", "runs/no_such_run/students/s", "--port", "1", timeout=120)
    _one_message(res, "model directory not found: runs/no_such_run/students/s")
    assert "Repo id" not in res.stderr


# --------------------------------------------------------------------------- capture: tokenizer vs teacher


def test_capture_refuses_a_tokenizer_larger_than_the_teacher(tiny_model_dir, tmp_path):
    from distillery.models import load_model, load_tokenizer

    vocab = load_model(str(tiny_model_dir), device="cpu").get_input_embeddings().num_embeddings
    big = load_tokenizer(str(tiny_model_dir))  # the teacher's, plus tokens the teacher never saw
    big.add_tokens([f"<extra_{i}>" for i in range(40)])
    assert len(big) > vocab
    big.save_pretrained(tmp_path / "big_tok")
    records = tmp_path / "records.jsonl"  # a reply using the added tokens: ids past the teacher's rows
    records.write_text(json.dumps({**GOOD, "messages": [GOOD["messages"][0], {
        "role": "assistant", "content": "2 <extra_3> <extra_39>"}]}) + "\n")
    config = tmp_path / "capture.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "cache"), "tokenizer": str(tmp_path / "big_tok"), "k": 4,
        "teacher": {"backend": "hf", "model": str(tiny_model_dir), "device": "cpu"},
        "data": {"path": str(records)}}))
    res = _cli("capture", str(config))
    _one_message(res, f"the tokenizer {tmp_path / 'big_tok'} has {len(big)} tokens", f"({vocab})",
                 "set `offsets: true`")


# --------------------------------------------------------------------------- distillery report


@pytest.fixture
def report_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    model = {"accuracy": 0.5, "ci95": [0.4, 0.6], "tokens_per_s": 10.0, "params": 100}
    write_json_atomic(run / "metrics.json", {"models": {"teacher": model}, "task": "t", "n_eval": 2})
    return run


def test_report_names_a_torn_metrics_file(report_dir):
    metrics = report_dir / "metrics.json"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) // 2])  # a kill or a full disk mid-write, outside distillery
    _one_message(_cli("report", str(report_dir), timeout=120), f"{metrics}:", "not valid JSON")


def test_report_names_a_metrics_file_of_the_wrong_shape(report_dir):
    (report_dir / "metrics.json").write_text('{"models": [], "task": "t", "n_eval": 2}')
    _one_message(_cli("report", str(report_dir), timeout=120), f"{report_dir / 'metrics.json'}: needs 'models'")


def test_report_names_a_bad_config_yaml(report_dir):
    config = report_dir / "config.yaml"
    config.write_text("eval:\n  seed: [1, 2\n")
    _one_message(_cli("report", str(report_dir), timeout=120), f"{config}:", "invalid YAML")
    config.write_bytes(b"eval:\n  seed: 1\n# " + LATIN1 + b"\n")
    _one_message(_cli("report", str(report_dir), timeout=120), f"{config}:3: not UTF-8 text")


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def _fill(fs: Path, leave: int = 0) -> None:
    """Fill ``fs`` up to ``leave`` bytes free."""
    free = shutil.disk_usage(fs).free - leave
    with open(fs / "ballast", "wb") as f:
        try:
            f.write(b"\0" * max(free, 0))
            f.flush()
        except OSError:
            pass


def test_atomic_writes_on_a_full_disk_keep_the_old_file(small_fs):
    path = small_fs / "records.jsonl"
    write_jsonl_atomic(path, [GOOD])
    meta = small_fs / "summary.json"
    write_json_atomic(meta, {"ok": 1})
    _fill(small_fs)
    rows = [{**GOOD, "id": str(i)} for i in range(2000)]
    with pytest.raises(DiskFullError, match=rf"^no space left on {path}: writing records\.jsonl; "
                       r"the previous records\.jsonl \(if any\) is unchanged; free space and re-run"):
        write_jsonl_atomic(path, rows)
    assert read_jsonl(path) == [GOOD] and not path.with_name("records.jsonl.tmp").exists()
    with pytest.raises(DiskFullError, match=f"no space left on {meta}"):
        write_json_atomic(meta, {"rows": rows})
    assert json.loads(meta.read_text()) == {"ok": 1}
    writer = JsonlWriter(small_fs / "gen.jsonl")
    with pytest.raises(DiskFullError, match=r"gen\.jsonl\.partial: writing records; the complete records"):
        writer.write(rows)


def test_a_checkpoint_on_a_full_disk_keeps_the_earlier_one(small_fs, tiny_model_dir):
    from distillery.models import load_model
    from distillery.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    model = load_model(str(tiny_model_dir), device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    args = {"model": model, "optimizer": opt, "scheduler": sched, "objective": object()}
    root = small_fs / "ckpt"
    first = save_checkpoint(root, 1, state={"tokens": 3}, **args)
    _fill(small_fs, leave=64 * 1024)  # room for some files of the next step, not all of them
    with pytest.raises(DiskFullError, match=rf"^no space left on {root}: writing checkpoint "
                       r"step_00000002; the earlier checkpoints"):
        save_checkpoint(root, 2, state={"tokens": 6}, **args)
    assert list_checkpoints(root) == [first] and not (root / "step_00000002.tmp").exists()
    assert load_checkpoint(first, **args)["step"] == 1


def test_a_model_save_on_a_full_disk_says_so(small_fs, tiny_model_dir):
    from distillery.models import load_model, load_tokenizer, save_model

    model, tok = load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))
    _fill(small_fs, leave=16 * 1024)
    with pytest.raises(DiskFullError, match=rf"^no space left on {small_fs / 'out'}: writing the model"):
        save_model(model, tok, small_fs / "out")


@pytest.fixture
def phase_teacher(tiny_model_dir):
    from distillery.teachers import HFTeacher

    return HFTeacher.from_pretrained(tiny_model_dir, device="cpu")


def _phase(teacher, out_dir: Path, cache, prompt: str = "") -> None:  # noqa: ANN001
    from distillery.teachers import GenerationRequest, SamplingParams
    from distillery.teachers.phases import Outcome, run_phase

    reqs = [GenerationRequest(f"r{i}", [{"role": "user", "content": f"{i}+{i} {prompt}"}],
                              SamplingParams(max_new_tokens=2)) for i in range(40)]
    run_phase("p", reqs, teacher, lambda r: Outcome(records=[{"id": r.request.id, "text": "t"}]),
              out_dir, cache=cache, show_progress=False)


def test_the_response_cache_on_a_full_disk_is_one_error(small_fs, tmp_path, phase_teacher):
    import sqlite3

    from distillery.teachers.phases import ResponseCache

    cache = ResponseCache(small_fs / "cache.sqlite")
    _fill(small_fs, leave=16 * 1024)  # a few WAL pages: SQLite reports SQLITE_FULL, not an OSError
    with pytest.raises(DiskFullError, match=rf"^no space left on {tmp_path / 'out'} or {cache.path}: "
                       r"writing the p phase's teacher results; every request finished before it "
                       r"is kept") as err:
        _phase(phase_teacher, tmp_path / "out", cache)
    assert isinstance(err.value.__context__, sqlite3.OperationalError)
    cache.close()
    (small_fs / "ballast").unlink()  # space freed: the re-run resumes and finishes
    _phase(phase_teacher, tmp_path / "out", ResponseCache(small_fs / "cache.sqlite"))
    assert len(read_jsonl(tmp_path / "out" / "p.jsonl")) == 40


def test_phase_files_on_a_full_disk_are_one_error(small_fs, phase_teacher):
    # long prompts: each reject line (too long for the tiny model) carries ~20 KB of messages
    _fill(small_fs, leave=100 * 1024)
    with pytest.raises(DiskFullError, match=r"^no space left on .*small: writing the p phase's "
                       r"teacher results; every request finished before it is kept"):
        _phase(phase_teacher, small_fs, None, prompt="x" * 20000)


def test_a_logit_cache_shard_on_a_full_disk_keeps_the_complete_shards(small_fs):
    import numpy as np

    from distillery.logits.cache import CacheWriter
    from distillery.logits.format import TopKExample

    rng = np.random.default_rng(0)

    def example(i: int) -> TopKExample:
        lp = np.sort(np.log(rng.dirichlet(np.ones(9), 2000)), axis=1)[:, ::-1]
        ids = np.argsort(rng.random((2000, 1000)), axis=1)[:, :8]  # 8 distinct ids per position
        return TopKExample(f"q{i}", rng.integers(0, 1000, 2000), ids, lp[:, :8], lp[:, 8])

    def writer() -> CacheWriter:
        return CacheWriter(small_fs / "cache", teacher="t", tokenizer_hash="h", k=8, temperature=1.0,
                           vocab_size=1000, shard_size=2)

    w = writer()
    for i in range(4):
        w.add(example(i))  # two complete shards
    _fill(small_fs)
    with pytest.raises(DiskFullError, match=r"^no space left on .*shard-000002\.dlc: writing logit cache "
                       r"shard shard-000002\.dlc; the 2 complete shards in .* are kept"):
        for i in range(4, 6):
            w.add(example(i))
    (small_fs / "ballast").unlink()
    assert writer().done_ids() == {"q0", "q1", "q2", "q3"}  # resumes from the complete shards


def test_train_on_a_full_disk_is_one_message(small_fs, tmp_path):
    config = _train_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"] = str(small_fs / "out")
    cfg["train"]["checkpoint"] = {"dir": str(small_fs / "ckpt"), "every": 1}
    config.write_text(yaml.safe_dump(cfg))
    _fill(small_fs, leave=200 * 1024)
    _one_message(_cli("train", str(config)), f"no space left on {small_fs / 'ckpt'}: writing checkpoint "
                 "step_00000001; the earlier checkpoints", "free space and re-run")
