"""The cross-tokenizer vocabulary mapping cache (:mod:`distillery.models.vocab_cache`).

Real tokenizers trained here (the shared BPE one and a unigram one), real files in a temp cache
root, and real train jobs. Whether the builder ran is counted by wrapping the real
``build_vocab_mapping`` (it still runs), not by timing.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

import distillery.models.vocab_cache as vocab_cache
from distillery.config import (
    CrossTokenizerConfig,
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainJobConfig,
)
from distillery.losses import LossSpec
from distillery.models import train_tokenizer
from distillery.models.vocab import build_vocab_mapping
from distillery.models.vocab_cache import SUBDIR, cached_vocab_mapping, tokenizer_fingerprint
from distillery.records import JsonlWriter, ground_truth_records
from distillery.tasks import load_problems
from distillery.train.job import run_train_job

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student_tok(task_cfg, tmp_path_factory):
    """A unigram tokenizer (digits merge) saved and loaded back, as a user's student tokenizer."""
    texts = [m["content"] for r in ground_truth_records(load_problems(task_cfg, "train", 300, seed=1), "chain")
             for m in r["messages"]]
    path = tmp_path_factory.mktemp("student_tok")
    train_tokenizer(texts, vocab_size=300, algorithm="unigram", split_digits=False).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def builds(monkeypatch):
    """Every call of the real builder made through the cache module, as (teacher size, prefix)."""
    calls: list[tuple[int, bool]] = []

    def counted(teacher_tok, student_tok, t_size, s_size, prefix=False):
        calls.append((t_size, prefix))
        return build_vocab_mapping(teacher_tok, student_tok, t_size, s_size, prefix=prefix)

    monkeypatch.setattr(vocab_cache, "build_vocab_mapping", counted)
    return calls


def _map(teacher, student, root, prefix=True, extra_rows=0):
    return cached_vocab_mapping(teacher, student, len(teacher) + extra_rows, len(student), prefix=prefix, root=root)


def _same(a, b):
    assert torch.equal(a.teacher_to_student, b.teacher_to_student)
    assert torch.equal(a.student_mapped, b.student_mapped)
    assert (a.n_mapped, a.n_tokens, a.n_prefix) == (b.n_mapped, b.n_tokens, b.n_prefix)


def test_second_build_reads_the_cache_and_equals_a_fresh_build(tiny_tokenizer, student_tok, tmp_path, builds):
    first = _map(tiny_tokenizer, student_tok, tmp_path, extra_rows=5)
    (entry,) = (tmp_path / SUBDIR).glob("*.safetensors")
    written = entry.stat().st_mtime_ns
    second = _map(tiny_tokenizer, student_tok, tmp_path, extra_rows=5)
    assert len(builds) == 1 and entry.stat().st_mtime_ns == written
    fresh = build_vocab_mapping(tiny_tokenizer, student_tok, len(tiny_tokenizer) + 5, len(student_tok), prefix=True)
    _same(first, fresh)
    _same(second, fresh)
    assert second.n_prefix > 0 and second.teacher_to_student.dtype == torch.long
    assert [p.name for p in (tmp_path / SUBDIR).iterdir()] == [entry.name]  # no temp file left


def test_the_key_is_the_content_not_the_path(tiny_tokenizer, student_tok, tmp_path, builds):
    _map(tiny_tokenizer, student_tok, tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path / "elsewhere")
    moved = AutoTokenizer.from_pretrained(tmp_path / "elsewhere")
    assert tokenizer_fingerprint(moved) == tokenizer_fingerprint(tiny_tokenizer)
    _map(moved, student_tok, tmp_path)
    assert len(builds) == 1


def test_a_changed_tokenizer_or_option_misses(tiny_tokenizer, student_tok, tmp_path, builds):
    base = _map(tiny_tokenizer, student_tok, tmp_path)
    student_tok.save_pretrained(tmp_path / "grown")
    changed = AutoTokenizer.from_pretrained(tmp_path / "grown")
    changed.add_tokens(["zzq"])  # one more token: another vocabulary, another entry
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(student_tok)
    _map(tiny_tokenizer, changed, tmp_path)
    exact = _map(tiny_tokenizer, student_tok, tmp_path, prefix=False)
    assert len(builds) == 3 and len(list((tmp_path / SUBDIR).glob("*.safetensors"))) == 3
    assert exact.n_prefix == 0 and base.n_prefix > 0  # the prefix option's entry is not reused


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key"])
def test_a_corrupt_entry_is_rebuilt_with_a_warning(tiny_tokenizer, student_tok, tmp_path, builds, damage):
    good = _map(tiny_tokenizer, student_tok, tmp_path)
    (entry,) = (tmp_path / SUBDIR).glob("*.safetensors")
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00" * 64)
    else:  # a whole file, but another pair's: copied or renamed by hand
        other = tmp_path / "other"
        _map(tiny_tokenizer, student_tok, other, prefix=False)
        entry.write_bytes(next((other / SUBDIR).glob("*.safetensors")).read_bytes())
    n = len(builds)
    with pytest.warns(UserWarning, match="unreadable vocabulary mapping cache entry.*rebuilding"):
        again = _map(tiny_tokenizer, student_tok, tmp_path)
    assert len(builds) == n + 1
    _same(again, good)
    _map(tiny_tokenizer, student_tok, tmp_path)  # the rebuilt entry is whole again: read, not built
    assert len(builds) == n + 1


def test_an_unwritable_cache_is_a_warning_not_an_error(tiny_tokenizer, student_tok, tmp_path, builds):
    blocker = tmp_path / "root"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not cache the vocabulary mapping"):
        m = _map(tiny_tokenizer, student_tok, blocker)
    assert m.n_mapped > 0 and len(builds) == 1


# --------------------------------------------------------------------------- in a train job


@pytest.fixture(scope="module")
def job_parts(tmp_path_factory, task_cfg, tiny_model_dir, student_tok):
    root = tmp_path_factory.mktemp("xtok_job")
    writer = JsonlWriter(root / "records.jsonl")
    writer.write(ground_truth_records(load_problems(task_cfg, "train", 16, seed=0), "chain"))
    writer.finish()
    student_tok.save_pretrained(root / "student_tok")
    return root


def _job(root, teacher_dir, out, method):
    train = TrainConfig(objective={"name": "logit_kd", "loss": LossSpec(divergence="forward_kl", kd_ratio=0.5),
                                   "cross_tokenizer": CrossTokenizerConfig(method=method)},
                        steps=2, batch_size=4, max_seq_len=48, log_every=1)
    return TrainJobConfig(output_dir=str(out), model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2),
                          tokenizer={"path": str(root / "student_tok")},
                          teacher=ModelConfig(path=str(teacher_dir), device="cpu"),
                          data=DataConfig(path=str(root / "records.jsonl")), train=train)


def _trained(out):
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [row for row in log if "loss" in row]


def test_train_jobs_build_the_mapping_once_and_uld_builds_none(job_parts, tmp_path, monkeypatch, builds,
                                                               tiny_model_dir):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    run_train_job(_job(job_parts, tiny_model_dir, tmp_path / "uld", "uld"), show_progress=False)
    assert builds == [] and not (tmp_path / "cache" / SUBDIR).exists()
    assert len(_trained(tmp_path / "uld")) == 2
    for run in ("first", "second"):
        run_train_job(_job(job_parts, tiny_model_dir, tmp_path / run, "vocab_map"), show_progress=False)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _trained(tmp_path / run))
    assert len(builds) == 1  # the second start read the entry the first one wrote
    assert len(list((tmp_path / "cache" / SUBDIR).glob("*.safetensors"))) == 1
