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
    TaskConfig,
    TrainJobConfig,
    config_hash,
    dump_config,
    load_config,
    parse_override,
)
from distillery.run_config import RunConfig

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


# the least a run needs: its teacher and one student (every other section has defaults)
MIN_RUN = "teacher: {path: assets/demo_teacher}\nstudents:\n  s: {}\n"

JOB_HEAD = "output_dir: o\ndata: {path: a.jsonl}\n"  # a train job's two required keys

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
        teacher: {path: t}
        students:
          s:
            train:
              steps: 10
              lrr: 0.1
              seed: 3
        """,
    )
    msg = _error(path)
    assert f"{path}:7" in msg  # 'lrr' is on line 7
    assert "'students.s.train.lrr'" in msg
    assert "did you mean 'students.s.train.lr'?" in msg


@pytest.mark.parametrize(
    ("yaml_text", "line", "bad", "suggestion"),
    [
        ("run_dri: x\n", 1, "run_dri", "run_dir"),
        ("eval:\n  seed: 1\n  num_problem: 3\n", 3, "eval.num_problem", "eval.num_problems"),
        ("generate:\n  sampling:\n    max_new_token: 4\n", 3, "generate.sampling.max_new_token",
         "generate.sampling.max_new_tokens"),
        # a dict-valued section: the suggestion comes from the value type (a train job)
        ("students:\n  mine:\n    model:\n      hiden_size: 64\n", 4, "students.mine.model.hiden_size",
         "students.mine.model.hidden_size"),
        ("students:\n  mine:\n    data:\n      sorce: task\n", 4, "students.mine.data.sorce",
         "students.mine.data.source"),
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
    path = _write(tmp_path, JOB_HEAD + "train:\n  steps: 3\n")
    msg = _error(path, TrainJobConfig, overrides=["train.lrr=1"])
    assert "command-line override: unknown key 'train.lrr'" in msg
    assert "did you mean 'train.lr'?" in msg
    assert f"{path}:" not in msg  # not blamed on a line of the file


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = _write(tmp_path, JOB_HEAD + "train:\n  zzzzzz: 1\n")
    msg = _error(path, TrainJobConfig)
    assert "did you mean" not in msg
    assert "valid keys here:" in msg and "lr" in msg and "warmup_steps" in msg


# --------------------------------------------------------------------------- wrong types


def test_wrong_type_in_file_names_expected_type_key_and_line(tmp_path):
    path = _write(tmp_path, JOB_HEAD + "train:\n  lr: 0.1\n  steps: abc\n")
    msg = _error(path, TrainJobConfig)
    assert f"{path}:5" in msg
    assert "'train.steps'" in msg
    assert "valid integer" in msg
    assert "'abc'" in msg


def test_wrong_type_in_override_names_command_line(tmp_path):
    path = _write(tmp_path, JOB_HEAD + "train:\n  steps: 3\n")
    msg = _error(path, TrainJobConfig, overrides=["train.batch_size=many"])
    assert "command-line override: key 'train.batch_size'" in msg
    assert "valid integer" in msg


def test_wrong_literal_in_list_names_element_line(tmp_path):
    path = _write(tmp_path, "task:\n  operations:\n    - '+'\n    - '/'\n")
    msg = _error(path)
    assert f"{path}:4" in msg
    assert "task.operations" in msg


@pytest.mark.parametrize(
    "override",
    ["task.digits=abc", "task.operations=[+,/]", "students.s.train.foo.bar=1"],
)
def test_bad_override_of_key_also_in_file_is_not_blamed_on_the_file(tmp_path, override):
    path = _write(tmp_path, "teacher: {path: t}\nstudents:\n  s:\n    train:\n      steps: 3\n"
                            "task:\n  digits: 2\n  operations: ['+', '-']\n")
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


def test_an_empty_run_config_is_refused_not_guessed(tmp_path):
    """No teacher and no student: an error naming both keys, not a default job that trains for an hour."""
    empty = _write(tmp_path, "# nothing but a comment\n")
    msg = _error(empty)
    assert "missing required key 'teacher'" in msg and "missing required key 'students'" in msg
    cfg = load_config(_write(tmp_path, MIN_RUN), RunConfig, ["students.s.train.steps=7"])
    assert cfg.students["s"].train.steps == 7 and cfg.students["s"].train.objective.name == "sft"


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
        teacher: {path: t}
        defaults:
          train:
            lr: 0.01
            steps: 50
        students:
          s: {}
        """,
    )
    cfg = load_config(
        path,
        RunConfig,
        [
            "defaults.train.lr=3e-4",
            "task.operations=[+,-]",
            "task.digits=[2,3]",
            "students.s.model.tie_word_embeddings=false",
        ],
    )
    train = cfg.students["s"].train
    assert isinstance(train.lr, float) and train.lr == pytest.approx(0.0003)
    assert train.steps == 50  # kept from the file
    assert cfg.task.operations == ["+", "-"]
    assert cfg.task.digits == (2, 3)
    assert cfg.students["s"].model.tie_word_embeddings is False
    # the last of two overrides of one key wins
    twice = load_config(path, RunConfig, ["defaults.train.lr=1", "defaults.train.lr=2"])
    assert twice.students["s"].train.lr == 2.0


def test_overrides_into_dict_valued_section_from_file():
    cfg = load_config(
        REPO / "configs/demo.yaml",
        RunConfig,
        ["students.student_distilled.train.objective.loss.kd_ratio=0.25", "students.extra.train.objective=sft"],
    )
    distilled = cfg.students["student_distilled"].train.objective
    assert distilled.loss.kd_ratio == 0.25
    assert distilled.name == "logit_kd" and distilled.loss.form == "dense"  # rest of the entry kept
    assert set(cfg.students) == {"student_ground_truth", "student_distilled", "extra"}
    # a new student takes the run's defaults: the demo's size and steps
    assert cfg.students["extra"].train.steps == 1200 and cfg.students["extra"].model.hidden_size == 64


def test_defaults_reach_every_student_and_a_students_own_key_wins(tmp_path):
    path = _write(tmp_path, MIN_RUN + "  t:\n    train: {lr: 0.5}\ndefaults:\n  train: {lr: 0.1, steps: 9}\n")
    cfg = load_config(path, RunConfig)
    assert (cfg.students["s"].train.lr, cfg.students["s"].train.steps) == (0.1, 9)
    assert (cfg.students["t"].train.lr, cfg.students["t"].train.steps) == (0.5, 9)


# --------------------------------------------------------------------------- dump / hash


@pytest.mark.parametrize(
    ("config", "schema", "overrides"),
    [
        ("configs/demo.yaml", RunConfig, []),
        ("configs/demo.yaml", RunConfig, ["defaults.train.lr=1e-5", "task.digits=[1,3]",
                                          "defaults.train.grad_clip=null"]),
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
        teacher={"path": "t"},
        students={"s": {"train": {"lr": lr, "steps": steps}}},
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
    train_a = a.students["student_distilled"].train
    assert config_hash(a.task, train_a) == config_hash(b.task, b.students["student_distilled"].train)
    changed = load_config(REPO / "configs/demo.yaml", RunConfig, ["defaults.train.lr=0.0031"])
    assert config_hash(changed) != h
    assert config_hash(changed.task) == config_hash(a.task)  # an untouched section keeps its hash
    assert config_hash(changed.students["student_distilled"].train) != config_hash(train_a)
    # the same values reached another way hash the same
    same = load_config(REPO / "configs/demo.yaml", RunConfig, ["defaults.train.lr=3.0e-3"])
    assert config_hash(same) == h
    # section order matters (a hash of (task, train) is not one of (train, task))
    assert config_hash(a.task, train_a) != config_hash(train_a, a.task)


def test_config_hash_is_the_same_in_another_process():
    code = ("from distillery.config import config_hash, load_config; from distillery.run_config import RunConfig; "
            "print(config_hash(load_config('configs/demo.yaml', RunConfig)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == config_hash(load_config(REPO / "configs/demo.yaml", RunConfig))


# --------------------------------------------------------------------------- validators


def test_jsonl_task_needs_a_path():
    msg = _error(None, overrides=["task.name=jsonl"])
    assert "task.path" in msg and "'task'" in msg
    cfg = load_config(REPO / "configs/demo.yaml", RunConfig, ["task.name=jsonl", "task.path=data/problems.jsonl"])
    assert cfg.task.path == "data/problems.jsonl"


def test_hidden_size_must_divide_by_heads(tmp_path):
    path = _write(tmp_path, MIN_RUN + "  t:\n    model:\n      hidden_size: 30\n      num_heads: 4\n")
    msg = _error(path)
    assert f"{path}:5" in msg and "students.t.model" in msg
    assert "divisible by num_heads" in msg and "30" in msg
    # an existing model (path given) takes its sizes from its own config: no check
    cfg = load_config(path, RunConfig, ["students.t.model.path=some/model"])
    assert cfg.students["t"].model.path == "some/model"


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
        ("output_dir: o\ndata:\n  path: a.jsonl\ntrain:\n  objective: {name: sft, cross_tokenizer: {}}\n",
         "unknown key 'cross_tokenizer' for objective 'sft'"),
        ("output_dir: o\ndata:\n  path: a.jsonl\ntrain:\n  cross_tokenizer: {}\n",
         "unknown key 'train.cross_tokenizer'"),
        ("output_dir: o\ndata:\n  path: a.jsonl\nteacher: {path: t}\ntrain:\n  objective:\n    name: logit_kd\n"
         "    cross_tokenizer: {method: hybrid, unmapped: renormalize}\n", "needs unmapped: tail_bucket"),
        ("output_dir: o\ndata:\n  task:\n    digits: [3, 1]\n", "min <= max"),
        ("output_dir: o\ndata:\n  task:\n    eval_fraction: 1.0\n", "eval_fraction"),
        ("output_dir: o\ndata:\n  task: {}\nteacher: {}\ntrain:\n  objective: {name: logit_kd, kd_ratio: 1.5}\n",
         "key 'train.objective.kd_ratio': Input should be less than or equal to 1"),
        ("output_dir: o\ndata:\n  task: {}\ntrain:\n  objective: logit_kd\n  kd_ratio: 0.5\n",
         "unknown key 'train.kd_ratio'"),
        ("output_dir: o\ndata:\n  task: {}\ntrain:\n  objective: {name: logit, kd_ratio: 0.5}\n",
         "unknown objective 'logit': did you mean 'logit_kd'? registered objectives: sft, "),
        ("output_dir: o\ndata:\n  task: {}\ntrain:\n  objective: {kd_ratio: 0.5}\n", "give the objective's name"),
        ("output_dir: o\ndata:\n  task: {}\ntrain:\n  objective: preference\n", "set data.path"),
        ("output_dir: o\ndata:\n  task: {}\nteacher_cache: c\ntrain:\n  objective: feature_kd\n",
         "train.objective 'feature_kd' does not: drop teacher_cache"),
        ("output_dir: o\ndata:\n  task: {}\ntrain:\n  objective: {name: reward, source: teacher_logprob}\n",
         "train.objective 'reward' needs a teacher and none is configured"),
        ("output_dir: o\ndata:\n  task: {}\nteacher: {path: t}\nteacher_finetune: {objective: on_policy}\n",
         "teacher_finetune.objective trains the teacher itself"),
    ],
)
def test_train_job_validation_errors(tmp_path, text, needle):
    msg = _error(_write(tmp_path, text), TrainJobConfig)
    assert needle in msg


def test_objective_keys_live_in_the_objective_and_show_prints_only_its_own(tmp_path):
    """``train.objective`` is the chosen objective's own config: its keys, no other objective's."""
    text = "output_dir: o\ndata:\n  task: {}\nteacher: {}\ntrain:\n  objective: logit_kd\n"
    cfg = load_config(_write(tmp_path, text), TrainJobConfig, ["train.objective.kd_ratio=0.25"])
    shown = yaml.safe_load(dump_config(cfg))["train"]["objective"]
    assert shown == {"name": "logit_kd", "kd_ratio": 0.25, "temperature": None, "loss": None,
                     "cross_tokenizer": None}
    assert cfg.train.objective.resolved_loss().kd_ratio == 0.25
    assert TrainJobConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg  # round trip
    sft = load_config(_write(tmp_path, "output_dir: o\ndata:\n  task: {}\n"), TrainJobConfig)
    assert yaml.safe_load(dump_config(sft))["train"]["objective"] == {"name": "sft"}


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
    out = _cli("config", "show", "configs/demo.yaml", "defaults.train.lr=0.001")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.001" in out.stdout
    shown = yaml.safe_load(out.stdout)
    assert {s["train"]["lr"] for s in shown["students"].values()} == {0.001}
    raw = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    assert shown["students"]["student_distilled"]["train"]["steps"] == raw["defaults"]["train"]["steps"]
    assert shown["eval"]["bootstrap_resamples"] == 10000  # a default
    # only the chosen objective's keys are printed
    assert set(shown["students"]["student_ground_truth"]["train"]["objective"]) == {"name"}
    assert RunConfig.model_validate(shown) == load_config(REPO / "configs/demo.yaml", RunConfig,
                                                          ["defaults.train.lr=0.001"])


def test_cli_config_show_unknown_override_exits_2_and_suggests():
    out = _cli("config", "show", "configs/demo.yaml", "students.student_distilled.train.lrr=1")
    assert out.returncode == 2
    assert "students.student_distilled.train.lr'" in out.stderr
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


def test_a_bad_key_in_defaults_is_named_once_where_it_was_written(tmp_path):
    """`defaults` is merged under every student; its errors name `defaults.*` and its line, once."""
    path = _write(tmp_path, "teacher: {path: t}\ndefaults:\n  train:\n    lr: fast\nstudents:\n  a: {}\n  b: {}\n")
    msg = _error(path)
    assert msg.count("key 'defaults.train.lr'") == 1 and f"{path}:4" in msg and "students." not in msg
    msg = _error(REPO / "configs/demo.yaml", overrides=["defaults.train.stpes=3"])
    assert msg.count("command-line override: unknown key 'defaults.train.stpes'") == 1
    assert "did you mean 'defaults.train.steps'?" in msg
    # the same key set in a student itself is that student's
    msg = _error(_write(tmp_path, MIN_RUN + "  b:\n    train: {lr: slow}\ndefaults:\n  train: {lr: 0.1}\n", "own.yaml"))
    assert "key 'students.b.train.lr'" in msg and "'defaults." not in msg
