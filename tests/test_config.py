"""Config loading: located errors (file:line, key, suggestion), overrides, dump/hash, validators, CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillery.config import (
    ConfigError,
    RunConfig,
    TaskConfig,
    TrainJobConfig,
    config_hash,
    dump_config,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parent.parent
DISTILLERY = Path(sys.executable).parent / "distillery"  # the console script (cli.py has no __main__ guard)


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _error(path, schema=RunConfig, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, schema, overrides)
    return str(info.value)


TRAIN_JOB = """
output_dir: out/model
data:
  task:
    name: arithmetic
    digits: 2
train:
  steps: 5
"""


# --------------------------------------------------------------------------- unknown keys


def test_misspelled_nested_key_names_key_file_line_and_closest_key(tmp_path):
    path = _write(
        tmp_path,
        """
        run_dir: runs/x
        train:
          steps: 10
          lrr: 0.1
          seed: 3
        """,
    )
    msg = _error(path)
    assert f"{path}:4" in msg  # 'lrr' is on line 4
    assert "'train.lrr'" in msg
    assert "did you mean 'train.lr'?" in msg


@pytest.mark.parametrize(
    ("yaml_text", "line", "bad", "suggestion"),
    [
        ("run_dri: x\n", 1, "run_dri", "run_dir"),
        ("eval:\n  seed: 1\n  num_problem: 3\n", 3, "eval.num_problem", "eval.num_problems"),
        ("student:\n  hiden_size: 64\n", 2, "student.hiden_size", "student.hidden_size"),
        ("generate:\n  max_new_token: 4\n", 2, "generate.max_new_token", "generate.max_new_tokens"),
        # a dict-valued section: the suggestion comes from the value type (StudentConfig)
        ("students:\n  mine:\n    data: teacher\n    kd_ratoi: 1\n", 4, "students.mine.kd_ratoi", "students.mine.kd_ratio"),
    ],
)
def test_unknown_keys_in_run_config(tmp_path, yaml_text, line, bad, suggestion):
    path = _write(tmp_path, yaml_text)
    msg = _error(path)
    assert f"{path}:{line}: unknown key '{bad}'" in msg
    assert f"did you mean '{suggestion}'?" in msg


@pytest.mark.parametrize(
    ("extra", "line", "bad", "suggestion"),
    [
        ("teacher:\n  hiden_size: 8\n", 9, "teacher.hiden_size", "teacher.hidden_size"),  # Optional section
        ("tokenizer:\n  vocab_sise: 100\n", 9, "tokenizer.vocab_sise", "tokenizer.vocab_size"),
    ],
)
def test_unknown_keys_in_train_job_config(tmp_path, extra, line, bad, suggestion):
    path = _write(tmp_path, TRAIN_JOB.lstrip("\n") + extra)
    msg = _error(path, TrainJobConfig)
    assert f"{path}:{line}: unknown key '{bad}'" in msg
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_key_in_optional_nested_task_of_train_job(tmp_path):
    path = _write(tmp_path, "output_dir: o\ndata:\n  task:\n    digit: 3\n")
    msg = _error(path, TrainJobConfig)
    assert f"{path}:4: unknown key 'data.task.digit'" in msg
    assert "did you mean 'data.task.digits'?" in msg


def test_unknown_key_from_override_says_command_line(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 3\n")
    msg = _error(path, overrides=["train.lrr=1"])
    assert "command-line override: unknown key 'train.lrr'" in msg
    assert "did you mean 'train.lr'?" in msg
    assert f"{path}:" not in msg  # not blamed on a line of the file


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = _write(tmp_path, "train:\n  zzzzzz: 1\n")
    msg = _error(path)
    assert "did you mean" not in msg
    assert "valid keys here:" in msg and "lr" in msg and "warmup_steps" in msg


# --------------------------------------------------------------------------- wrong types


def test_wrong_type_in_file_names_expected_type_key_and_line(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.1\n  steps: abc\n")
    msg = _error(path)
    assert f"{path}:3" in msg
    assert "'train.steps'" in msg
    assert "valid integer" in msg
    assert "'abc'" in msg


def test_wrong_type_in_override_names_command_line(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 3\n")
    msg = _error(path, overrides=["train.batch_size=many"])
    assert "command-line override: key 'train.batch_size'" in msg
    assert "valid integer" in msg


def test_wrong_literal_in_list_names_element_line(tmp_path):
    path = _write(tmp_path, "task:\n  operations:\n    - '+'\n    - '/'\n")
    msg = _error(path)
    assert f"{path}:4" in msg
    assert "task.operations" in msg


@pytest.mark.parametrize(
    "override",
    ["task.digits=abc", "task.operations=[+,/]", "train.foo.bar=1"],
)
def test_bad_override_of_key_also_in_file_is_not_blamed_on_the_file(tmp_path, override):
    path = _write(tmp_path, "task:\n  digits: 2\n  operations: ['+', '-']\ntrain:\n  steps: 3\n")
    msg = _error(path, overrides=[override])
    assert "command-line override" in msg
    assert f"{path}:" not in msg


# --------------------------------------------------------------------------- bad YAML


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("train:\n  steps: 3\n\tlr: 1\n", 3),  # a tab
        ("train:\n  steps: 3\n   lr: 1\n", 3),  # over-indented
        ("train:\n  steps: 3\n lr: 1\n", 3),  # under-indented
    ],
)
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    path = _write(tmp_path, text)
    msg = _error(path)
    assert msg.startswith(f"{path}:{line}: invalid YAML")


def test_unclosed_bracket_is_invalid_yaml_naming_the_file(tmp_path):
    path = _write(tmp_path, "task:\n  operations: ['+', '-'\ntrain:\n  lr: 1\n")
    msg = _error(path)
    assert msg.startswith(f"{path}:")
    assert "invalid YAML" in msg


def test_unclosed_bracket_reports_the_line_of_the_bracket(tmp_path):
    path = _write(tmp_path, "task:\n  operations: ['+', '-'\ntrain:\n  lr: 1\n")
    msg = _error(path)
    assert f"{path}:2" in msg or "line 2" in msg


def test_missing_file_and_non_mapping_top_level(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in _error(missing)
    path = _write(tmp_path, "- 1\n- 2\n")
    assert "must be a mapping" in _error(path)


def test_empty_file_and_no_file_give_defaults(tmp_path):
    empty = _write(tmp_path, "# nothing but a comment\n")
    assert load_config(empty, RunConfig) == RunConfig()
    cfg = load_config(None, RunConfig, ["train.steps=7"])
    assert cfg.train.steps == 7
    assert cfg.model_copy(update={"train": RunConfig().train}) == RunConfig()


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("override", "keys", "value"),
    [
        ("train.lr=3e-4", ["train", "lr"], 3e-4),
        ("train.lr=1E-2", ["train", "lr"], 1e-2),
        ("train.steps=7", ["train", "steps"], 7),
        ("train.grad_clip=null", ["train", "grad_clip"], None),
        ("student.tie_word_embeddings=false", ["student", "tie_word_embeddings"], False),
        ("task.operations=[+,-]", ["task", "operations"], ["+", "-"]),
        ('task.operations=["+","*"]', ["task", "operations"], ["+", "*"]),
        ("run_dir=runs/v1.2", ["run_dir"], "runs/v1.2"),
        ("run_dir=a=b", ["run_dir"], "a=b"),
    ],
)
def test_parse_override(override, keys, value):
    got_keys, got = parse_override(override)
    assert got_keys == keys
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize("bad", ["train.lr", "train..lr=1", ".lr=1"])
def test_malformed_override_is_config_error(bad):
    with pytest.raises(ConfigError, match="override"):
        load_config(None, RunConfig, [bad])


def test_overrides_apply_types_and_win_over_file(tmp_path):
    path = _write(
        tmp_path,
        """
        task:
          digits: 1
          operations: ['*']
        train:
          lr: 0.01
          steps: 50
        """,
    )
    cfg = load_config(
        path,
        RunConfig,
        [
            "train.lr=3e-4",
            "task.operations=[+,-]",
            "task.digits=[2,3]",
            "student.tie_word_embeddings=false",
        ],
    )
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(0.0003)
    assert cfg.train.steps == 50  # kept from the file
    assert cfg.task.operations == ["+", "-"]
    assert cfg.task.digits == (2, 3)
    assert cfg.student.tie_word_embeddings is False
    # the last of two overrides of one key wins
    assert load_config(path, RunConfig, ["train.lr=1", "train.lr=2"]).train.lr == 2.0


def test_overrides_into_dict_valued_section_from_file():
    cfg = load_config(
        REPO / "configs/demo.yaml",
        RunConfig,
        ["students.student_distilled.kd_ratio=0.25", "students.extra.data=teacher"],
    )
    assert cfg.students["student_distilled"].kd_ratio == 0.25
    assert cfg.students["student_distilled"].objective == "logit_kd"  # rest of the entry kept
    assert set(cfg.students) == {"student_ground_truth", "student_distilled", "extra"}


def test_override_of_one_default_student_keeps_the_other_defaults():
    cfg = load_config(None, RunConfig, ["students.student_distilled.data=teacher"])
    assert set(cfg.students) == set(RunConfig().students)


# --------------------------------------------------------------------------- dump / hash


@pytest.mark.parametrize(
    ("config", "schema", "overrides"),
    [
        ("configs/demo.yaml", RunConfig, []),
        ("configs/demo.yaml", RunConfig, ["train.lr=1e-5", "task.digits=[1,3]", "train.grad_clip=null"]),
        ("configs/demo_teacher.yaml", TrainJobConfig, []),
        ("configs/demo_teacher.yaml", TrainJobConfig, ["teacher.hidden_size=16", "train.objective=logit_kd"]),
        ("configs/demo_cross_tokenizer.yaml", RunConfig, []),
    ],
)
def test_dump_config_round_trips(tmp_path, config, schema, overrides):
    cfg = load_config(REPO / config, schema, overrides)
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path, schema)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lr=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False).filter(lambda x: x > 0),
    steps=st.integers(min_value=1, max_value=10**9),
    digits=st.one_of(st.integers(1, 9), st.tuples(st.integers(1, 4), st.integers(4, 9))),
    ops=st.lists(st.sampled_from(["+", "-", "*"]), min_size=1, max_size=3),
    run_dir=st.text(min_size=1, max_size=20),
)
def test_dump_config_round_trips_random_values(tmp_path, lr, steps, digits, ops, run_dir):
    cfg = RunConfig(
        run_dir=run_dir,
        task=TaskConfig(digits=digits, operations=ops),
        train={"lr": lr, "steps": steps},
    )
    path = tmp_path / "rt.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path, RunConfig) == cfg


def test_config_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(REPO / "configs/demo.yaml", RunConfig)
    b = load_config(REPO / "configs/demo.yaml", RunConfig)
    h = config_hash(a)
    assert len(h) == 16 and int(h, 16) >= 0
    assert config_hash(b) == h
    assert config_hash(a.task, a.train) == config_hash(b.task, b.train)
    changed = load_config(REPO / "configs/demo.yaml", RunConfig, ["train.lr=0.0031"])
    assert config_hash(changed) != h
    assert config_hash(changed.task) == config_hash(a.task)  # an untouched section keeps its hash
    assert config_hash(changed.train) != config_hash(a.train)
    # the same values reached another way hash the same
    same = load_config(REPO / "configs/demo.yaml", RunConfig, ["train.lr=3.0e-3"])
    assert config_hash(same) == h
    # section order matters (a hash of (task, train) is not one of (train, task))
    assert config_hash(a.task, a.train) != config_hash(a.train, a.task)


def test_config_hash_is_the_same_in_another_process():
    code = "from distillery.config import RunConfig, config_hash; print(config_hash(RunConfig()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == config_hash(RunConfig())


# --------------------------------------------------------------------------- validators


def test_jsonl_task_needs_a_path():
    msg = _error(None, overrides=["task.name=jsonl"])
    assert "task.path" in msg and "'task'" in msg
    cfg = load_config(None, RunConfig, ["task.name=jsonl", "task.path=data/problems.jsonl"])
    assert cfg.task.path == "data/problems.jsonl"


def test_hidden_size_must_divide_by_heads(tmp_path):
    path = _write(tmp_path, "student:\n  hidden_size: 30\n  num_heads: 4\n")
    msg = _error(path)
    assert f"{path}:1" in msg
    assert "divisible by num_heads" in msg and "30" in msg
    # an existing model (path given) takes its sizes from its own config: no check
    cfg = load_config(path, RunConfig, ["student.path=some/model"])
    assert cfg.student.path == "some/model"


def test_logit_kd_job_needs_a_teacher(tmp_path):
    path = _write(tmp_path, TRAIN_JOB)
    msg = _error(path, TrainJobConfig, ["train.objective=logit_kd"])
    assert "logit_kd" in msg and "teacher" in msg
    cfg = load_config(path, TrainJobConfig, ["train.objective=logit_kd", "teacher.path=/some/teacher"])
    assert cfg.teacher is not None and cfg.teacher.path == "/some/teacher"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("data:\n  task: {}\n", "missing required key 'output_dir'"),
        ("output_dir: o\ndata: {}\n", "exactly one of data.path"),
        ("output_dir: o\ndata:\n  path: a.jsonl\n  task: {}\n", "exactly one of data.path"),
        ("output_dir: o\ndata:\n  path: a.jsonl\ntrain:\n  cross_tokenizer: {}\n",
         "cross_tokenizer applies to objective logit_kd"),
        ("output_dir: o\ndata:\n  path: a.jsonl\nteacher: {path: t}\ntrain:\n  objective: logit_kd\n"
         "  cross_tokenizer: {method: hybrid, unmapped: renormalize}\n", "needs unmapped: tail_bucket"),
        ("output_dir: o\ndata:\n  task:\n    digits: [3, 1]\n", "min <= max"),
        ("output_dir: o\ndata:\n  task:\n    eval_fraction: 1.0\n", "eval_fraction"),
        ("output_dir: o\ndata:\n  task: {}\ntrain:\n  kd_ratio: 1.5\n", "train.kd_ratio"),
    ],
)
def test_train_job_validation_errors(tmp_path, text, needle):
    msg = _error(_write(tmp_path, text), TrainJobConfig)
    assert needle in msg


@pytest.mark.parametrize(("given", "method", "unmapped"), [
    ({}, "vocab_map", "renormalize"),
    ({"method": "hybrid"}, "hybrid", "tail_bucket"),
    ({"method": "vocab_map", "unmapped": "tail_bucket"}, "vocab_map", "tail_bucket"),
])
def test_cross_tokenizer_defaults_resolve_per_method(given, method, unmapped):
    from distillery.config import CrossTokenizerConfig

    cfg = CrossTokenizerConfig(**given)
    assert (cfg.resolved_method, cfg.resolved_unmapped, cfg.mapping) == (method, unmapped, "prefix")


# --------------------------------------------------------------------------- the CLI, for real


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DISTILLERY), *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_cli_config_show_applies_override():
    out = _cli("config", "show", "configs/demo.yaml", "train.lr=0.001")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.001" in out.stdout
    shown = yaml.safe_load(out.stdout)
    assert shown["train"]["lr"] == 0.001
    raw = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    assert shown["train"]["steps"] == raw["train"]["steps"]  # kept from the file
    assert shown["eval"]["bootstrap_resamples"] == RunConfig().eval.bootstrap_resamples  # a default
    assert RunConfig.model_validate(shown) == load_config(REPO / "configs/demo.yaml", RunConfig, ["train.lr=0.001"])


def test_cli_config_show_unknown_override_exits_2_and_suggests():
    out = _cli("config", "show", "configs/demo.yaml", "train.lrr=1")
    assert out.returncode == 2
    assert "train.lr'" in out.stderr
    assert "command-line override" in out.stderr
    assert out.stdout == ""


def test_cli_config_show_detects_train_job():
    out = _cli("config", "show", "configs/demo_teacher.yaml")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["output_dir"] == yaml.safe_load((REPO / "configs/demo_teacher.yaml").read_text())["output_dir"]
    assert TrainJobConfig.model_validate(shown) == load_config(REPO / "configs/demo_teacher.yaml", TrainJobConfig)


def test_cli_config_show_bad_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 3\n\tlr: 1\n")
    out = _cli("config", "show", str(path))
    assert out.returncode == 2
    assert f"{path}:3" in out.stderr
