"""mkdocs hook: the configuration reference, generated from the typed settings (dreambooth.config),
and the command reference, generated from the command line's parser (dreambooth.cli), every time the
site is built, so neither can drift from the code.

Each setting's comment is the one written beside it in config.py (the lines just above it and the
end of its own line); its type is its annotation as written, its default the model's.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
import typing

from pydantic import BaseModel

from dreambooth.config_files import settings_class

PLACEHOLDER = "<!-- settings reference -->"
STAGES_PLACEHOLDER = "<!-- stages -->"
COMMANDS_PLACEHOLDER = "<!-- commands reference -->"


def _comments(cls: type) -> dict[str, str]:
    """{field: its comment} from the class's source."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    notes: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            notes[token.start[0]] = token.string.lstrip("#").strip()
    found = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, notes[line])
            line -= 1
        trailing = [notes[n] for n in range(node.lineno, node.end_lineno + 1) if n in notes]
        found[node.target.id] = " ".join(part for part in above + trailing if part and not part.startswith("noqa"))
    return found


def _annotations(cls: type) -> dict[str, str]:
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: ast.unparse(node.annotation) for node in body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    text = repr(value.value if hasattr(value, "value") else value)
    return f"`{text}`" if len(text) < 60 else f"`{text[:57]}...`"


def _summary(cls: type) -> str:
    """The first paragraph of a settings class's docstring (pydantic's own docstring does not count)."""
    return inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")


def _section(cls: type, prefix: str, out: list[str], shown: dict) -> None:
    """A table of the class's settings under `prefix`, then each nested section's (each class once: a
    class met again, e.g. the samplers, points at the table that lists its keys)."""
    shown[cls] = prefix
    comments, annotations, nested = _comments(cls), _annotations(cls), []
    title = prefix or "top level"
    out += [f"## `{title}`", ""]
    doc = inspect.cleandoc(cls.__doc__) if cls.__doc__ else None  # pydantic sets an empty one
    if doc:
        out += [doc, ""]
    out += ["| setting | type | default | what it does |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        inner = settings_class(field.annotation)
        note = comments.get(name, "")
        if inner is not None:
            shape = {list: f"{key}[]", dict: f"{key}.<name>"}.get(typing.get_origin(field.annotation), key)
            if inner in shown or inner in [found for found, _ in nested]:
                earlier = shown.get(inner) or next(where for found, where in nested if found is inner)
                note = f"{note} The keys of `{earlier}`.".strip()
            else:
                nested.append((inner, shape))
            note = note or _summary(inner)
        note = note.replace("|", "\\|")
        out.append(f"| `{key}` | `{annotations.get(name, '')}` | {_default(field)} | {note} |")
    out.append("")
    for inner, shape in nested:
        if inner not in shown:
            _section(inner, shape, out, shown)


def settings_reference() -> str:
    """Every setting of a run's config: its key, type, default and comment, a table per section."""
    from dreambooth.config import RunConfig

    out: list[str] = []
    _section(RunConfig, "", out, {})
    return "\n".join(out)


def stages_table() -> str:
    """The table of stages (dreambooth.stages) as the code holds it: name, whose stage, what it does."""
    from dreambooth.stages import STAGES

    rows = [f"| `{stage.name}` | {stage.scope} | {stage.does}{'' if stage.component else ' (a step of finish-tracking)'} |" for stage in STAGES]
    return "\n".join(["| stage | for | what it does |", "|---|---|---|", *rows])


def _option_row(action) -> str:
    flags = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.dest.upper()}`"
    if action.choices and not action.option_strings:
        flags = " \\| ".join(f"`{choice}`" for choice in action.choices)
    shown_default = action.default not in (None, False, "==SUPPRESS==") and not action.required and action.option_strings
    default = f" (default: `{action.default}`)" if shown_default and "default" not in (action.help or "") else ""
    required = "required; " if action.required and action.option_strings else ""
    described = (action.help or "").replace("|", "\\|")
    return f"| {flags} | {required}{described}{default} |"


def commands_reference() -> str:
    """Every subcommand of `dreambooth`: its usage line, what it does, and each argument with its help."""
    import argparse

    from dreambooth.cli import _parser

    parser = _parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    out: list[str] = []
    for name, sub in commands.choices.items():
        usage = " ".join(sub.format_usage().removeprefix("usage: ").split())
        out += [f"### `dreambooth {name}`", "", helps.get(name, ""), "", "```", usage, "```", "",
                "| argument | what it does |", "|---|---|"]
        out += [_option_row(action) for action in sub._actions if not isinstance(action, argparse._HelpAction)]
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return (markdown.replace(PLACEHOLDER, settings_reference()).replace(STAGES_PLACEHOLDER, stages_table())
            .replace(COMMANDS_PLACEHOLDER, commands_reference()))
