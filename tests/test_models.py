"""Models and tokenizers: the task tokenizer, save → load through plain HF paths, params, safety."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.config import ModelConfig, TaskConfig
from distillery.models import (
    build_model,
    count_params,
    load_model,
    load_tokenizer,
    loading,
    read_meta,
    save_model,
    train_tokenizer,
)
from distillery.models.tokenizer import ASSISTANT, EOS, PAD, SYSTEM, USER
from distillery.tasks import load_problems

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "device": "cpu"}
META = {"objective": "sft", "train": {"lr": 0.003, "steps": [1, 2]}, "note": "héllo"}


@pytest.fixture(scope="module")
def texts():
    cfg = TaskConfig(num_operands=(2, 3), digits=(1, 2), operations=["+", "-", "*"])
    return [p.prompt + " " + p.chain for p in load_problems(cfg, "train", 300, seed=0)]


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), tok).eval()
    out = save_model(model, tok, tmp_path_factory.mktemp("tiny_model"), meta=META)
    return model, out


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- tokenizer


def test_digits_are_single_tokens(tok, texts):
    digit_ids = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    assert len(set(digit_ids)) == 10 and tok.unk_token_id not in digit_ids
    for text in texts[:100] + ["123456789", "9876+54321=64197"]:
        for i in _ids(tok, text):
            piece = tok.decode([i])
            if any(c.isdigit() for c in piece):
                assert len(piece) == 1, f"{piece!r} in {text!r} merges a digit with something"
    assert _ids(tok, "2024") == [digit_ids[2], digit_ids[0], digit_ids[2], digit_ids[4]]


def test_specials_are_single_ids(tok):
    for special in (PAD, EOS, USER, ASSISTANT, SYSTEM):
        ids = _ids(tok, special)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [special]
    assert tok.eos_token == EOS and tok.pad_token == PAD
    assert tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("text", ["héllo wörld 🙂", "日本語のテキスト", "  two  spaces\tand\ttabs\r\n", "Ω≈ç√∫", "\x00\x7f"])
def test_text_outside_the_corpus_round_trips_without_unk(tok, text):
    ids = _ids(tok, text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40))
def test_any_text_round_trips(tok, text):
    assert tok.decode(_ids(tok, text)) == text


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "12+7"},
        {"role": "assistant", "content": "12+7=19;#19"},
    ]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full == "<|system|>be brief<|user|>12+7<|assistant|>12+7=19;#19<|end|>"
    prompt = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>12+7<|assistant|>"
    assert tok.apply_chat_template(msgs[1:2], tokenize=False) == "<|user|>12+7"
    ids = _ids(tok, full)
    assert ids[-1] == tok.eos_token_id
    assert ids.count(tok.convert_tokens_to_ids(ASSISTANT)) == 1
    # the prompt's tokens are a prefix of the full conversation's tokens
    p_ids = _ids(tok, prompt)
    assert _ids(tok, tok.apply_chat_template(msgs[1:], tokenize=False))[: len(p_ids)] == p_ids


# --------------------------------------------------------------------------- save / load


def test_saved_dir_is_safetensors_only(saved):
    _, out = saved
    files = {p.name for p in Path(out).rglob("*") if p.is_file()}
    assert "model.safetensors" in files
    assert {"config.json", "tokenizer.json", "distillery.json"} <= files
    pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert not pickled


def test_save_then_load_gives_identical_logits_and_tokenization(saved, tok):
    model, out = saved
    model2 = load_model(str(out))
    tok2 = load_tokenizer(str(out))
    model2.eval()
    texts = ["12+7*3", "héllo 🙂", tok.apply_chat_template([{"role": "user", "content": "5-9"}], tokenize=False, add_generation_prompt=True)]
    for text in texts:
        assert _ids(tok2, text) == _ids(tok, text)
    assert tok2.get_vocab() == tok.get_vocab()
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert tok2.apply_chat_template([{"role": "user", "content": "1"}], tokenize=False, add_generation_prompt=True) == "<|user|>1<|assistant|>"
    a_ids, b_ids = _ids(tok, "12+7*3=33;#33"), _ids(tok, "99-98+0*7=1;#1")
    n = min(len(a_ids), len(b_ids))
    x = torch.tensor([a_ids[:n], b_ids[:n]])
    with torch.no_grad():
        a = model(x).logits
        b = model2(x).logits
    assert a.shape == (2, x.shape[1], len(tok))
    assert torch.equal(a, b)
    assert model2.dtype == torch.float32
    assert count_params(model2) == count_params(model)


def test_saved_dir_loads_with_plain_transformers(saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, out = saved
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    x = torch.tensor([tok("3*4=12", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(plain(x).logits, model(x).logits)


def test_tied_weights_survive_save_and_load(saved):
    model, out = saved
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model2 = load_model(str(out))
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()


def test_load_model_in_another_dtype(saved):
    _, out = saved
    m = load_model(ModelConfig(path=str(out), dtype="bfloat16", device="cpu"))
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_meta_round_trips(saved, tmp_path):
    _, out = saved
    assert read_meta(out) == META
    assert read_meta(tmp_path) == {}  # no distillery.json


def test_load_tokenizer_pads_with_eos_when_there_is_no_pad(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=EOS)
    assert bare.pad_token is None
    bare.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == EOS and loaded.pad_token_id == tok.eos_token_id


# --------------------------------------------------------------------------- build / count


def _manual_count(cfg, vocab: int, tied: bool) -> int:
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size or 4 * cfg.hidden_size, cfg.num_layers
    per_layer = 4 * h * h + 3 * h * inter + 2 * h  # q,k,v,o; gate,up,down; two RMSNorms
    return vocab * h + layers * per_layer + h + (0 if tied else vocab * h)


@pytest.mark.parametrize("tied", [True, False])
def test_build_model_sizes_and_count_params(tok, tied):
    cfg = ModelConfig(**{**TINY, "num_layers": 2}, tie_word_embeddings=tied)
    model = build_model(cfg, tok)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (32, 2, 2, len(tok))
    assert c.intermediate_size == 128
    assert (c.pad_token_id, c.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert count_params(model) == _manual_count(cfg, len(tok), tied)
    # the naive sum over named parameters with duplicates counts the tied matrix twice
    naive = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert naive - count_params(model) == (len(tok) * 32 if tied else 0)


def test_count_params_counts_a_shared_parameter_once():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3, bias=False)
    b.weight = a.weight
    assert count_params(torch.nn.ModuleList([a, b])) == 4 * 3 + 3


# --------------------------------------------------------------------------- loading safety


def test_load_model_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "no_such_model"))
    with pytest.raises(FileNotFoundError):
        load_model("./no_such_model_here")
    with pytest.raises(ValueError, match="model.path"):
        load_model(ModelConfig())


def test_trust_remote_code_is_off_by_default(saved, monkeypatch):
    _, out = saved
    assert ModelConfig().trust_remote_code is False
    seen = []

    def spy(real):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy(loading.AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", spy(loading.AutoTokenizer.from_pretrained))
    load_model(str(out))
    load_tokenizer(str(out))
    assert seen == [False, False]
    load_model(ModelConfig(path=str(out), trust_remote_code=True, device="cpu"))
    load_tokenizer(str(out), trust_remote_code=True)
    assert seen[2:] == [True, True]


def test_random_init_keeps_the_architecture_and_draws_fresh_weights(saved):
    """``model.init: random`` (the from-scratch control of a pruned student): the same config and
    parameter shapes as the directory, new weights that the seed reproduces."""
    saved = saved[1]
    pretrained = load_model(ModelConfig(path=str(saved), device="cpu"))
    torch.manual_seed(3)
    fresh = load_model(ModelConfig(path=str(saved), device="cpu", init="random"))
    torch.manual_seed(3)
    again = load_model(ModelConfig(path=str(saved), device="cpu", init="random"))
    assert fresh.config.to_dict() | {"_name_or_path": ""} == pretrained.config.to_dict() | {"_name_or_path": ""}
    a, b, c = (dict(m.named_parameters()) for m in (pretrained, fresh, again))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert all(torch.equal(b[k], c[k]) for k in b)  # the seed decides the draw
    changed = [k for k in a if not torch.equal(a[k], b[k]) and "norm" not in k]
    assert len(changed) == len([k for k in a if "norm" not in k])  # norms init to ones either way


def test_random_init_needs_an_architecture_to_copy():
    with pytest.raises(ValueError, match="model.init: random copies the architecture"):
        ModelConfig(init="random")
