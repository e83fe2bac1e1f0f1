"""A local transformers model as a teacher: batched generation, left padding, KV cache."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from distillery.config import ModelConfig
from distillery.models import load_model, load_tokenizer
from distillery.teachers.base import Generation, GenerationStats, SamplingParams
from distillery.train.data import prompt_text


class HFTeacher:
    """Generate with a local HF causal LM, ``batch_size`` conversations at a time.

    Prompts are rendered with the tokenizer's chat template and left-padded, so every row's
    continuation starts at the same column and the KV cache serves the whole batch.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
        name: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name or getattr(model.config, "_name_or_path", "") or "hf-model"
        self.stats = GenerationStats()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, batch_size: int = 64, device: str = "auto", trust_remote_code: bool = False
    ) -> HFTeacher:
        model = load_model(ModelConfig(path=str(path), device=device, trust_remote_code=trust_remote_code))
        tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, batch_size=batch_size, name=str(path))

    @torch.no_grad()
    def generate(
        self,
        conversations: list[list[dict]],
        params: SamplingParams,
        progress: Progress | None = None,
        batch_size: int | None = None,
    ) -> list[list[Generation]]:
        """``params.n`` continuations of each conversation (a list of "messages")."""
        batch_size = batch_size or self.batch_size
        tok = self.tokenizer
        tok.padding_side = "left"
        gen_cfg = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else None,
            top_p=params.top_p if params.temperature > 0 else None,
            top_k=None,
            num_return_sequences=params.n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        task = progress.add_task("generate", total=len(conversations)) if progress else None
        results: list[list[Generation]] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            texts = [prompt_text(c, tok) for c in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(params.seed + start)  # sampling is reproducible per batch
            t0 = time.perf_counter()
            out = self.model.generate(**enc, generation_config=gen_cfg)
            seconds = time.perf_counter() - t0
            new = out[:, enc["input_ids"].shape[1] :]
            gens = [self._decode(row, params) for row in new]
            n_tokens = sum(g.num_tokens for g in gens)
            self.stats.tokens += n_tokens
            self.stats.seconds += seconds
            self.stats.batches.append((len(chunk), n_tokens, seconds))
            results.extend(gens[i : i + params.n] for i in range(0, len(gens), params.n))
            if progress is not None:
                progress.advance(task, len(chunk))
        return results

    def _decode(self, row: torch.Tensor, params: SamplingParams) -> Generation:
        """Text up to the first end token; tokens counted include that end token."""
        ids = row.tolist()
        eos = self.tokenizer.eos_token_id
        if params.min_new_tokens:
            # a fixed-length probe: every generated position counts, text is not the point
            return Generation(self.tokenizer.decode(ids, skip_special_tokens=True), len(ids), "length")
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
            reason = "stop"
        else:
            reason = "length"
        return Generation(
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            num_tokens=len(ids),
            finish_reason=reason,
        )
