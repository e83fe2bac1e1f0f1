"""Every objective through `run_train_job`, the path a user's config takes: it trains (the
loss falls), saves a plain HF directory that reloads, and the shipped recipes validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillery.config import TrainJobConfig, load_config
from distillery.records import write_jsonl_atomic
from distillery.train.job import run_train_job

pytestmark = pytest.mark.filterwarnings("ignore")

TASK = {"name": "arithmetic", "num_operands": 2, "digits": [1, 2]}
SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64, "device": "cpu"}


def _job(tmp_path: Path, name: str, **sections) -> TrainJobConfig:
    base = {"output_dir": str(tmp_path / name), "model": SMALL,
            "data": {"task": TASK, "num_examples": 128, "target": "chain"}}
    train = {"steps": 24, "batch_size": 8, "warmup_steps": 2, "max_seq_len": 48, "log_every": 4, "lr": 1e-2,
             **sections.pop("train", {})}
    return TrainJobConfig.model_validate({**base, **sections, "train": train})


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _reloads(out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no distillery, no peft
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return Path("assets/demo_teacher").resolve()


def test_on_policy_gkd_and_minillm(tmp_path, teacher_dir):
    for variant in ("gkd", "minillm"):
        cfg = _job(tmp_path, variant, tokenizer={"path": str(teacher_dir)},
                   teacher={"path": str(teacher_dir), "device": "cpu"},
                   train={"objective": {"name": "on_policy", "variant": variant, "max_new_tokens": 12},
                          "steps": 12})
        result = run_train_job(cfg, show_progress=False)
        log = _log(tmp_path / variant)
        div = "kd/jsd" if variant == "gkd" else "kd/reverse_kl"
        assert log[-1][div] < log[0][div]
        assert any(r["on_policy"] == 1.0 for r in log)
        if variant == "minillm":
            assert all(r["on_policy"] == 1.0 for r in log)
        assert result.final_loss == pytest.approx(log[-1]["loss"])
        _reloads(tmp_path / variant)


def test_preference_dpo_from_records(tmp_path, teacher_dir):
    pairs = []
    for i, (a, b) in enumerate([(12, 7), (40, 3), (9, 9), (21, 30), (5, 8), (33, 11), (2, 2), (17, 6)]):
        prompt = [{"role": "user", "content": f"{a}+{b}"}]
        pairs.append({"id": f"p{i}", "prompt": prompt,
                      "chosen": [{"role": "assistant", "content": f"{a}+{b}={a + b};#{a + b}"}],
                      "rejected": [{"role": "assistant", "content": f"#{a + b + 7}"}]})
    write_jsonl_atomic(tmp_path / "prefs.jsonl", pairs)
    cfg = _job(tmp_path, "dpo", model={"path": str(teacher_dir), "device": "cpu"},
               data={"path": str(tmp_path / "prefs.jsonl")},
               train={"objective": "preference", "lr": 2e-3, "steps": 12, "batch_size": 4,
                      "lora": {"r": 4, "alpha": 8, "merge": True}})
    run_train_job(cfg, show_progress=False)
    log = _log(tmp_path / "dpo")
    assert log[-1]["rewards/margin"] > log[0]["rewards/margin"] + 0.1
    _reloads(tmp_path / "dpo")


def test_reward_verifier(tmp_path, teacher_dir):
    cfg = _job(tmp_path, "grpo", model={"path": str(teacher_dir), "device": "cpu"},
               data={"task": {**TASK, "num_operands": 3}, "num_examples": 64, "target": "chain"},
               train={"objective": {"name": "reward", "source": "verifier", "group_size": 4,
                                    "max_new_tokens": 24},
                      "steps": 3, "batch_size": 4, "lr": 1e-5})
    run_train_job(cfg, show_progress=False)
    log = _log(tmp_path / "grpo")
    assert 0.0 <= log[-1]["reward/mean"] <= 1.0
    assert log[-1]["gen_tokens"] > 0


def test_lora_packing_checkpointing_and_teacher_finetune(tmp_path, teacher_dir):
    """The torchtune blog's pipeline in small: fine-tune the teacher (LoRA, merged), then
    logit-KD a LoRA student with packed rows and gradient checkpointing."""
    cfg = _job(tmp_path, "kd", model={"path": str(teacher_dir), "device": "cpu"},
               teacher={"path": str(teacher_dir), "device": "cpu"},
               teacher_finetune={"objective": "sft", "steps": 4, "batch_size": 8, "warmup_steps": 1,
                                 "max_seq_len": 48, "lora": {"r": 4}},
               train={"objective": {"name": "logit_kd", "kd_ratio": 0.5}, "lr": 1e-3, "packing": True,
                      "gradient_checkpointing": True, "lora": {"r": 8, "alpha": 16, "merge": True}})
    run_train_job(cfg, show_progress=False)
    assert (tmp_path / "kd.teacher_ft" / "model.safetensors").exists()
    log = _log(tmp_path / "kd")
    assert log[-1]["loss"] < log[0]["loss"]
    _reloads(tmp_path / "kd")
    # merged student = base + B·A·(alpha/r): it moved away from the base it started as
    base = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "kd")
    q0 = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q0, tuned.model.layers[0].self_attn.q_proj.weight)


RECIPES = sorted(Path("configs/recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_validate(path):
    """Every recipe loads through the config loader (the models are not downloaded here)."""
    from distillery.cli import _guess_kind
    from distillery.config import CaptureConfig
    from distillery.elicit.config import GenerateJobConfig

    kind = _guess_kind(str(path))
    schema = {"train": TrainJobConfig, "generate": GenerateJobConfig}.get(kind, CaptureConfig)
    if "capture" in path.stem:
        schema = CaptureConfig
    load_config(path, schema)


ACCELERATE = sorted(Path("configs/accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.stem for p in ACCELERATE])
def test_accelerate_configs_load(path):
    """accelerate's own loader reads each launch config (DDP, FSDP2, DeepSpeed ZeRO-2/3)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes > 1 and cfg.distributed_type.name in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
