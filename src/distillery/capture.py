"""``distillery capture``, a stage: the teacher's top-k next-token distributions over a dataset, on disk.

It runs a teacher, so it sits with elicit/train/evaluate above models and teachers; the on-disk
format and the cache directory it writes (:mod:`distillery.logits`) are core, read by training.

Each record is tokenized exactly as training tokenizes it (the student's tokenizer, its chat
template, ``max_seq_len``). The teacher then scores the sequence, and the cache keeps one row per
position the student learns from: position ``t`` is stored when ``labels[t + 1]`` is an
assistant token, holding the teacher's top-k distribution of ``input_ids[t + 1]`` given
``input_ids[:t + 1]``. Prompt positions are never trained on, so they are not stored.

Shards are written atomically every ``shard_size`` examples; a killed capture resumes from the
complete shards (see :class:`~distillery.logits.cache.CacheWriter`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distillery.chat import content_offsets, tokenize_messages
from distillery.config import CaptureConfig
from distillery.errors import DistilleryError
from distillery.logits.cache import CacheWriter, Manifest, stored_positions, tokenizer_hash
from distillery.logits.format import TopKExample
from distillery.models import load_tokenizer
from distillery.tasks import load_records
from distillery.teachers import build_teacher

console = Console(stderr=True)


class CaptureError(DistilleryError, ValueError):
    """A capture config that cannot work (k larger than the vocabulary, a backend without log-probs)."""


def _examples(records: list[dict], tokenizer, max_len: int, done: set[str], offsets: bool) -> Iterator[tuple]:  # noqa: ANN001
    for rec in records:
        if rec["id"] in done:
            continue
        item = tokenize_messages(rec["messages"], tokenizer, max_len)
        positions = stored_positions(item["labels"])
        if len(positions):
            spans = content_offsets(rec["messages"], tokenizer, max_len) if offsets else None
            yield rec["id"], item["input_ids"], positions, spans


def _records_fingerprint(records: list[dict]) -> str:
    """sha256 over every record's id and messages, in id order: a cache resumed with records
    edited, added or removed under the same output_dir is refused instead of mixing old teacher
    rows with new text."""
    h = hashlib.sha256()
    for rid, msgs in sorted(((str(r["id"]), r["messages"]) for r in records), key=lambda x: x[0]):
        h.update(json.dumps([rid, msgs], sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def run_capture(cfg: CaptureConfig, show_progress: bool = True) -> Manifest:
    """Capture ``cfg.data`` through ``cfg.teacher`` into ``cfg.output_dir``; resumes a killed run."""
    records = load_records(cfg.data)
    tok_source = cfg.tokenizer or cfg.teacher.model
    tokenizer = load_tokenizer(tok_source, trust_remote_code=cfg.teacher.trust_remote_code)
    if cfg.k > len(tokenizer):
        raise CaptureError(f"capture k={cfg.k} exceeds the vocabulary ({len(tokenizer)} tokens of "
                         f"{tok_source}): use k <= {len(tokenizer)} (k = the vocabulary size stores "
                         "the whole distribution)")
    teacher = build_teacher(cfg.teacher)
    if not hasattr(teacher, "logprobs"):
        raise CaptureError(f"teacher backend {cfg.teacher.backend!r} cannot return log-probs: "
                           "capture with backend hf or openai")
    teacher_vocab = getattr(teacher, "vocab_size", None)  # unknown for a server teacher
    if teacher_vocab is not None and len(tokenizer) > teacher_vocab:
        raise CaptureError(
            f"the tokenizer {tok_source} has {len(tokenizer)} tokens, more than the vocabulary of "
            f"teacher {cfg.teacher.model} ({teacher_vocab}): the teacher scores the tokenizer's "
            "ids, so it must be the teacher's own (or share its ids). For a student with another "
            "tokenizer, drop `tokenizer` (capture with the teacher's) and set `offsets: true`; the "
            "student then trains with train.objective.cross_tokenizer")
    writer = CacheWriter(cfg.output_dir, teacher=teacher.name, tokenizer_hash=tokenizer_hash(tokenizer),
                         k=cfg.k, temperature=cfg.temperature, vocab_size=len(tokenizer),
                         shard_size=cfg.shard_size,
                         source={"records": _records_fingerprint(records), "count": len(records),
                                 "max_seq_len": cfg.max_seq_len, "offsets": cfg.offsets})
    done = writer.done_ids()
    todo = list(_examples(records, tokenizer, cfg.max_seq_len, done, cfg.offsets))
    batch = cfg.teacher.batch_size
    t0, cpu0, tokens, seq_tokens = time.perf_counter(), time.process_time(), 0, 0
    columns = (TextColumn("[bold]capture"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        bar = progress.add_task("capture", total=len(done) + len(todo), completed=len(done), rate="")
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            tops = teacher.logprobs([ids for _, ids, _, _ in chunk], cfg.k, temperature=cfg.temperature)
            for (rid, ids, positions, spans), top in zip(chunk, tops):
                writer.add(TopKExample(
                    id=rid, token_ids=np.asarray(ids, dtype=np.int64),
                    ids=top.ids[positions].numpy(), logprobs=top.logprobs[positions].numpy(),
                    log_tail=top.log_tail[positions].numpy(), offsets=spans))
                tokens += len(positions)
                seq_tokens += len(ids)
            dt = time.perf_counter() - t0
            progress.update(bar, advance=len(chunk), rate=f"{tokens / max(dt, 1e-9):.0f} positions/s")
    # this run's work and time (teacher, codec and disk; not the model load) go into the manifest;
    # CPU seconds, unlike wall time, are not inflated by other jobs on the machine
    writer.flush()
    run = {"records": len(todo), "resumed": len(done), "positions": tokens,
           "sequence_tokens": seq_tokens, "seconds": round(time.perf_counter() - t0, 3),
           "cpu_seconds": round(time.process_time() - cpu0, 3)}
    # the tokenizer's source: a cross-tokenizer student re-tokenizes the records with it
    manifest = writer.finish(extra={"tokenizer": tok_source, "offsets": cfg.offsets, "last_run": run})
    console.print(summary_line(manifest, cfg.output_dir), highlight=False, soft_wrap=True)
    return manifest


def summary_line(manifest: Manifest, out_dir: str) -> str:
    """What ``distillery capture`` prints last: the run's records, stored positions and
    throughput (``manifest.extra["last_run"]``), and the whole cache's size per stored position
    (the figure that scales with the data: prompt tokens are not stored)."""
    run = manifest.extra["last_run"]
    dt = max(run["seconds"], 1e-9)
    return (f"captured {run['records']} records ({run['resumed']} more from an earlier run) into "
            f"{out_dir}: k={manifest.k}, {run['positions']} stored positions of "
            f"{run['sequence_tokens']} sequence tokens in {run['seconds']:.1f} s "
            f"({run['positions'] / dt:.0f} positions/s, {run['sequence_tokens'] / dt:.0f} teacher "
            f"tok/s); cache: {manifest.count} records, {manifest.positions} stored positions, "
            f"{manifest.nbytes / 1e6:.2f} MB, {manifest.bytes_per_position:.1f} bytes per stored position")
