"""Pruning (distillery.models.prune): exact slices, importance that finds what is crafted to be
unimportant, reloadable directories, the train-job and run hooks, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from distillery.config import DataConfig, ModelConfig, PruneConfig, TrainConfig, TrainJobConfig
from distillery.models.prune import (
    PruneError,
    block_influence,
    calibration_inputs,
    prune_model,
    rank_layers,
    uniform_layers,
)
from distillery.records import ground_truth_records
from distillery.tasks import load_problems

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, HEADS, KV, HEAD_DIM, HIDDEN, MLP = 4, 4, 2, 8, 32, 48


def _llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A random GQA Llama (4 query heads over 2 KV heads), tied embeddings, float32."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=MLP,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF inits RMSNorm weights to 1: make them distinct to catch misslicing
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model.eval()


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def records(task_cfg):
    return ground_truth_records(load_problems(task_cfg, "train", 12, seed=0), "chain")


def _logits(model, tokenizer, records) -> torch.Tensor:
    x = calibration_inputs(records[:3], tokenizer, 64)[0]
    with torch.no_grad():
        return model(input_ids=x).logits


def _prune(src: str, out: Path, records, **kw) -> tuple[dict, LlamaForCausalLM]:
    meta = prune_model(PruneConfig(source=src, calibration="test", **kw), out, records)
    return meta, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def test_depth_pruning_keeps_exact_weights_and_reloads(tmp_path, tiny_tokenizer, records):
    src_model = _llama(tiny_tokenizer)
    src = _save(src_model, tiny_tokenizer, tmp_path / "src")
    meta, pruned = _prune(src, tmp_path / "out", records, layers=2, method="uniform")
    assert meta["depth"]["kept_layers"] == [0, LAYERS - 1]
    assert pruned.config.num_hidden_layers == 2
    s, p = src_model.state_dict(), pruned.state_dict()
    for new_i, old_i in enumerate([0, LAYERS - 1]):
        for key in [k for k in s if k.startswith(f"model.layers.{old_i}.")]:
            assert torch.equal(p[key.replace(f".{old_i}.", f".{new_i}.", 1)], s[key]), key
    assert torch.equal(p["model.embed_tokens.weight"], s["model.embed_tokens.weight"])
    assert torch.isfinite(_logits(pruned, tiny_tokenizer, records)).all()
    saved = json.loads((tmp_path / "out" / "distillery.json").read_text())["prune"]
    assert saved["depth"]["dropped_layers"] == [1, 2] and len(saved["depth"]["block_influence"]) == LAYERS
    assert saved["params"]["pruned"] < saved["params"]["source"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "src" / "tokenizer.json").read_bytes()


def test_block_influence_drops_an_identity_layer_first(tmp_path, tiny_tokenizer, records):
    """Layer 2 with o_proj and down_proj zeroed adds nothing to the residual stream: its
    influence is 0, it is dropped first, and dropping it leaves the logits unchanged."""
    model = _llama(tiny_tokenizer, seed=1)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(model, calibration_inputs(records, tiny_tokenizer, 64))
    assert scores[2] < 1e-9 < min(s for i, s in enumerate(scores) if i != 2)
    assert rank_layers(scores, 3, keep_ends=True) == [0, 1, 3]
    src = _save(model, tiny_tokenizer, tmp_path / "src")
    meta, pruned = _prune(src, tmp_path / "out", records, layers=3)
    assert meta["depth"]["dropped_layers"] == [2]
    torch.testing.assert_close(_logits(pruned, tiny_tokenizer, records), _logits(model, tiny_tokenizer, records),
                               atol=1e-5, rtol=0)


def test_width_pruning_of_dead_channels_and_kv_groups_leaves_logits_unchanged(tmp_path, tiny_tokenizer, records):
    """Half the MLP channels (gate and up rows zero) and KV group 1 (v_proj rows zero, so its two
    query heads output 0) are dead in every layer: pruning keeps exactly the live ones, as
    slices of the source, and the logits stay the same."""
    model = _llama(tiny_tokenizer, seed=2)
    dead = {i: sorted(torch.randperm(MLP, generator=torch.Generator().manual_seed(i))[: MLP // 2].tolist())
            for i in range(LAYERS)}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate_proj.weight[dead[i]] = 0
            layer.mlp.up_proj.weight[dead[i]] = 0
            layer.self_attn.v_proj.weight[HEAD_DIM:] = 0
    src = _save(model, tiny_tokenizer, tmp_path / "src")
    meta, pruned = _prune(src, tmp_path / "out", records, mlp_ratio=0.5, heads=2)
    live = [[c for c in range(MLP) if c not in dead[i]] for i in range(LAYERS)]
    assert meta["width"]["mlp"]["kept"] == live
    assert meta["width"]["kv_groups"]["kept"] == [[0]] * LAYERS
    c = pruned.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (24, 2, 1, HEAD_DIM)
    s, p = model.state_dict(), pruned.state_dict()
    q = slice(0, 2 * HEAD_DIM)  # group 0 = query heads 0 and 1, KV head 0
    for i in range(LAYERS):
        a, b = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        assert torch.equal(p[a + "q_proj.weight"], s[a + "q_proj.weight"][q])
        assert torch.equal(p[a + "k_proj.weight"], s[a + "k_proj.weight"][:HEAD_DIM])
        assert torch.equal(p[a + "v_proj.weight"], s[a + "v_proj.weight"][:HEAD_DIM])
        assert torch.equal(p[a + "o_proj.weight"], s[a + "o_proj.weight"][:, q])
        assert torch.equal(p[b + "gate_proj.weight"], s[b + "gate_proj.weight"][live[i]])
        assert torch.equal(p[b + "down_proj.weight"], s[b + "down_proj.weight"][:, live[i]])
    torch.testing.assert_close(_logits(pruned, tiny_tokenizer, records), _logits(model, tiny_tokenizer, records),
                               atol=1e-5, rtol=0)


def test_embedding_pruning_finds_dead_channels_and_slices_every_tensor(tmp_path, tiny_tokenizer, records):
    """Residual channels that nothing writes (embedding columns, o_proj and down_proj rows zero)
    rank last; every tensor that reads or writes the stream is sliced on the same channels."""
    model = _llama(tiny_tokenizer, seed=3)
    dead = [1, 5, 6, 11, 17, 20, 26, 31]  # 24 left: transformers wants a multiple of the 4 heads
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    src = _save(model, tiny_tokenizer, tmp_path / "src")
    meta, pruned = _prune(src, tmp_path / "out", records, hidden=HIDDEN - len(dead), layers=3)
    keep = [c for c in range(HIDDEN) if c not in dead]
    assert meta["width"]["hidden"]["kept"] == keep
    assert (pruned.config.hidden_size, pruned.config.head_dim) == (HIDDEN - len(dead), HEAD_DIM)
    s, p = model.state_dict(), pruned.state_dict()
    assert torch.equal(p["model.embed_tokens.weight"], s["model.embed_tokens.weight"][:, keep])
    assert torch.equal(p["model.norm.weight"], s["model.norm.weight"][keep])
    kept_layers = meta["depth"]["kept_layers"]
    for new_i, old_i in enumerate(kept_layers):
        a, b = f"model.layers.{new_i}.", f"model.layers.{old_i}."
        assert torch.equal(p[a + "self_attn.k_proj.weight"], s[b + "self_attn.k_proj.weight"][:, keep])
        assert torch.equal(p[a + "self_attn.o_proj.weight"], s[b + "self_attn.o_proj.weight"][keep])
        assert torch.equal(p[a + "mlp.up_proj.weight"], s[b + "mlp.up_proj.weight"][:, keep])
        assert torch.equal(p[a + "mlp.down_proj.weight"], s[b + "mlp.down_proj.weight"][keep])
        assert torch.equal(p[a + "post_attention_layernorm.weight"], s[b + "post_attention_layernorm.weight"][keep])
    assert torch.isfinite(_logits(pruned, tiny_tokenizer, records)).all()


def test_bad_requests_are_refused(tmp_path, tiny_tokenizer, records):
    src = _save(_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "src")
    with pytest.raises(PruneError, match="multiple of 2"):
        prune_model(PruneConfig(source=src, heads=3), tmp_path / "a", records)
    with pytest.raises(PruneError, match="multiple of the attention heads"):
        prune_model(PruneConfig(source=src, hidden=30), tmp_path / "a", records)
    with pytest.raises(PruneError, match=r"layers=9 keeps 9 of 4"):
        prune_model(PruneConfig(source=src, layers=9), tmp_path / "b", records)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(PruneError, match="Llama architecture.*'qwen2'"):
        prune_model(PruneConfig(source=_save(qwen, tiny_tokenizer, tmp_path / "qwen"), layers=1,
                                keep_ends=False), tmp_path / "c", records)


@given(n=st.integers(1, 40), data=st.data(), ends=st.booleans())
def test_uniform_layers_are_evenly_spaced(n, data, ends):
    keep = data.draw(st.integers(2 if ends and n >= 2 else 1, n))
    kept = uniform_layers(n, keep, ends)
    assert kept == sorted(set(kept)) and len(kept) == keep and 0 <= kept[0] and kept[-1] < n
    if ends and keep >= 2:
        assert (kept[0], kept[-1]) == (0, n - 1)
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1


def test_train_job_prunes_once_and_trains_the_pruned_student(tmp_path, tiny_tokenizer, records, task_cfg):
    src = _save(_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "src")
    from distillery.train.job import pruned_dir, run_train_job

    prune = {"source": src, "layers": 2, "mlp_ratio": 0.5, "num_examples": 8}
    job = TrainJobConfig(output_dir=str(tmp_path / "student"), model=ModelConfig(prune=prune, device="cpu"),
                         data=DataConfig(task=task_cfg, num_examples=32),
                         train=TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, max_seq_len=64))
    result = run_train_job(job, show_progress=False)
    assert result.steps == 3
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert (out.config.num_hidden_layers, out.config.intermediate_size) == (2, MLP // 2)
    stamp = (pruned_dir(job) / "model.safetensors").stat().st_mtime_ns
    run_train_job(job, show_progress=False)  # same source, settings and data: the pruned model is reused
    assert (pruned_dir(job) / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(Exception, match="only in `distillery run`"):
        run_train_job(job.model_copy(update={"model": ModelConfig(prune={**prune, "source": "teacher"})}),
                      show_progress=False)


def test_a_run_student_pruned_from_the_teacher(tmp_path):
    """In a run, ``source: teacher`` is the run's teacher directory, and the report says so."""
    from distillery.config import load_config
    from distillery.pipeline import _describe_model
    from distillery.run_config import RunConfig

    cfg = load_config(Path(__file__).parents[1] / "configs/demo.yaml", RunConfig,
                      ["students.student_kd.model={prune: {source: teacher, layers: 1, keep_ends: false, "
                       "mlp_ratio: 0.5}}"])
    job = cfg.student_job("student_kd", Path("/teachers/t"))
    assert job.model.prune.source == "/teachers/t" and job.model.path is None
    assert _describe_model(job) == "`/teachers/t` pruned to 1 layers (block_influence), 50% of the MLP channels"
    # students pruned the same way from the same data share one pruned directory under the run
    cfg = load_config(Path(__file__).parents[1] / "configs/demo.yaml", RunConfig, [
        "defaults.model={prune: {source: teacher, layers: 1}}", "students.twin={train: {objective: sft}}",
        "students.third={model: {prune: {layers: 2}}, train: {objective: sft}}"])
    dirs = {n: cfg.student_job(n, Path("/teachers/t")).model.prune.output_dir for n in cfg.students}
    assert all(Path(d).parent == Path(cfg.run_dir) / "pruned" for d in dirs.values())
    assert dirs["student_distilled"] == dirs["twin"]
    assert len({dirs["student_distilled"], dirs["third"], dirs["student_ground_truth"]}) == 3  # settings, data


def test_prune_command(tmp_path, tiny_tokenizer, records):
    from typer.testing import CliRunner

    from distillery.cli import app

    src = _save(_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "src")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in records))
    res = CliRunner().invoke(app, ["prune", src, str(tmp_path / "out"), "--layers", "3",
                                   "--calibration", str(calib), "--num-examples", "4"])
    assert res.exit_code == 0, res.output
    assert "kept layers [0, " in res.output and "3 layers" in res.output
    bad = CliRunner().invoke(app, ["prune", str(tmp_path / "nope"), str(tmp_path / "out2"), "--layers", "3",
                                   "--calibration", str(calib)])
    assert bad.exit_code == 2 and "model directory not found" in bad.output
