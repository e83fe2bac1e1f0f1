"""``logit_kd`` across tokenizers: data and batches (``train.objective.cross_tokenizer``; the objective
is :class:`distillery.train.objectives.logit_kd.CrossTokenizerKDObjective`).

Each record is tokenized twice, by the student and by the teacher, each with its own chat
template (:func:`~distillery.train.alignment.align_messages`). Inside assistant turns the two
token sequences are cut into groups that cover the same characters; the start of a group is a
point where both models predict "the next token" after the very same text, so their next-token
distributions are comparable there. One compared row per group:

* the student's distribution at the position before its first token of the group, ``[N, Vs]``;
* the teacher's at the position before its first token, ``[N, Vt]`` (live), or its cached top-k;
* a mass move (``kind``) where the two first tokens differ in length:
  ``CHAIN`` — the teacher spells the student's single token as several tokens t1…tc: the chain
  probability P(t1)·P(t2|t1)·… is the teacher's probability of the student's token and moves
  from t1's entry to it; ``COARSER`` — the teacher's tokens t1…tc reach past the student's
  token (t1 itself, as ``=-`` against ``=`` ``-``, or a later one, as ``0`` ``;#-`` against
  ``0;#`` ``-``): the text they spell begins with the student's token, so their chain
  probability is part of the student token's probability (a lower bound of it) and moves there.
  ``SAME`` moves nothing.

The loss is ``(ce_weight · Σ_tokens CE + kd_weight · Σ_inside CE + Σ_rows Σ_i w_i D_i) / label
tokens``: a mean over the student's label tokens (the loop's ``count``), so any split over
micro-batches or processes takes the same step. A student token inside a group (after its first
token: the student's ``-`` of the teacher's ``=-``) has no teacher distribution conditioned on the
same text; there the text stands in for the teacher, and the token's CE takes the divergences'
weight too (``kd_weight``, before T²), so every label token carries the same total weight as under
same-tokenizer ``logit_kd`` (on the demo task these tokens are the sign of every negative result).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distillery.logits.cache import CacheMismatchError, LogitCache, stored_positions
from distillery.train.alignment import AlignedExample, align_messages, group_starts
from distillery.train.data import Collator, report_truncation

SAME, CHAIN, COARSER = 0, 1, 2


def compared_rows(ex: AlignedExample) -> dict[str, list]:
    """One row per alignment group whose first tokens both have a position before them.

    Returns lists of length N: ``student_pos``/``teacher_pos`` (the logit position that predicts
    the group's first token: its index − 1), ``student_token``/``teacher_token`` (those first
    tokens), ``kind`` (SAME, CHAIN, COARSER) and ``chain`` (the teacher token indices t1…tc
    whose probabilities multiply into the mass moved to the student's first token; empty for SAME).
    """
    starts = group_starts(ex)
    rows: dict[str, list] = {k: [] for k in ("student_pos", "teacher_pos", "student_token",
                                              "teacher_token", "kind", "chain")}
    for s1, t1, end, exact, tok in zip(starts["student_pos"], starts["teacher_pos"], starts["teacher_chain_end"],
                                       starts["teacher_chain_exact"], starts["student_token"]):
        if s1 < 1 or t1 < 1:
            continue
        if exact and end == t1:
            kind, chain = SAME, []
        elif exact:  # the teacher spells the student's token as t1..end
            kind, chain = CHAIN, list(range(t1, end + 1))
        else:  # t1..end reach past the student's token: their chain is part of its probability
            kind, chain = COARSER, list(range(t1, end + 1))
        rows["student_pos"].append(s1 - 1)
        rows["teacher_pos"].append(t1 - 1)
        rows["student_token"].append(tok)
        rows["teacher_token"].append(ex.teacher_input_ids[t1])
        rows["kind"].append(kind)
        rows["chain"].append(chain)
    return rows


class CrossTokenizerDataset(torch.utils.data.Dataset):
    """Records tokenized by both tokenizers and aligned, once, up front.

    With a ``cache`` (captured with the teacher's tokenizer and ``offsets``), every record must
    be in it; its teacher rows are read lazily, and each is checked against the alignment's
    tokens and character offsets as it is read, so a cache made from other text or another
    tokenizer is refused rather than misaligned.
    """

    def __init__(self, records: list[dict], student_tok: PreTrainedTokenizerBase,
                 teacher_tok: PreTrainedTokenizerBase, max_len: int, cache: LogitCache | None = None) -> None:
        self.items: list[dict] = []
        self.cache = cache
        cut = []
        for r in records:
            ex = align_messages(r["messages"], student_tok, teacher_tok, max_len)
            if len(ex.student_input_ids) >= max_len:  # the alignment keeps no uncut length
                cut.append(max_len)
            if not any(label != -100 for label in ex.student_labels):
                continue
            rows = compared_rows(ex)
            item = {"input_ids": ex.student_input_ids, "labels": ex.student_labels,
                    "teacher_input_ids": ex.teacher_input_ids, "rows": rows, "id": r.get("id")}
            if cache is not None:
                if r["id"] not in cache:
                    raise CacheMismatchError(f"record {r['id']!r} is not in the logit cache {cache.dir}: "
                                             "capture this dataset with the teacher's tokenizer")
                item.update(teacher_positions=stored_positions(ex.teacher_labels),
                            teacher_offsets=ex.teacher_offsets)
            self.items.append(item)
        report_truncation(len(records), cut, len(records) - len(self.items), max_len)

    def _checked(self, item: dict) -> object:
        """The cached example of ``item``, decoded once and checked against the alignment's
        teacher tokens and offsets (lazily, as :class:`~distillery.train.cached.CachedSFTDataset`)."""
        rid, cached = item["id"], self.cache[item["id"]]
        if not np.array_equal(cached.token_ids, np.asarray(item["teacher_input_ids"])):
            raise CacheMismatchError(
                f"record {rid!r}: the cached tokens differ from the teacher tokenizer's "
                f"({len(cached.token_ids)} vs {len(item['teacher_input_ids'])} tokens): the cache was "
                "captured from other text, another tokenizer or another max_seq_len")
        if cached.offsets is None:
            raise CacheMismatchError(f"logit cache {self.cache.dir} holds no token offsets: capture "
                                     "it again with capture.offsets: true for a cross-tokenizer student")
        if not np.array_equal(cached.offsets, np.asarray(item["teacher_offsets"])):
            raise CacheMismatchError(f"record {rid!r}: the cached teacher offsets differ from the "
                                     "alignment's (another tokenizer or chat template)")
        return cached

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        if self.cache is None:
            return item
        return {**item, "teacher": _cached_rows(self._checked(item), item)}


def _cached_rows(ex: object, item: dict) -> dict[str, np.ndarray]:
    """The cached teacher top-k at the compared positions and each row's log mass to move.

    A chain member whose actual token is outside the cached top-k has an unknown probability
    (below the k-th): its chain moves nothing (log mass −inf).
    """
    row_of = {int(p): j for j, p in enumerate(item["teacher_positions"])}
    rows, tokens = item["rows"], item["teacher_input_ids"]
    idx = [row_of[p] for p in rows["teacher_pos"]]
    log_mass = np.full(len(idx), -np.inf)
    for n, chain in enumerate(rows["chain"]):
        total = 0.0
        for j in chain:
            r = row_of[j - 1]
            hit = np.nonzero(ex.ids[r] == tokens[j])[0]
            total = total + (float(ex.logprobs[r][hit[0]]) if len(hit) else -np.inf)
        if chain:
            log_mass[n] = total
    return {"ids": ex.ids[idx], "logprobs": ex.logprobs[idx], "log_tail": ex.log_tail[idx],
            "log_mass": log_mass}


@dataclass
class CrossTokenizerCollator(Collator):
    """Pads the student side as :class:`Collator`, the teacher's ids with its own pad id, and
    flattens the compared rows of the batch: ``xt_*`` tensors of length N (rows of all items),
    plus, for a cached teacher, ``xt_teacher_ids/logprobs [N, k]``, ``xt_teacher_log_tail`` and
    ``xt_log_mass [N]``; for a live one the chain members ``xt_chain_{row,pos,token,seg} [M]``."""

    teacher_pad_id: int = 0

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])
        width = max(len(it["teacher_input_ids"]) for it in items)
        t_ids = torch.full((len(items), width), self.teacher_pad_id, dtype=torch.long)
        t_mask = torch.zeros((len(items), width), dtype=torch.long)
        flat: dict[str, list] = {k: [] for k in ("row", "student_pos", "teacher_pos", "student_token",
                                                  "teacher_token", "kind")}
        chain: dict[str, list] = {k: [] for k in ("row", "pos", "token", "seg")}
        for b, it in enumerate(items):
            ids = it["teacher_input_ids"]
            t_ids[b, : len(ids)] = torch.as_tensor(ids)
            t_mask[b, : len(ids)] = 1
            rows = it["rows"]
            for n in range(len(rows["kind"])):
                seg = len(flat["row"])
                flat["row"].append(b)
                for k in ("student_pos", "teacher_pos", "student_token", "teacher_token", "kind"):
                    flat[k].append(rows[k][n])
                for j in rows["chain"][n]:
                    chain["row"].append(b)
                    chain["pos"].append(j - 1)
                    chain["token"].append(ids[j])
                    chain["seg"].append(seg)
        batch.update(teacher_input_ids=t_ids, teacher_attention_mask=t_mask)
        batch.update({f"xt_{k}": torch.as_tensor(v, dtype=torch.long) for k, v in flat.items()})
        batch.update({f"xt_chain_{k}": torch.as_tensor(v, dtype=torch.long) for k, v in chain.items()})
        if "teacher" in items[0]:
            cat = {k: np.concatenate([it["teacher"][k] for it in items]) for k in items[0]["teacher"]}
            batch.update(xt_teacher_ids=torch.as_tensor(cat["ids"], dtype=torch.long),
                         xt_teacher_logprobs=torch.as_tensor(cat["logprobs"], dtype=torch.float32),
                         xt_teacher_log_tail=torch.as_tensor(cat["log_tail"], dtype=torch.float32),
                         xt_log_mass=torch.as_tensor(cat["log_mass"], dtype=torch.float32))
        return batch
