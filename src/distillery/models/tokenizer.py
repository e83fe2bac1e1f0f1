"""Train a small tokenizer for a task with the `tokenizers` library, as a HF fast tokenizer.

Digits are split one per token (models learn arithmetic far better that way), text is
byte-level BPE so any string round-trips, and a compact chat template renders the "messages"
format. The result is saved with ``save_pretrained`` and reloaded through ``AutoTokenizer``,
the same path a user's tokenizer takes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distillery.config import ConfigError

PAD, EOS, UNK = "<|pad|>", "<|end|>", "<|unk|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, EOS, UNK, USER, ASSISTANT, SYSTEM]

# Renders [{"role","content"}...] as <|user|>…<|assistant|>…<|end|>; the generation prompt is
# the bare <|assistant|> tag, so the assistant's tokens start right after it.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}" + SYSTEM + "{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}" + USER + "{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}" + ASSISTANT + "{{ m['content'] }}" + EOS + ""
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 384, algorithm: str = "bpe", split_digits: bool = True
) -> PreTrainedTokenizerFast:
    """A tokenizer trained on ``texts`` with the chat special tokens and chat template.

    ``algorithm``: "bpe" (byte-level BPE, the default) or "unigram" (SentencePiece's algorithm
    with the "▁" metaspace and byte fallback). Both encode any string and report character
    offsets. ``split_digits`` keeps every digit a token of its own; False lets digits merge.
    """
    if algorithm == "bpe":
        tok = _bpe(texts, vocab_size, split_digits)
    elif algorithm == "unigram":
        tok = _unigram(texts, vocab_size, split_digits)
    else:
        raise ValueError(f"tokenizer algorithm must be 'bpe' or 'unigram', got {algorithm!r}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _bpe(texts: Iterable[str], vocab_size: int, split_digits: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level  # its regex keeps runs of digits together, so they can merge
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # the whole byte alphabet, so text outside the training corpus still encodes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# SentencePiece's byte-fallback pieces: a character outside the vocabulary encodes as its bytes
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


def _unigram(texts: Iterable[str], vocab_size: int, split_digits: bool) -> Tokenizer:
    """Unigram pieces over "▁"-for-space text, then the 256 byte pieces appended for fallback.

    No space is prepended to the first word ("never"), so the pieces of any text concatenate
    back to exactly that text, as byte-level BPE's do (chat pieces are tokenized one by one).
    """
    n_pieces = vocab_size - len(BYTE_PIECES)
    if n_pieces <= len(SPECIAL_TOKENS):
        raise ConfigError(
            f"tokenizer.vocab_size={vocab_size} leaves no room for unigram pieces next to the "
            f"{len(BYTE_PIECES)} byte pieces and {len(SPECIAL_TOKENS)} special tokens; use at least "
            f"{len(BYTE_PIECES) + len(SPECIAL_TOKENS) + 1}"
        )
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    steps = [metaspace, pre_tokenizers.Digits(individual_digits=True)] if split_digits else [metaspace]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    trainer = trainers.UnigramTrainer(
        vocab_size=n_pieces, special_tokens=SPECIAL_TOKENS, unk_token=UNK, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = _unigram_vocab(json.loads(tok.to_str())["model"]["vocab"])
    tok.model = models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index(UNK), byte_fallback=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


def _unigram_vocab(trained: list[list]) -> list[tuple[str, float]]:
    """The trained (piece, log-prob) list with byte pieces inserted after the special tokens.

    Byte pieces get a score below every trained piece, so they are used only for characters
    that no piece covers.
    """
    specials = [(p, s) for p, s in trained if p in SPECIAL_TOKENS]
    rest = [(p, s) for p, s in trained if p not in SPECIAL_TOKENS and p not in BYTE_PIECES]
    floor = min((s for _, s in rest), default=0.0) - 10.0
    return specials + [(b, floor) for b in BYTE_PIECES] + rest
