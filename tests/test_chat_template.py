"""Chat templates executed with jinja2's sandbox: ids and assistant masks equal transformers'
``apply_chat_template`` for the same tokenizer directory and messages; each family's default
template renders the published chat format."""
import os

import pytest

from mindport.models.registry import family
from mindport.tokenizer import Tokenizer
from testkit import tokenizers
from testkit.tokenizers import CHAT, CHATML_GENERATION, SYSTEM, TELECHAT_GENERATION, chat_dir

# The published chat formats of SYSTEM + CHAT[:3] with the generation prompt (facts: research/<family>/chat_template.jinja)
PUBLISHED = {
    "telechat2": "<_system>Be brief.\n<_user>Hello world<_bot>the quick fox<_end>\n<_user>你好 again<_bot>",
    "qwen_moe": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>"
                "assistant\nthe quick fox<|im_end|>\n<|im_start|>user\n你好 again<|im_end|>\n<|im_start|>assistant\n",
    "mixtral": "<s> [INST] Be brief.\n\nHello world [/INST] the quick fox</s> [INST] 你好 again [/INST]",
    "xverse": "Be brief.\n\nHuman: Hello world\n\nAssistant: the quick fox</s>Human: 你好 again\n\nAssistant: ",
}
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_family_templates_render_the_published_format_and_equal_transformers(tmp_path, name):
    from transformers import AutoTokenizer

    directory = chat_dir(tmp_path, name)
    ours, theirs = Tokenizer.load(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.apply_chat_template([SYSTEM] + CHAT[:3], add_generation_prompt=True, tokenize=False) == PUBLISHED[name]
    for messages in ([SYSTEM] + CHAT, CHAT, CHAT[:3], [SYSTEM] + CHAT[:1]):
        for generation_prompt in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            assert text == theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                      tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
            # transformers 5 returns a BatchEncoding (return_dict=True by default); compare its input_ids
            assert ids == theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt)["input_ids"]
    # the end of an assistant turn stops a chat reply
    end_of_turn = {"telechat2": "<_end>", "qwen_moe": "<|im_end|>", "mixtral": "</s>", "xverse": "</s>"}[name]
    assert ours.token_to_id(end_of_turn) in ours.stop_ids(chat=True)


@pytest.mark.parametrize("shape", ["qwen_moe", "telechat2"])
def test_generation_blocks_give_transformers_assistant_mask(tmp_path, shape):
    from transformers import AutoTokenizer

    directory = chat_dir(tmp_path, shape, CHATML_GENERATION if shape == "qwen_moe" else TELECHAT_GENERATION)
    ours, theirs = Tokenizer.load(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.has_generation_blocks()
    for messages in ([SYSTEM] + CHAT, CHAT[:2]):
        mine = ours.apply_chat_template(messages, return_assistant_tokens_mask=True)
        ref = theirs.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
        assert mine["input_ids"] == ref["input_ids"] and mine["assistant_masks"] == ref["assistant_masks"]
        assert sum(mine["assistant_masks"]) > 0


def test_template_exceptions_are_one_line(tmp_path):
    from mindport.tokenizer import TokenizerError

    tok = Tokenizer.load(chat_dir(tmp_path, "mixtral"))
    with pytest.raises(TokenizerError, match="chat_template.jinja: template error: Mixtral-Instruct: after an optional"):
        tok.apply_chat_template([CHAT[0], CHAT[0]])


def test_the_family_default_is_used_when_the_tokenizer_has_none_and_saved_with_it(tmp_path):
    directory = tokenizers.build("metaspace_bos", str(tmp_path / "tok"))
    tok = Tokenizer.load(directory, family="mixtral")
    assert tok.chat_template_source == family("mixtral").chat_template_file
    assert tok.apply_chat_template(CHAT[:1], tokenize=False) == "<s> [INST] Hello world [/INST]"
    tok.save(str(tmp_path / "copy"))
    assert Tokenizer.load(str(tmp_path / "copy")).chat_template == family("mixtral").chat_template
    assert os.path.isfile(tmp_path / "copy" / "chat_template.jinja")
