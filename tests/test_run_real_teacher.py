"""`distillery run` with a real-LLM teacher: a GGUF converted once into the cache, a LoRA adapter
merged on top (`teacher.gguf`, `teacher.adapter`), and `train.steps: 0` students (a pruned model,
untrained, as a baseline row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM  # noqa: E402

from distillery.config import ModelConfig, TrainJobConfig  # noqa: E402
from distillery.models import build_model, save_model  # noqa: E402
from distillery.pipeline import prepare_teacher  # noqa: E402
from distillery.run_config import RunConfig  # noqa: E402
from distillery.train.job import run_train_job  # noqa: E402
from test_convert import write_tiny_gguf  # noqa: E402


def _adapter(base_dir: Path, out: Path) -> None:
    """A LoRA adapter on every linear layer of the model in ``base_dir``, with non-zero B (a
    freshly initialised adapter is the identity and would prove nothing)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = peft.get_peft_model(base, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)


def _run_cfg(tmp_path: Path, teacher: dict) -> RunConfig:
    return RunConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "task": {"num_operands": 2, "digits": 1},
        "teacher": teacher,
        "students": {"s": {"model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
                           "train": {"steps": 0}}},
    })


def test_gguf_teacher_is_converted_once_and_the_adapter_merged(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file, np.float32)
    cfg = _run_cfg(tmp_path, {"gguf": str(gguf_file)})
    base_dir, base_fp = prepare_teacher(cfg, Path(cfg.run_dir))
    assert base_dir.parent == tmp_path / "cache" / "converted"
    stamp = (base_dir / "model.safetensors").stat().st_mtime_ns

    _adapter(base_dir, tmp_path / "adapter")
    cfg = _run_cfg(tmp_path, {"gguf": str(gguf_file), "adapter": str(tmp_path / "adapter")})
    teacher_dir, fp = prepare_teacher(cfg, Path(cfg.run_dir))
    assert teacher_dir == Path(cfg.run_dir) / "teacher" and fp != base_fp
    # the cache entry was reused, not converted again
    assert (base_dir / "model.safetensors").stat().st_mtime_ns == stamp

    ids = torch.tensor([[3, 17, 40, 5, 90, 2]])
    reference = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64)
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    with torch.no_grad():
        want, got, before = (m(ids).logits for m in (reference, merged, plain))
    assert (want - before).abs().max() > 1e-2  # the adapter changes the model
    assert (got - want).abs().max() < 1e-4  # float32 weights, float64 compute

    # a second run merges nothing: same directory, same fingerprint
    stamp = (teacher_dir / "model.safetensors").stat().st_mtime_ns
    again, fp2 = prepare_teacher(cfg, Path(cfg.run_dir))
    assert (again, fp2) == (teacher_dir, fp)
    assert (teacher_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_an_adapter_for_another_model_is_refused_by_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file, np.float32)
    cfg = _run_cfg(tmp_path, {"gguf": str(gguf_file), "adapter": str(tmp_path / "nowhere")})
    with pytest.raises(Exception, match="adapter_config.json"):
        prepare_teacher(cfg, Path(cfg.run_dir))


def test_teacher_keys_that_do_not_go_together_are_named() -> None:
    for teacher, words in (({"path": "a", "gguf": "b.gguf"}, "path or gguf"),
                           ({"path": "a", "chat_template": "x"}, "chat_template"),
                           ({"recipe": "r.yaml", "adapter": "a"}, "adapter")):
        with pytest.raises(Exception, match=words):
            RunConfig.model_validate({"teacher": teacher, "students": {"s": {}}})


def test_zero_steps_saves_the_student_as_initialised(tmp_path: Path, tiny_tokenizer) -> None:
    """`train.steps: 0`: a pruned model saved untrained, its kept weights the source's exactly."""
    torch.manual_seed(0)
    source = build_model(ModelConfig(hidden_size=32, num_layers=3, num_heads=2, device="cpu"), tiny_tokenizer)
    save_model(source, tiny_tokenizer, tmp_path / "src")
    job = TrainJobConfig.model_validate({
        "output_dir": str(tmp_path / "out"),
        "model": {"prune": {"source": str(tmp_path / "src"), "layers": 2, "method": "uniform"}},
        "data": {"task": {"num_operands": 2, "digits": 1}, "num_examples": 8},
        "train": {"objective": "sft", "steps": 0, "batch_size": 4, "max_seq_len": 32},
    })
    result = run_train_job(job, show_progress=False)
    assert result.steps == 0
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert out.config.num_hidden_layers == 2
    for kept, layer in ((0, 0), (1, 2)):  # uniform keeps the ends
        torch.testing.assert_close(out.model.layers[kept].mlp.up_proj.weight,
                                   source.model.layers[layer].mlp.up_proj.weight, rtol=0, atol=0)
