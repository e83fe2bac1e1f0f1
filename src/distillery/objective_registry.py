"""The one registry of training objectives: name → config model, needs, build.

An objective is one module under :mod:`distillery.train.objectives` that declares its config
(a pydantic model whose ``name`` field is its registered name), what it needs
(:class:`ObjectiveNeeds`) and how it builds its dataset, collator and objective, and calls
:func:`register_objective` (re-exported there, with the typed ``build`` signature).

The table lives here, at the bottom of the layers, because the config layer reads it too:
``train.objective`` is validated by the registered config model of the name it gives, and
``TrainJobConfig``'s checks (a teacher, a logit cache, packing, its records) come from the
needs. The built-in objectives are registered on the first lookup by importing
:data:`BUILTIN_PACKAGE` (by name, as a plugin is loaded: nothing here depends on the train
layer's code), then the modules named by the ``DISTILLERY_OBJECTIVES`` environment variable
(a user's objectives, for ``distillery train``; in Python, importing the module is enough).
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel

from distillery.errors import DistilleryError

BUILTIN_PACKAGE = "distillery.train.objectives"  # its import registers sft, logit_kd, ...
# comma-separated modules of the user's objectives, imported with the built-ins (on PYTHONPATH)
PLUGINS_ENV = "DISTILLERY_OBJECTIVES"


class UnknownObjectiveError(DistilleryError, ValueError):
    """``train.objective`` names no registered objective."""


@dataclass(frozen=True)
class ObjectiveNeeds:
    """What an objective needs from the job around it; the job's checks read this, not names.

    ``live_teacher``: ``"required"`` (a teacher model, or a logit cache where ``cache``),
    ``"optional"`` (its config decides, see :meth:`ObjectiveEntry.needs_for`) or ``"no"`` (a
    configured teacher is not loaded). ``cache``: a logit cache (``teacher_cache``) may stand
    in for the live teacher. ``packing``: its batches may be packed (``train.packing``).
    ``samples``: it samples from the student while training (its batches are built per
    step, never packed). ``messages``: it reads "messages" records (from ``data.path`` or
    generated from ``data.task``); False: it validates records of its own, from ``data.path``.
    """

    live_teacher: Literal["no", "required", "optional"] = "no"
    cache: bool = False
    packing: bool = False
    samples: bool = False
    messages: bool = True


@dataclass(frozen=True)
class ObjectiveEntry:
    """One registered objective (see :func:`register_objective`)."""

    name: str
    config_model: type[BaseModel]
    needs: ObjectiveNeeds  # the declaration: the most this objective may need
    build: Callable[[Any], tuple[Any, Any, Any]]  # BuildContext -> (dataset, collator, objective)

    def needs_for(self, config: BaseModel) -> ObjectiveNeeds:
        """The needs of one config of this objective: the declaration, refined by the config's
        ``resolve_needs(declared)`` where it has one (e.g. a reward source that reads the teacher)."""
        resolve = getattr(config, "resolve_needs", None)
        return resolve(self.needs) if resolve is not None else self.needs


_REGISTRY: dict[str, ObjectiveEntry] = {}
_builtins = "unloaded"  # "unloaded" → "loading" → "loaded"


def register_objective(name: str, config_model: type[BaseModel], needs: ObjectiveNeeds,
                       build: Callable[[Any], tuple[Any, Any, Any]]) -> ObjectiveEntry:
    """Add an objective; ``config_model.name`` must default to ``name`` (the discriminator).

    The same module registering again (imported twice, or reloaded) replaces its entry; another
    module's objective under a taken name is an error.
    """
    field = config_model.model_fields.get("name")
    if field is None or field.default != name:
        raise ValueError(f"objective {name!r}: its config model {config_model.__name__} needs the field "
                         f"`name: Literal[{name!r}] = {name!r}` (train.objective is chosen by it)")
    old = _REGISTRY.get(name)
    same = old is not None and (old.config_model.__module__, old.config_model.__qualname__) == (
        config_model.__module__, config_model.__qualname__)
    if old is not None and not same:
        raise ValueError(f"objective {name!r} is already registered (by {old.config_model.__module__}); "
                         "pick another name")
    entry = ObjectiveEntry(name, config_model, replace(needs), build)
    _REGISTRY[name] = entry
    return entry


def _load_builtins() -> None:
    global _builtins
    if _builtins == "unloaded":
        _builtins = "loading"  # a lookup while the package imports must not import it again
        importlib.import_module(BUILTIN_PACKAGE)
        for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
            try:
                importlib.import_module(module)
            except ImportError as exc:
                _builtins = "unloaded"  # retried once the path is fixed
                raise UnknownObjectiveError(f"{PLUGINS_ENV}: cannot import {module!r} ({exc}); "
                                            "is its directory on PYTHONPATH?") from exc
        _builtins = "loaded"


def objective_names() -> list[str]:
    """Registered objective names, built-ins first, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def get_objective(name: str) -> ObjectiveEntry:
    """The entry of ``name``; an unknown name lists the registered ones."""
    _load_builtins()
    entry = _REGISTRY.get(name)
    if entry is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownObjectiveError(f"unknown objective {name!r}: {hint}registered objectives: "
                                    f"{', '.join(_REGISTRY)}")
    return entry


def objective_config(value: Any) -> BaseModel:
    """Validate ``train.objective``: a bare name (``sft``), a mapping with ``name`` and the
    objective's own keys, or a config instance; by the config model registered for the name.

    Errors inside the objective's keys keep their location (``train.objective.kd_ratio``).
    """
    if isinstance(value, BaseModel):
        name = getattr(value, "name", None)
        if isinstance(name, str) and type(value) is get_objective(name).config_model:
            return value
        value = value.model_dump()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ValueError(f"an objective name (one of {', '.join(objective_names())}) or a mapping "
                         "{name: ..., <its keys>}")
    if "name" not in value:
        raise ValueError(f"give the objective's name: {{name: <one of {', '.join(objective_names())}>, ...}}")
    model = get_objective(value["name"]).config_model
    # checked here so the message lists this objective's keys (a generic "unknown key" error
    # would be reported against the base config, whose only key is the name)
    valid = list(model.model_fields)
    for key in value:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown key {key!r} for objective {value['name']!r}: {hint}"
                             f"its keys are {', '.join(valid)}")
    return model.model_validate(value)


def objective_needs(config: BaseModel) -> ObjectiveNeeds:
    """The needs of a validated ``train.objective`` (its declaration refined by its config)."""
    return get_objective(config.name).needs_for(config)  # type: ignore[attr-defined]
