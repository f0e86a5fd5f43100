"""The documentation: the README stays a front door, and the configuration reference is generated
from the typed settings (docs/hooks.py, run by mkdocs) with a comment for every setting."""

import importlib.util
import re

from conftest import REPO


def _reference_module():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _settings_classes():
    """Every settings class a config holds, each once, with its fields."""
    from dreambooth.config import RunConfig
    from dreambooth.config_files import settings_class

    found, todo = {}, [RunConfig]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found[cls] = list(cls.model_fields)
        todo += [inner for field in cls.model_fields.values() if (inner := settings_class(field.annotation)) is not None]
    return found


def test_the_reference_lists_every_setting_once_with_its_comment():
    rows = re.findall(r"^\| `([^`]+)` \| `[^|]*` \| [^|]* \| (.*) \|$", _reference_module().settings_reference(), re.M)
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys)) == sum(len(fields) for fields in _settings_classes().values())
    assert [key for key, comment in rows if not comment.strip()] == []  # a new setting needs its comment in config.py
    assert "training.prior_loss_weight" in keys and "cluster.stages.<name>.gpus" in keys and "superres.training" in keys


def test_the_readme_is_a_front_door_whose_links_lead_to_pages():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and [link for link in links if not (REPO / link).is_file()] == []


def test_the_command_reference_lists_every_command_and_argument_with_what_it_does():
    import argparse

    from dreambooth.cli import _parser

    reference = _reference_module().commands_reference()
    (commands,) = [action for action in _parser()._actions if isinstance(action, argparse._SubParsersAction)]
    assert re.findall(r"^### `dreambooth ([\w-]+)`$", reference, re.M) == list(commands.choices)
    rows = re.findall(r"^\| (`[^|]+`(?: \\\| `[^|]+`)*) \| (.*) \|$", reference, re.M)
    arguments = sum(len([a for a in sub._actions if not isinstance(a, argparse._HelpAction)]) for sub in commands.choices.values())
    assert len(rows) == arguments
    assert [flags for flags, described in rows if not described.strip() or described.startswith("(default")] == []
    sections = reference.split("### ")[1:]
    assert [section.splitlines()[0] for section in sections if not section.splitlines()[2].strip()] == []  # each says what it does
    assert "<!-- commands reference -->" in (REPO / "docs" / "cli.md").read_text()
