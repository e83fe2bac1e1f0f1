"""Shared fixtures: a tiny tokenizer and tiny Llama models, built locally (no downloads)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory, monkeypatch):
    """Fast tests never write into the user's cache folder (~/.cache/distillery: converted models,
    vocabulary mappings); the slow real-model tests use it, so conversions are reused."""
    if request.node.get_closest_marker("slow") is None and "DISTILLERY_CACHE" not in os.environ:
        monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path_factory.getbasetemp() / "distillery_cache"))


@pytest.fixture(scope="session")
def task_cfg():
    from distillery.config import TaskConfig

    return TaskConfig(num_operands=2, digits=(1, 2), operations=["+", "-"])


@pytest.fixture(scope="session")
def tiny_tokenizer(task_cfg):
    from distillery.models import train_tokenizer
    from distillery.tasks import load_problems

    problems = load_problems(task_cfg, "train", 300, seed=0)
    return train_tokenizer((p.prompt + " " + p.chain for p in problems), vocab_size=300)


@pytest.fixture(scope="session")
def merging_tokenizer_dir(tmp_path_factory, task_cfg):
    """A saved student tokenizer unlike ``tiny_tokenizer`` (unigram, digits allowed to merge), so
    the single-digit teacher spells some student tokens as chains: the cross-tokenizer tests'."""
    from distillery.models import train_tokenizer
    from distillery.records import ground_truth_records
    from distillery.tasks import load_problems

    texts = [m["content"] for r in ground_truth_records(load_problems(task_cfg, "train", 400, seed=1), "chain")
             for m in r["messages"]]
    out = tmp_path_factory.mktemp("merging_tokenizer")
    train_tokenizer(texts, vocab_size=300, algorithm="unigram", split_digits=False).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved 1-layer Llama (random init) with its tokenizer: loaded like a user's model."""
    import torch

    from distillery.config import ModelConfig
    from distillery.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu"), tiny_tokenizer)
    return save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def demo_teacher():
    """The shipped demo teacher (assets/demo_teacher): ~98% on 3-operand +/- arithmetic."""
    from distillery.teachers import HFTeacher

    return HFTeacher.from_pretrained("assets/demo_teacher", device="cpu")


@pytest.fixture(scope="session")
def tiny_teacher(tiny_model_dir):
    """The random tiny model as a teacher: garbage text, deterministic under greedy decoding."""
    from distillery.teachers import HFTeacher

    return HFTeacher.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread runs them ~10× faster than
    two contended ones. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def label_plainly(problems, teacher, params, out_path, show_progress: bool = False):
    """Label problems as the demo's generate section does (labeling, the task's turns as they
    are, the teacher's text kept whatever it says) into ``out_path``; returns its path."""
    from pathlib import Path

    from distillery.elicit.labeling import LabelingConfig, run_labeling
    from distillery.elicit.seeds import task_seeds

    out_path = Path(out_path)
    cfg = LabelingConfig(chain_of_thought=False, require_answer=False, drop_truncated=False)
    path, _ = run_labeling(task_seeds(problems), teacher, cfg, params, out_path.parent,
                           phase=out_path.name.removesuffix(".jsonl"), show_progress=show_progress)
    return path


def tiny_train_job(tmp_path, **sections):
    """A `distillery train` config for a 1-layer model on 16 arithmetic problems, written to
    ``tmp_path/train.yaml`` (top-level ``sections`` replace the defaults'); returns its path."""
    import yaml

    cfg = {
        "output_dir": str(tmp_path / "out"),
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64,
                  "device": "cpu"},
        "tokenizer": {"vocab_size": 300},
        "data": {"task": {"name": "arithmetic", "num_operands": 2, "digits": [1, 2]}, "num_examples": 16},
        "train": {"objective": "sft", "steps": 2, "batch_size": 4, "max_seq_len": 48},
        **sections,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
