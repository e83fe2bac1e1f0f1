"""Task prompts for chat models: a task's prompt template and system prompt, rendered sandboxed,
reach generation, training records, capture and evaluation as the same turns."""

from __future__ import annotations

import json

import pytest

from distillery.chat import TemplateError, prompt_text, render, task_messages, tokenize_messages
from distillery.config import DataConfig, EvalConfig, TaskConfig
from distillery.elicit.feedback import FeedbackConfig, assemble_preferences, join_grades
from distillery.elicit.labeling import LabelingConfig, run_labeling
from distillery.elicit.seeds import load_seeds
from distillery.elicit.self_knowledge import sample_handler, sample_requests
from distillery.evaluate.run import evaluate_model
from distillery.records import read_jsonl
from distillery.tasks import Problem, load_problems, load_records
from distillery.teachers import SamplingParams
from distillery.teachers.phases import run_phase

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = "Solve: {{ prompt }}\nEnd with: #### <answer>"
SYSTEM = "You are a careful calculator."


@pytest.fixture
def jsonl_task(tmp_path):
    """A user's JSONL task whose lines carry an extra key (``unit``) the template uses."""
    path = tmp_path / "task.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"{i}+{i}", "reference": str(2 * i), "unit": "apples"}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_default_is_the_bare_prompt_as_before(task_cfg):
    """No template, no system prompt: the one user turn the code sent before templates existed."""
    for p in load_problems(task_cfg, "eval", 5, seed=0):
        assert p.messages == [{"role": "user", "content": p.prompt}]
        assert task_messages(task_cfg, p) == [{"role": "user", "content": p.prompt}]
    # a problem made without a task (tests, notebooks) is sent bare too
    assert Problem(id="x", prompt="8-9", reference="-1").messages == [{"role": "user", "content": "8-9"}]


def test_system_prompt_and_template_with_extra_keys(jsonl_task):
    task = TaskConfig(name="jsonl", path=str(jsonl_task), system_prompt=SYSTEM,
                      prompt_template="[{{ id }}] How many {{ unit }}: {{ prompt }}? End with: #### <answer>")
    p = next(p for p in load_problems(task, "train", 12) if p.id == "q3")
    assert p.messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "[q3] How many apples: 3+3? End with: #### <answer>"},
    ]


def test_template_from_a_file(tmp_path, task_cfg, monkeypatch):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "chat.j2").write_text(CHAT + "\n")  # the file's final newline is dropped
    monkeypatch.chdir(tmp_path)  # "@path" is relative to the working directory
    task = task_cfg.model_copy(update={"prompt_template": "@prompts/chat.j2"})
    p = load_problems(task, "eval", 1)[0]
    assert p.messages == [{"role": "user", "content": f"Solve: {p.prompt}\nEnd with: #### <answer>"}]
    with pytest.raises(TemplateError, match=r"task\.prompt_template: template file not found: missing\.j2"):
        load_problems(task_cfg.model_copy(update={"prompt_template": "@missing.j2"}), "eval", 1)


def test_unknown_variable_names_the_key(task_cfg):
    task = task_cfg.model_copy(update={"prompt_template": "{{ prompt }} in {{ units }}"})
    with pytest.raises(TemplateError, match=r"^task\.prompt_template: 'units' is undefined; "
                                            r"available variables: id, prompt$"):
        load_problems(task, "eval", 1)


def test_syntax_error_names_the_key_and_line(task_cfg):
    task = task_cfg.model_copy(update={"prompt_template": "ok\n{{ prompt "})
    with pytest.raises(TemplateError, match=r"^task\.prompt_template: template line 2: "):
        load_problems(task, "eval", 1)


@pytest.mark.parametrize("attack", [
    "{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}",
    "{{{{ prompt.__class__.__mro__[1].__subclasses__() }}}}{{{{ ''.join(['touch {marker}']) }}}}",
])
def test_the_sandbox_refuses_python_internals(tmp_path, task_cfg, attack):
    """A template shared in someone's config cannot run a command: the sandbox raises before."""
    marker = tmp_path / "pwned"
    task = task_cfg.model_copy(update={"prompt_template": attack.format(marker=marker)})
    with pytest.raises(TemplateError, match=r"^task\.prompt_template: refused by the template sandbox"):
        load_problems(task, "eval", 1)
    assert not marker.exists()


def test_the_sandbox_is_immutable():
    """A template cannot change a value it is given (here, the caller's list)."""
    items = ["a"]
    with pytest.raises(TemplateError, match="refused by the template sandbox"):
        render("{{ items.append('b') }}", "labeling.template", items=items)
    assert items == ["a"]


def test_generation_training_capture_and_eval_send_the_same_turns(tmp_path, task_cfg, tiny_teacher):
    """For each problem, every path builds exactly the same prompt turns: the labeling records
    (generate), the ground-truth records (train and capture read them through load_records), the
    tokens capture scores, and what evaluate_model generates from."""
    task = task_cfg.model_copy(update={"prompt_template": CHAT, "system_prompt": SYSTEM})
    problems = load_problems(task, "train", 4, seed=1)
    expected = {p.id: p.messages for p in problems}
    assert all(m[0]["role"] == "system" and m[1]["content"].startswith("Solve: ") for m in expected.values())

    # generation: seeds drawn from the task, labeled by a (tiny) teacher
    seeds = load_seeds(task, None, "train", 4, seed=1)
    cfg = LabelingConfig(chain_of_thought=False, require_answer=False, drop_truncated=False)
    path, _ = run_labeling(seeds, tiny_teacher, cfg, SamplingParams(max_new_tokens=3), tmp_path,
                           show_progress=False)
    generated = {r["meta"]["seed_id"]: r["messages"][:-1] for r in read_jsonl(path)}
    assert generated == expected

    # training records (and capture, which reads the same data section)
    records = load_records(DataConfig(task=task, num_examples=4, seed=1))
    assert {r["id"]: r["messages"][:-1] for r in records} == expected

    # capture tokenizes each record as training does: its prompt part is the eval prompt's tokens
    tok = tiny_teacher.tokenizer
    for r in records:
        prompt_ids = tok(prompt_text(expected[r["id"]], tok), add_special_tokens=False)["input_ids"]
        assert tokenize_messages(r["messages"], tok, 512)["input_ids"][: len(prompt_ids)] == prompt_ids

    # evaluation: greedy outputs are the ones the teacher gives for exactly these turns
    eval_cfg = EvalConfig(num_problems=4, batch_size=4, max_new_tokens=4, bootstrap_resamples=100,
                          speed_prompts=1)
    res = evaluate_model(tiny_teacher, problems, eval_cfg)
    direct = tiny_teacher.generate([p.messages for p in problems],
                                   SamplingParams(max_new_tokens=4, temperature=0.0), batch_size=4)
    assert [i["output"] for i in res["items"]] == [g[0].text for g in direct]


def test_student_samples_and_preference_pairs_keep_the_task_turns(tmp_path, task_cfg, tiny_teacher):
    """Self-knowledge and feedback sample a student on the task's turns; their records and the
    preference pairs built from graded samples keep those turns, while the grader is shown the
    user turn (not the system prompt) as "the prompt"."""
    task = task_cfg.model_copy(update={"prompt_template": CHAT, "system_prompt": SYSTEM})
    seeds = load_seeds(task, None, "train", 2, seed=4)
    expected = {p.id: p.messages for p in load_problems(task, "train", 2, seed=4)}
    params = SamplingParams(max_new_tokens=3, temperature=1.0, n=2, seed=0)
    requests = list(sample_requests(seeds, params, None, "self_knowledge.template", "samples"))
    assert {r.meta["seed_id"]: r.messages for r in requests} == expected
    path, _ = run_phase("samples", requests, tiny_teacher,
                        sample_handler("feedback", tiny_teacher.name, keep_instruction=False), tmp_path,
                        show_progress=False)
    samples = read_jsonl(path)
    assert len(samples) == 4 and all(r["messages"][:-1] == expected[r["meta"]["seed_id"]] for r in samples)

    grades = [{"id": r["id"], "score": float(r["meta"]["sample"] * 5), "rationale": "",
               "meta": {"judge": "T"}} for r in samples]
    graded = join_grades(samples, grades)
    assert all(g["prompt"] == expected[g["seed_id"]][1]["content"] for g in graded)
    prefs, _, _ = assemble_preferences(graded, FeedbackConfig(min_margin=1))
    assert prefs and all(p["prompt"] == expected[p["meta"]["seed_id"]] for p in prefs)
