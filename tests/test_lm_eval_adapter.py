"""The lm-evaluation-harness adapter on a local YAML task and tiny Llamas saved to disk.

The task is multiple choice over a local JSONL (``dataset_path: json``): "a+b=" with three
candidate sums. A random model's accuracy must equal the argmax of its own log-likelihoods
computed the plain way (float64), and a model trained on the right answers must beat it.
Skipped when the ``lm_eval`` extra is not installed.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys

import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402

from distillery.config import ModelConfig  # noqa: E402
from distillery.evaluate.lm_eval_adapter import format_lm_eval, run_lm_eval  # noqa: E402
from distillery.models import build_model, save_model, train_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TASK_YAML = """\
task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}="
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def make_docs(n: int = 40) -> list[dict]:
    rng = random.Random(0)
    docs = []
    for _ in range(n):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        options = [a + b, a + b + rng.randint(1, 9), a + b - rng.randint(1, 9)]
        rng.shuffle(options)
        docs.append({"question": f"{a}+{b}", "choices": [str(o) for o in options],
                     "answer": options.index(a + b)})
    return docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(docs, task dir, random model dir, trained model dir)."""
    root = tmp_path_factory.mktemp("lm_eval")
    docs = make_docs()
    data = root / "tasks" / "tiny_sums.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks" / "tiny_sums.yaml").write_text(TASK_YAML.format(data=data))
    tok = train_tokenizer([f"{d['question']}={' '.join(d['choices'])}" for d in docs], vocab_size=280)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu"), tok)
    random_dir = save_model(model, tok, root / "random")
    trained_dir = save_model(train_on_answers(model, tok, docs), tok, root / "trained")
    return docs, root / "tasks", random_dir, trained_dir


def train_on_answers(model, tok, docs, steps: int = 100):
    """Full-batch Adam on "a+b= c" for the right c, loss on c only: the model memorizes the
    answers (measured: answer loss 0.04 after 100 steps, 2.5 s)."""
    texts = [f"{d['question']}= {d['choices'][d['answer']]}" for d in docs]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for row, d in enumerate(docs):
        labels[row, : len(tok(d["question"] + "=").input_ids)] = -100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def plain_choice_margins(model_dir, docs) -> list[tuple[bool, float]]:
    """Per doc: (argmax of summed float64 log-likelihoods is right, gap to the runner-up).

    lm-eval scores ``doc_to_text`` + its target delimiter " " + the choice."""
    from distillery.models import load_model, load_tokenizer

    tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir), device="cpu").double()
    out = []
    for d in docs:
        context = d["question"] + "="
        n_ctx = len(tok(context).input_ids)
        scores = []
        for choice in d["choices"]:
            ids = torch.tensor([tok(context + " " + choice).input_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
            targets = ids[0, n_ctx:]
            scores.append(logp[n_ctx - 1 :].gather(-1, targets[:, None]).sum().item())
        ranked = sorted(scores, reverse=True)
        out.append((scores.index(ranked[0]) == d["answer"], ranked[0] - ranked[1]))
    return out


def test_local_yaml_task_on_a_random_model_matches_plain_loglikelihoods(setup):
    docs, task_dir, random_dir, _ = setup
    result = run_lm_eval(random_dir, ["tiny_sums"], include_path=str(task_dir), device="cpu", batch_size=16)
    acc = result["lm_eval"]["tiny_sums"]["acc"]
    assert set(acc) == {"value", "stderr", "ci95", "n"} and acc["n"] == len(docs)
    assert 0.0 <= acc["ci95"][0] <= acc["value"] <= acc["ci95"][1] <= 1.0
    # lm-eval's stderr for a mean of 0/1 scores is the sample formula sqrt(p(1-p)/(n-1))
    p, n = acc["value"], len(docs)
    assert acc["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert acc["ci95"][1] - acc["ci95"][0] <= 2 * 1.96 * acc["stderr"] + 1e-12
    margins = plain_choice_margins(random_dir, docs)
    near_ties = sum(gap < 1e-4 for _, gap in margins)  # float32 vs float64 may order these apart
    assert abs(p - sum(ok for ok, _ in margins) / n) <= near_ties / n


def test_trained_model_beats_the_random_one_and_limit_counts(setup):
    docs, task_dir, random_dir, trained_dir = setup
    random_acc = run_lm_eval(random_dir, ["tiny_sums"], include_path=str(task_dir), device="cpu")
    trained = run_lm_eval(trained_dir, ["tiny_sums"], include_path=str(task_dir), device="cpu")
    before = random_acc["lm_eval"]["tiny_sums"]["acc"]
    after = trained["lm_eval"]["tiny_sums"]["acc"]
    assert after["value"] >= 0.9 and after["ci95"][0] > before["value"], (before, after)
    limited = run_lm_eval(trained_dir, ["tiny_sums"], include_path=str(task_dir), device="cpu", limit=10)
    assert limited["lm_eval"]["tiny_sums"]["acc"]["n"] == 10
    table = format_lm_eval({"random": random_acc, "trained": trained, "no lm-eval": {"accuracy": 0.5}})
    assert table.count("| tiny_sums | acc |") == 2 and "no lm-eval" not in table
    print(f"\nrandom {before['value']:.3f} {before['ci95']}, trained {after['value']:.3f} {after['ci95']}")


def test_clear_errors(setup, tmp_path, monkeypatch):
    _, task_dir, random_dir, _ = setup
    with pytest.raises(FileNotFoundError, match="include_path"):
        run_lm_eval(random_dir, ["tiny_sums"], include_path=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ValueError, match="non-empty list"):
        run_lm_eval(random_dir, "tiny_sums", include_path=str(task_dir))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an install without the extra sees
    with pytest.raises(ImportError, match=re.escape("pip install 'distillery[lm_eval]'")):
        run_lm_eval(random_dir, ["tiny_sums"], include_path=str(task_dir))


@pytest.mark.slow  # indexes lm-eval's ~14k task YAMLs: 15-50 s on a shared 2-core machine
def test_unknown_task_is_named(setup):
    _, task_dir, random_dir, _ = setup
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task_xyz'\]"):
        run_lm_eval(random_dir, ["tiny_sums", "no_such_task_xyz"], include_path=str(task_dir), device="cpu")
