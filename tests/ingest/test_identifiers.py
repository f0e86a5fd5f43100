"""The identifier [V]: a rare, short, meaningless token of the model's own tokenizer."""

import pytest

from dreambooth.errors import InputError
from dreambooth.ingest.identifiers import check_user_identifier, common_short_words, select_rare_identifier
from dreambooth.models.loading import load_tokenizer

PROMPTS = ["a {identifier} {class_noun}", "a {identifier} {class_noun} on the beach"]


@pytest.fixture(scope="module")
def tokenizer(model_cache):
    return load_tokenizer("tiny://sd")


def test_the_chosen_token_is_rare_short_and_meaningless(tokenizer):
    choice = select_rare_identifier(tokenizer, "dog", PROMPTS, (700, 1050))
    (token_id,) = choice.token_ids
    assert 700 <= token_id < 1050
    assert 1 <= len(choice.identifier) <= 3 and choice.identifier.isalpha()
    assert choice.identifier not in common_short_words()
    assert tokenizer(choice.identifier, add_special_tokens=False)["input_ids"] == [token_id]
    assert choice.source == "selected" and "700, 1050" in choice.reason


def test_the_choice_is_reproducible_and_seeded(tokenizer):
    first = select_rare_identifier(tokenizer, "dog", PROMPTS, (700, 1050), seed=0)
    again = select_rare_identifier(tokenizer, "dog", PROMPTS, (700, 1050), seed=0)
    others = {select_rare_identifier(tokenizer, "dog", PROMPTS, (700, 1050), seed=s).identifier for s in range(1, 6)}
    assert first == again
    assert len(others | {first.identifier}) > 1


def test_several_tokens_can_form_the_identifier(tokenizer):
    choice = select_rare_identifier(tokenizer, "dog", PROMPTS, (700, 1050), num_tokens=3)
    assert len(choice.token_ids) == 3
    assert tokenizer(choice.identifier, add_special_tokens=False)["input_ids"] == choice.token_ids


def test_common_words_and_prompt_words_are_never_chosen(tokenizer):
    # The whole vocabulary: ordinary words (dog, on, the, ...) sit in it but must be skipped.
    chosen = {select_rare_identifier(tokenizer, "dog", PROMPTS, (0, 1052), seed=s).identifier for s in range(40)}
    assert not chosen & (common_short_words() | {"dog", "on", "the", "beach"})


def test_a_range_without_rare_tokens_is_a_clear_error(tokenizer):
    with pytest.raises(InputError, match=r"identifier_token_range: \[0, 256\) holds 0 usable"):
        select_rare_identifier(tokenizer, "dog", PROMPTS, (0, 256))


def test_a_user_identifier_is_checked_against_the_tokenizer(tokenizer):
    assert check_user_identifier(tokenizer, "sks", "dog").source == "user"
    assert "ordinary word" in check_user_identifier(tokenizer, "cat", "dog").reason
    with pytest.raises(InputError, match=r"subject\.identifier: 'abcdefgh' is \d tokens.*use 1-3"):
        check_user_identifier(tokenizer, "abcdefgh", "dog")
    with pytest.raises(InputError, match="overlaps the class noun"):
        check_user_identifier(tokenizer, "dog", "dog")
