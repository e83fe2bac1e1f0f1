"""on_policy with the teacher off the training process (``train.objective.scoring``).

The remote teacher is a real ``distillery serve`` subprocess on 127.0.0.1 serving the shipped
demo teacher (assets/demo_teacher, 4×128, 266 ids); students are 1×32 Llamas, random init,
with the teacher's tokenizer. The server runs with ``--max-batch-size 1`` so that its answers
do not depend on which requests happen to be batched together (left padding changes the
float32 sums in the last bits).
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import torch.nn.functional as F

from distillery.config import ConfigError, ModelConfig, TaskConfig, TrainJobConfig
from distillery.errors import DataError
from distillery.models import build_model, load_model, load_tokenizer, save_model
from distillery.records import ground_truth_records
from distillery.tasks import load_problems
from distillery.teachers.base import TeacherUnavailableError
from distillery.teachers.openai import OpenAITeacher
from distillery.teachers.scoring import (
    ClientScorer,
    ModelScorer,
    TeacherScoringConfig,
    build_panel,
    check_scoring_tokenizers,
    mix_scores,
)
from distillery.train import Collator, SFTDataset, train_loop
from distillery.train.objectives import BuildContext, build_training_parts
from distillery.train.objectives.on_policy import OnPolicyConfig, OnPolicyObjective
from distillery.train.sampling import batch_prompts, continuation_batch, sample_continuations
from distillery.train.scoring_queue import ScoringQueue, hidden_share
from distillery.train.targets import shifted_targets
from distillery.train.teacher_scores import score_tensors

TEACHER = "assets/demo_teacher"
MAX_LEN = 64
K = 8

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``distillery serve MODEL --port P`` as a subprocess; ``kill()`` is SIGKILL, ``start()`` again."""

    def __init__(self, model_dir: str, port: int | None = None) -> None:
        self.model_dir, self.port = model_dir, port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, wait: bool = True) -> Served:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distillery.cli", "serve", self.model_dir, "--port", str(self.port),
             "--device", "cpu", "--model-name", "demo", "--max-batch-size", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 400.0) -> None:
        # generous: on a loaded 2-core machine starting a server took from 11 s to over 60 s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, "distillery serve exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/models", timeout=10).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("distillery serve did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(other_teacher_dir):
    """The demo teacher and a random 2×32 teacher (same tokenizer), served side by side."""
    both = [Served(TEACHER).start(wait=False), Served(other_teacher_dir).start(wait=False)]
    try:
        for s in both:
            s.wait_ready()
        yield both
    finally:
        for s in both:
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def random_server(servers):
    return servers[1]


def _remote(url: str, **kw) -> dict:
    return {"backend": "openai", "model": "demo", "base_urls": [url], "mode": "completions",
            "max_concurrency": 4, **kw}


# --------------------------------------------------------------------------- models and data


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TEACHER)


@pytest.fixture(scope="module")
def teacher():
    return load_model(TEACHER, device="cpu").eval().requires_grad_(False)


def _student(tok, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu"), tok).to(dtype)


def _records(n: int, seed: int = 0) -> list[dict]:
    problems = load_problems(TaskConfig(num_operands=3, digits=(1, 2)), "train", n, seed=seed)
    return ground_truth_records(problems, "chain")


def _batch(tok, records):
    ds = SFTDataset(records, tok, MAX_LEN)
    return Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])


def _objective(tok, scoring: dict, **cfg) -> OnPolicyObjective:
    config = OnPolicyConfig(scoring=scoring, **{"lmbda": 1.0, "temperature": 0.0, "max_new_tokens": 24, **cfg})
    return OnPolicyObjective(config, tok.eos_token_id, tok.pad_token_id, max_seq_len=MAX_LEN, seed=0)


@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory, tok):
    """A second teacher with the demo tokenizer (2×32, random init), saved as a user's model."""
    torch.manual_seed(7)
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, device="cpu"), tok)
    return str(save_model(model, tok, tmp_path_factory.mktemp("other_teacher")))


def _job(tmp_path, scoring: dict, steps: int = 4, **objective) -> TrainJobConfig:
    return TrainJobConfig.model_validate({
        "output_dir": str(tmp_path / "out"),
        "tokenizer": {"path": TEACHER},
        "data": {"task": {"name": "arithmetic", "num_operands": 3, "digits": [1, 2]}, "num_examples": 8},
        "train": {"objective": {"name": "on_policy", "lmbda": 1.0, "max_new_tokens": 16, "scoring": scoring,
                                **objective},
                  "steps": steps, "batch_size": 4, "max_seq_len": MAX_LEN, "lr": 3e-3, "warmup_steps": 0,
                  "log_every": 1},
    })


def _student_samples(tok, n: int = 4) -> list[list[int]]:
    """Sequences a (random) student wrote after the records' prompts: what the teacher scores."""
    student = _student(tok)
    batch = _batch(tok, _records(n))
    prompts = batch_prompts(batch)
    conts = sample_continuations(student, prompts, max_new_tokens=20, temperature=1.0,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return [p + c for p, c in zip(prompts, conts)]


# --------------------------------------------------------------------------- (a) scores


def test_remote_scoring_equals_the_in_process_teachers_top_k(tok, teacher, server):
    torch.manual_seed(1)
    seqs = _student_samples(tok)
    local = ModelScorer(teacher, tok.pad_token_id).score(seqs, K)
    remote = ClientScorer(OpenAITeacher.from_config(_teacher_cfg(server.base_url)), "demo").score(seqs, K)
    for s, a, b in zip(seqs, local, remote):
        assert a.top.ids.shape == b.top.ids.shape == (len(s) - 1, K)
        # float32 over JSON: the served log-probs carry float32's precision
        torch.testing.assert_close(b.top.logprobs, a.top.logprobs, atol=2e-5, rtol=0)
        torch.testing.assert_close(b.top.log_tail.exp(), a.top.log_tail.exp(), atol=2e-5, rtol=0)
        torch.testing.assert_close(b.token_logprobs, a.token_logprobs, atol=2e-5, rtol=0)
        # the same ids, except where two log-probs tie within that precision
        gap = (a.top.logprobs[:, :-1] - a.top.logprobs[:, 1:]).abs()
        clear = torch.cat([gap[:, :1], torch.minimum(gap[:, 1:], gap[:, :-1]), gap[:, -1:]], 1) > 1e-4
        assert torch.equal(a.top.ids[clear], b.top.ids[clear])
        # and they are the teacher's: its log-softmax at the ids the server sent
        full = F.log_softmax(teacher(input_ids=torch.tensor([s])).logits[0, :-1].double(), -1)
        torch.testing.assert_close(full.gather(-1, b.top.ids).float(), b.top.logprobs, atol=2e-5, rtol=0)


def _teacher_cfg(url: str, **kw):
    from distillery.config import TeacherConfig

    return TeacherConfig(**_remote(url, **kw))


# --------------------------------------------------------------------------- (b) loss and gradients


def _plain_divergence(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per position over K + 1 buckets (top-k and the tail), float64, written out."""
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    m = 0.5 * p + 0.5 * q  # GKD's JSD at β = 0.5
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_loss_and_gradients_equal_the_local_teacher_restricted_to_its_top_k(tok, random_server, other_teacher_dir,
                                                                           divergence):
    # a random teacher: its tail mass (~0.9) is resolved by float32 log-probs; a confident
    # teacher's tail below ~1e-7 is not (see docs/training/on_policy.md)
    teacher = load_model(other_teacher_dir, device="cpu").eval()
    student = _student(tok, dtype=torch.float64)
    reference = copy.deepcopy(student)
    batch = _batch(tok, _records(4))
    obj = _objective(tok, {"teacher": _remote(random_server.base_url), "top_k": K}, loss={"divergence": divergence})
    out = obj.loss(batch, student, None)
    out.loss.backward()

    # the reference: the same greedy samples, the local teacher in float64, its own top-k
    prompts = batch_prompts(batch)
    conts = sample_continuations(reference, prompts, max_new_tokens=24, temperature=0.0,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cb = continuation_batch(prompts, conts, tok.pad_token_id, MAX_LEN)
    targets, mask = shifted_targets(cb)
    teacher64 = copy.deepcopy(teacher).double()
    t_lp = F.log_softmax(teacher64(input_ids=cb["input_ids"], attention_mask=cb["attention_mask"]).logits[:, :-1], -1)
    top_lp, ids = t_lp.topk(K, -1)
    p = torch.cat([top_lp.exp(), (1 - top_lp.exp().sum(-1, keepdim=True))], -1)
    q_full = F.softmax(reference(**{k: cb[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1], -1)
    q_top = q_full.gather(-1, ids)
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    ref_loss = _plain_divergence(divergence, p, q)[mask].mean()
    ref_loss.backward()

    assert out.metrics["on_policy"] == 1.0 and out.count == float(mask.sum())
    torch.testing.assert_close(out.loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(student.named_parameters(), reference.parameters()):
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


# --------------------------------------------------------------------------- (c) the server dies


class _Killer:
    """Wraps a real scorer: on its ``at``-th call SIGKILLs the server, restarts it a second
    later (a new process on the same port), then scores as usual (the call fails until then)."""

    def __init__(self, scorer, served: Served, at: int) -> None:
        self.scorer, self.served, self.at, self.calls = scorer, served, at, 0
        self.name = scorer.name
        self.restart: threading.Thread | None = None

    def score(self, seqs, k):
        self.calls += 1
        if self.calls == self.at:
            self.served.kill()
            self.restart = threading.Thread(target=lambda: (time.sleep(1.0), self.served.start(wait=False)))
            self.restart.start()
        return self.scorer.score(seqs, k)


def _train(tmp_path, tok, scoring: dict, steps: int, wrap=None, staleness: int = 0):
    job = _job(tmp_path, {**scoring, "staleness": staleness}, steps=steps)
    records = _records(8)
    student = _student(tok)
    dataset, collate, obj = build_training_parts(BuildContext(job, records, tok, student))
    if wrap is not None:
        obj.panel.scorers["teacher"] = wrap(obj.panel.scorers["teacher"])
    result = train_loop(student, obj, dataset, collate, job.train, show_progress=False)
    obj.queue.close()
    return student, result


@pytest.mark.slow
def test_teacher_killed_and_restarted_training_waits_and_ends_with_the_same_weights(tmp_path, tok):
    served = Served(TEACHER).start()
    try:
        # few client retries: the outage reaches the scoring queue, which waits and tries again
        scoring = {"teacher": _remote(served.base_url, max_retries=1, backoff_base_s=0.05), "top_k": K}
        plain, plain_result = _train(tmp_path / "a", tok, scoring, steps=5)
        killer = {}

        def wrap(scorer):
            killer["k"] = _Killer(scorer, served, at=3)
            return killer["k"]

        killed, killed_result = _train(tmp_path / "b", tok, scoring, steps=5, wrap=wrap)
        killer["k"].restart.join()
    finally:
        served.stop()
    retries = [h.get("scoring/retries", 0.0) for h in killed_result.history]
    assert retries[2] > 0 and sum(retries) == retries[2], retries  # step 3 waited, the others not
    assert sum(h.get("scoring/retries", 0.0) for h in plain_result.history) == 0
    assert killed_result.steps == 5
    for (name, a), b in zip(killed.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_teacher_down_for_longer_than_retry_for_s_stops_training_with_a_clear_error():
    def down(job):
        raise TeacherUnavailableError("teacher demo: cannot connect")

    q = ScoringQueue(down, retry_for_s=0.0)
    with pytest.raises(TeacherUnavailableError, match="retry_for_s"):
        q.result(q.submit(([[1, 2]], None)))
    q.close()


# --------------------------------------------------------------------------- (d) several teachers


class _Recorder:
    """Wraps a real scorer and keeps the sequences it was asked to score."""

    def __init__(self, scorer) -> None:
        self.scorer, self.name, self.seen = scorer, scorer.name, []

    def score(self, seqs, k):
        self.seen.extend(seqs)
        return self.scorer.score(seqs, k)

    def __getattr__(self, name):  # the rest (the client, for seq_kd) is the scorer's
        return getattr(self.scorer, name)


def test_two_teachers_routed_by_a_record_field_each_score_only_their_own_records(tmp_path, tok, teacher, server,
                                                                                  other_teacher_dir):
    scoring = {"teachers": {"a": _remote(server.base_url), "b": {"backend": "hf", "model": other_teacher_dir,
                                                                  "device": "cpu"}},
               "route_by": "meta.teacher", "top_k": K}
    records = _records(6)
    for i, r in enumerate(records):
        r["meta"]["teacher"] = "ab"[i % 3 == 0]  # records 0 and 3 go to b
    job = _job(tmp_path, scoring)
    dataset, collate, obj = build_training_parts(BuildContext(job, records, tok, _student(tok)))
    rec = {n: _Recorder(s) for n, s in obj.panel.scorers.items()}
    obj.panel.scorers.update(rec)
    batch = collate([dataset[i] for i in range(len(dataset))])
    out = obj.loss(batch, _student(tok), None)

    prompts = batch_prompts(batch)
    for name in "ab":
        mine = [p for p, r in zip(prompts, records) if r["meta"]["teacher"] == name]
        assert len(rec[name].seen) == len(mine) == (2 if name == "b" else 4)
        assert [s[: len(p)] for s, p in zip(rec[name].seen, mine)] == mine
    assert out.metrics["teacher/a/loss"] > 0 and out.metrics["teacher/b/loss"] > 0
    # the loss is the rows' count-weighted mix of the two teachers' losses
    pending = obj._pending  # staleness 0: nothing sampled ahead
    assert not pending
    obj.queue.close()


def test_a_weighted_mixture_equals_the_plain_mixture_of_the_teachers_distributions(tok, teacher, other_teacher_dir):
    other = load_model(other_teacher_dir, device="cpu").eval()
    seqs = _student_samples(tok, 3)
    vocab = teacher.config.vocab_size
    a = ModelScorer(teacher, tok.pad_token_id, "a").score(seqs, vocab)  # k = V: the mixture is exact
    b = ModelScorer(other, tok.pad_token_id, "b").score(seqs, vocab)
    mixed = mix_scores([a, b], [0.25, 0.75], K)
    for s, m in zip(seqs, mixed):
        ids = torch.tensor([s])
        pa = F.softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1)
        pb = F.softmax(other(input_ids=ids).logits[0, :-1].double(), -1)
        plain = (0.25 * pa + 0.75 * pb).log()
        top, top_ids = plain.topk(K, -1)
        torch.testing.assert_close(m.top.logprobs.double(), top, atol=1e-5, rtol=0)
        assert torch.equal(m.top.ids, top_ids)
        tail = (1 - top.exp().sum(-1)).log()
        torch.testing.assert_close(m.top.log_tail.double(), tail, atol=1e-4, rtol=0)
        torch.testing.assert_close(m.token_logprobs, plain.gather(-1, ids[0, 1:, None])[:, 0], atol=1e-5, rtol=0)


def test_a_mixture_step_logs_the_loss_against_each_teacher(tok, other_teacher_dir):
    scoring = {"teachers": {"a": {"backend": "hf", "model": TEACHER, "device": "cpu"},
                            "b": {"backend": "hf", "model": other_teacher_dir, "device": "cpu"}},
               "mixture": {"a": 1.0, "b": 3.0}, "top_k": K}
    obj = _objective(tok, scoring)
    out = obj.loss(_batch(tok, _records(3)), _student(tok), None)
    assert {"teacher/a/loss", "teacher/b/loss"} <= set(out.metrics)
    assert out.metrics["teacher/a/loss"] != out.metrics["teacher/b/loss"]
    obj.queue.close()


# --------------------------------------------------------------------------- staleness 1


def test_staleness_one_scores_the_loops_next_batch_ahead(tmp_path, tok):
    scoring = {"teacher": {"backend": "hf", "model": TEACHER, "device": "cpu"}, "top_k": K}
    _, result = _train(tmp_path, tok, scoring, steps=4, staleness=1)
    prefetched = [h["scoring/prefetched"] for h in result.history]
    assert prefetched == [0.0, 1.0, 1.0, 1.0]  # the first batch had no step before it
    assert all(0.0 <= h["scoring/hidden"] <= 1.0 for h in result.history)


def test_hidden_share():
    assert hidden_share(2.0, 0.5) == 0.75
    assert hidden_share(2.0, 3.0) == 0.0
    assert hidden_share(0.0, 0.0) == 1.0


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(("scoring", "message"), [
    ({"teacher": {"model": TEACHER}, "teachers": {"a": {"model": TEACHER}}}, "not both"),
    ({"teachers": {"a": {"model": TEACHER}, "b": {"model": TEACHER}}}, "names 2 teachers \\(a, b\\)"),
    ({"teachers": {"a": {"model": TEACHER}, "b": {"model": TEACHER}}, "route_by": "meta.teacher",
      "mixture": {"a": 1, "b": 1}}, "not both"),
    ({"teachers": {"a": {"model": TEACHER}, "b": {"model": TEACHER}}, "mixture": {"a": 1, "c": 1}},
     "one weight per teacher"),
    ({"teacher": {"model": TEACHER}, "route_by": "meta.teacher"}, "give train.objective.scoring.teachers"),
    ({"teacher": {"backend": "openai", "model": "demo"}}, "base_urls is empty"),
])
def test_scoring_config_errors(scoring, message):
    with pytest.raises(ValueError, match=message):
        TeacherScoringConfig.model_validate(scoring)


def test_a_remote_teacher_needs_no_job_teacher_and_seq_kd_needs_one_writer(tmp_path):
    job = _job(tmp_path, {"teacher": _remote("http://127.0.0.1:1/v1")})
    assert job.teacher is None
    mixed = {"teachers": {"a": {"model": TEACHER}, "b": {"model": TEACHER}}, "mixture": {"a": 1, "b": 1}}
    with pytest.raises(ValueError, match="seq_kd has a teacher write .* scoring.mixture names no one teacher"):
        _job(tmp_path, mixed, seq_kd=True, lmbda=0.0)


def test_seq_kd_with_a_served_teacher_scores_the_teachers_own_greedy_continuations(tok, teacher, server):
    obj = _objective(tok, {"teacher": _remote(server.base_url), "top_k": K}, lmbda=0.0, seq_kd=True)
    batch = _batch(tok, _records(3))
    obj.attach_scoring(build_panel(obj.scoring))
    rec = _Recorder(obj.panel.scorers["teacher"])
    obj.panel.scorers["teacher"] = rec
    out = obj.loss(batch, _student(tok), None)
    assert out.metrics["on_policy"] == 0.0 and out.metrics["gen_tokens"] > 0
    for prompt, scored in zip(batch_prompts(batch), rec.seen):
        ids = torch.tensor([prompt])
        gen = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                               do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        cont = gen[0, len(prompt):].tolist()
        cont = cont[: cont.index(tok.eos_token_id) + 1] if tok.eos_token_id in cont else cont
        assert scored == prompt + cont  # the end token the server stopped at is put back
        assert cont[-1] == tok.eos_token_id
    obj.queue.close()


def test_a_teacher_with_another_tokenizer_is_named(tok, tmp_path):
    from distillery.models import train_tokenizer

    other = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300, algorithm="unigram")
    other.save_pretrained(tmp_path / "other_tok")
    cfg = TeacherScoringConfig.model_validate(
        {"teachers": {"good": {"model": TEACHER},
                      "other": {"backend": "openai", "model": "x", "base_urls": ["http://127.0.0.1:1/v1"],
                                "tokenizer": str(tmp_path / "other_tok")}},
         "route_by": "meta.t"})
    with pytest.raises(ConfigError, match="teacher\\(s\\) other .*another tokenizer"):
        check_scoring_tokenizers(cfg, tok)


def test_a_mixture_of_servers_needs_their_tokenizers(tok):
    cfg = TeacherScoringConfig.model_validate(
        {"teachers": {"a": _remote("http://127.0.0.1:1/v1"), "b": {"model": TEACHER}}, "mixture": {"a": 1, "b": 1}})
    with pytest.raises(ConfigError, match="train.objective.scoring.teachers.a.tokenizer"):
        check_scoring_tokenizers(cfg, tok)
    ok = cfg.model_copy(deep=True)
    ok.teachers["a"].tokenizer = TEACHER
    check_scoring_tokenizers(ok, tok)


def test_a_record_without_its_teacher_is_named(tmp_path, tok):
    scoring = {"teachers": {"a": {"model": TEACHER, "device": "cpu"}, "b": {"model": TEACHER, "device": "cpu"}},
               "route_by": "meta.teacher"}
    records = _records(2)
    records[0]["meta"]["teacher"] = "a"
    with pytest.raises(DataError, match=f"record '{records[1]['id']}' has no field 'meta.teacher'.*a, b"):
        build_training_parts(BuildContext(_job(tmp_path, scoring), records, tok, _student(tok)))
    records[1]["meta"]["teacher"] = "c"
    with pytest.raises(DataError, match="names teacher 'c'"):
        build_training_parts(BuildContext(_job(tmp_path, scoring), records, tok, _student(tok)))


def test_teacher_ids_outside_the_students_vocabulary_are_refused(tok):
    from distillery.logits.topk import TeacherTopK
    from distillery.teachers.scoring import ScoredSequence

    batch = _batch(tok, _records(1))
    n = int(batch["attention_mask"].sum()) - 1
    s = ScoredSequence(TeacherTopK(torch.full((n, 2), 300), torch.full((n, 2), -1.0), None), torch.zeros(n))
    with pytest.raises(ConfigError, match="teacher 'big' returned token id 300.*another tokenizer"):
        score_tensors(batch, [s], 2, 266, ["big"])


# --------------------------------------------------------------------------- reward: teacher_logprob


def test_reward_teacher_logprob_from_a_server_equals_the_in_process_teachers(tmp_path, tok, teacher, server):
    from distillery.train.objectives.reward import prepare_reward_training
    from distillery.train.reward import TeacherLogprobReward

    job = TrainJobConfig.model_validate({
        "output_dir": str(tmp_path / "out"), "tokenizer": {"path": TEACHER},
        "data": {"task": {"name": "arithmetic", "num_operands": 3, "digits": [1, 2]}, "num_examples": 4},
        "train": {"objective": {"name": "reward", "source": "teacher_logprob", "group_size": 2, "max_new_tokens": 12,
                                "scoring": {"teacher": _remote(server.base_url)}},
                  "steps": 1, "batch_size": 2, "max_seq_len": MAX_LEN},
    })
    assert job.teacher is None  # the server stands in for the job's teacher
    records = _records(2)
    dataset, collate, obj = prepare_reward_training(job, records, tok, _student(tok))
    batch = collate([dataset[i] for i in range(len(dataset))])
    torch.manual_seed(3)
    cbatch, index = obj.rollout(batch, _student(tok))
    remote = obj.rewards(cbatch, index, None)
    local = TeacherLogprobReward().score_batch(cbatch, teacher)
    assert len(remote) == 4
    torch.testing.assert_close(torch.tensor(remote, dtype=torch.float64), torch.tensor(local, dtype=torch.float64),
                               atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="scoring gives the teacher of source 'teacher_logprob'"):
        TrainJobConfig.model_validate({**job.model_dump(), "train": {
            **job.train.model_dump(), "objective": {"name": "reward", "source": "verifier",
                                                    "scoring": {"teacher": _remote(server.base_url)}}}})


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_resumed_run_continues_the_coins_and_at_staleness_0_the_weights(tok, teacher, tmp_path, staleness):
    import shutil

    from distillery.config import TrainConfig
    from distillery.train.scoring_queue import BatchSchedule

    cfg = TrainConfig(objective={"name": "on_policy", "lmbda": 0.5, "max_new_tokens": 8,
                                 "scoring": {"top_k": K, "staleness": staleness}},
                      steps=8, batch_size=4, lr=1e-2, warmup_steps=1, max_seq_len=MAX_LEN, log_every=1, seed=4,
                      checkpoint={"every": 4, "keep_last": 2})
    ds = SFTDataset(_records(32), tok, MAX_LEN)
    collate = Collator(tok.pad_token_id)

    def run(directory, resume: bool):
        student = _student(tok)
        obj = OnPolicyObjective(cfg.objective, tok.eos_token_id, tok.pad_token_id, max_seq_len=MAX_LEN, seed=cfg.seed)
        obj.attach_scoring(build_panel(cfg.objective.scoring, teacher, tok.pad_token_id), BatchSchedule(ds, collate, cfg))
        result = train_loop(student, obj, ds, collate, cfg, teacher, None, False, checkpoint_dir=directory,
                            resume=resume)
        obj.queue.close()
        return student, result.history

    whole, history = run(tmp_path / "whole", False)
    (halfway,) = [p for p in (tmp_path / "whole").iterdir() if p.name.endswith("4")]
    shutil.copytree(halfway, tmp_path / "resumed" / halfway.name)
    shutil.copy(tmp_path / "whole" / ".distillery", tmp_path / "resumed" / ".distillery")
    resumed, rest = run(tmp_path / "resumed", True)
    assert [h["on_policy"] for h in rest] == [h["on_policy"] for h in history[4:]]
    assert len({h["on_policy"] for h in history}) == 2  # both sides of the coin were drawn
    if staleness == 0:
        assert [h["loss"] for h in rest] == [h["loss"] for h in history[4:]]
        assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))
    else:  # the resumed run's first batch had no step before it to be scored during
        assert [h["scoring/prefetched"] for h in rest] == [0.0, 1.0, 1.0, 1.0]
