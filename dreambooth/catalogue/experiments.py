"""Experiments: the paper's comparisons and ablations as one batch (`dreambooth experiment FILE`).

An experiment file is a subjects file with `variants:` beside `subjects:`:

    subjects:
      - {id: grey-dog, photos: gs://bucket/dreambench/dog, class_noun: dog}
    variants:
      - {name: dreambooth}                                   # the baseline: no settings
      - {name: ti, training: {method: textual_inversion, learning_rate: 5.0e-4}}
      - {name: no-ppl, training: {prior_loss_weight: 0}}
      - {name: no-class, class_noun: ""}
      - {name: wrong-class, class_noun: {grey-dog: backpack}}
      - {name: photos-3, photos_limit: 3}

Each (subject, variant) becomes one batch entry, `grey-dog--ti`, with the variant's settings over
the subject's own overrides, so the batch machinery isolates failures, shares class priors and
skips what is up to date. What a variant tests (its roles) decides which row of the paper's tables
it fills (dreambooth.reports.paper_tables).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from dreambooth.config import RunConfig, setting_problems
from dreambooth.config_files import merge_settings
from dreambooth.errors import InputError
from dreambooth.evaluation.prompts import is_live_subject
from dreambooth.catalogue.entries import SAFE_ID, SubjectEntry, override_problems, subject_config

BASELINE = "dreambooth"
VARIANT_FIELDS = ("name", "class_noun", "photos_limit")  # beside config sections
# What a variant tests: the rows of the paper's tables it can fill.
TEXTUAL_INVERSION, NO_PRIOR, NO_CLASS, WRONG_CLASS, PHOTOS = "textual_inversion", "no_prior", "no_class", "wrong_class", "photos"
ENTRY_SEPARATOR = "--"


def _variant_problems(raw: Any, subject_ids: set[str]) -> list[str]:
    if not isinstance(raw, dict):
        return [f"expected a mapping with `name` and settings ({', '.join(VARIANT_FIELDS)}, config sections)"]
    problems = []
    name = str(raw.get("name") or "").strip()
    if not SAFE_ID.fullmatch(name) or ENTRY_SEPARATOR in name:
        problems.append(f"name: {name!r} is not a usable name (letters, digits, '.', '_' and single '-')")
    noun = raw.get("class_noun")
    if isinstance(noun, dict):
        problems += [f"class_noun: {key!r} is no subject of this file" for key in noun if key not in subject_ids]
        problems += [f"class_noun.{key}: expected a word" for key, value in noun.items() if not isinstance(value, str)]
    elif noun is not None and not isinstance(noun, str):
        problems.append("class_noun: expected a word, \"\" (no class noun) or a map from subject id to a word")
    limit = raw.get("photos_limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        problems.append(f"photos_limit: {limit!r} is not a count of photos (1 or more)")
    sections = {key: value for key, value in raw.items() if key not in VARIANT_FIELDS}
    problems += [problem.removeprefix("overrides.") for problem in override_problems(sections)]
    if name == BASELINE and (sections or noun is not None or limit is not None):
        problems.append(f"{BASELINE} is the baseline and takes no settings; give this variant another name")
    return problems


def variant_roles(raw: dict, subject: SubjectEntry, config: RunConfig) -> list[str]:
    """Which rows of the paper's tables this variant of this subject fills."""
    if config.training.method == "textual_inversion":
        return [TEXTUAL_INVERSION]  # another method: its settings are its own, not an ablation of DreamBooth's
    roles = []
    if "priors" in raw or "training" in raw:
        if not config.priors.enabled or config.training.prior_loss_weight == 0:
            roles.append(NO_PRIOR)
    if not config.subject.class_noun_in_prompts:
        roles.append(NO_CLASS)
    elif config.subject.class_noun != subject.class_noun:
        roles.append(WRONG_CLASS)
    if raw.get("photos_limit"):
        roles.append(PHOTOS)
    return roles


def _variant_entry(subject: SubjectEntry, raw: dict, shared: RunConfig) -> SubjectEntry:
    name = raw["name"]
    overrides = merge_settings(subject.overrides, {key: value for key, value in raw.items() if key not in VARIANT_FIELDS})
    noun = raw.get("class_noun")
    class_noun = noun.get(subject.id, subject.class_noun) if isinstance(noun, dict) else subject.class_noun if noun is None else noun
    if not class_noun.strip():  # no class noun: the captions say `a [V]`; the class still names the class images
        class_noun = subject.class_noun
        overrides = merge_settings(overrides, {"subject": {"class_noun_in_prompts": False}})
    if raw.get("photos_limit"):
        overrides = merge_settings(overrides, {"subject": {"photos_limit": raw["photos_limit"]}})
    # The evaluation's prompt set follows what the subject is, not the noun a variant trains with.
    live = subject.live if subject.live is not None else is_live_subject(subject.class_noun)
    entry = subject.model_copy(update={"id": f"{subject.id}{ENTRY_SEPARATOR}{name}", "class_noun": class_noun.strip(),
                                       "overrides": overrides, "live": live})
    roles = variant_roles(raw, subject, subject_config(shared, entry))
    return entry.model_copy(update={"experiment": {"subject": subject.id, "variant": name, "roles": roles,
                                                   "photos_limit": raw.get("photos_limit")}})


def expand_variants(subjects: list[SubjectEntry], raw_variants: Any, source: str, shared: RunConfig) -> list[SubjectEntry]:
    """One entry per subject and variant, subject by subject; every problem reported at once, a line each."""
    if not isinstance(raw_variants, list) or not raw_variants:
        raise InputError(f"{source}: variants: expected a list of variants, each {{name: ..., settings}}")
    subject_ids = {subject.id for subject in subjects}
    problems, names, usable = [], {}, []
    for index, raw in enumerate(raw_variants, start=1):
        where = f"{source}: variant {index}" + (f" ({raw.get('name')})" if isinstance(raw, dict) and raw.get("name") else "")
        found = [f"{where}: {problem}" for problem in _variant_problems(raw, subject_ids)]
        if isinstance(raw, dict) and raw.get("name") in names:
            found.append(f"{where}: name: duplicate of variant {names[raw['name']]}")
        if isinstance(raw, dict):
            names.setdefault(raw.get("name"), index)
        problems += found
        if not found:
            usable.append((where, raw))
    entries, reported = [], set()
    for subject in subjects:
        for where, raw in usable:
            try:
                entry = _variant_entry(subject, raw, shared)
            except ValidationError as error:  # the same settings fail every subject: said once
                found = [f"{where}: {problem}" for problem in setting_problems(error)]
                problems += [line for line in found if line not in reported]
                reported.update(found)
                continue
            if len(entry.id) > 64:
                problems.append(f"{source}: {entry.id}: longer than 64 characters; shorten the subject id or the variant name")
            entries.append(entry)
    if problems:
        raise InputError("\n".join(problems))
    return entries
