"""``distillery train``: data → tokenizer → model → training loop → a saved HF directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from distillery.config import DataConfig, TrainJobConfig
from distillery.logits.cache import LogitCache
from distillery.models import build_model, load_model, load_tokenizer, save_model, train_tokenizer
from distillery.records import ground_truth_records, read_jsonl, validate_sft_records
from distillery.tasks import load_problems
from distillery.train.cached import CachedCollator, CachedSFTDataset
from distillery.train.data import Collator, SFTDataset
from distillery.train.loop import TrainResult, train_loop
from distillery.train.objectives import build_objective

console = Console(stderr=True)


def load_training_records(data: DataConfig) -> list[dict]:
    """SFT records from a JSONL file, or generated from the task with ground-truth targets."""
    if data.path is not None:
        records = read_jsonl(data.path)
        validate_sft_records(records, data.path)
        return records[: data.num_examples]
    assert data.task is not None
    problems = load_problems(data.task, "train", data.num_examples, seed=data.seed)
    return ground_truth_records(problems, data.target)


def run_train_job(cfg: TrainJobConfig, show_progress: bool = True) -> TrainResult:
    """Train the configured model and save it (weights, tokenizer, distillery.json) atomically."""
    records = load_training_records(cfg.data)
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path, trust_remote_code=cfg.model.trust_remote_code)
    elif cfg.model.path:
        tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    else:
        texts = (m["content"] for r in records for m in r["messages"])
        tokenizer = train_tokenizer(texts, vocab_size=cfg.tokenizer.vocab_size)
    model = load_model(cfg.model) if cfg.model.path else build_model(cfg.model, tokenizer)
    teacher = load_model(cfg.teacher) if cfg.teacher is not None else None

    if cfg.teacher_cache is not None:
        cache = LogitCache(cfg.teacher_cache)
        dataset = CachedSFTDataset(records, tokenizer, cfg.train.max_seq_len, cache)
        collator = CachedCollator(tokenizer.pad_token_id, k=cache.manifest.k)
    else:
        dataset = SFTDataset(records, tokenizer, cfg.train.max_seq_len)
        collator = Collator(tokenizer.pad_token_id)
    objective = build_objective(cfg.train, student=model, teacher=teacher, cached=cfg.teacher_cache is not None)
    out = Path(cfg.output_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    console.print(f"training {cfg.train.objective} on {len(dataset)} records for {cfg.train.steps} steps")
    result = train_loop(model, objective, dataset, collator, cfg.train,
                        teacher=teacher, log_path=tmp / "train_log.jsonl", show_progress=show_progress)
    meta = {"config": cfg.model_dump(mode="json"), "steps": result.steps, "seconds": result.seconds,
            "final_loss": result.final_loss, "task": cfg.data.task.model_dump(mode="json") if cfg.data.task else None}
    save_model(model, tokenizer, tmp, meta=meta)
    # replace the old output only once the new one is complete
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    console.print(f"saved {out} (final loss {result.final_loss:.4f}, {result.seconds:.0f}s)")
    return result
