"""Configuration: one pydantic model per stage, loaded from YAML with dotted CLI overrides.

``load_config("configs/demo.yaml", RunConfig, ["defaults.train.lr=3e-4"])`` reads the file, applies the
overrides, and validates. Every error names the file, the line (when the key came from the
file), the dotted key, and what to do: an unknown key suggests the closest valid one, a wrong
type names the expected type.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from distillery.answers import GraderConfig, NumericOptions
from distillery.errors import DistilleryError
from distillery.files import read_text
from distillery.objective_registry import objective_config, objective_needs
from distillery.threads import apply_config_threads

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- stage sections


class TaskConfig(StrictModel):
    """Where problems come from: the built-in arithmetic generator or a user's JSONL file."""

    name: Literal["arithmetic", "jsonl"] = "arithmetic"
    # arithmetic knobs: an int, or [min, max] inclusive
    num_operands: int | tuple[int, int] = (2, 3)
    digits: int | tuple[int, int] = (1, 2)
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-"])
    style: Literal["symbolic", "word"] = "symbolic"
    # share of the problem space (by hash of the problem) reserved for the held-out split
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # jsonl task: records {"prompt", "reference"}; without eval_path the split is by hash
    path: str | None = None
    eval_path: str | None = None
    # what a model is sent for each problem (generation, training records, capture and eval
    # alike, through distillery.chat.task_messages): the user turn is this Jinja2 template
    # (inline text or "@path/to/file.j2"; variables: prompt, id and a JSONL line's other keys,
    # rendered sandboxed) and system_prompt, when set, a system turn before it. None = the
    # bare prompt and no system turn.
    prompt_template: str | None = None
    system_prompt: str | None = None
    # how an output is graded against the reference (distillery.answers): a name ("numeric",
    # "exact", "symbolic", "f1", "multiple_choice") or {name: regex, pattern: ...},
    # {name: judge, model: {...}}; numeric suits numeric references
    grader: GraderConfig = Field(default_factory=NumericOptions)

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.name == "jsonl" and not self.path:
            raise ValueError("task.name is 'jsonl' but task.path is not set: give the JSONL file")
        for key, least in (("num_operands", 2), ("digits", 1)):
            lo, hi = as_range(getattr(self, key))
            if lo < least or hi < lo:
                raise ValueError(f"task.{key} must be >= {least}, as an int or [min, max] with min <= max")
        return self


def as_range(value: int | tuple[int, int]) -> tuple[int, int]:
    """A task size given as ``n`` or ``[min, max]``, as the pair ``(min, max)``."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class PruneConfig(StrictModel):
    """A student derived from ``source`` by pruning (:mod:`distillery.models.prune`).

    Depth: keep ``layers`` decoder layers (or ``keep_ratio`` of them), ranked by ``method``.
    Width (Minitron-style, activation importance): ``mlp_ratio`` of the MLP channels,
    ``heads`` attention heads (whole KV groups), ``hidden`` embedding channels. ``calibration``:
    a JSONL of "messages" records, or ``data`` for the train job's own records (first
    ``num_examples``). In ``distillery run``, ``source: teacher`` is the run's teacher.
    """

    source: str
    layers: int | None = Field(None, ge=1)
    keep_ratio: float | None = Field(None, gt=0, le=1)
    method: Literal["block_influence", "uniform"] = "block_influence"
    keep_ends: bool = True  # always keep the first and last layers (they matter most)
    mlp_ratio: float | None = Field(None, gt=0, le=1)
    heads: int | None = Field(None, ge=1)
    hidden: int | None = Field(None, ge=1)
    calibration: str = "data"
    num_examples: int = Field(64, ge=1)
    max_len: int = Field(512, ge=2)
    # where the pruned model is written before training; null: <output_dir>.pruned (in
    # `distillery run`: <run_dir>/pruned/<settings>, shared by students pruned the same way)
    output_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        if self.layers is not None and self.keep_ratio is not None:
            raise ValueError("prune takes layers or keep_ratio, not both")
        if (self.layers, self.keep_ratio, self.mlp_ratio, self.heads, self.hidden) == (None,) * 5:
            raise ValueError("prune needs at least one of layers, keep_ratio, mlp_ratio, heads, hidden")
        return self


class ModelConfig(StrictModel):
    """A causal LM: an existing HF model (``path``: local dir or hub id) or one built from sizes,
    or (``prune``) one derived from an existing model by pruning, which the train job makes."""

    path: str | None = None
    arch: Literal["llama"] = "llama"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int | None = None  # default: 4 × hidden_size
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "auto"  # "auto" = cuda if available, else cpu
    trust_remote_code: bool = False
    prune: PruneConfig | None = None
    # "random": the architecture of ``path`` (or of the pruned model) with fresh weights drawn
    # under ``train.seed``: the from-scratch control of a pruned student (same shape, no transfer)
    init: Literal["pretrained", "random"] = "pretrained"

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.prune is not None and self.path is not None:
            raise ValueError("model takes path or prune (which makes the path), not both")
        if self.init == "random" and self.path is None and self.prune is None:
            raise ValueError("model.init: random copies the architecture of model.path or model.prune; "
                             "a model built from sizes is randomly initialised already: drop init")
        if self.path is None and self.prune is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        return self


class TokenizerConfig(StrictModel):
    """An existing tokenizer (``path``) or one trained on the task's text (``vocab_size``)."""

    path: str | None = None
    # a trained one: byte-level BPE (the byte alphabet and 6 special tokens always in, merges
    # fill the rest) or unigram (SentencePiece's algorithm, byte fallback)
    algorithm: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(384, ge=262)
    split_digits: bool = True  # one token per digit (small models learn arithmetic far better)


class DataConfig(StrictModel):
    """Training records: a JSONL file of "messages" records, or problems drawn from the task."""

    path: str | None = None
    task: TaskConfig | None = None
    num_examples: int = Field(10000, ge=1)
    target: Literal["chain", "answer"] = "chain"  # what the assistant turn holds
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if (self.path is None) == (self.task is None):
            raise ValueError("data needs exactly one of data.path (JSONL records) or data.task")
        return self


class TeacherConfig(StrictModel):
    """Which teacher answers, and how it is called.

    ``hf``: a local transformers model (``model`` = directory or hub id). ``openai``: any
    OpenAI-compatible endpoint (``model`` = the name sent in requests, ``base_urls`` = one or
    more ``http://host:port/v1`` URLs, spread over). ``vllm``: in-process vLLM (optional extra).
    The API key is read from the environment variable named by ``api_key_env``; a key in the
    config file itself is refused.
    """

    backend: Literal["hf", "openai", "vllm"] = "hf"
    model: str
    # hf / vllm
    batch_size: int = Field(64, ge=1)
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    trust_remote_code: bool = False
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to vllm.LLM(...)
    # openai
    base_urls: list[str] = Field(default_factory=list)
    api_key_env: str | None = None  # e.g. OPENAI_API_KEY; the key itself never goes in a file
    mode: Literal["chat", "completions"] = "chat"
    max_concurrency: int = Field(32, ge=1)  # requests in flight, over all base URLs
    max_retries: int = Field(6, ge=0)
    timeout_s: float = Field(120.0, gt=0)  # per request attempt
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)  # prompt + max_new_tokens, reserved up front

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if self.backend == "openai" and not self.base_urls:
            raise ValueError("teacher.backend is 'openai' but teacher.base_urls is empty: "
                             "give the endpoint, e.g. [http://127.0.0.1:8000/v1]")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError("teacher.api_key_env names an environment variable (e.g. OPENAI_API_KEY), "
                             "not the key itself: keys are never read from config files")
        return self


class LoraConfig(StrictModel):
    """LoRA adapters through peft; ``quantize: 4bit`` is QLoRA (bitsandbytes, CUDA only)."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    quantize: Literal["none", "4bit"] = "none"
    merge: bool = True  # save the student with adapters merged (a plain HF directory)


class CheckpointConfig(StrictModel):
    """Crash-safe checkpoints: model, optimizer, schedule, RNG and data position."""

    every: int | None = Field(None, ge=1)  # steps between checkpoints; null: only at the end
    keep_last: int = Field(2, ge=1)
    dir: str | None = None  # null: <output_dir>.checkpoints


class CrossTokenizerConfig(StrictModel):
    """``logit_kd`` between a teacher and a student whose tokenizers differ (docs/cross_tokenizer.md).

    Same tokenizer with a different vocabulary size (padded embedding rows, extra special
    tokens at the end) needs no config: it is detected and handled exactly. For different
    tokenizers both sides tokenize the same text, tokens are aligned by character offsets and
    distributions are compared at the positions where both start a token at the same character:

    * ``vocab_map``: teacher probability moves to the student token with the same string
      (mass merged where the teacher splits a student token into several), or with
      ``mapping: prefix`` a teacher token the student lacks goes to the student's longest token
      its text starts with (``=-`` onto ``=``); the mass left with no student counterpart is
      handled by ``unmapped`` (``renormalize``: dropped, both sides renormalized;
      ``tail_bucket``: one extra bucket on both sides); the divergence is the objective's ``loss``;
    * ``uld``: Universal Logit Distillation, the optimal-transport bound between the sorted
      probability vectors (arXiv 2402.12030), no mapping needed;
    * ``hybrid``: ``vocab_map`` with a tail bucket, plus ``uld_weight`` × ULD between the
      unmapped parts of both distributions (as TRL's GOLD does);
    * ``auto``: ``vocab_map``.
    """

    method: Literal["auto", "vocab_map", "uld", "hybrid"] = "auto"
    # the teacher's tokenizer: a path or hub id; null = the teacher model's directory
    teacher_tokenizer: str | None = None
    mapping: Literal["prefix", "exact"] = "prefix"
    # null: renormalize for vocab_map, tail_bucket for hybrid (which compares that bucket by ULD)
    unmapped: Literal["tail_bucket", "renormalize"] | None = None
    uld_weight: float = Field(1.0, ge=0)
    # live teacher: keep only the top_k teacher tokens per compared position (null = all)
    top_k: int | None = Field(None, ge=1)
    # chunked: project both models' hidden states to logits chunk_rows positions at a time and
    # turn each chunk into what the method reads (never [batch, seq, vocab]); dense: whole logits
    form: Literal["chunked", "dense"] = "chunked"
    chunk_rows: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> CrossTokenizerConfig:
        if self.resolved_method == "hybrid" and self.unmapped == "renormalize":
            raise ValueError("train.objective.cross_tokenizer.method 'hybrid' compares the unmapped mass by "
                             "ULD and needs unmapped: tail_bucket (or null); use method 'vocab_map' for "
                             "'renormalize'")
        return self

    @property
    def resolved_method(self) -> str:
        return "vocab_map" if self.method == "auto" else self.method

    @property
    def resolved_unmapped(self) -> str:
        if self.unmapped is not None:
            return self.unmapped
        return "tail_bucket" if self.resolved_method == "hybrid" else "renormalize"


class ObjectiveConfig(StrictModel):
    """Base of every objective's config (``train.objective``): ``name`` picks the objective.

    Each objective declares a subclass in its own module (:mod:`distillery.train.objectives`),
    with ``name: Literal["<its name>"]`` and its own keys, and registers it
    (:func:`distillery.objective_registry.register_objective`). ``train.objective`` is
    validated by the model registered for the name it gives, so only that objective's keys are
    accepted (and printed by ``distillery config show``).
    """

    name: str


class TrainConfig(StrictModel):
    """The training loop: objective, optimizer, schedule, batch. Shared by every objective."""

    # a registered objective: {name: logit_kd, kd_ratio: 0.5, ...}, or a bare name (``sft``)
    objective: SerializeAsAny[ObjectiveConfig] = Field(
        default_factory=lambda: objective_config("sft"))
    # 0: no training, the student is saved as initialised (e.g. a pruned model, as a baseline)
    steps: int = Field(1000, ge=0)
    # the global batch of one optimizer step: split over processes, then into grad_accum_steps
    # micro-batches (each process takes batch_size / (processes × grad_accum_steps) examples)
    batch_size: int = Field(64, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr × this
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = 1.0
    lora: LoraConfig | None = None  # LoRA (or QLoRA) on the student instead of full fine-tuning
    gradient_checkpointing: bool = False
    # padding-free batches: examples concatenated in one row, each attending only to itself
    packing: bool = False
    max_seq_len: int = Field(128, ge=8)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)  # JSONL always
    # multi-process runs: "fsdp" shards the teacher like the student; "replicate" puts a whole
    # teacher on every process and must be asked for; "auto" = fsdp when the run uses FSDP
    teacher_sharding: Literal["auto", "fsdp", "replicate"] = "auto"

    @field_validator("objective", mode="before")
    @classmethod
    def _objective(cls, value: Any) -> Any:
        return objective_config(value)


class TrainJobConfig(StrictModel):
    """``distillery train CONFIG``: train one model and save it as a plain HF directory."""

    output_dir: str
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    teacher: ModelConfig | None = None  # the live teacher, for objectives that need one
    teacher_cache: str | None = None  # a logit cache (distillery capture) instead of a live teacher
    # optional first step (torchtune's KD recipe): fine-tune the teacher on the same data
    # (objective sft, usually with lora) before distilling from it; saved beside output_dir
    teacher_finetune: TrainConfig | None = None
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainJobConfig:
        # what the objective needs comes from its registry entry, never from its name
        name, needs = self.train.objective.name, objective_needs(self.train.objective)
        if self.teacher_cache is not None:
            if not needs.cache:
                raise ValueError("teacher_cache (a logit cache) stands in for the live teacher of objectives "
                                 f"that read one; train.objective '{name}' does not: drop teacher_cache")
            if self.teacher is not None:
                raise ValueError("set teacher (a live model) or teacher_cache (captured logits), not both")
        elif needs.live_teacher == "required" and self.teacher is None:
            cache = ", or teacher_cache: a logit cache" if needs.cache else ""
            raise ValueError(f"train.objective '{name}' needs a teacher and none is configured "
                             f"(teacher: a model{cache})")
        if not needs.messages and self.data.path is None:
            raise ValueError(f"train.objective '{name}' reads records of its own kind, not problems of "
                             "a task: set data.path")
        if self.train.packing:
            why = None
            if not needs.packing:
                why = f"objective '{name}' " + ("samples its own batches" if needs.samples
                                                else "does not take packed batches with this config")
            elif self.teacher_cache is not None:
                why = "a logit cache (teacher_cache) is stored per example, not per packed row"
            if why:
                raise ValueError(f"train.packing is not supported here: {why}; set train.packing: false")
        if self.teacher_finetune is not None:
            if self.teacher is None or self.teacher.path is None:
                raise ValueError("teacher_finetune fine-tunes teacher.path: configure the teacher model")
            ft = objective_needs(self.teacher_finetune.objective)
            if ft.live_teacher == "required" or not ft.messages:
                raise ValueError("teacher_finetune.objective trains the teacher itself on the job's records: "
                                 "use one that needs no teacher and reads messages records (e.g. sft)")
        return self


class CaptureConfig(StrictModel):
    """``distillery capture CONFIG``: the teacher's top-k distributions over a dataset, to disk.

    The records are tokenized with ``tokenizer`` (the student's; default: the teacher model's
    own) exactly as training will, and the teacher scores every position the student learns
    from (assistant tokens). ``teacher.backend`` is ``hf`` (a local forward pass) or
    ``openai`` (a server returning prompt log-probs: ``distillery serve``, vLLM).
    """

    output_dir: str
    data: DataConfig
    teacher: TeacherConfig
    tokenizer: str | None = None  # path or hub id of the student's tokenizer
    k: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_seq_len: int = Field(256, ge=2)  # as train.max_seq_len: the cache must match training
    shard_size: int = Field(1024, ge=1)  # examples per shard (the unit of resume)
    # store each token's character offsets in its turn's content, so a student with another
    # tokenizer can train from this cache (train.objective.cross_tokenizer); 8 bytes per token more
    offsets: bool = False

    @model_validator(mode="after")
    def _check(self) -> CaptureConfig:
        if self.teacher.backend == "vllm":
            raise ValueError("capture supports teacher.backend hf or openai (serve the model with "
                             "vLLM and use backend: openai)")
        return self


class JudgeConfig(StrictModel):
    """``eval.judge``: an LLM judge over the held-out answers (docs/evaluation/judge.md).

    ``model`` is any teacher backend (``hf`` directory, ``openai`` URL such as ``distillery
    serve``, ``vllm``). ``pairwise``: each model against the reference model (the teacher), both
    orders, ties; ``pointwise``: a 1..10 grade per answer, reference-guided with the task's
    reference. Only the first ``max_items`` held-out items are judged (two calls per pair).
    """

    model: TeacherConfig
    pairwise: bool = True
    pointwise: bool = False
    max_items: int = Field(100, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    pairwise_template: str | None = None  # Jinja2 text or @file; null: judge_pairwise.j2
    pointwise_template: str | None = None  # null: judge_pointwise(_reference).j2

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if not (self.pairwise or self.pointwise):
            raise ValueError("eval.judge has pairwise and pointwise both false: enable one, or set eval.judge: null")
        return self


class LmEvalConfig(StrictModel):
    """``eval.lm_eval``: lm-evaluation-harness tasks on every model (needs the ``lm_eval`` extra)."""

    tasks: list[str] = Field(min_length=1)
    include_path: str | None = None  # a directory of local task YAMLs
    limit: float | None = Field(None, gt=0)  # items per task; a fraction when < 1
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> LmEvalConfig:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:  # checked here so a run fails before training
            raise ValueError("eval.lm_eval needs the lm-evaluation-harness: pip install 'distillery[lm_eval]' "
                             "(or set eval.lm_eval: null)")
        return self


class PitfallConfig(StrictModel):
    """``eval.pitfalls``: the thresholds of the report's pitfall checks (docs/evaluation/pitfalls.md)."""

    contamination_n: int = Field(13, ge=1)  # word n-grams shared with the training data
    contamination_threshold: float = Field(0.0, ge=0, lt=1)  # share of eval items allowed to overlap
    format_threshold: float = Field(0.05, ge=0, le=1)  # no-answer share that warns
    position_bias_threshold: float = Field(0.2, ge=0, le=1)  # judge position-bias rate that warns


class EvalConfig(StrictModel):
    """Held-out evaluation: greedy decoding (or ``samples`` sampled answers per problem), graded
    by the task's grader, bootstrap CIs, speed; optionally an LLM judge and lm-eval tasks (null:
    not run)."""

    num_problems: int = Field(500, ge=1)
    batch_size: int = Field(250, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    # answers per problem: 1 = greedy; n > 1 = sampled at `temperature`, accuracy is pass@1
    # averaged over the n samples, and pass@k (unbiased estimator) is reported for k in pass_k
    samples: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)  # null: 0 (greedy) for 1 sample, 1.0 for more
    pass_k: list[int] = Field(default_factory=lambda: [1])
    bootstrap_resamples: int = Field(10000, ge=100)
    speed_prompts: int = Field(8, ge=1)  # prompts decoded one at a time for batch-1 tokens/s
    seed: int = 0
    judge: JudgeConfig | None = None
    lm_eval: LmEvalConfig | None = None
    pitfalls: PitfallConfig = Field(default_factory=PitfallConfig)

    @model_validator(mode="after")
    def _check_sampling(self) -> EvalConfig:
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"eval.samples is {self.samples} but eval.temperature is 0: greedy decoding "
                             "gives identical samples; set eval.temperature > 0 (or leave it null: 1.0)")
        bad = [k for k in self.pass_k if not 1 <= k <= self.samples]
        if bad:
            raise ValueError(f"eval.pass_k holds {bad[0]}: each k must be between 1 and eval.samples "
                             f"({self.samples}); raise eval.samples or drop that k")
        return self

    @property
    def sampling_temperature(self) -> float:
        """The decoding temperature: ``temperature``, else 0 for one sample and 1.0 for more."""
        if self.temperature is not None:
            return self.temperature
        return 1.0 if self.samples > 1 else 0.0


class EvalJobConfig(StrictModel):
    """``distillery eval CONFIG``: evaluate existing model directories, no training.

    ``models``: name → HF directory. The reference (``reference``, else the model named
    ``teacher``) is what retention and pairwise judging compare against. ``train_data``: JSONL
    records the models were trained on, for the contamination check.
    """

    output_dir: str
    task: TaskConfig = Field(default_factory=TaskConfig)
    models: dict[str, str] = Field(min_length=1)
    reference: str | None = None
    train_data: str | list[str] | None = None  # one JSONL file or several
    device: str = "auto"
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> EvalJobConfig:
        ref = self.reference_name
        if ref not in self.models:
            raise ValueError(f"reference model {ref!r} is not among models ({', '.join(self.models)}): "
                             "name one model 'teacher', or set reference: <one of the models>")
        return self

    @property
    def reference_name(self) -> str:
        return self.reference or "teacher"

    @property
    def train_paths(self) -> list[str]:
        return [self.train_data] if isinstance(self.train_data, str) else list(self.train_data or [])


# --------------------------------------------------------------------------- loading


class ConfigError(DistilleryError, ValueError):
    """A config problem, with a message that says where it is and how to fix it."""


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = (*path, str(key_node.value))
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def parse_override(override: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` → (["train", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.subkey=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads 3e-4 as a string; the user means a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return parts, value


def apply_overrides(data: dict, overrides: list[str], schema: type[BaseModel] | None = None) -> dict:
    """Set each dotted override in a nested dict (creating sub-dicts as needed).

    With ``schema``, a section the file does not have starts from its default value, so that
    ``students.student_distilled.kd_ratio=0.3`` edits the default students instead of
    replacing them.
    """
    for override in overrides:
        parts, value = parse_override(override)
        if schema is not None and len(parts) > 1 and parts[0] not in data:
            field = schema.model_fields.get(parts[0])
            default = field.get_default(call_default_factory=True) if field is not None else None
            if isinstance(default, BaseModel):
                data[parts[0]] = default.model_dump(mode="json")
            elif isinstance(default, dict):
                data[parts[0]] = {
                    k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in default.items()
                }
        node = data
        for part in parts[:-1]:
            if isinstance(node.get(part), str):
                # a bare name is a shorthand for {name: ...} (``objective: logit_kd``): keep it
                node[part] = {"name": node[part]}
            elif not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The valid field names of the sub-model reached by following ``loc`` from ``schema``."""
    model: Any = schema
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            # a key of a dict-valued field (e.g. students.<name>): descend into its value type
            continue
        annotation = field.annotation
        model = _first_model(annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _first_model(annotation: Any) -> Any:
    """The first BaseModel class inside an annotation like ``X | None`` or ``dict[str, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


_TYPE_TAG = re.compile(r"^(int|float|str|bool|none|bytes|[a-z_-]+\[.*\])$")


def _is_type_tag(part: object) -> bool:
    """Pydantic adds the union member tried (``int``, ``tuple[int, int]``) to error locations."""
    return isinstance(part, str) and bool(_TYPE_TAG.match(part))


def _is_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def _format_errors(
    err: ValidationError,
    schema: type[BaseModel],
    source: str,
    lines: dict[tuple[str, ...], int],
    overridden: set[tuple[str, ...]],
    data: dict | None = None,
) -> str:
    messages: list[str] = []
    # a schema whose sections inherit keys from another (RunConfig: students from `defaults`)
    # names the key where it was written, not where it was merged to
    source_of = getattr(schema, "error_source", None)
    for e in err.errors():
        real = tuple(str(p) for p in e["loc"] if not _is_type_tag(p))
        loc = source_of(real, data or {}) if source_of is not None else real
        key = ".".join(loc) or "(top level)"
        where = source
        if any(_is_prefix(loc, o) or _is_prefix(o, loc) for o in overridden):
            where = "command-line override"
        elif loc in lines:
            where = f"{source}:{lines[loc]}"
        elif loc[:-1] in lines:
            where = f"{source}:{lines[loc[:-1]]}"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(schema, tuple(p for p in e["loc"][:-1] if not _is_type_tag(p)))
            close = difflib.get_close_matches(real[-1], valid, n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join((*loc[:-1], close[0]))}'?" if close else ""
            options = f"valid keys here: {', '.join(valid)}" if valid else ""
            messages.append(f"{where}: unknown key '{key}'. " + " ".join(x for x in (hint, options) if x))
        elif e["type"] == "missing":
            messages.append(f"{where}: missing required key '{key}'")
        else:
            got = e.get("input")
            got_s = f" (got {got!r}, a {type(got).__name__})" if not isinstance(got, dict) else ""
            messages.append(f"{where}: key '{key}': {e['msg']}{got_s}")
    return "invalid config:\n  " + "\n  ".join(dict.fromkeys(messages))  # one inherited key, said once


def load_config(path: str | Path | None, schema: type[M], overrides: list[str] | None = None) -> M:
    """Load a YAML config (or the schema's defaults when ``path`` is None), apply overrides, validate."""
    overrides = overrides or []
    source = str(path) if path is not None else "(defaults)"
    text = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text = read_text(p, ConfigError)
    try:
        data = yaml.safe_load(text) if text else {}
        lines = _yaml_lines(text) if text else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        n_lines = max(text.count("\n") + (not text.endswith("\n")), 1)
        line = f":{min(mark.line + 1, n_lines)}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        opened = f" ({context} at line {cmark.line + 1})" if context and cmark is not None else ""
        raise ConfigError(f"{source}{line}: invalid YAML: {problem}{opened}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    if "threads" not in schema.model_fields:
        # every config may say how many CPU threads its command uses (docs/threads.md); an
        # override `threads=N` replaces the file's
        given = [o for o in overrides if o.split("=", 1)[0].strip() == "threads"]
        overrides = [o for o in overrides if o not in given]
        if given:
            data["threads"] = yaml.safe_load(given[-1].split("=", 1)[1])
        if "threads" in data:
            apply_config_threads(data.pop("threads"), source + (" (override)" if given else ""))
    apply_overrides(data, overrides, schema)
    overridden = {tuple(parse_override(o)[0]) for o in overrides}
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, schema, source, lines, overridden, data)) from None


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (what ``distillery config show`` prints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_hash(*parts: Any) -> str:
    """A short, stable fingerprint of config sections (used to decide whether a stage is stale)."""
    payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
