"""Train a small tokenizer for a task with the `tokenizers` library, as a HF fast tokenizer.

Digits are split one per token (models learn arithmetic far better that way), text is
byte-level BPE so any string round-trips, and a compact chat template renders the "messages"
format. The result is saved with ``save_pretrained`` and reloaded through ``AutoTokenizer``,
the same path a user's tokenizer takes.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with single-digit tokens and the chat special tokens."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # the whole byte alphabet, so text outside the training corpus still encodes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
