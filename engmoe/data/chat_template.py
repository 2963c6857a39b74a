"""The Jinja chat template shipped in ``tokenizer_config.json``: engmoe/data/chat.py's format for HF.

For every conversation :func:`engmoe.data.chat.render_text` accepts, the template renders the identical
string (tests compare them through ``transformers``' ``apply_chat_template``). Conversation switches become
template variables, passed as keyword arguments of ``apply_chat_template``:

* ``enable_thinking`` (default: whether any assistant turn carries ``reasoning``) — reasoning mode;
* ``reasoning_lang``: ``"en"`` | ``"ita"`` → ``/reasoning_en`` | ``/reasoning_ita``;
* ``enable_turbo``: compressed reasoning (``/turbo`` on its own line after the language token).

``add_generation_prompt`` opens an assistant turn with the control prefix of the chosen mode — the language
token (and ``/turbo``) then ``<think>`` when thinking, the closed empty ``<think>\\n\\n</think>\\n\\n`` when
not — so the mode is set by the caller, not guessed by the model. Tool calls take ``arguments`` as an object
(serialised like ``json.dumps``) or as a JSON string, inserted verbatim (identical to ``render_text`` when
the string is already ``json.dumps`` output). Tool *definitions* (``tools=``) are not rendered: the training
format has no slot for them. The same errors as ``render_text`` are raised for inconsistent switches.
Differences by design: a generation prompt does not need an earlier assistant turn.
"""
from __future__ import annotations

CHAT_TEMPLATE = r"""{#- EngGPT2 ChatML with reasoning control; mirrors engmoe.data.chat.render_text -#}
{%- set ns = namespace(has_reasoning=false, prev_role='', prev_called_tools=false) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'assistant' and message['reasoning'] is defined -%}
        {%- if message['reasoning'] is not none -%}
            {%- set ns.has_reasoning = true -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if enable_thinking is defined and enable_thinking is not none -%}
    {%- set thinking = enable_thinking -%}
{%- else -%}
    {%- set thinking = ns.has_reasoning -%}
{%- endif -%}
{%- set lang = reasoning_lang if reasoning_lang is defined and reasoning_lang is not none else 'en' -%}
{%- if lang == 'en' -%}
    {%- set lang_token = '/reasoning_en' -%}
{%- elif lang == 'ita' -%}
    {%- set lang_token = '/reasoning_ita' -%}
{%- else -%}
    {{- raise_exception("reasoning_lang: expected 'en' or 'ita', got '" ~ lang ~ "'") -}}
{%- endif -%}
{%- set turbo = enable_turbo if enable_turbo is defined and enable_turbo is not none else false -%}
{%- if turbo and not thinking -%}
    {{- raise_exception('enable_turbo (compressed reasoning) needs enable_thinking') -}}
{%- endif -%}
{%- if thinking -%}
    {%- set mode_prefix = lang_token ~ ('\n/turbo' if turbo else '') ~ '\n<think>' -%}
{%- else -%}
    {%- set mode_prefix = '<think>\n\n</think>' -%}
{%- endif -%}
{%- for message in messages -%}
    {%- set role = message['role'] -%}
    {%- if role not in ['system', 'user', 'assistant', 'tool'] -%}
        {{- raise_exception('messages[' ~ loop.index0 ~ '].role: expected system, user, assistant or tool') -}}
    {%- endif -%}
    {{- '<|im_start|>' ~ role ~ '\n' -}}
    {%- if role == 'assistant' -%}
        {%- set reasoning = message['reasoning'] if message['reasoning'] is defined else none -%}
        {%- if thinking -%}
            {%- if reasoning is none or reasoning is not string or (reasoning | trim) == '' -%}
                {{- raise_exception('messages[' ~ loop.index0 ~ '].reasoning: thinking is enabled, so every '
                                    ~ 'assistant turn needs a non-empty reasoning string') -}}
            {%- endif -%}
            {{- mode_prefix ~ '\n' ~ reasoning ~ '\n</think>' -}}
        {%- else -%}
            {%- if reasoning is not none -%}
                {{- raise_exception('messages[' ~ loop.index0
                                    ~ '].reasoning: present but enable_thinking is false') -}}
            {%- endif -%}
            {{- mode_prefix -}}
        {%- endif -%}
        {%- set content = message['content'] if message['content'] is defined else none -%}
        {%- set content = '' if content is none else content -%}
        {{- '\n\n' ~ content -}}
        {%- set calls = message['tool_calls'] if message['tool_calls'] is defined and message['tool_calls'] else [] -%}
        {%- for call in calls -%}
            {%- set fn = call['function'] if call['function'] is defined else call -%}
            {%- set args = fn['arguments'] if fn['arguments'] is defined and fn['arguments'] is not none else {} -%}
            {%- if content or not loop.first -%}
                {{- '\n' -}}
            {%- endif -%}
            {%- set args_json = args if args is string else (args | tojson) -%}
            {{- '<tool_call>\n{"name": ' ~ (fn['name'] | tojson) ~ ', "arguments": ' ~ args_json ~ '}\n</tool_call>' -}}
        {%- endfor -%}
        {%- set ns.prev_called_tools = calls | length > 0 -%}
    {%- elif role == 'tool' -%}
        {%- if not (ns.prev_role == 'tool' or ns.prev_called_tools) -%}
            {{- raise_exception('messages[' ~ loop.index0 ~ '].role: a tool turn must follow an assistant turn '
                                ~ 'with tool_calls (or another tool turn)') -}}
        {%- endif -%}
        {{- '<tool_response>\n' ~ message['content'] ~ '\n</tool_response>' -}}
    {%- else -%}
        {{- message['content'] -}}
        {%- set ns.prev_called_tools = false -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
    {%- set ns.prev_role = role -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' ~ mode_prefix -}}
    {%- if not thinking -%}
        {{- '\n\n' -}}
    {%- endif -%}
{%- endif -%}"""
