"""Config files as people write them: found by name or path, `extends:` resolved, and every
problem of a file reported in one pass as `file:line: setting: reason`.

The settings' types live in dreambooth.config; this module knows YAML, files and lines, and
words a validation problem for the person who has to fix it (pydantic's "Extra inputs are not
permitted" becomes "unknown setting; did you mean max_steps?").
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ValidationError

from dreambooth.errors import InputError

# Shipped configs are package data: they resolve by name wherever the package is installed.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

Location = tuple[Path, int]


def shipped_configs() -> dict[str, str]:
    """{name: what it is}, from each shipped file's first comment line (up to its first colon)."""
    described = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "# ")
        summary = first.lstrip("# ").split(": ", 1)[0].rstrip(".")
        described[path.stem] = summary
    return described


def resolve_config_path(name_or_path: str, named_in: str = "--config") -> Path:
    """`tiny` -> the shipped dreambooth/configs/tiny.yaml; anything with a slash or suffix is a path.
    A name that is not shipped is refused with the names that are."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or "/" in name_or_path:
        return candidate
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = list(shipped_configs())
        close = nearest(name_or_path, names)
        hint = f"did you mean {close}? " if close else ""
        raise InputError(f"{named_in} {name_or_path}: no shipped config of that name; {hint}shipped: {', '.join(names)} "
                         "(`dreambooth configs` describes them), or give a YAML file's path")
    return shipped


def nearest(name: str, names: list[str]) -> Optional[str]:
    """The name a typo most likely meant (sd16 -> sd15 before sd21: a shared start breaks ties), or None."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.7)
    return max(close, key=lambda candidate: (difflib.SequenceMatcher(None, name, candidate).ratio(),
                                              len(os.path.commonprefix([name, candidate]))), default=None)


@dataclass
class ConfigSource:
    """A config file's settings after `extends:`, and where each setting was written."""

    path: Path
    settings: dict
    # (section, key, ...) -> (file, 1-based line) of the file that set it last.
    origins: dict[tuple, Location] = field(default_factory=dict)

    def location(self, setting: tuple) -> Optional[Location]:
        """Where a setting, or failing that its closest enclosing section, was written."""
        for length in range(len(setting), 0, -1):
            if setting[:length] in self.origins:
                return self.origins[setting[:length]]
        return None


def merge_settings(base: dict, overrides: dict) -> dict:
    """Nested dicts merge key by key; any other value replaces the base's."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


def _key_lines(node: yaml.Node, path: Path, prefix: tuple = ()) -> dict[tuple, Location]:
    """(key, ...) -> line of every mapping key and list item under a composed YAML node."""
    found: dict[tuple, Location] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + (key_node.value,)
            found[key] = (path, key_node.start_mark.line + 1)
            found.update(_key_lines(value_node, path, key))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found[prefix + (index,)] = (path, item.start_mark.line + 1)
            found.update(_key_lines(item, path, prefix + (index,)))
    return found


def read_config(path: Path, seen: tuple[Path, ...] = (), named_in: Optional[str] = None) -> ConfigSource:
    """A config file's settings on top of the file it `extends` (e.g. a cluster config over sd15)."""
    from dreambooth.storage import read_text

    if not path.is_file():
        raise InputError(f"{named_in + ': ' if named_in else ''}{path}: config file not found")
    if path.resolve() in seen:
        raise InputError(f"{path}: `extends` loops back to itself")
    text = read_text(str(path))
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InputError(f"{where}: not valid YAML ({reason})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of settings at the top level")
    origins = _key_lines(node, path) if node is not None else {}
    parent = raw.pop("extends", None)
    if parent is None:
        return ConfigSource(path, raw, origins)
    extends_at = f"{path}:{origins[('extends',)][1]}: extends"
    # A name (sd15) is a shipped config; a file name or path is relative to the extending file.
    if not isinstance(parent, str):
        raise InputError(f"{extends_at}: give a shipped config's name or a YAML file's path")
    named = parent if Path(parent).suffix in {".yaml", ".yml"} or "/" in parent else None
    parent_path = path.parent / named if named else resolve_config_path(parent, named_in=extends_at)
    base = read_config(parent_path, seen + (path.resolve(),), named_in=extends_at)
    base.settings.pop("name", None)
    return ConfigSource(path, merge_settings(base.settings, raw), {**base.origins, **origins})


def _model_at(model: type[BaseModel], setting: tuple) -> Optional[type[BaseModel]]:
    """The settings class that holds `setting`'s last key (RunConfig, ('training', 'max_stepz') -> TrainingSettings)."""
    for key in setting:
        if isinstance(key, int):
            continue
        field_info = model.model_fields.get(key)
        if field_info is None:
            return None
        nested = settings_class(field_info.annotation)
        if nested is None:
            return None
        model = nested
    return model


def settings_class(annotation) -> Optional[type[BaseModel]]:
    """The settings class inside Optional[...], list[...] or dict[str, ...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = settings_class(argument)
        if found is not None:
            return found
    return None


def _unknown_setting(model: type[BaseModel], setting: tuple) -> str:
    """`unknown setting`, with the nearest real name beside it or the section that has this one."""
    holder = _model_at(model, setting[:-1])
    names = list(holder.model_fields) if holder else []
    close = nearest(str(setting[-1]), names)
    if close:
        return f"unknown setting; did you mean {close}?"
    elsewhere = [f"{section}.{setting[-1]}" for section, info in model.model_fields.items()
                 if (nested := settings_class(info.annotation)) and setting[-1] in nested.model_fields]
    if elsewhere:
        return f"unknown setting here; did you mean {elsewhere[0]}?"
    return "unknown setting" + (f" (this section has: {', '.join(names)})" if names else "")


def problem_lines(error: ValidationError, model: type[BaseModel]) -> list[tuple[tuple, str]]:
    """Each validation problem as (setting, reason), worded for whoever fixes it."""
    problems = []
    for problem in error.errors():
        setting = tuple(problem["loc"])
        if problem["type"] == "extra_forbidden":
            reason = _unknown_setting(model, setting)
        elif problem["type"] == "missing":
            reason = "required"
        else:
            reason = problem["msg"].removeprefix("Value error, ")
        if not setting:  # a whole-config check names its own setting first: `training.x: ...`
            named = re.match(r"([a-z_][\w.]*): (.*)", reason, re.DOTALL)
            if named:
                setting = tuple(int(part) if part.isdigit() else part for part in named.group(1).split("."))
                reason = named.group(2)
        problems.append((setting, reason))
    return problems


def describe_problems(error: ValidationError, model: type[BaseModel], source: ConfigSource) -> str:
    """Every problem of a config, one line each: `file:line: setting: reason` (the file that wrote the setting)."""
    lines = []
    for setting, reason in problem_lines(error, model):
        located = source.location(setting)
        where = f"{located[0]}:{located[1]}" if located else str(source.path)
        name = ".".join(str(part) for part in setting)
        order = (str(located[0]), located[1]) if located else (str(source.path), 0)
        lines.append((order, f"{where}: {name}: {reason}" if name else f"{where}: {reason}"))
    return "\n".join(line for _, line in sorted(lines))
