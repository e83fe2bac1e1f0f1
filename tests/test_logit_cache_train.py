"""Capture a logit cache and train from it: alignment, refusals, resume, and equality with a live teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from distillery.capture import run_capture
from distillery.chat import IGNORE, tokenize_messages
from distillery.config import CaptureConfig, DataConfig, TaskConfig, TeacherConfig, TrainJobConfig
from distillery.logits import LogitCache
from distillery.logits.cache import CacheMismatchError, stored_positions
from distillery.losses import LossSpec, distillation_loss
from distillery.models import load_model, load_tokenizer, train_tokenizer
from distillery.records import ground_truth_records, write_jsonl_atomic
from distillery.tasks import load_problems
from distillery.train.cached import CachedCollator, CachedSFTDataset
from distillery.train.objectives.logit_kd import LogitKDObjective
from distillery.train.targets import shifted_targets

TASK = TaskConfig(num_operands=2, digits=(1, 2))


@pytest.fixture(scope="module")
def records_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "records.jsonl"
    write_jsonl_atomic(path, ground_truth_records(load_problems(TASK, "train", 24, seed=3), "chain"))
    return path


def _capture_cfg(out, records_path, model_dir, **kw):
    teacher = kw.pop("teacher", {"backend": "hf", "model": str(model_dir), "device": "cpu", "batch_size": 8})
    return CaptureConfig(output_dir=str(out), data=DataConfig(path=str(records_path), num_examples=24),
                         teacher=TeacherConfig(**teacher), k=kw.pop("k", 8), max_seq_len=64, **kw)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, records_path, tiny_model_dir):
    out = tmp_path_factory.mktemp("cache") / "c"
    run_capture(_capture_cfg(out, records_path, tiny_model_dir, shard_size=5), show_progress=False)
    return out


def test_capture_stores_the_teachers_topk_at_every_trained_position(cache_dir, records_path, tiny_model_dir):
    cache = LogitCache(cache_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).double()
    recs = [json.loads(line) for line in open(records_path)]
    assert len(cache) == 24 and cache.manifest.k == 8 and len(cache.manifest.shards) == 5
    for rec in recs[:5]:
        item = tokenize_messages(rec["messages"], tok, 64)
        ex = cache[rec["id"]]
        assert list(ex.token_ids) == item["input_ids"]
        pos = stored_positions(item["labels"])
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([item["input_ids"]])).logits[0], -1)[pos]
        top = ref.topk(8, dim=-1)
        for row in range(len(pos)):  # same ids (as a set); probabilities within the codec's bound
            want = dict(zip(top.indices[row].tolist(), top.values[row].tolist()))
            got = dict(zip(ex.ids[row].tolist(), ex.logprobs[row].tolist()))
            assert set(got) == set(want)
            # docs/logit_format.md: |sqrt(q) - sqrt(p)| <= sqrt(max_kl) per entry (max_kl 5e-4)
            err = max(abs(np.exp(got[i] / 2) - np.exp(want[i] / 2)) for i in want)
            assert err <= np.sqrt(5e-4) + 1e-3


def _trained_positions(records_path, tok) -> int:
    """Label positions counted from the records (assistant tokens after the first token), not
    through the cache's own bookkeeping."""
    recs = [json.loads(line) for line in open(records_path)]
    return sum(sum(1 for lab in tokenize_messages(r["messages"], tok, 64)["labels"][1:] if lab != IGNORE)
               for r in recs)


def test_capture_prints_bytes_per_stored_position_and_the_manifest_counts_only_them(tmp_path, records_path, tiny_model_dir):
    cfg = _capture_cfg(tmp_path / "cache", records_path, tiny_model_dir, shard_size=10)
    path = tmp_path / "capture.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "distillery.cli", "capture", str(path)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "60"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    positions = _trained_positions(records_path, load_tokenizer(str(tiny_model_dir)))
    cache = LogitCache(tmp_path / "cache")
    total_tokens = sum(len(cache[rid].token_ids) for rid in cache.ids())
    nbytes = sum(f.stat().st_size for f in (tmp_path / "cache").glob("shard-*.dlc"))
    assert positions < total_tokens  # prompts are not stored: the two figures differ
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sum(s["positions"] for s in manifest["shards"]) == positions
    assert sum(s["sequence_tokens"] for s in manifest["shards"]) == total_tokens
    run = manifest["extra"]["last_run"]
    assert (run["records"], run["positions"], run["sequence_tokens"]) == (24, positions, total_tokens)
    m = cache.manifest
    assert m.positions == positions and m.bytes_per_position == pytest.approx(nbytes / positions)
    line = proc.stderr.strip().splitlines()[-1]  # one line, however narrow the terminal
    assert line.startswith("captured 24 records") and f"{positions} stored positions" in line
    assert f"{nbytes / positions:.1f} bytes per stored position" in line
    assert "positions/s" in line and "teacher tok/s" in line


def test_a_manifest_from_before_position_counts_still_loads(tmp_path, cache_dir, records_path, tiny_model_dir):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(cache_dir, old)
    raw = json.loads((old / "manifest.json").read_text())
    for shard in raw["shards"]:  # the old layout: "tokens" counted every sequence token
        shard["tokens"] = shard.pop("sequence_tokens")
        del shard["positions"]
    (old / "manifest.json").write_text(json.dumps(raw))
    m = LogitCache(old).manifest
    nbytes = sum(f.stat().st_size for f in old.glob("shard-*.dlc"))
    positions = _trained_positions(records_path, load_tokenizer(str(tiny_model_dir)))
    assert m.positions == positions and m.bytes_per_position == pytest.approx(nbytes / positions)
    assert all("tokens" not in s and s["sequence_tokens"] > s["positions"] for s in m.shards)


def test_training_from_the_cache_equals_the_live_teacher_restricted_to_topk(cache_dir, records_path, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    cache = LogitCache(cache_dir)
    recs = [json.loads(line) for line in open(records_path)][:6]
    ds = CachedSFTDataset(recs, tok, 64, cache)
    batch = CachedCollator(tok.pad_token_id, k=8)([ds[i] for i in range(len(ds))])
    spec = LossSpec(divergence="forward_kl", kd_ratio=0.5, form="sparse", tail_policy="tail_bucket")
    student = load_model(str(tiny_model_dir)).double()  # student = teacher weights: a real, nonzero KD gradient
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = load_model(str(tiny_model_dir)).double()

    cached_loss = LogitKDObjective(spec, cached=True).loss(batch, student, None).loss
    (g_cached,) = torch.autograd.grad(cached_loss, student.lm_head.weight)

    # the live teacher, float64, restricted to the same top k: the plain reference
    targets, mask = shifted_targets(batch)
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                              .logits[:, :-1], -1)
    top = t.topk(8, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-12))
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    live_loss, _ = distillation_loss(spec, student_logits=s_logits, teacher_topk_ids=top.indices,
                                     teacher_topk_logprobs=top.values, teacher_log_tail=tail,
                                     labels=targets, mask=mask)
    (g_live,) = torch.autograd.grad(live_loss, student.lm_head.weight)
    assert abs(cached_loss.item() - live_loss.item()) < 1e-3 * abs(live_loss.item())
    # the only difference is the codec's rounding (per entry |sqrt q - sqrt p| <= sqrt(5e-4)):
    # measured 5e-5 relative on the loss and 1.2e-3 on the gradient
    rel = ((g_cached - g_live).norm() / g_live.norm()).item()
    assert rel < 1e-2


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_the_fused_form_from_the_cache_equals_the_sparse_form(cache_dir, records_path, tiny_model_dir, divergence):
    """The cache's default form is fused (no [tokens, vocab] student logits); it computes the
    sparse form's loss and gradients (float64), and a dense spec is read as fused."""
    tok = load_tokenizer(str(tiny_model_dir))
    recs = [json.loads(line) for line in open(records_path)][:6]
    ds = CachedSFTDataset(recs, tok, 64, LogitCache(cache_dir))
    batch = CachedCollator(tok.pad_token_id, k=8)([ds[i] for i in range(len(ds))])
    student = load_model(str(tiny_model_dir)).double()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grads, losses = {}, {}
    for form in ("sparse", "fused", "dense"):
        spec = LossSpec(divergence=divergence, kd_ratio=0.5, temperature=2.0, form=form, chunk_tokens=7)
        objective = LogitKDObjective(spec, cached=True)
        assert objective.spec.form == ("fused" if form == "dense" else form)
        losses[form] = objective.loss(batch, student, None).loss
        grads[form] = torch.autograd.grad(losses[form], [p for p in student.parameters()])
    for form in ("fused", "dense"):
        assert abs(losses[form].item() - losses["sparse"].item()) < 1e-8 * abs(losses["sparse"].item())
        # the cache's float32 teacher values are upcast at other points of the two paths:
        # measured 1.4e-8 relative on the lm_head gradient; a wrong term would be O(1)
        for g, ref in zip(grads[form], grads["sparse"], strict=True):
            assert ((g - ref).norm() / ref.norm()).item() < 1e-6


def test_a_cache_from_another_tokenizer_is_refused(cache_dir, records_path):
    other = train_tokenizer(["completely different text 123"] * 50, vocab_size=300)
    recs = [json.loads(line) for line in open(records_path)]
    with pytest.raises(CacheMismatchError, match="cross"):
        CachedSFTDataset(recs, other, 64, LogitCache(cache_dir))


def test_misaligned_tokens_are_refused_with_the_record_and_position(cache_dir, records_path, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    recs = [json.loads(line) for line in open(records_path)]
    recs[0]["messages"][1]["content"] += " extra"  # the record changed after capture
    ds = CachedSFTDataset(recs, tok, 64, LogitCache(cache_dir))
    with pytest.raises(CacheMismatchError, match=recs[0]["id"]):
        ds[0]
    with pytest.raises(CacheMismatchError, match="not in the logit cache"):
        CachedSFTDataset([{**recs[1], "id": "unknown"}], tok, 64, LogitCache(cache_dir))


def test_train_job_from_the_cache_runs_and_needs_no_teacher(tmp_path, cache_dir, records_path, tiny_model_dir):
    from distillery.train.job import run_train_job

    cfg = TrainJobConfig(output_dir=str(tmp_path / "student"), model={"path": str(tiny_model_dir), "device": "cpu"},
                         teacher_cache=str(cache_dir), data={"path": str(records_path), "num_examples": 24},
                         train={"objective": "logit_kd", "steps": 6, "batch_size": 4, "max_seq_len": 64,
                                "log_every": 1})
    result = run_train_job(cfg, show_progress=False)
    assert result.steps == 6 and np.isfinite(result.final_loss)
    with pytest.raises(ValueError, match="not both"):
        TrainJobConfig(**{**cfg.model_dump(), "teacher": {"path": str(tiny_model_dir)}})


def test_capture_over_http_from_distillery_serve_matches_the_local_capture(tmp_path, cache_dir, records_path, tiny_model_dir):
    from distillery.serve import start_server

    with start_server(tiny_model_dir, model_name="tiny", device="cpu") as server:
        teacher = {"backend": "openai", "model": "tiny", "base_urls": [server.base_url], "max_concurrency": 4}
        run_capture(_capture_cfg(tmp_path / "remote", records_path, tiny_model_dir, teacher=teacher,
                                 tokenizer=str(tiny_model_dir)), show_progress=False)
    local, remote = LogitCache(cache_dir), LogitCache(tmp_path / "remote")
    assert sorted(local.ids()) == sorted(remote.ids())
    for rid in local.ids():
        a, b = local[rid], remote[rid]
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=0.05)
        np.testing.assert_allclose(np.exp(a.log_tail), np.exp(b.log_tail), atol=0.01)


def test_sigkill_during_capture_then_resume_loses_and_repeats_nothing(tmp_path, records_path, tiny_model_dir):
    cfg = _capture_cfg(tmp_path / "cache", records_path, tiny_model_dir, shard_size=2)
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"batch_size": 1})})
    path = tmp_path / "capture.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "distillery.cli", "capture", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((tmp_path / "cache").glob("shard-*.dlc"))) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards_before = len(list((tmp_path / "cache").glob("shard-*.dlc")))
    assert 3 <= shards_before < 12, "the kill should land mid-capture"
    manifest = run_capture(cfg, show_progress=False)
    cache = LogitCache(tmp_path / "cache")
    ids = cache.ids()
    assert manifest.count == 24 and len(ids) == 24 == len(set(ids))


def test_k_larger_than_the_vocabulary_is_refused_before_any_work(tmp_path, records_path, tiny_model_dir):
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        run_capture(_capture_cfg(tmp_path / "c", records_path, tiny_model_dir, k=100000), show_progress=False)
    assert not (tmp_path / "c").exists()
