"""The exported Jinja chat template reproduces engmoe.data.chat.render_text through transformers'
``apply_chat_template``, for every mode, tool calls included, and tokenises to the renderer's ids."""
import json

import pytest

from engmoe.data.chat import ChatRenderer, render_text

SYSTEM = {"role": "system", "content": "Sei un assistente utile."}
USER = {"role": "user", "content": "Che tempo fa a Roma? Rispondi in breve."}
USER2 = {"role": "user", "content": "And tomorrow, in the città?"}


def _a(content, reasoning=None, **extra):
    msg = {"role": "assistant", "content": content, **extra}
    if reasoning is not None:
        msg["reasoning"] = reasoning
    return msg


CALL_OPENAI = {"id": "c1", "type": "function",
               "function": {"name": "weather", "arguments": json.dumps({"city": "Roma", "days": 2})}}
CALL_FLAT = {"name": "clock", "arguments": {"tz": "Europe/Rome", "nested": {"x": [1, 2]}, "città": "ü"}}
CALL_NO_ARGS = {"type": "function", "function": {"name": "ping"}}
TOOL = {"role": "tool", "content": '{"temp": 21, "sky": "sereno"}', "tool_call_id": "c1"}

# (id, conversation): every switch of render_text, single and multi-turn, with and without tools
CONVERSATIONS = [
    ("plain", {"messages": [USER, _a("Sole, 24 gradi.")]}),
    ("plain-system-multiturn", {"messages": [SYSTEM, USER, _a("Sole."), USER2, _a("Pioggia.")],
                                "enable_thinking": False}),
    ("think-en", {"messages": [SYSTEM, USER, _a("Sunny.", "The user asks about Rome; answer briefly.")],
                  "reasoning_lang": "en"}),
    ("think-ita", {"messages": [USER, _a("Sole.", "Domanda sul meteo di Roma.")], "reasoning_lang": "ita",
                   "enable_thinking": True}),
    ("turbo-en", {"messages": [USER, _a("Sunny.", "rome weather short")], "turbo": True}),
    ("turbo-ita-multiturn", {"messages": [USER, _a("Sole.", "meteo roma"), USER2, _a("Pioggia.", "domani pioggia")],
                             "reasoning_lang": "ita", "turbo": True}),
    ("tools-plain", {"messages": [USER, _a("Controllo.", tool_calls=[CALL_OPENAI, CALL_FLAT]), TOOL,
                                  {"role": "tool", "content": "12:00"}, _a("21 gradi, sereno.")]}),
    ("tools-empty-content", {"messages": [USER, _a(None, tool_calls=[CALL_OPENAI]), TOOL, _a("Sereno.")]}),
    ("tools-no-args", {"messages": [USER, _a("", tool_calls=[CALL_NO_ARGS, CALL_FLAT]), TOOL, _a("ok")]}),
    ("tools-thinking", {"messages": [SYSTEM, USER, _a("", "need the weather tool", tool_calls=[CALL_OPENAI]), TOOL,
                                     _a("21 degrees.", "the tool said 21")], "reasoning_lang": "en"}),
]


def _kwargs(conv: dict) -> dict:
    """render_text's conversation switches as template variables."""
    kw = {}
    if "enable_thinking" in conv:
        kw["enable_thinking"] = conv["enable_thinking"]
    if "reasoning_lang" in conv:
        kw["reasoning_lang"] = conv["reasoning_lang"]
    if "turbo" in conv:
        kw["enable_turbo"] = conv["turbo"]
    return kw


@pytest.fixture(scope="module")
def hf_tok(hf_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_tokenizer_dir)


@pytest.fixture(scope="module")
def renderer(demo_tokenizer):
    from engmoe.data.tokenizer import load_tokenizer

    return ChatRenderer(load_tokenizer(demo_tokenizer))


@pytest.mark.parametrize("name,conv", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_template_text_equals_render_text(hf_tok, name, conv):
    got = hf_tok.apply_chat_template(conv["messages"], tokenize=False, **_kwargs(conv))
    assert got == render_text(conv)


@pytest.mark.parametrize("name,conv", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_template_tokens_equal_renderer_tokens(hf_tok, renderer, name, conv):
    ids = hf_tok.apply_chat_template(conv["messages"], tokenize=True, **_kwargs(conv))
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == renderer.render(conv).tokens


@pytest.mark.parametrize("lang,turbo,thinking,expected_tail", [
    ("en", False, False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ("en", False, True, "<|im_start|>assistant\n/reasoning_en\n<think>"),
    ("ita", False, True, "<|im_start|>assistant\n/reasoning_ita\n<think>"),
    ("ita", True, True, "<|im_start|>assistant\n/reasoning_ita\n/turbo\n<think>"),
])
def test_generation_prompt_opens_the_chosen_mode(hf_tok, lang, turbo, thinking, expected_tail):
    history = [SYSTEM, USER]
    prompt = hf_tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True, enable_thinking=thinking,
                                        reasoning_lang=lang, enable_turbo=turbo)
    assert prompt.endswith(expected_tail)
    # the prompt is exactly the start of the training text of the same conversation with its answer
    answer = _a("Sole.", "meteo" if thinking else None)
    full = render_text({"messages": history + [answer], "enable_thinking": thinking, "reasoning_lang": lang,
                        "turbo": turbo})
    assert full.startswith(prompt) and len(full) > len(prompt)


def test_thinking_defaults_to_whether_reasoning_is_present(hf_tok):
    with_reasoning = [USER, _a("Sunny.", "short")]
    assert "/reasoning_en\n<think>\nshort\n</think>" in hf_tok.apply_chat_template(with_reasoning, tokenize=False)
    prompt = hf_tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("messages,kwargs,match", [
    ([USER, _a("x")], {"enable_turbo": True, "enable_thinking": False}, "enable_turbo"),
    ([USER, _a("x")], {"enable_thinking": True}, "reasoning"),
    ([USER, _a("x", "why")], {"enable_thinking": False}, "enable_thinking is false"),
    ([USER, _a("x")], {"reasoning_lang": "de"}, "reasoning_lang"),
    ([USER, TOOL], {}, "tool turn must follow"),
    ([{"role": "robot", "content": "beep"}], {}, "role"),
])
def test_template_refuses_what_render_text_refuses(hf_tok, messages, kwargs, match):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match=match):
        hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)
