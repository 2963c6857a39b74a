"""Render OpenAI-style conversations into EngGPT2 ChatML tokens with a per-token loss mask.

Format (docs/DESIGN.md §1), one turn per message::

    <|im_start|>system\\n{content}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n/reasoning_en\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}<|im_end|>\\n
    <|im_start|>tool\\n<tool_response>\\n{content}\\n</tool_response><|im_end|>\\n

* reasoning mode: ``/reasoning_en`` or ``/reasoning_ita`` (``reasoning_lang``), then ``\\n/turbo`` when
  ``turbo`` is set (compressed reasoning), then the ``<think>`` block. ``/turbo`` sits on its own line so
  the text form re-tokenises to the same ids with a word-boundary-safe special-token matcher.
* thinking disabled: the assistant turn opens with an empty ``<think>\\n\\n</think>\\n\\n`` and no language
  token.
* tool calls follow the assistant content, one ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  each, separated by ``\\n``.

Why pieces: the token path and the text path (:func:`render_text`, which the HF chat template must
reproduce) are both built from one list of pieces, so they cannot drift apart. Template control tokens are
inserted by id; message text is encoded with special tokens disabled, so a user writing ``<|im_start|>``
gets ordinary text tokens, never a control token. Adjacent text pieces are encoded as one string, which makes
``tokens == tokenizer.encode(render_text(conv), allow_special=True)`` whenever the messages themselves
contain no special-token strings.

The loss mask is 1 on exactly what the model must produce in an assistant turn: everything after
``<|im_start|>assistant\\n`` up to and including that turn's ``<|im_end|>``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Sequence

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
REASONING_LANG_TOKENS = {"en": "/reasoning_en", "ita": "/reasoning_ita"}
TURBO = "/turbo"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"

#: every control token the template inserts (all must exist in the tokenizer)
TEMPLATE_TOKENS: tuple[str, ...] = (
    IM_START, IM_END, THINK, END_THINK, *REASONING_LANG_TOKENS.values(), TURBO,
    TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE,
)
ROLES = ("system", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "content", "reasoning", "tool_calls", "name", "tool_call_id"}


class ChatFormatError(ValueError):
    """A conversation record that does not follow the expected schema (message names record and field)."""


@dataclass(frozen=True)
class RenderedChat:
    """Token ids of one conversation and a 0/1 mask of the same length (1 = assistant output to learn)."""

    tokens: list[int]
    loss_mask: list[int]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.loss_mask):
            raise ValueError(f"RenderedChat: {len(self.tokens)} tokens but {len(self.loss_mask)} mask entries")

    def __len__(self) -> int:
        return len(self.tokens)


class _Piece(NamedTuple):
    text: str
    control: bool  # True: a template special token inserted by id
    mask: int


@dataclass(frozen=True)
class _Options:
    thinking: bool
    lang_token: str
    turbo: bool


def _err(where: Optional[str], field: str, msg: str) -> ChatFormatError:
    return ChatFormatError(f"{where or 'conversation'}: field '{field}': {msg}")


def _options(conv: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], where: Optional[str]) -> _Options:
    """Conversation-level switches. ``enable_thinking`` defaults to whether any assistant turn has reasoning."""
    lang = conv.get("reasoning_lang", "en")
    if lang not in REASONING_LANG_TOKENS:
        raise _err(where, "reasoning_lang", f"expected one of {sorted(REASONING_LANG_TOKENS)}, got {lang!r}")
    turbo = conv.get("turbo", False)
    if not isinstance(turbo, bool):
        raise _err(where, "turbo", f"expected a bool, got {type(turbo).__name__}")
    has_reasoning = any(m.get("role") == "assistant" and m.get("reasoning") is not None for m in messages)
    thinking = conv.get("enable_thinking", has_reasoning)
    if not isinstance(thinking, bool):
        raise _err(where, "enable_thinking", f"expected a bool, got {type(thinking).__name__}")
    if turbo and not thinking:
        raise _err(where, "turbo", "turbo (compressed reasoning) needs thinking enabled")
    return _Options(thinking=thinking, lang_token=REASONING_LANG_TOKENS[lang], turbo=turbo)


def _tool_call_json(call: Any, where: Optional[str], field: str) -> str:
    """One tool call as canonical JSON ``{"name": ..., "arguments": {...}}``.

    Accepts the OpenAI form ``{"type": "function", "function": {"name", "arguments"}}`` (arguments a JSON
    string or an object) and the flat form ``{"name", "arguments"}``.
    """
    if not isinstance(call, Mapping):
        raise _err(where, field, f"expected an object, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping):
        raise _err(where, f"{field}.function", f"expected an object, got {type(fn).__name__}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _err(where, f"{field}.name", "expected a non-empty string")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise _err(where, f"{field}.arguments", f"not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(args, Mapping):
        raise _err(where, f"{field}.arguments", f"expected a JSON object, got {type(args).__name__}")
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def _content(msg: Mapping[str, Any], i: int, where: Optional[str], *, optional: bool) -> str:
    if "content" not in msg or msg["content"] is None:
        if optional:
            return ""
        raise _err(where, f"messages[{i}].content", "missing (expected a string)")
    content = msg["content"]
    if not isinstance(content, str):
        raise _err(where, f"messages[{i}].content", f"expected a string, got {type(content).__name__}")
    return content


def _assistant_pieces(msg: Mapping[str, Any], i: int, opts: _Options, where: Optional[str]) -> list[_Piece]:
    tool_calls = msg.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise _err(where, f"messages[{i}].tool_calls", f"expected a list, got {type(tool_calls).__name__}")
    content = _content(msg, i, where, optional=bool(tool_calls))
    reasoning = msg.get("reasoning")
    out: list[_Piece] = []
    if opts.thinking:
        if not isinstance(reasoning, str) or not reasoning.strip():
            raise _err(where, f"messages[{i}].reasoning",
                       "thinking is enabled, so every assistant turn needs a non-empty reasoning string "
                       "(set enable_thinking false for non-thinking data)")
        out.append(_Piece(opts.lang_token, True, 1))
        if opts.turbo:
            out += [_Piece("\n", False, 1), _Piece(TURBO, True, 1)]
        out += [_Piece("\n", False, 1), _Piece(THINK, True, 1), _Piece(f"\n{reasoning}\n", False, 1),
                _Piece(END_THINK, True, 1)]
    else:
        if reasoning is not None:
            raise _err(where, f"messages[{i}].reasoning", "present but enable_thinking is false")
        out += [_Piece(THINK, True, 1), _Piece("\n\n", False, 1), _Piece(END_THINK, True, 1)]
    out.append(_Piece("\n\n" + content, False, 1))
    for j, call in enumerate(tool_calls):
        body = _tool_call_json(call, where, f"messages[{i}].tool_calls[{j}]")
        if content or j:
            out.append(_Piece("\n", False, 1))
        out += [_Piece(TOOL_CALL, True, 1), _Piece(f"\n{body}\n", False, 1), _Piece(END_TOOL_CALL, True, 1)]
    return out


def _pieces(conv: Any, where: Optional[str] = None) -> list[_Piece]:
    """Validate ``conv`` and lay it out as template pieces (the single source of both render paths)."""
    if not isinstance(conv, Mapping):
        raise ChatFormatError(f"{where or 'conversation'}: expected a JSON object, got {type(conv).__name__}")
    messages = conv.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _err(where, "messages", "expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise _err(where, f"messages[{i}]", f"expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise _err(where, f"messages[{i}].role", f"expected one of {list(ROLES)}, got {role!r}")
        unknown = sorted(set(m) - _MESSAGE_KEYS)
        if unknown:  # e.g. 'reasoning_content' would otherwise silently lose the reasoning
            raise _err(where, f"messages[{i}].{unknown[0]}", f"unknown key (allowed: {sorted(_MESSAGE_KEYS)})")
        if role != "assistant" and m.get("tool_calls"):
            raise _err(where, f"messages[{i}].tool_calls", f"only assistant turns may call tools, not {role!r}")
        if role != "assistant" and m.get("reasoning") is not None:
            raise _err(where, f"messages[{i}].reasoning", f"only assistant turns carry reasoning, not {role!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise _err(where, "messages", "no assistant turn (nothing to train on)")
    opts = _options(conv, messages, where)

    out: list[_Piece] = []
    prev_role: Optional[str] = None
    prev_called_tools = False
    for i, m in enumerate(messages):
        role = m["role"]
        out += [_Piece(IM_START, True, 0), _Piece(role + "\n", False, 0)]
        if role == "assistant":
            out += _assistant_pieces(m, i, opts, where)
            prev_called_tools = bool(m.get("tool_calls"))
        elif role == "tool":
            if not (prev_role == "tool" or prev_called_tools):
                raise _err(where, f"messages[{i}].role",
                           "a tool turn must follow an assistant turn with tool_calls (or another tool turn)")
            content = _content(m, i, where, optional=False)
            out += [_Piece(TOOL_RESPONSE, True, 0), _Piece(f"\n{content}\n", False, 0),
                    _Piece(END_TOOL_RESPONSE, True, 0)]
        else:
            out.append(_Piece(_content(m, i, where, optional=False), False, 0))
            prev_called_tools = False
        mask = 1 if role == "assistant" else 0
        out += [_Piece(IM_END, True, mask), _Piece("\n", False, 0)]
        prev_role = role
    return out


def render_text(conv: Mapping[str, Any], *, where: Optional[str] = None) -> str:
    """The conversation as one ChatML string (what the HF chat template must produce)."""
    return "".join(p.text for p in _pieces(conv, where))


class ChatRenderer:
    """Renders conversations with one tokenizer; resolves (and checks) the template's control-token ids once."""

    def __init__(self, tokenizer: Any):
        special = getattr(tokenizer, "special_ids", None)
        if not isinstance(special, Mapping):
            raise TypeError("ChatRenderer: tokenizer has no special_ids mapping")
        missing = [t for t in TEMPLATE_TOKENS if t not in special]
        if missing:
            raise ValueError(f"ChatRenderer: tokenizer lacks the chat control tokens {missing}")
        self.tokenizer = tokenizer
        self._ids = {t: int(special[t]) for t in TEMPLATE_TOKENS}

    def render(self, conv: Mapping[str, Any], *, where: Optional[str] = None) -> RenderedChat:
        """Tokens and loss mask of ``conv``; ``where`` (e.g. ``file.jsonl:12``) prefixes error messages."""
        tokens: list[int] = []
        mask: list[int] = []
        pending = ""  # adjacent text pieces are encoded as one string (same split as the text path)
        pending_mask = 0

        def flush() -> None:
            nonlocal pending
            if pending:
                ids = self.tokenizer.encode(pending, allow_special=False)
                tokens.extend(ids)
                mask.extend([pending_mask] * len(ids))
                pending = ""

        for piece in _pieces(conv, where):
            if piece.control:
                flush()
                tokens.append(self._ids[piece.text])
                mask.append(piece.mask)
            else:
                if pending and piece.mask != pending_mask:
                    flush()
                pending_mask = piece.mask
                pending += piece.text
        flush()
        return RenderedChat(tokens, mask)


def render_chat(conv: Mapping[str, Any], tokenizer: Any, *, where: Optional[str] = None) -> RenderedChat:
    """One-off convenience for :meth:`ChatRenderer.render` (build a ChatRenderer for many conversations)."""
    return ChatRenderer(tokenizer).render(conv, where=where)
