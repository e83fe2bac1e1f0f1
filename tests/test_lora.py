"""LoRA/QLoRA students and teachers: adapters train alone, save merged or not, reload equal."""

from __future__ import annotations

import copy
import importlib.util
import json
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from distillery.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, TrainJobConfig
from distillery.models import (
    enable_gradient_checkpointing,
    finalize_student,
    is_peft_model,
    load_model,
    load_model_for_training,
    read_meta,
    save_model,
)
from distillery.records import ground_truth_records
from distillery.tasks import load_problems
from distillery.train.data import Collator, SFTDataset
from distillery.train.finetune_teacher import finetune_teacher, teacher_finetune_dir
from distillery.train.loop import train_loop
from distillery.train.objectives.sft import SFTObjective

TRAIN = dict(steps=8, batch_size=8, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, max_seq_len=64, log_every=1)


def _peft_problem() -> str | None:
    """Why peft cannot make LoRA layers here (missing, or an old torchao beside it), or None."""
    try:
        import peft

        peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), peft.LoraConfig(r=1, target_modules=["0"]))
    except ImportError as exc:
        return str(exc)
    return None


PEFT_PROBLEM = _peft_problem()
needs_peft = pytest.mark.skipif(PEFT_PROBLEM is not None, reason=f"peft unusable: {PEFT_PROBLEM}")


@pytest.fixture(scope="module")
def records(task_cfg):
    return ground_truth_records(load_problems(task_cfg, "train", 32, seed=1), "chain")


@pytest.fixture(scope="module")
def model_cfg(tiny_model_dir):
    return ModelConfig(path=str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def trained(model_cfg, records, tiny_tokenizer):
    """A LoRA student after a few optimizer steps, with its loss history."""
    model = load_model_for_training(model_cfg, LoraConfig(r=4, alpha=8))
    data = SFTDataset(records, tiny_tokenizer, 64)
    result = train_loop(model, SFTObjective(), data, Collator(tiny_tokenizer.pad_token_id),
                        TrainConfig(**TRAIN), show_progress=False)
    return model.eval(), result


@pytest.fixture(scope="module")
def probe(tiny_tokenizer, records):
    return Collator(tiny_tokenizer.pad_token_id)(SFTDataset(records[:4], tiny_tokenizer, 64).items)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@needs_peft
def test_lora_trains_only_the_adapters(trained, model_cfg):
    model, result = trained
    assert is_peft_model(model)
    base = load_model(model_cfg).state_dict()
    adapters, frozen = 0, 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            adapters += 1
            if "lora_B" in name:  # starts at zero: every one must have moved
                assert p.abs().max() > 0, name
        else:
            frozen += 1
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(p, base[key]), f"{name} changed"
    assert adapters == 2 * 7 and frozen == len(base) - 1  # 7 linear layers; lm_head tied to embed
    losses = [h["loss"] for h in result.history]
    print(f"\nLoRA SFT loss: step 1 {losses[0]:.4f} → step {len(losses)} {losses[-1]:.4f}")
    assert losses[-1] < losses[0]


@needs_peft
def test_merged_student_is_a_plain_hf_directory(trained, tiny_tokenizer, probe, tmp_path):
    model = copy.deepcopy(trained[0])
    expected = _logits(model, probe)
    merged = finalize_student(model, LoraConfig(merge=True))
    assert not is_peft_model(merged)
    out = save_model(merged, tiny_tokenizer, tmp_path / "student")
    assert not (out / "adapter_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM" and not hasattr(reloaded, "peft_config")
    diff = (_logits(reloaded, probe) - expected).abs().max().item()
    assert diff < 1e-5, diff


@needs_peft
def test_unmerged_student_saves_base_and_adapter(trained, tiny_tokenizer, probe, model_cfg, tmp_path):
    model = trained[0]
    expected = _logits(model, probe)
    kept = finalize_student(model, LoraConfig(merge=False))
    assert kept is model
    out = save_model(kept, tiny_tokenizer, tmp_path / "student", meta={"note": "unmerged"})
    for name in ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json"):
        assert (out / name).is_file(), name
    assert "from_pretrained" in (out / "README.md").read_text()
    # the base weights saved are the untouched base model's
    base = load_model(model_cfg).state_dict()
    with safe_open(out / "model.safetensors", "pt") as f:
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), base[key]), key
    # transformers (with peft installed) attaches the adapter by itself ...
    with_adapter = load_model(ModelConfig(path=str(out), device="cpu")).eval()
    assert (_logits(with_adapter, probe) - expected).abs().max().item() < 1e-5
    # ... and peft loads the adapter onto the original base
    from peft import PeftModel

    on_base = PeftModel.from_pretrained(load_model(model_cfg), out).eval()
    assert (_logits(on_base, probe) - expected).abs().max().item() < 1e-5
    assert (_logits(load_model(model_cfg).eval(), probe) - expected).abs().max().item() > 1e-3


@needs_peft
def test_target_module_typo_is_named(model_cfg):
    with pytest.raises(ValueError, match=r"train\.lora\.target_modules: 'v_prj'.*did you mean 'v_proj'"):
        load_model_for_training(model_cfg, LoraConfig(target_modules=["q_proj", "v_prj"]))
    model = load_model_for_training(model_cfg, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert sorted({n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}) == ["q_proj", "v_proj"]


@needs_peft
def test_adapter_initialisation_is_drawn_from_the_seed(model_cfg):
    def adapters(seed: int) -> dict[str, torch.Tensor]:
        model = load_model_for_training(model_cfg, LoraConfig(r=4), seed=seed)
        return {n: p.detach() for n, p in model.named_parameters() if "lora_A" in n}

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = adapters(0)
    assert torch.equal(torch.rand(1), expected_next)  # the global generator was left alone
    torch.manual_seed(7)  # another global state: same adapters
    assert all(torch.equal(first[n], p) for n, p in adapters(0).items())
    assert not any(torch.equal(first[n], p) for n, p in adapters(1).items())


QLORA_HERE = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(QLORA_HERE, reason="this machine can run QLoRA")
def test_qlora_is_refused_before_loading_anything(tmp_path):
    # a path that does not exist: the QLoRA check must come first, not the loader's error
    cfg = ModelConfig(path=str(tmp_path / "no_such_model"), device="cpu")
    with pytest.raises(RuntimeError, match="QLoRA needs bitsandbytes and a CUDA GPU; found: .*"
                                           "use lora.quantize: none"):
        load_model_for_training(cfg, LoraConfig(quantize="4bit"))


@pytest.mark.skipif(not QLORA_HERE, reason="QLoRA needs CUDA and bitsandbytes")
@needs_peft
def test_qlora_trains_and_merges_to_a_plain_model(tiny_model_dir, records, tiny_tokenizer, tmp_path):
    cfg = ModelConfig(path=str(tiny_model_dir), device="cuda", dtype="bfloat16")
    model = load_model_for_training(cfg, LoraConfig(r=4, quantize="4bit"), gradient_checkpointing=True)
    train_loop(model, SFTObjective(), SFTDataset(records, tiny_tokenizer, 64),
               Collator(tiny_tokenizer.pad_token_id), TrainConfig(**TRAIN), show_progress=False)
    merged = finalize_student(model, LoraConfig(quantize="4bit"))
    out = save_model(merged, tiny_tokenizer, tmp_path / "student")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def _grads_and_saved_bytes(model, batch) -> tuple[list[torch.Tensor], int]:
    """Gradients of the SFT loss, and the bytes the forward kept for the backward."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = SFTObjective().loss(batch, model).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params)), saved


@pytest.mark.parametrize("lora", [pytest.param(None, id="full"),
                                  pytest.param(LoraConfig(r=4), id="lora", marks=needs_peft)])
def test_gradient_checkpointing_gives_the_same_gradients(model_cfg, probe, lora):
    plain = load_model_for_training(model_cfg, lora)
    checkpointed = enable_gradient_checkpointing(copy.deepcopy(plain))
    grads, saved = _grads_and_saved_bytes(plain, probe)
    grads_ckpt, saved_ckpt = _grads_and_saved_bytes(checkpointed, probe)
    assert len(grads) == len(grads_ckpt) > 0
    assert max((a - b).abs().max().item() for a, b in zip(grads, grads_ckpt)) < 1e-6
    print(f"\n{'lora' if lora else 'full'}: activations kept for backward {saved} → {saved_ckpt} bytes")
    assert saved_ckpt < saved  # the layers' activations were recomputed, not kept


def _job(tmp_path, model_cfg, task_cfg, steps: int) -> TrainJobConfig:
    return TrainJobConfig(
        output_dir=str(tmp_path / "student"), teacher=model_cfg,
        data=DataConfig(task=task_cfg, num_examples=32),
        teacher_finetune=TrainConfig(**{**TRAIN, "steps": steps}, lora=LoraConfig(r=2, alpha=4)),
    )


@needs_peft
def test_teacher_finetune_is_reused_and_retrained_on_change(tmp_path, model_cfg, task_cfg, records,
                                                            tiny_tokenizer, probe):
    job = _job(tmp_path, model_cfg, task_cfg, steps=3)
    out = finetune_teacher(job, records, tiny_tokenizer, show_progress=False)
    assert out == teacher_finetune_dir(job) == tmp_path / "student.teacher_ft"
    assert not (out / "adapter_config.json").exists()  # merged: a plain teacher
    weights = out / "model.safetensors"
    first = (weights.stat().st_mtime_ns, read_meta(out)["fingerprint"])
    tuned = load_model(ModelConfig(path=str(out), device="cpu")).eval()
    assert (_logits(tuned, probe) - _logits(load_model(model_cfg).eval(), probe)).abs().max() > 1e-4

    start = time.perf_counter()
    assert finetune_teacher(job, records, tiny_tokenizer, show_progress=False) == out
    assert (weights.stat().st_mtime_ns, read_meta(out)["fingerprint"]) == first  # reused
    print(f"\nreuse took {time.perf_counter() - start:.2f}s")
    # the same task records made again (new meta.created): same conversations, still reused
    remade = [{**r, "meta": {**r.get("meta", {}), "created": "2099-01-01T00:00:00"}} for r in records]
    finetune_teacher(job, remade, tiny_tokenizer, show_progress=False)
    assert (weights.stat().st_mtime_ns, read_meta(out)["fingerprint"]) == first

    changed = _job(tmp_path, model_cfg, task_cfg, steps=4)
    assert finetune_teacher(changed, records, tiny_tokenizer, show_progress=False) == out
    assert read_meta(out)["fingerprint"] != first[1] and read_meta(out)["steps"] == 4
    assert weights.stat().st_mtime_ns != first[0]
    assert not out.with_name(out.name + ".tmp").exists()
    finetune_teacher(changed, records[:-1], tiny_tokenizer, show_progress=False)  # other data
    assert read_meta(out)["records"] == len(records) - 1


@needs_peft
def test_packed_rows_train_a_checkpointed_lora_model_like_padded_ones(model_cfg, tiny_tokenizer, records):
    from distillery.train.packing import PackedCollator, model_inputs
    from distillery.train.targets import cross_entropy, shifted_targets

    items = SFTDataset(records[:12], tiny_tokenizer, 64).items
    model = load_model_for_training(model_cfg, LoraConfig(r=4), gradient_checkpointing=True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    packed = PackedCollator(tiny_tokenizer.pad_token_id, 64)(items)
    loss_packed = cross_entropy(model(**model_inputs(packed)).logits[:, :-1], shifted_targets(packed)[0])
    grads_packed = torch.autograd.grad(loss_packed, params)
    loss_padded = SFTObjective().loss(Collator(tiny_tokenizer.pad_token_id)(items), model).loss
    grads_padded = torch.autograd.grad(loss_padded, params)
    assert packed["input_ids"].shape[0] < len(items)
    assert abs(loss_packed.item() - loss_padded.item()) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads_packed, grads_padded)) < 1e-6
