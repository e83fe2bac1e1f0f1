"""Students derived from a model by pruning: fewer decoder layers, narrower layers.

Depth: keep N decoder layers. ``block_influence`` (ShortGPT) ranks a layer by how much it
changes the hidden state on calibration data, ``1 - cos(h_in, h_out)`` averaged over tokens; a
layer that barely turns the residual stream is dropped first. ``uniform`` keeps evenly spaced
layers (the baseline). With ``keep_ends`` the first and last layers are always kept: they map
tokens into and out of the residual stream and every pruning study finds them the costliest
to lose.

Width (Minitron-style activation importance, measured on the depth-pruned model):
MLP channels by the mean ``|act(gate(x)) * up(x)|`` (the input of ``down_proj``); attention
heads by the mean L2 norm of each head's output (the input of ``o_proj``), summed over the
query heads of a KV group, and pruned by whole KV groups so grouped-query attention stays
grouped; embedding channels by the mean ``|y|`` of every RMSNorm's output. MLP channels and
heads are chosen per layer (each layer keeps its own best, the same count everywhere, as the HF
config has one size for all layers); embedding channels once for the whole residual stream.

The result is a plain HF directory: kept weights are slices of the source's, bit for bit (no
re-scaling, so removing an embedding channel changes every RMSNorm's mean square by
``H / H'``; training recovers that). Only the Llama architecture is supported.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from transformers import AutoConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distillery.chat import tokenize_messages
from distillery.config import ModelConfig, PruneConfig, TaskConfig, config_hash, load_config
from distillery.errors import DistilleryError, MissingInputError
from distillery.models.loading import (
    check_model_source,
    count_params,
    load_model,
    load_tokenizer,
    read_meta,
)
from distillery.outputs import check_replaceable, claim_dir, remove_dir, replace_dir
from distillery.records import ground_truth_records, json_text, read_jsonl, validate_sft_records
from distillery.tasks import load_problems

SUPPORTED = ("llama",)
# files of a source directory that the pruned model writes itself (everything else, the
# tokenizer and chat template among them, is copied verbatim)
OWN_FILES = {"config.json", "generation_config.json", "distillery.json", ".distillery",
             "model.safetensors.index.json", "pytorch_model.bin.index.json"}


class PruneError(DistilleryError, ValueError):
    """A pruning request that cannot work on this model (architecture, sizes, calibration)."""


class _TaskFile(BaseModel):
    """A calibration YAML: its ``task:`` section (other keys ignored, so a run config works)."""

    model_config = ConfigDict(extra="ignore")
    task: TaskConfig


def calibration_records(path: str, num_examples: int) -> list[dict]:
    """The first ``num_examples`` calibration records: a JSONL file of "messages" records, or a
    YAML file with a ``task:`` section (its train problems in chat form with their chains)."""
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"calibration file not found: {path}: give a JSONL of \"messages\" "
                                "records or a YAML file with a task: section")
    if p.suffix in (".yaml", ".yml"):
        task = load_config(p, _TaskFile).task
        return ground_truth_records(load_problems(task, "train", num_examples), "chain")
    records = read_jsonl(p)
    validate_sft_records(records, str(p))
    return records[:num_examples]


def calibration_inputs(records: list[dict], tokenizer: PreTrainedTokenizerBase,
                       max_len: int) -> list[torch.Tensor]:
    """Token ids ``[1, seq]`` of each record, rendered with the model's chat template; one
    sequence per forward, so no padding enters the statistics."""
    ids = [tokenize_messages(r["messages"], tokenizer, max_len)["input_ids"] for r in records]
    out = [torch.tensor([x]) for x in ids if len(x) >= 2]
    if not out:
        raise PruneError("the calibration records tokenize to nothing: give records with text")
    return out


def _run(model: PreTrainedModel, inputs: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in inputs:
            model(input_ids=x.to(model.device), use_cache=False)


def block_influence(model: PreTrainedModel, inputs: list[torch.Tensor]) -> list[float]:
    """ShortGPT's block influence of each decoder layer: ``1 - cos(h_in, h_out)`` of the hidden
    state ``[hidden]`` entering and leaving the layer, averaged over all calibration tokens."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = [0]

    def hook(i: int) -> Callable:
        def record(_module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            sums[i] += (1 - cos).sum().item()
            if i == 0:
                count[0] += cos.numel()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count[0], 1)).tolist()


def uniform_layers(num_layers: int, keep: int, keep_ends: bool) -> list[int]:
    """``keep`` evenly spaced layers of ``num_layers``; with ``keep_ends`` the first and last."""
    if keep_ends:
        if keep == 1:
            return [0]
        return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})
    return [int((i + 0.5) * num_layers / keep) for i in range(keep)]


def rank_layers(scores: list[float], keep: int, keep_ends: bool) -> list[int]:
    """The ``keep`` layers of highest score (ascending indices); the ends first with ``keep_ends``."""
    n = len(scores)
    forced = [0, n - 1][:keep] if keep_ends and n > 1 else []
    rest = sorted((i for i in range(n) if i not in forced), key=lambda i: -scores[i])
    return sorted(forced + rest[: keep - len(forced)])


def width_importance(model: PreTrainedModel, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Minitron's activation importance on the calibration tokens.

    ``mlp``: ``[layers, intermediate]`` mean |input of down_proj|; ``heads``: ``[layers,
    num_attention_heads]`` mean L2 norm of each head's output (input of o_proj); ``hidden``:
    ``[hidden]`` mean |output| of every RMSNorm (both per layer and the final one), summed.
    """
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = _head_dim(cfg)
    mlp = torch.zeros(n_layers, cfg.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    tokens = [0]

    def on_mlp(i: int) -> Callable:
        def record(_m: torch.nn.Module, args: tuple) -> None:
            mlp[i] += args[0].double().abs().reshape(-1, mlp.shape[1]).sum(0)
            tokens[0] += args[0].shape[0] * args[0].shape[1] if i == 0 else 0
        return record

    def on_attn(i: int) -> Callable:
        def record(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0].double().reshape(-1, n_heads, head_dim)
            heads[i] += x.norm(dim=-1).sum(0)
        return record

    def on_norm(_m: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        hidden.add_(output.double().abs().reshape(-1, hidden.shape[0]).sum(0))

    handles = [model.model.norm.register_forward_hook(on_norm)]
    for i, layer in enumerate(model.model.layers):
        handles += [layer.mlp.down_proj.register_forward_pre_hook(on_mlp(i)),
                    layer.self_attn.o_proj.register_forward_pre_hook(on_attn(i)),
                    layer.input_layernorm.register_forward_hook(on_norm),
                    layer.post_attention_layernorm.register_forward_hook(on_norm)]
    try:
        _run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    n = max(tokens[0], 1)
    return {"mlp": mlp / n, "heads": heads / n, "hidden": hidden / n}


def _head_dim(cfg: object) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, ascending (ties broken by the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def slice_llama(model: LlamaForCausalLM, layers: list[int] | None = None,
                mlp: list[list[int]] | None = None, groups: list[list[int]] | None = None,
                hidden: list[int] | None = None) -> LlamaForCausalLM:
    """A new Llama holding slices of ``model``'s weights: the decoder ``layers`` kept (source
    indices), per kept layer the ``mlp`` channels and KV ``groups`` kept (each group with its
    query heads), and the ``hidden`` channels kept everywhere. None keeps all. ``head_dim`` is
    written into the config so that narrowing ``hidden_size`` leaves the heads as they are."""
    cfg = model.config
    layers = list(range(cfg.num_hidden_layers)) if layers is None else layers
    n_heads, n_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, _head_dim(cfg)
    group = n_heads // n_kv
    new_cfg = cfg.__class__.from_dict(cfg.to_dict())
    new_cfg.num_hidden_layers = len(layers)
    new_cfg.head_dim = head_dim
    if groups is not None:
        new_cfg.num_key_value_heads = len(groups[0])
        new_cfg.num_attention_heads = len(groups[0]) * group
    if mlp is not None:
        new_cfg.intermediate_size = len(mlp[0])
    if hidden is not None:
        new_cfg.hidden_size = len(hidden)
    if getattr(new_cfg, "layer_types", None):
        new_cfg.layer_types = [cfg.layer_types[i] for i in layers]

    h = torch.tensor(hidden) if hidden is not None else None
    src = model.state_dict()

    def cut(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None = None) -> torch.Tensor:
        t = t if rows is None else t.index_select(0, rows)
        return t if cols is None else t.index_select(1, cols)

    out = {"model.embed_tokens.weight": cut(src["model.embed_tokens.weight"], None, h),
           "model.norm.weight": cut(src["model.norm.weight"], h)}
    if "lm_head.weight" in src:
        out["lm_head.weight"] = cut(src["lm_head.weight"], None, h)
    for new_i, old_i in enumerate(layers):
        kv = groups[new_i] if groups is not None else list(range(n_kv))
        q_rows = torch.tensor([hd + head * head_dim for g in kv for head in range(g * group, (g + 1) * group)
                               for hd in range(head_dim)])
        kv_rows = torch.tensor([g * head_dim + hd for g in kv for hd in range(head_dim)])
        m = torch.tensor(mlp[new_i]) if mlp is not None else None
        # (rows, cols) of each tensor, by its name within a layer; a bias takes the rows
        plan = {"self_attn.q_proj": (q_rows, h), "self_attn.k_proj": (kv_rows, h),
                "self_attn.v_proj": (kv_rows, h), "self_attn.o_proj": (h, q_rows),
                "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m),
                "input_layernorm": (h, None), "post_attention_layernorm": (h, None)}
        prefix = f"model.layers.{old_i}."
        for name, t in src.items():
            if not name.startswith(prefix):
                continue
            part, kind = name[len(prefix):].rsplit(".", 1)
            if part not in plan:
                raise PruneError(f"unexpected tensor {name}: pruning supports the plain Llama layer "
                                 "(q/k/v/o projections, gate/up/down MLP, two RMSNorms)")
            rows, cols = plan[part]
            out[f"model.layers.{new_i}.{part}.{kind}"] = cut(t, rows, cols if kind == "weight" else None)
    pruned = LlamaForCausalLM(new_cfg).to(model.dtype)
    missing, unexpected = pruned.load_state_dict(out, strict=False)
    # a tied lm_head is the embedding itself: absent from `out` only when the source has none
    if unexpected or [k for k in missing if k != "lm_head.weight" or not new_cfg.tie_word_embeddings]:
        raise PruneError(f"the pruned weights do not fit the pruned model: missing {missing}, "
                         f"unexpected {unexpected}")
    pruned.generation_config = model.generation_config
    return pruned.eval()


def _count(cfg: PruneConfig, key: str, value: float | int | None, total: int) -> int | None:
    if value is None:
        return None
    n = round(value * total) if isinstance(value, float) else value
    if not 1 <= n <= total:
        raise PruneError(f"prune.{key}={value} keeps {n} of {total}: give a value from 1 to {total}")
    return n


def prune_fingerprint(cfg: PruneConfig, records: list[dict]) -> str:
    """What a pruned model depends on: the prune settings, the source's files (name, size,
    mtime; a hub id: the id) and the calibration conversations."""
    p = Path(cfg.source)
    files = ([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir()) if f.is_file()]
             if p.is_dir() else cfg.source)
    return config_hash(cfg, files, [r.get("messages") for r in records[: cfg.num_examples]])


def prune_model(cfg: PruneConfig, out_dir: str | Path, records: list[dict],
                made_by: str = "distillery prune",
                hint: str = "choose another output directory, or move the files out of it") -> dict:
    """Prune ``cfg.source`` as ``cfg`` says, measuring importance on ``records`` (their first
    ``cfg.num_examples``), and write the result to ``out_dir`` (atomically: a ``.tmp`` directory
    swapped in once complete). Returns the ``prune`` section written to ``distillery.json``.

    An ``out_dir`` already pruned from the same source, settings and records is kept as it is
    (its section is returned with ``reused: true``)."""
    source, out = cfg.source, Path(out_dir)
    fingerprint = prune_fingerprint(cfg, records)
    done = read_meta(out).get("prune", {}) if out.is_dir() else {}
    if done.get("fingerprint") == fingerprint:
        return {**done, "reused": True}
    local = check_model_source(source)
    src_cfg = AutoConfig.from_pretrained(source)
    if src_cfg.model_type not in SUPPORTED:
        raise PruneError(f"{source}: pruning supports the Llama architecture (model_type 'llama', "
                         f"e.g. SmolLM2, Llama 3); this model is '{src_cfg.model_type}'")
    if getattr(src_cfg, "quantization_config", None):
        raise PruneError(f"{source} is quantized ({src_cfg.quantization_config.get('quant_method')}): "
                         "pruning slices float weights; dequantize it first (a GGUF: `distillery convert`)")
    tmp = out.with_name(out.name + ".tmp")
    check_replaceable(out, made_by, hint)  # a user's directory is refused before the work, not after
    remove_dir(tmp, made_by, hint)
    claim_dir(tmp, made_by, hint)
    # statistics in float32; the slices return to the source's dtype exactly (a widening cast)
    src_dtype = getattr(src_cfg, "dtype", None) or torch.float32
    src_dtype = getattr(torch, src_dtype) if isinstance(src_dtype, str) else src_dtype
    model = load_model(ModelConfig(path=source, dtype="float32", device="cpu")).eval()
    src_params = count_params(model)
    tokenizer = load_tokenizer(source)
    inputs = calibration_inputs(records[: cfg.num_examples], tokenizer, cfg.max_len)
    mc = model.config
    n_layers = mc.num_hidden_layers
    meta: dict = {"source": str(Path(source).resolve()) if local else source,
                  "calibration": {"source": cfg.calibration, "records": len(inputs),
                                  "tokens": sum(x.shape[1] for x in inputs)},
                  "config": cfg.model_dump(mode="json"), "fingerprint": fingerprint}

    keep = _count(cfg, "layers" if cfg.layers else "keep_ratio", cfg.layers or cfg.keep_ratio, n_layers)
    if keep is not None:
        if cfg.keep_ends and keep < 2 <= n_layers:
            raise PruneError("prune keeps the first and last layers (keep_ends): keep at least 2 "
                             "layers, or set keep_ends: false")
        scores = block_influence(model, inputs)
        kept = (rank_layers(scores, keep, cfg.keep_ends) if cfg.method == "block_influence"
                else uniform_layers(n_layers, keep, cfg.keep_ends))
        meta["depth"] = {"method": cfg.method, "kept_layers": kept,
                         "dropped_layers": [i for i in range(n_layers) if i not in kept],
                         "block_influence": [round(s, 6) for s in scores]}
        model = slice_llama(model, layers=kept)

    group = mc.num_attention_heads // mc.num_key_value_heads
    n_mlp = _count(cfg, "mlp_ratio", cfg.mlp_ratio, mc.intermediate_size)
    n_heads = _count(cfg, "heads", cfg.heads, mc.num_attention_heads)
    if n_heads is not None and n_heads % group:
        raise PruneError(f"prune.heads={n_heads}: heads are pruned by whole KV groups of {group} query "
                         f"heads ({mc.num_attention_heads} heads, {mc.num_key_value_heads} KV heads): "
                         f"give a multiple of {group}")
    n_hidden = _count(cfg, "hidden", cfg.hidden, mc.hidden_size)
    heads_after = n_heads or mc.num_attention_heads
    if n_hidden is not None and n_hidden % heads_after:
        # transformers refuses a Llama config whose hidden_size is not a multiple of its heads,
        # even with head_dim given
        raise PruneError(f"prune.hidden={n_hidden}: transformers needs hidden_size to be a multiple of "
                         f"the attention heads ({heads_after}): give a multiple of {heads_after}")
    if (n_mlp, n_heads, n_hidden) != (None, None, None):
        imp = width_importance(model, inputs)
        group_scores = imp["heads"].reshape(len(imp["heads"]), -1, group).sum(-1)
        mlp = [_top(s, n_mlp) for s in imp["mlp"]] if n_mlp is not None else None
        groups = [_top(s, n_heads // group) for s in group_scores] if n_heads is not None else None
        hidden = _top(imp["hidden"], n_hidden) if n_hidden is not None else None
        meta["width"] = {
            "mlp": None if mlp is None else {"kept": mlp, "importance": _rounded(imp["mlp"])},
            "kv_groups": None if groups is None else {"kept": groups, "importance": _rounded(group_scores)},
            "hidden": None if hidden is None else {"kept": hidden, "importance": _rounded(imp["hidden"])}}
        model = slice_llama(model, mlp=mlp, groups=groups, hidden=hidden)

    model = model.to(src_dtype)
    meta["params"] = {"source": src_params, "pruned": count_params(model)}
    meta["shape"] = {k: getattr(model.config, k) for k in (
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "head_dim")}
    model.save_pretrained(tmp, safe_serialization=True)
    if local:
        for f in Path(source).iterdir():
            if f.is_file() and f.name not in OWN_FILES and f.suffix not in (".safetensors", ".bin"):
                shutil.copy2(f, tmp / f.name)
    else:
        tokenizer.save_pretrained(tmp)
    (tmp / "distillery.json").write_text(json_text({"prune": meta}, tmp / "distillery.json",
                                                   indent=2, sort_keys=True))
    replace_dir(tmp, out, made_by, hint)
    return meta


def _rounded(t: torch.Tensor) -> list:
    return [float(f"{v:.6g}") for v in t.tolist()] if t.dim() == 1 else [_rounded(r) for r in t]
