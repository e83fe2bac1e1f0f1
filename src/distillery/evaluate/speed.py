"""Speed and size probes: time to first token, decode tokens/s at batch 1 and batched, peak memory.

Every model of a run is probed in one process on the same prompts, so their figures compare.

* ``ttft_s``: median wall time of ``generate(max_new_tokens=1)`` at batch 1 — the prefill of
  the prompt plus the first token, what a user waits before anything appears;
* ``decode_tokens_per_s_batch1``: tokens after the first, per second, one prompt at a time:
  ``(N - 1) / (t(N) - t(1))`` with ``t(k)`` the time to generate exactly ``k`` tokens
  (``min_new_tokens = k``, so a model that stops early is timed on the same work);
* ``decode_tokens_per_s_batched``: the same at ``throughput_batch`` prompts per call,
  counting every row's tokens (throughput when serving many users);
* ``peak_memory_mb``: on CUDA ``torch.cuda.max_memory_allocated`` during the probe
  (``peak_memory_source: "cuda"``); on CPU an estimate, parameters + buffers + the KV cache of
  the batched probe at its longest (``"estimate"``) — the process's RSS high-water mark does
  not move for a model smaller than what the process has already touched, so it measures
  nothing on small models;
* ``params``: parameter count.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillery.models import count_params


def _encode(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device) -> dict:
    tokenizer.padding_side = "left"  # every row's continuation starts at the same column
    return tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)


@torch.no_grad()
def _timed_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, enc: dict, tokens: int) -> float:
    """Seconds to generate exactly ``tokens`` greedy tokens per row of ``enc``."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    model.generate(
        **enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - start


def _median_times(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, encs: list[dict], tokens: int, repeats: int
) -> float:
    """Median over ``repeats`` passes of the summed time over ``encs`` (one shared-machine
    hiccup does not set the figure)."""
    return statistics.median(
        sum(_timed_generate(model, tokenizer, enc, tokens) for enc in encs) for _ in range(repeats)
    )


def kv_cache_bytes(model: PreTrainedModel, batch: int, seq_len: int) -> int:
    """Bytes of a full KV cache: ``2 × layers × batch × seq_len × kv_heads × head_dim × dtype``."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * batch * seq_len * kv_heads * head_dim * elem


def estimated_memory_bytes(model: PreTrainedModel, batch: int, seq_len: int) -> int:
    """Parameters + buffers + the KV cache for ``batch`` rows of ``seq_len`` tokens."""
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return weights + kv_cache_bytes(model, batch, seq_len)


def measure_speed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    throughput_batch: int,
    repeats: int = 3,
) -> dict:
    """Speed and size of ``model`` on ``prompts`` (rendered text, e.g. via ``prompt_text``).

    Returns ``{ttft_s, decode_tokens_per_s_batch1, decode_tokens_per_s_batched, peak_memory_mb,
    peak_memory_source, params}`` (see the module docstring for each definition). The batched
    probe uses the first ``throughput_batch`` prompts (repeated when there are fewer).
    """
    if not prompts:
        raise ValueError("measure_speed needs at least one prompt")
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 to time decoding past the first token, got {max_new_tokens}")
    model.eval()
    device = model.device
    singles = [_encode(tokenizer, [p], device) for p in prompts]
    batch_prompts = [prompts[i % len(prompts)] for i in range(throughput_batch)]
    batched = _encode(tokenizer, batch_prompts, device)
    _timed_generate(model, tokenizer, singles[0], 2)  # warm-up: first-call allocations
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)

    first = _median_times(model, tokenizer, singles, 1, repeats)
    full = _median_times(model, tokenizer, singles, max_new_tokens, repeats)
    b_first = _median_times(model, tokenizer, [batched], 1, repeats)
    b_full = _median_times(model, tokenizer, [batched], max_new_tokens, repeats)
    decode = max_new_tokens - 1
    if on_cuda:
        peak, source = torch.cuda.max_memory_allocated(device), "cuda"
    else:
        seq = batched["input_ids"].shape[1] + max_new_tokens
        peak, source = estimated_memory_bytes(model, throughput_batch, seq), "estimate"
    return {
        "ttft_s": first / len(singles),
        "decode_tokens_per_s_batch1": decode * len(singles) / max(full - first, 1e-9),
        "decode_tokens_per_s_batched": decode * throughput_batch / max(b_full - b_first, 1e-9),
        "peak_memory_mb": peak / 2**20,
        "peak_memory_source": source,
        "params": count_params(model),
    }
