"""logit_kd from a teacher with another tokenizer (BPE teacher, unigram student), end to end.

The objective's loss is checked against a float64 reference written with plain loops over the
compared rows (teacher distribution carried to student ids by string, span mass moved, tail
bucket), ULD likewise; the logit-cache path against the live one; a job trains and refuses
a mismatched pair without ``train.objective.cross_tokenizer``.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from distillery.capture import run_capture
from distillery.config import (
    CaptureConfig,
    CrossTokenizerConfig,
    DataConfig,
    ModelConfig,
    TeacherConfig,
    TrainConfig,
    TrainJobConfig,
)
from distillery.logits.cache import CacheMismatchError, LogitCache
from distillery.losses import LossSpec
from distillery.models import build_model, load_tokenizer, save_model, train_tokenizer
from distillery.models.vocab import VocabMismatchError, build_vocab_mapping, token_bytes
from distillery.records import JsonlWriter, ground_truth_records
from distillery.tasks import load_problems
from distillery.train.cross_tokenizer import (
    CHAIN,
    COARSER,
    SAME,
    CrossTokenizerCollator,
    CrossTokenizerDataset,
)
from distillery.train.job import run_train_job
from distillery.train.objectives.logit_kd import CrossTokenizerKDObjective

MAX_LEN = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory, task_cfg, tiny_tokenizer, merging_tokenizer_dir):
    root = tmp_path_factory.mktemp("xtok")
    records = ground_truth_records(load_problems(task_cfg, "train", 48, seed=0), "chain")
    data = root / "records.jsonl"
    writer = JsonlWriter(data)
    writer.write(records)
    writer.finish()
    texts = [m["content"] for r in ground_truth_records(load_problems(task_cfg, "train", 400, seed=1), "chain")
             for m in r["messages"]]
    student_tok = load_tokenizer(str(merging_tokenizer_dir))
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, tie_word_embeddings=False),
                          tiny_tokenizer)
    with torch.no_grad():  # a confident teacher: peaked distributions a student can measurably approach
        teacher.get_output_embeddings().weight.mul_(40.0)
    save_model(teacher, tiny_tokenizer, root / "teacher")
    student = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), student_tok)
    # one token per digit: the tokenizations then differ only where the teacher writes `=-` and
    # `;#-` as one token the student has not (COARSER rows whose first teacher token is unmapped)
    split_tok = train_tokenizer(texts, vocab_size=300, algorithm="unigram", split_digits=True)
    split_student = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), split_tok)
    return {"root": root, "records": records, "data": data, "student_tok": student_tok,
            "student_tok_dir": merging_tokenizer_dir,
            "teacher_tok": tiny_tokenizer, "teacher": teacher.eval(), "student": student.eval(),
            "split_tok": split_tok, "split_student": split_student.eval()}


def _which(s, student):
    """The fixture with ``student`` ('merged' digits or 'split' digits) as its student. The split
    student's teacher gives `=-` and `;#-` real mass everywhere (an output bias): the rows where
    one of them is the teacher's first token then move much mass out of an unmapped token."""
    if student == "merged":
        return s
    teacher = copy.deepcopy(s["teacher"])
    head = teacher.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[s["teacher_tok"].convert_tokens_to_ids(["=-", ";#-"])] = 40.0
    teacher.set_output_embeddings(biased)
    return {**s, "student_tok": s["split_tok"], "student": s["split_student"], "teacher": teacher.eval()}


def _batch(s, n=8, cache=None):
    ds = CrossTokenizerDataset(s["records"][:n], s["student_tok"], s["teacher_tok"], MAX_LEN, cache)
    collate = CrossTokenizerCollator(s["student_tok"].pad_token_id, teacher_pad_id=s["teacher_tok"].pad_token_id)
    return collate([ds[i] for i in range(len(ds))])


def _objective(s, method, cached=False, unmapped=None, prefix=False, **loss):
    mapping = build_vocab_mapping(s["teacher_tok"], s["student_tok"], len(s["teacher_tok"]), len(s["student_tok"]),
                                  prefix=prefix)
    cfg = CrossTokenizerConfig(method=method, unmapped=unmapped)
    return CrossTokenizerKDObjective(LossSpec(divergence="forward_kl", **loss), cfg, mapping, cached), mapping


def _logits(s, batch):
    with torch.no_grad():
        st = s["student"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        te = s["teacher"](input_ids=batch["teacher_input_ids"],
                          attention_mask=batch["teacher_attention_mask"]).logits.double()
    return st, te


def test_rows_start_where_both_tokenizations_agree(setup):
    batch = _batch(setup)
    kinds = batch["xt_kind"].tolist()
    assert kinds.count(SAME) and kinds.count(CHAIN) and kinds.count(COARSER), kinds  # all occur here
    s_bytes, t_bytes = token_bytes(setup["student_tok"]), token_bytes(setup["teacher_tok"])
    for n, kind in enumerate(kinds):
        s_tok, t_tok = int(batch["xt_student_token"][n]), int(batch["xt_teacher_token"][n])
        b, tp = int(batch["xt_row"][n]), int(batch["xt_teacher_pos"][n])
        assert int(batch["teacher_input_ids"][b, tp + 1]) == t_tok
        if kind == SAME:
            assert s_bytes[s_tok] == t_bytes[t_tok]
        else:
            seg = batch["xt_chain_seg"] == n
            spelled = b"".join(t_bytes[int(t)] for t in batch["xt_chain_token"][seg])
            if kind == CHAIN:  # the chain's teacher tokens spell the student's token
                assert spelled == s_bytes[s_tok]
            else:  # COARSER: they reach past it (`0` `;#-` against `0;#`), only the last one does
                assert spelled.startswith(s_bytes[s_tok]) and len(spelled) > len(s_bytes[s_tok])
                assert len(spelled) - len(t_bytes[int(batch["xt_chain_token"][seg][-1])]) < len(s_bytes[s_tok])


def _reference_rows(setup, batch, mapping):
    """Per compared row, float64, plain loops: the student's probabilities ``q``, the teacher
    carried to student ids with the span mass moved (``{student id: mass}`` and the tail), and
    the teacher's unmapped entries (``{teacher id: mass}``) after that move."""
    st, te = _logits(setup, batch)
    m = mapping.teacher_to_student.tolist()
    for n in range(len(batch["xt_row"])):
        b = int(batch["xt_row"][n])
        q = torch.softmax(st[b, int(batch["xt_student_pos"][n])], -1)
        p = torch.softmax(te[b, int(batch["xt_teacher_pos"][n])], -1)
        mapped, tail, unmapped = {}, 0.0, {}
        for v, pv in enumerate(p.tolist()):
            if m[v] >= 0:
                mapped[m[v]] = mapped.get(m[v], 0.0) + pv
            else:
                tail += pv
                unmapped[v] = pv
        seg = (batch["xt_chain_seg"] == n).nonzero()[:, 0].tolist()
        if seg:
            mass = 1.0
            for j in seg:
                probs = torch.softmax(te[int(batch["xt_chain_row"][j]), int(batch["xt_chain_pos"][j])], -1)
                mass *= float(probs[int(batch["xt_chain_token"][j])])
            t1 = int(batch["xt_teacher_token"][n])
            src = m[t1]
            dst = int(batch["xt_student_token"][n])
            have = mapped.get(src, 0.0) if src >= 0 else tail
            moved = min(mass, have)
            if src >= 0:
                mapped[src] -= moved
            else:  # out of the tail: it was t1's unmapped mass, now the student token's
                tail -= moved
                unmapped[t1] -= min(moved, unmapped[t1])
            mapped[dst] = mapped.get(dst, 0.0) + moved
        yield q, mapped, tail, unmapped


def _reference_inside_ce(setup, batch, weight: float = 1.0) -> float:
    """``weight`` × Σ CE over the student's label tokens that start no compared row (inside a
    group), float64, plain loops; divided by the label tokens."""
    st, _ = _logits(setup, batch)
    rows = {(int(b), int(p)) for b, p in zip(batch["xt_row"], batch["xt_student_pos"], strict=True)}
    total, count = 0.0, 0
    for b in range(batch["labels"].shape[0]):
        for p in range(batch["labels"].shape[1] - 1):
            label = int(batch["labels"][b, p + 1])
            if label == -100:
                continue
            count += 1
            if (b, p) not in rows:
                total -= float(torch.log_softmax(st[b, p], -1)[label])
    return weight * total / count


def _reference_vocab_map(setup, batch, mapping, unmapped="tail_bucket") -> float:
    """Σ over compared rows of KL(teacher carried to student ids + moves ‖ student), the
    unmapped mass a bucket of its own on both sides (tail_bucket) or dropped with both sides
    renormalized over the mapped ids (renormalize), float64, plain loops; divided by the label
    tokens."""
    total = 0.0
    for q, mapped, tail, _ in _reference_rows(setup, batch, mapping):
        q_mapped = sum(float(q[i]) for i in mapped)
        if unmapped == "renormalize":
            p_mapped = sum(mapped.values())
            total += sum(pv / p_mapped * math.log((pv / p_mapped) / (float(q[i]) / q_mapped))
                         for i, pv in mapped.items() if pv > 0)
            continue
        kl = sum(pv * math.log(pv / float(q[i])) for i, pv in mapped.items() if pv > 0)
        if tail > 0:
            kl += tail * math.log(tail / (1.0 - q_mapped))
        total += kl
    return total / float((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("unmapped, prefix", [("tail_bucket", False), ("renormalize", False), ("renormalize", True)])
@pytest.mark.parametrize("student", ["merged", "split"])
def test_vocab_map_loss_equals_float64_reference(setup, student, unmapped, prefix):
    setup = _which(setup, student)
    batch = _batch(setup)
    objective, mapping = _objective(setup, "vocab_map", unmapped=unmapped, prefix=prefix)
    out = objective.loss(batch, setup["student"], setup["teacher"])
    loss = out.loss
    ref = _reference_vocab_map(setup, batch, mapping, unmapped) + _reference_inside_ce(setup, batch)
    assert out.count == float((batch["labels"][:, 1:] != -100).sum())
    assert abs(float(loss.detach()) - ref) < 1e-4 * max(1.0, ref), (float(loss), ref)


@pytest.mark.parametrize("student", ["merged", "split"])
def test_hybrid_loss_equals_float64_reference(setup, student):
    """vocab_map + ULD between the unmapped parts; mass moved from an unmapped first teacher
    token (``=-`` onto the student's ``=``) is the student token's, not unmapped any more."""
    s = _which(setup, student)
    batch = _batch(s)
    objective, mapping = _objective(s, "hybrid")
    out = objective.loss(batch, s["student"], s["teacher"])
    loss, metrics = out.loss, out.metrics
    free = (~mapping.student_mapped).nonzero()[:, 0].tolist()
    uld = 0.0
    for q, _, _, unmapped in _reference_rows(s, batch, mapping):
        a = sorted((float(q[v]) for v in free), reverse=True)
        b = sorted(unmapped.values(), reverse=True)
        width = max(len(a), len(b))
        uld += sum(abs(x - y) for x, y in zip(a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))))
    count = float((batch["labels"][:, 1:] != -100).sum())
    ref = _reference_vocab_map(s, batch, mapping) + uld / count + _reference_inside_ce(s, batch)
    assert abs(float(loss.detach()) - ref) < 1e-4 * max(1.0, ref), (float(loss), ref)
    assert metrics["kd/uld"] == pytest.approx(uld / len(batch["xt_row"]), rel=1e-4, abs=1e-7)
    if student == "split":
        kinds = batch["xt_kind"].tolist()
        assert kinds.count(COARSER) >= 1 and not kinds.count(CHAIN), kinds


@pytest.mark.parametrize("method", ["vocab_map", "uld", "hybrid"])
def test_kd_ratio_splits_plain_ce_from_distillation(setup, method):
    """kd_ratio 0 is SFT exactly, whatever the method (ULD too); kd_ratio r is (1 − r)·CE plus
    r × the pure distillation loss (which holds the CE of tokens inside groups)."""
    s = _which(setup, "split")
    batch = _batch(s)
    st, _ = _logits(s, batch)
    targets, mask = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    sft = float(torch.nn.functional.cross_entropy(st[:, :-1][mask], targets[mask]))
    loss = {r: float(_objective(s, method, kd_ratio=r)[0].loss(batch, s["student"], s["teacher"]).loss.detach())
            for r in (0.0, 0.5)}
    pure = float(_objective(s, method)[0].loss(batch, s["student"], s["teacher"]).loss.detach())
    assert abs(loss[0.0] - sft) < 1e-5 * sft
    assert abs(loss[0.5] - (0.5 * sft + 0.5 * pure)) < 1e-5 * pure
    assert abs(pure - sft) > 1e-3  # the distillation part is not the CE in disguise


def test_uld_loss_equals_float64_reference(setup):
    batch = _batch(setup)
    objective, _ = _objective(setup, "uld")
    loss = objective.loss(batch, setup["student"], setup["teacher"]).loss
    st, te = _logits(setup, batch)
    total = 0.0
    for n in range(len(batch["xt_row"])):
        b = int(batch["xt_row"][n])
        q = sorted(torch.softmax(st[b, int(batch["xt_student_pos"][n])], -1).tolist(), reverse=True)
        p = sorted(torch.softmax(te[b, int(batch["xt_teacher_pos"][n])], -1).tolist(), reverse=True)
        width = max(len(p), len(q))
        total += sum(abs(a - c) for a, c in zip(q + [0.0] * (width - len(q)), p + [0.0] * (width - len(p))))
    ref = total / float((batch["labels"][:, 1:] != -100).sum()) + _reference_inside_ce(setup, batch)
    assert abs(float(loss.detach()) - ref) < 1e-5 * max(1.0, ref)


def test_split_batches_weighted_by_count_give_the_same_loss(setup):
    """The loop weights micro-batches by ``count``: two halves must average to the whole."""
    objective, _ = _objective(setup, "hybrid", kd_ratio=0.5)
    whole = objective.loss(_batch(setup, 8), setup["student"], setup["teacher"])
    ds = CrossTokenizerDataset(setup["records"][:8], setup["student_tok"], setup["teacher_tok"], MAX_LEN)
    collate = CrossTokenizerCollator(setup["student_tok"].pad_token_id, teacher_pad_id=setup["teacher_tok"].pad_token_id)
    parts = [objective.loss(collate([ds[i] for i in idx]), setup["student"], setup["teacher"])
             for idx in (range(0, 3), range(3, 8))]
    combined = sum(float(part.loss.detach()) * part.count for part in parts) / whole.count
    assert abs(combined - float(whole.loss.detach())) < 1e-5


def test_cached_teacher_matches_live(setup):
    root = setup["root"]
    cfg = CaptureConfig(output_dir=str(root / "cache"), data=DataConfig(path=str(setup["data"])),
                        teacher=TeacherConfig(model=str(root / "teacher"), device="cpu", dtype="float32"),
                        k=len(setup["teacher_tok"]), max_seq_len=MAX_LEN, offsets=True)
    manifest = run_capture(cfg, show_progress=False)
    assert manifest.extra["tokenizer"] == str(root / "teacher")
    cache = LogitCache(cfg.output_dir)
    batch = _batch(setup, cache=cache)
    live = _objective(setup, "hybrid")[0].loss(batch, setup["student"], setup["teacher"]).loss
    cached = _objective(setup, "hybrid", cached=True)[0].loss(batch, setup["student"], None).loss
    # the codec keeps each position within 5e-4 nats of the true distribution
    assert abs(float(cached.detach()) - float(live.detach())) < 2e-3 * max(1.0, float(live.detach()))
    plain = CaptureConfig(**{**cfg.model_dump(), "output_dir": str(root / "cache_plain"), "offsets": False})
    run_capture(plain, show_progress=False)
    with pytest.raises(CacheMismatchError, match="offsets"):
        _batch(setup, cache=LogitCache(plain.output_dir))


def _job(setup, out, cross, steps=30):
    objective = {"name": "logit_kd", "loss": LossSpec(divergence="forward_kl", kd_ratio=0.9),
                 "cross_tokenizer": cross}
    train = TrainConfig(objective=objective, steps=steps, batch_size=8, lr=3e-3, warmup_steps=2,
                        max_seq_len=MAX_LEN, log_every=1)
    return TrainJobConfig(output_dir=str(out), model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2),
                          tokenizer={"path": str(setup["student_tok_dir"])},
                          teacher=ModelConfig(path=str(setup["root"] / "teacher"), device="cpu"),
                          data=DataConfig(path=str(setup["data"])), train=train)


def test_job_trains_across_tokenizers_and_refuses_without_the_config(setup, tmp_path):
    with pytest.raises(VocabMismatchError, match="cross_tokenizer"):
        run_train_job(_job(setup, tmp_path / "refused", None), show_progress=False)
    out = tmp_path / "student"
    run_train_job(_job(setup, out, CrossTokenizerConfig(method="hybrid")), show_progress=False)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    kd = [row["kd/forward_kl"] for row in log if "kd/forward_kl" in row]
    assert np.mean(kd[-5:]) < 0.8 * np.mean(kd[:5]), kd
    assert load_tokenizer(str(out)).get_vocab() == setup["student_tok"].get_vocab()
