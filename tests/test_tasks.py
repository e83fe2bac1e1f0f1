"""Tasks: the arithmetic generator (determinism, disjoint splits, correct chains, knobs), how
task outputs are graded (distillery.answers, numeric by default), and user JSONL task files."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from distillery.answers import extract_final_answer, grade
from distillery.config import TaskConfig
from distillery.tasks import Problem, is_correct, load_problems
from distillery.tasks.arithmetic import generate_problems, iter_problems, split_of
from distillery.tasks.jsonl import TaskFileError, read_task_file, split_task_file

ALL_OPS = ["+", "-", "*"]
STEP = re.compile(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$")
WORDS = {"add": "+", "subtract": "-", "multiply by": "*"}


def _operands(prompt: str) -> list[str]:
    return re.findall(r"\d+", prompt)


def _ops(prompt: str) -> list[str]:
    return re.findall(r"[+\-*]", prompt)


def _check_chain(p: Problem) -> None:
    """Every step is right, steps are chained, '*' comes first, and #answer == reference == eval."""
    *steps, final = p.chain.split(";")
    assert final == f"#{p.reference}"
    assert len(steps) == len(_ops(p.prompt))
    kinds = []
    for step in steps:
        m = STEP.match(step)
        assert m, f"malformed step {step!r} in {p.chain!r}"
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, step
        kinds.append(op == "*")
    assert kinds == sorted(kinds, reverse=True), f"multiplications must come first: {p.chain}"
    last = STEP.match(steps[-1])
    assert last[4] == p.reference
    assert str(eval(p.prompt)) == p.reference  # Python's precedence is the task's precedence


# --------------------------------------------------------------------------- generator


def test_same_seed_same_problems_different_seed_different():
    cfg = TaskConfig(operations=ALL_OPS)
    a = generate_problems(cfg, "train", 200, seed=3)
    b = generate_problems(cfg, "train", 200, seed=3)
    c = generate_problems(cfg, "train", 200, seed=4)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert len({p.prompt for p in a} & {p.prompt for p in c}) < 100
    # load_problems is the same generator
    assert load_problems(cfg, "train", 200, seed=3) == a


def test_problems_within_a_split_are_distinct():
    ps = generate_problems(TaskConfig(), "train", 2000, seed=0)
    assert len({p.prompt for p in ps}) == len(ps)
    assert len({p.id for p in ps}) == len(ps)


def test_train_and_eval_splits_are_disjoint():
    cfg = TaskConfig(num_operands=(2, 3), digits=(1, 2))
    train = generate_problems(cfg, "train", 3000, seed=0)
    evals = generate_problems(cfg, "eval", 600, seed=0) + generate_problems(cfg, "eval", 600, seed=1)
    train_text = {p.prompt for p in train}
    eval_text = {p.prompt for p in evals}
    assert len(eval_text) > 600  # two seeds give different eval problems
    assert not train_text & eval_text
    assert all(split_of(t, cfg.eval_fraction) == "train" for t in train_text)
    assert all(split_of(t, cfg.eval_fraction) == "eval" for t in eval_text)
    assert all(p.id.startswith("arith-train-") for p in train)
    assert all(p.id.startswith("arith-eval-") for p in evals)


def test_splits_partition_a_small_space_exactly():
    """digits=1, two operands, '+': 100 problems; the two splits exhaust it, disjointly, with no gaps."""
    cfg = TaskConfig(digits=1, num_operands=2, operations=["+"])
    seen = {}
    for split in ("train", "eval"):
        stream = iter_problems(cfg, split, seed=0)
        got = set()
        with pytest.raises(RuntimeError, match="exhausted"):
            for p in stream:
                got.add(p.prompt)
        seen[split] = got
    everything = {f"{a}+{b}" for a in range(10) for b in range(10)}
    assert not seen["train"] & seen["eval"]
    assert seen["train"] | seen["eval"] == everything
    assert 0.1 < len(seen["eval"]) / 100 < 0.3  # eval_fraction 0.2


def test_exhaustion_error_when_asking_for_too_many():
    cfg = TaskConfig(digits=1, num_operands=2, operations=["+"])
    with pytest.raises(RuntimeError, match=r"exhausted.*task\.digits"):
        generate_problems(cfg, "train", 1000)


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        generate_problems(TaskConfig(), "test", 1)


def test_chains_are_correct_with_all_operations():
    cfg = TaskConfig(num_operands=(2, 5), digits=(1, 3), operations=ALL_OPS)
    problems = generate_problems(cfg, "train", 500, seed=11) + generate_problems(cfg, "eval", 100, seed=11)
    for p in problems:
        _check_chain(p)
    # negatives do occur (subtraction), and are handled in the chain
    assert any(p.reference.startswith("-") for p in problems)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    split=st.sampled_from(["train", "eval"]),
    n_lo=st.integers(2, 4),
    n_extra=st.integers(0, 2),
    d_lo=st.integers(1, 3),
    d_extra=st.integers(0, 2),
    ops=st.lists(st.sampled_from(ALL_OPS), min_size=1, max_size=3, unique=True),
)
def test_any_generated_problem_is_right_and_respects_the_knobs(seed, split, n_lo, n_extra, d_lo, d_extra, ops):
    cfg = TaskConfig(num_operands=(n_lo, n_lo + n_extra), digits=(d_lo, d_lo + d_extra), operations=ops)
    for p in generate_problems(cfg, split, 5, seed=seed):
        _check_chain(p)
        nums = _operands(p.prompt)
        assert n_lo <= len(nums) <= n_lo + n_extra
        assert all(d_lo <= len(x) <= d_lo + d_extra for x in nums), p.prompt
        assert all(x == "0" or not x.startswith("0") for x in nums)
        assert set(_ops(p.prompt)) <= set(ops)
        assert split_of(p.prompt, cfg.eval_fraction) == split
        assert extract_final_answer(p.chain).answer == p.reference
        assert is_correct(p.target("chain"), p.reference)
        assert is_correct(p.target("answer"), p.reference)


def test_knobs_exact_values():
    ps = generate_problems(TaskConfig(num_operands=4, digits=3, operations=["*"]), "train", 200)
    for p in ps:
        nums = _operands(p.prompt)
        assert len(nums) == 4
        assert all(100 <= int(x) <= 999 for x in nums)
        assert set(_ops(p.prompt)) == {"*"}
    # a range is a range: every value in it shows up
    ps = generate_problems(TaskConfig(num_operands=(2, 4), digits=(1, 3), operations=ALL_OPS), "train", 400)
    assert {len(_operands(p.prompt)) for p in ps} == {2, 3, 4}
    assert {len(x) for p in ps for x in _operands(p.prompt)} == {1, 2, 3}
    assert {op for p in ps for op in _ops(p.prompt)} == set(ALL_OPS)


def test_num_operands_one_is_rejected():
    # a one-operand "problem" has no step to reason about; the generator cannot honour it
    with pytest.raises(ValidationError, match="num_operands must be >= 2"):
        TaskConfig(num_operands=1)


def test_invalid_knobs_are_rejected():
    for bad in ({"digits": 0}, {"num_operands": (3, 2)}, {"digits": (0, 2)}, {"operations": ["/"]}):
        with pytest.raises(ValidationError):
            TaskConfig(**bad)


def _words_to_symbolic(prompt: str) -> str:
    m = re.match(r"^Start with (\d+)((?:, then [a-z ]+ \d+)*)\. Use the usual order of operations\. What is the result\?$", prompt)
    assert m, prompt
    expr = m[1]
    for word, n in re.findall(r", then ([a-z ]+?) (\d+)", m[2]):
        expr += WORDS[word] + n
    return expr


def test_word_style_renders_words_with_the_same_answers():
    sym = generate_problems(TaskConfig(operations=ALL_OPS, num_operands=(2, 4)), "train", 300, seed=5)
    word = generate_problems(TaskConfig(operations=ALL_OPS, num_operands=(2, 4), style="word"), "train", 300, seed=5)
    assert [p.id for p in word] == [p.id for p in sym]
    assert [p.reference for p in word] == [p.reference for p in sym]
    assert [p.chain for p in word] == [p.chain for p in sym]
    for w, s in zip(word, sym):
        assert not _ops(w.prompt)  # no operator symbols in a word problem
        assert _words_to_symbolic(w.prompt) == s.prompt
        assert str(eval(_words_to_symbolic(w.prompt))) == w.reference


def test_problem_target():
    p = Problem(id="x", prompt="2+3", reference="5", chain="2+3=5;#5")
    assert p.target("chain") == "2+3=5;#5"
    assert p.target("answer") == "#5"
    assert Problem(id="y", prompt="q", reference="7").target("chain") == "#7"


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("55*2=110;22+110=132;#132", "132"),
        ("#-7", "-7"),
        ("5-12=-7;#-7", "-7"),
        ("# 12", "12"),
        ("#012", "12"),
        ("#12.0", "12"),
        ("#12.5", "12.5"),
        ("#1;#2", "2"),  # last '#' wins
        ("1+1=2;#2 and then #3", "3"),
        ("The answer is 1,234.", "1234"),
        ("the ANSWER IS: $42", "42"),
        ("So the answer is -1,000.50", "-1000.5"),
        ("#7<|end|>", "7"),
        ("#1,234", "1234"),
    ],
)
def test_task_outputs_read_by_the_numeric_grader(output, expected):
    assert grade(output, expected).correct
    assert not grade(output, str(int(float(expected)) + 1)).correct


@pytest.mark.parametrize("output", ["", None, "garbage", "12+3=15;15-", "#", "# abc", "12+3=15", "###"])
def test_malformed_task_outputs_have_no_answer(output):
    assert grade(output, "15").status == "no_answer"


@pytest.mark.parametrize(
    ("text", "reference"),
    [("1,234", "1234"), ("007", "7"), ("-0012", "-12"), ("12.0", "12"), ("12.50", "12.5"),
     ("-0", "0"), (" 42 ", "42"), ("42.", "42"), ("  Hello   World ", "hello world")],
)
def test_numeric_grader_normalizes_formatting(text, reference):
    assert grade(f"The answer is {text}", reference).correct


@given(st.integers(-(2**53), 2**53))
def test_numeric_grader_on_formatted_integers(n):
    assert grade(f"#{n:,}", str(n)).correct
    assert grade(f"#{n}.0", str(n)).correct
    assert not grade(f"#{n}", str(n + 1)).correct


def test_big_integer_answers_are_compared_exactly():
    ps = generate_problems(TaskConfig(digits=10, num_operands=2, operations=["*"]), "train", 10)
    for p in ps:
        wrong = str(int(p.reference) + 1)
        assert not is_correct(f"#{wrong}", p.reference), f"{wrong} accepted for {p.prompt}={p.reference}"
        assert is_correct(f"#{p.reference}", p.reference)


@pytest.mark.parametrize("text", ["Nan", "Infinity", "inf", "1e400", "1e999999999"])
def test_numeric_grader_never_raises_on_odd_numbers(text):
    assert grade(f"The answer is {text}", "1").status == "wrong"


@pytest.mark.parametrize(
    ("output", "reference", "ok"),
    [
        ("55*2=110;22+110=132;#132", "132", True),
        ("#0132", "132", True),
        ("#12.0", "12", True),
        ("#1234", "1,234", True),
        ("The answer is 1,234.", "1234", True),
        ("#-7", "-7", True),
        ("#7", "-7", False),
        ("#133", "132", False),
        ("12+3=15;15-", "15", False),  # a cut-off chain is not an answer
        ("15", "15", True),  # a last line that is only the answer is one
        ("12+3=15", "15", False),  # ... but a step of a chain is not
        ("", "0", False),
    ],
)
def test_is_correct(output, reference, ok):
    assert is_correct(output, reference) is ok


def test_is_correct_with_the_task_grader():
    assert not is_correct("The answer is 78-73", "5")  # numeric: an expression is not a number
    assert is_correct("The answer is 78-73", "5", "symbolic")
    assert is_correct("The answer is 78-73", "5", TaskConfig(grader="symbolic").grader)


# --------------------------------------------------------------------------- JSONL task files


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _good_records(n: int = 200) -> list[dict]:
    recs = [{"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "reference": 2 * i} for i in range(n)]
    recs[5].pop("id")  # ids are optional
    recs[6]["chain"] = "6+6=12;#12"
    return recs


def test_good_task_file_loads_and_splits_disjointly(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", _good_records())
    problems = read_task_file(path)
    assert len(problems) == 200
    assert problems[0] == Problem(id="q0", prompt="What is 0 plus 0?", reference="0")
    assert problems[6].chain == "6+6=12;#12"
    assert problems[5].id and problems[5].id != "None"
    assert all(isinstance(p.reference, str) for p in problems)
    train = split_task_file(problems, "train", 0.2)
    evals = split_task_file(problems, "eval", 0.2)
    assert not {p.id for p in train} & {p.id for p in evals}
    assert len(train) + len(evals) == 200
    assert 0.1 < len(evals) / 200 < 0.3
    # the split depends on each prompt alone, not on file order
    shuffled = problems[:]
    random.Random(0).shuffle(shuffled)
    assert {p.id for p in split_task_file(shuffled, "eval", 0.2)} == {p.id for p in evals}


def test_blank_lines_are_skipped(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "reference": "1"}, "", "   ", {"prompt": "b", "reference": "2"}])
    assert [p.prompt for p in read_task_file(path)] == ["a", "b"]


@pytest.mark.parametrize(
    ("lines", "line", "needle"),
    [
        ([{"prompt": "a", "reference": 1}, {"prompt": "b", "reference": 2}, '{"prompt": "c", "reference": 3'], 3, "not valid JSON"),
        ([{"prompt": "a", "reference": 1}, {"prompt": "b"}], 2, '"reference"'),
        ([{"prompt": "a", "reference": 1}, "", {"prompt": "b", "reference": 1}, {"reference": 2}], 4, '"prompt"'),
        ([{"prompt": 5, "reference": 1}], 1, '"prompt"'),
        ([[1, 2]], 1, "each line must be a JSON object"),
        ([{"id": "x", "prompt": "a", "reference": 1}, {"id": "y", "prompt": "b", "reference": 1}, {"id": "x", "prompt": "c", "reference": 1}], 3, "duplicate id 'x'"),
        ([{"prompt": "same", "reference": 1}, {"prompt": "same", "reference": 1}], 2, "duplicate id"),
    ],
)
def test_bad_task_file_names_file_and_line(tmp_path, lines, line, needle):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TaskFileError) as info:
        read_task_file(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}:")
    assert needle in msg


def test_missing_or_empty_task_file(tmp_path):
    with pytest.raises(TaskFileError, match="not found"):
        read_task_file(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TaskFileError, match="no records"):
        read_task_file(empty)


def test_load_problems_from_jsonl_split_by_hash(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", _good_records())
    cfg = TaskConfig(name="jsonl", path=str(path))
    train_all = load_problems(cfg, "train", 10_000)
    eval_all = load_problems(cfg, "eval", 10_000)
    assert not {p.id for p in train_all} & {p.id for p in eval_all}
    assert len(train_all) + len(eval_all) == 200
    some = load_problems(cfg, "train", 20, seed=1)
    assert len(some) == 20 and {p.id for p in some} <= {p.id for p in train_all}
    assert load_problems(cfg, "train", 20, seed=1) == some
    assert load_problems(cfg, "train", 20, seed=2) != some


def test_load_problems_with_separate_eval_file(tmp_path):
    train_path = _write_jsonl(tmp_path / "train.jsonl", _good_records(50))
    eval_path = _write_jsonl(tmp_path / "eval.jsonl", [{"id": f"e{i}", "prompt": f"E{i}", "reference": i} for i in range(10)])
    cfg = TaskConfig(name="jsonl", path=str(train_path), eval_path=str(eval_path))
    train = load_problems(cfg, "train", 1000)
    evals = load_problems(cfg, "eval", 1000)
    assert len(train) == 50  # the whole train file, no hash split
    assert [p.id for p in evals] == [f"e{i}" for i in range(10)]
    assert len(load_problems(cfg, "eval", 3)) == 3


def test_jsonl_task_config_needs_path():
    with pytest.raises(ValidationError, match="task.path"):
        TaskConfig(name="jsonl")
