import pytest

from anelab.errors import AnelabError
from anelab.tokens import eot_index, prompt_tokens, resolve_tokens


def test_every_ane_prompt_word_is_one_token_at_its_real_clip_position(tiny_pipe, ane_prompts):
    tok = tiny_pipe.tokenizer
    assert len(ane_prompts) == 276
    for prompt in ane_prompts.prompt:
        words = prompt.split()
        # real CLIP BPE has every A&E vocabulary word as one token (reference §4): position = 1 + word index
        assert prompt_tokens(tok, prompt) == {i + 1: w for i, w in enumerate(words)}
        assert eot_index(tok, prompt) == len(words) + 1


def test_subject_positions_follow_the_reference_rule(tiny_pipe, ane_prompts):
    expected = {"animal_animal": {(2, 5)}, "animal_object": {(2, 5), (2, 6)}, "object_object": {(3, 7)}}
    for row in ane_prompts.itertuples():
        positions = tuple(resolve_tokens(tiny_pipe.tokenizer, row.prompt, row.tokens))
        assert positions in expected[row.category], row.prompt
        if row.category == "animal_object":
            assert positions == ((2, 5) if " with " in row.prompt else (2, 6))


def test_positions_pass_through_and_words_are_case_insensitive(tiny_pipe):
    assert resolve_tokens(tiny_pipe.tokenizer, "a cat and a dog", [5, "CAT"]) == [5, 2]


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["cow"], "'cow' is not a token of 'a cat and a dog'; its tokens are 1:a 2:cat 3:and 4:a 5:dog"),
        (["a"], "'a' appears 2 times"),
        ([0], "token position 0 is not a word of the prompt"),
        ([6], "token position 6 is not a word of the prompt"),
        ([70], "token position 70"),
        (["cat", 2], "same position twice"),
        ([2.5], "must be words or int positions"),
    ],
)
def test_bad_tokens_name_the_prompt_tokens(tiny_pipe, tokens, message):
    with pytest.raises(AnelabError, match=message.replace("(", r"\(")):
        resolve_tokens(tiny_pipe.tokenizer, "a cat and a dog", tokens)


def test_prompt_longer_than_77_tokens_is_an_error(tiny_pipe):
    with pytest.raises(AnelabError, match="prompt is 82 tokens long, the text encoder takes at most 77"):
        resolve_tokens(tiny_pipe.tokenizer, " ".join(["cat"] * 80), [1])
