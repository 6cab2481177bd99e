"""Golden renderings of chat templates by transformers, for crates/data/tests/chat_template_golden.rs.

Every template in crates/data/tests/fixtures/chat_templates/<name>.jinja (copied byte-exact from the
public tokenizer_config.json of the model named in TEMPLATES) is rendered over a set of
conversations, with add_generation_prompt true and false, by transformers' own
`apply_chat_template(..., tokenize=False)` on a tokenizer whose special tokens are the model's.
A conversation the template rejects with raise_exception is recorded as an expected error with
its message. The Rust side must reproduce every byte. For templates with `{% generation %}`
blocks, each case also records the character spans transformers' AssistantTracker finds
(`render_jinja_template(..., return_assistant_tokens_mask=True)`), as `generation_spans`.
`strftime_now` reads a fixed clock (FIXED_NOW, monkeypatched into transformers), which the Rust
test fixes too.

It also writes trl_templates.json: what TRL 1.16's own trainers make of rows rendered with
SmolLM3's template (its `chat_template_kwargs` column, `assistant_only_loss` on its generation
blocks, `SFTConfig.eos_token`), with the small tokenizer of
crates/data/tests/fixtures/tokenization/tiny-chatml; see `trl_goldens`.

usage: make_chat_template_goldens.py   (run with the reference venv, scripts/reference_env.sh;
        writes crates/data/tests/fixtures/chat_templates/{goldens,trl_templates}.json)
"""
import copy
import datetime
import hashlib
import json
import os
import re
import sys
import tempfile

import datasets
import jinja2
import tokenizers
import transformers
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from transformers.utils import chat_template_utils

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates/data/tests/fixtures/chat_templates")
TINY_TOKENIZER = os.path.join(FIXTURES, "..", "tokenization", "tiny-chatml")

# The clock `strftime_now` reads (SmolLM3's template prints today's date).
FIXED_NOW = datetime.datetime(2025, 7, 4, 13, 5, 9)


class FixedDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW


chat_template_utils.datetime = FixedDatetime

# name -> (where the template comes from, special tokens of that tokenizer)
TEMPLATES = {
    "zephyr": ("alignment-handbook DEFAULT_CHAT_TEMPLATE (src/alignment/data.py), Mistral tokens",
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                              {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                               "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}),
    "gemma-7b-it": ("google/gemma-7b-it",
                    {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}),
    "llama-3-8b-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct",
                            {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct",
                              {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral-7b-instruct-v0.1": ("mistralai/Mistral-7B-Instruct-v0.1 (original template)",
                                 {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "mistral-7b-instruct-v0.2": ("mistralai/Mistral-7B-Instruct-v0.2 (template with optional system message)",
                                 {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "llama-2-7b-chat": ("meta-llama/Llama-2-7b-chat-hf",
                        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "deepseek-coder-6.7b-instruct": ("deepseek-ai/deepseek-coder-6.7b-instruct",
                                     {"bos_token": "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "eos_token": "<|EOT|>",
                                      "pad_token": "<\uff5cend\u2581of\u2581sentence\uff5c>"}),
    "openchat-3.5-0106": ("openchat/openchat-3.5-0106",
                          {"bos_token": "<s>", "eos_token": "<|end_of_turn|>", "unk_token": "<unk>"}),
    # The `chat_template` of alignment-handbook's recipes/smollm3/sft/sft.yaml (commit 925acdf), with
    # {% generation %} blocks, strftime_now and the enable_thinking / xml_tools / python_tools
    # variables. It reads no special token.
    "smollm3": ("alignment-handbook recipes/smollm3/sft/sft.yaml `chat_template`",
                {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}),
    # scripts/make_tokenization_goldens.py's ChatML and Zephyr templates with {% generation %}.
    "chatml-generation": ("scripts/make_tokenization_goldens.py CHATML_GENERATION",
                          {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}),
    "zephyr-generation": ("scripts/make_tokenization_goldens.py ZEPHYR_GENERATION",
                          {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
}


def m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = {
    "prompt_only": [m("user", "Hello!")],
    "single_turn": [m("user", "What is the capital of France?"), m("assistant", "Paris.")],
    "with_system": [m("system", "You are a concise assistant."), m("user", "Name a prime number."),
                    m("assistant", "Seven.")],
    "multi_turn": [m("user", "Hi there"), m("assistant", "Hello! How can I help?"),
                   m("user", "What is 2 + 2?"), m("assistant", "4"),
                   m("user", "And times 3?"), m("assistant", "12"),
                   m("user", "Thanks, bye.")],
    "multi_turn_with_system": [m("system", "Answer in French."), m("user", "Good morning"),
                               m("assistant", "Bonjour"), m("user", "Good night"), m("assistant", "Bonne nuit"),
                               m("user", "Thank you"), m("assistant", "Merci")],
    "unicode": [m("user", "Café crème, naïve façade — ¿qué tal? Привет! 日本語で答えてください。"),
                m("assistant", "もちろん！🦀🚀 👩‍💻 ✓ ñ ü ß ∑ 中文 한국어 العربية")],
    "whitespace": [m("user", "  \n  Leading spaces and newlines,\ttabs\t and trailing ones  \n\n"),
                   m("assistant", "\n\nLine one\nLine two\r\n\u00a0non-breaking\u3000ideographic\u3000 \n")],
    "python_whitespace": [m("user", "\x1c\x1d\x1e\x1f\u0085\u2028 separators are whitespace to Python \u2029\x1f"),
                          m("assistant", "\x0b\x0c vertical tab and form feed \x0c\x0b")],
    "template_syntax_in_content": [m("user", "Render {{ this }} and {% if x %}that{% endif %} {# literally #}"),
                                   m("assistant", "Quotes ' \" and backslashes \\n \\ and tokens </s> <|im_end|> <eos>")],
    "empty_content": [m("user", ""), m("assistant", "")],
    "non_alternating": [m("user", "First"), m("user", "Second"), m("assistant", "Reply")],
    "unknown_role": [m("user", "What is the weather?"), m("tool", "{\"temp\": 21}"), m("assistant", "21 degrees.")],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo — 天気 🌦 for a \"city\"",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "Name, e.g. São Paulo"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7, "default": 1.5, "scale": 1e-07, "big": 1e16},
                "units": {"enum": ["c", "f"], "nullable": None, "strict": True, "legacy": False},
                "tags": {"type": "array", "items": {}, "examples": [[], {}]},
            },
            "required": ["city"],
        },
    },
}

# Extra conversations only some templates get, with the template variables (transformers' **kwargs,
# plus `tools`/`documents`) to render them with.
SPECIAL_CASES = {
    "llama-3.1-8b-instruct": [
        ("tools_in_user_message", CONVERSATIONS["with_system"], {"tools": [WEATHER_TOOL], "date_string": "01 Jan 2025"}),
        ("tools_in_system", CONVERSATIONS["single_turn"],
         {"tools": [WEATHER_TOOL, {"name": "noop", "parameters": {}}], "tools_in_user_message": False}),
        ("tool_call_and_result",
         [m("user", "Weather in Paris?"),
          {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
          m("tool", "{\"temp\": 21, \"sky\": \"clear\"}"),
          {"role": "ipython", "content": {"temp": 21, "feels_like": [20.5, None], "ok": True}},
          m("assistant", "It is 21 °C and clear.")],
         {"tools": [WEATHER_TOOL], "tools_in_user_message": False}),
        ("builtin_tool_call",
         [m("system", "Search when needed."), m("user", "Who won?"),
          {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "brave_search", "arguments": {"query": "winner", "lang": "en"}}}]}],
         {"builtin_tools": ["brave_search", "code_interpreter", "wolfram_alpha"]}),
        ("two_tool_calls",
         [m("user", "Both?"),
          {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "a", "arguments": {}}},
                                               {"type": "function", "function": {"name": "b", "arguments": {}}}]}],
         {}),
        ("tools_without_user_message", [m("system", "Only a system message.")], {"tools": [WEATHER_TOOL]}),
    ],
    "smollm3": [
        ("enable_thinking_false", CONVERSATIONS["multi_turn"], {"enable_thinking": False}),
        ("enable_thinking_true", CONVERSATIONS["multi_turn"], {"enable_thinking": True}),
        # smoltalk2's `chat_template_kwargs` struct: every field present, unset ones None.
        ("smoltalk2_kwargs", CONVERSATIONS["single_turn"],
         {"custom_instructions": None, "enable_thinking": False, "python_tools": None, "xml_tools": None}),
        ("system_no_think", [m("system", "Be brief. /no_think"), m("user", "Hi"), m("assistant", "\n\nHello")], {}),
        ("system_think", [m("system", "Think hard /think  "), m("user", "Hi"), m("assistant", "Hello")],
         {"enable_thinking": False}),
        ("system_override", [m("system", "/system_override Only this. /think"), m("user", "Hi"), m("assistant", "Hey")], {}),
        ("tools", CONVERSATIONS["single_turn"], {"tools": [WEATHER_TOOL], "python_tools": "def f(x: int) -> int: ..."}),
        ("xml_tools_kwarg", CONVERSATIONS["with_system"], {"xml_tools": "<tools>custom</tools>", "enable_thinking": None}),
    ],
}

# Small templates probing Jinja semantics a chat template can observe (Python printing of values,
# filters, tests, loop variables, whitespace control), rendered over PROBE_MESSAGES with
# add_generation_prompt=True. Known differences, not probed: tuples print as lists (`('a', 1)`,
# `.items()` pairs), `**` with a negative exponent, the str methods pycompat lacks (`center`,
# `zfill`, `partition`, ...) and the `wordcount` filter.
PROBE_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}
PROBE_MESSAGES = [m("system", "Sys text"), m("user", "Hello there  "), m("assistant", "Hi!")]
PROBES = [
    "{{ none }}|{{ true }}|{{ false }}|{{ 1.0 }}|{{ 10/4 }}|{{ 10//4 }}|{{ 2**10 }}|{{ 7 % 3 }}|{{ -7 // 2 }}",
    "{{ [1, 'a', none, true, 2.5] }}|{{ {'k': 'v', 'n': [1]} }}",
    "{{ 'x' ~ none ~ true ~ 1.5 }}",
    "{{ [1, none, 'a'] | join(',') }}",
    "{{ messages | length }}|{{ messages[0].role }}|{{ messages[-1]['content'] }}|{{ messages[1:] | length }}|{{ messages[::-1][0].role }}",
    "{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.length }}{{ loop.first }}{{ loop.last }}{% if loop.previtem is defined %}<{{ loop.previtem.role }}{% endif %}{% if loop.nextitem is defined %}>{{ loop.nextitem.role }}{% endif %};{% endfor %}",
    "{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% set ns.s = ns.s + m.role[0] %}{% endfor %}{{ ns.n }}{{ ns.s }}",
    "{% set x = 1 %}{% for m in messages %}{% set x = x + 1 %}{% endfor %}{{ x }}",
    "{{ messages | map(attribute='role') | list }}|{{ messages | selectattr('role', 'equalto', 'user') | list | length }}|{{ messages | rejectattr('role', 'equalto', 'user') | map(attribute='content') | join('+') }}",
    "{{ messages[0] | tojson }}|{{ 'a<b>&\\'\"' | tojson }}|{{ 'é\\u2028' | tojson }}|{{ none | tojson }}",
    "{{ messages[0].items() | list | length }}|{{ messages[0].keys() | list }}|{{ messages[0].get('nope', 'dflt') }}|{{ messages[0].get('role') }}",
    "{{ ' a b  c '.split() }}|{{ 'a,b,,c'.split(',') }}|{{ 'a b c'.split(' ', 1) }}|{{ 'xAy'.lower() }}{{ 'xAy'.upper() }}|{{ 'hello'.startswith('he') }}{{ 'hello'.endswith(('lo', 'x')) }}|{{ 'aXbX'.replace('X', '-') }}",
    "{{ 'hello world'.capitalize() }}|{{ 'hello world' | capitalize }}|{{ 'HELLO wORLD' | title }}|{{ 'x' * 3 }}|{{ 'abc'[1:] }}|{{ 'abc'[-1] }}|{{ 'abc' | reverse }}|{{ 'é中' | length }}",
    "{{ '%.2f' | format(3.14159) }}|{{ '%s-%d' | format('a', 3) }}|{{ 3.7 | int }}|{{ '42' | int + 1 }}|{{ 3.14159 | round(2) }}|{{ 2.5 | round }}|{{ -3 | abs }}",
    "{{ undefined_var }}|{{ undefined_var is defined }}|{{ undefined_var | default('d') }}|{{ none | default('d') }}|{{ '' | default('d', true) }}",
    "{% if 'role' in messages[0] %}in{% endif %}|{% if 'us' in 'user' %}sub{% endif %}|{{ messages[0] is mapping }}{{ 'x' is string }}{{ 'x' is iterable }}{{ 1 is number }}{{ none is none }}{{ [] is sequence }}{{ 'x' is sequence }}",
    "{% macro turn(m) %}[{{ m.role | upper }}]{% endmacro %}{% for m in messages %}{{ turn(m) }}{% endfor %}",
    "{% for i in range(3) %}{{ i }}{% endfor %}|{% for i in range(1, 7, 2) %}{{ i }}{% endfor %}|{{ range(3) | list }}",
    "{{ messages | first | tojson }}|{{ (messages | last).role }}|{{ [3,1,2] | sort }}|{{ [3,1,2] | max }}{{ [3,1,2] | min }}{{ [3,1,2] | sum }}|{{ ['a','b'] | unique | list }}",
    "{% for k, v in messages[0] | items %}{{ k }}={{ v }};{% endfor %}|{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}|{{ messages[0] | dictsort | map('first') | join(',') }}",
    "{{ dict(a=1, b='x') }}|{{ dict(a=1).a }}",
    "  {%- if true %} x {% endif -%}  \n  {% if true %}\n  y\n  {% endif %}\n  {{ 'z' }}  \n{# comment #}\n  {# indented comment #}\nend\n",
    "{% raw %}{{ not rendered }}{% endraw %}|{{ '{{ x }}' }}",
    "{%- for m in messages -%}{%- if loop.index0 == 1 -%}{%- continue -%}{%- endif -%}{{ m.role }}{%- if loop.index0 == 2 -%}{%- break -%}{%- endif -%}{%- endfor -%}",
    "{{ bos_token }}{{ eos_token }}|{{ unk_token is defined }}|{{ pad_token }}|{{ tools }}|{{ documents is none }}|{{ add_generation_prompt }}",
    "{{ 'a\\tb\\n\\u00e9\\x41' }}|{{ \"double 'quotes'\" }}|{{ 'it\\'s' }}",
    "{{ [1,2,3] | batch(2) | list }}|{{ [1,2,3] | select('odd') | list }}|{{ messages | groupby('role') | map(attribute='grouper') | list }}",
    "{{ 'a' if false }}|{{ 'b' if true else 'c' }}|{{ (1, 2) | list }}|{{ [1] + [2] }}|{{ 'ab' in ['ab'] }}",
    "{{ strftime_now('%d %b %Y') | length }}",
    "{{ 0.1 + 0.2 }}|{{ 1e20 }}|{{ 3 / 1 }}|{{ 10 / 3 }}|{{ 2 ** 64 }}|{{ 1e-7 }}|{{ -0.0 }}|{{ 1.5e300 * 1e10 }}",
    "{{ 2.5 | round }}|{{ 3.5 | round }}|{{ 2.675 | round(2) }}|{{ 0.125 | round(2) }}|{{ 7 | round }}|{{ 2.1 | round(0, 'ceil') }}|{{ -2.5 | round(0, 'floor') }}|{{ 1234.5 | round(-2) }}",
    "{{ 'x' is sequence }}{{ messages is sequence }}{{ messages[0] is sequence }}{{ 1 is sequence }}",
    "{% for m in messages %}{{ loop.cycle('a', 'b') }}{% endfor %}|{% filter upper %}up{{ 'x' }}{% endfilter %}|{% set blk %}B{{ 1 }}{% endset %}{{ blk }}",
    "{{ true is true }}{{ 1 is true }}{{ 'a' in 'abc' }}{{ 2 in [1, 2] }}{{ 1 is odd }}{{ 4 is divisibleby 2 }}{{ 'x' is lower }}",
    "{{ 'ab' | list }}|{{ 1.5 | string }}|{{ none | string }}|{{ [none] | string }}|{{ {'a': none} | tojson }}",
    "{{ messages | tojson(indent=2) }}",
    "{{ messages[0].content.split(' ') | join('_') }}|{{ messages[1].content | trim | length }}|{{ messages[1].content.rstrip() ~ '|' }}",
    "{{ 'Hello' | tojson(ensure_ascii=true) }}|{{ {'b': 1, 'a': [1, 2]} | tojson(separators=(',', ':'), sort_keys=true) }}",
]


def make_tokenizer(template, special_tokens):
    vocab = {"<unk-placeholder>": 0}
    for token in special_tokens.values():
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk-placeholder>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **special_tokens)


def has_generation(template):
    return re.search(r"\{\%-?\s*generation\s*-?\%\}", template) is not None


def generation_spans(tokenizer, messages, add_generation_prompt, tools, documents, kwargs):
    """transformers' AssistantTracker spans (character offsets) and the text rendered with them."""
    template_kwargs = {**tokenizer.special_tokens_map, **kwargs}
    rendered, spans = chat_template_utils.render_jinja_template(
        conversations=[copy.deepcopy(messages)], tools=tools, documents=documents, chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True, add_generation_prompt=add_generation_prompt, **template_kwargs)
    return rendered[0], [list(span) for span in spans[0]]


def render(tokenizer, messages, add_generation_prompt, kwargs):
    kwargs = dict(kwargs)
    tools = kwargs.pop("tools", None)
    documents = kwargs.pop("documents", None)
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, documents=documents, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
        if has_generation(tokenizer.chat_template):
            tracked, spans = generation_spans(tokenizer, messages, add_generation_prompt, tools, documents, kwargs)
            assert tracked == text, "rendering with the tracker changes the text"
            return {"expected": text, "generation_spans": spans}
        return {"expected": text}
    except jinja2.exceptions.TemplateError as e:
        # Only raise_exception raises the bare TemplateError; anything else (syntax, undefined) is a bug here.
        if type(e) is not jinja2.exceptions.TemplateError:
            raise
        return {"error": str(e)}


def main():
    templates, cases = {}, []
    for name, (origin, special_tokens) in TEMPLATES.items():
        with open(os.path.join(FIXTURES, f"{name}.jinja"), "rb") as f:
            raw = f.read()
        template = raw.decode("utf-8")
        templates[name] = {"file": f"{name}.jinja", "origin": origin, "sha256": hashlib.sha256(raw).hexdigest(),
                           "special_tokens": special_tokens}
        tokenizer = make_tokenizer(template, special_tokens)
        runs = [(conv, CONVERSATIONS[conv], {}) for conv in CONVERSATIONS] + SPECIAL_CASES.get(name, [])
        for conv, messages, kwargs in runs:
            for add_generation_prompt in (False, True):
                case = {"template": name, "conversation": conv, "add_generation_prompt": add_generation_prompt}
                if conv not in CONVERSATIONS:
                    case["messages"] = messages
                if kwargs:
                    case["kwargs"] = kwargs
                case.update(render(tokenizer, messages, add_generation_prompt, kwargs))
                cases.append(case)
    probes = []
    for source in PROBES:
        probe = {"source": source}
        probe.update(render(make_tokenizer(source, PROBE_TOKENS), PROBE_MESSAGES, True, {}))
        probes.append(probe)
    out = {
        "generator": "scripts/make_chat_template_goldens.py",
        "now": FIXED_NOW.isoformat(),
        "transformers_version": transformers.__version__,
        "jinja2_version": jinja2.__version__,
        "tokenizers_version": tokenizers.__version__,
        "templates": templates,
        "conversations": CONVERSATIONS,
        "cases": cases,
        "probes": {"special_tokens": PROBE_TOKENS, "messages": PROBE_MESSAGES, "add_generation_prompt": True, "cases": probes},
    }
    path = os.path.join(FIXTURES, "goldens.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    errors = sum("error" in c for c in cases)
    print(f"{path}: {len(cases)} cases ({errors} expected errors), {len(probes)} probes, transformers {transformers.__version__}")
    trl_goldens()


# ---------------------------------------------------------------------------------------------
# TRL 1.16's trainers on rows rendered with SmolLM3's template.

def trl_goldens():
    """SFTTrainer (real, on a 1-layer random Llama) and DPOTrainer / ORPOTrainer's tokenization
    (the stand-ins of make_tokenization_goldens.py) on rows with a `chat_template_kwargs` column.
    Each case records the rows as the `datasets` table holds them (a struct column gives every
    row every field, None where unset) and, per kept row, `input_ids` and `label_mask` ("1" where
    the label is the id, "0" where it is -100)."""
    import torch
    import trl
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_tokenization_goldens import CONVERSATIONS as CONVS, GENERATION_TEMPLATES, PAIRS, compact_labels, dpo_prepare, \
        orpo_tokenize

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    templates = {name: open(os.path.join(FIXTURES, f"{name}.jinja"), encoding="utf-8").read()
                 for name in ("smollm3", "zephyr-generation", "chatml-generation", "smollm2-135m-instruct")}
    assert templates["chatml-generation"] == GENERATION_TEMPLATES["chatml"]
    assert templates["zephyr-generation"] == GENERATION_TEMPLATES["zephyr"]

    def tokenizer(template):
        tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
        tok.chat_template = templates[template]
        return tok

    def model(tok):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        return LlamaForCausalLM(config)

    thinking = [{"enable_thinking": False}, {"enable_thinking": True}, {"enable_thinking": None}]
    names = ["single_turn", "with_system", "multi_turn", "unicode", "whitespace", "empty_assistant",
             "special_text_in_content"]
    messages_rows = [{"messages": CONVS[c], "chat_template_kwargs": thinking[i % 3]} for i, c in enumerate(names)]
    prompt_completion_rows = [{"prompt": CONVS[c][:-1], "completion": CONVS[c][-1:], "chat_template_kwargs": thinking[i % 3]}
                              for i, c in enumerate(names)]
    text_rows = [{"text": CONVS[c][-1]["content"] or "empty"} for c in names] + [{"text": "ends with eos<|endoftext|>"}]

    cases = []

    def sft(name, template, rows, **config):
        tok = tokenizer(template)
        table = datasets.Dataset.from_list([dict(r, idx=i) for i, r in enumerate(rows)])
        case = {"name": name, "objective": "sft", "template": template, "rows": [
            {k: v for k, v in r.items() if k != "idx"} for r in table.to_list()], "config": config}
        with tempfile.TemporaryDirectory() as tmp:
            args = SFTConfig(output_dir=tmp, report_to="none", use_cpu=True, bf16=False, **config)
            try:
                trainer = SFTTrainer(model=model(tok), args=args, train_dataset=table, processing_class=tok)
            except (ValueError, RuntimeError) as e:
                case["error"] = str(e)
                cases.append(case)
                return
            case["eos_token"] = tok.eos_token
            case["examples"] = {str(r["idx"]): compact_labels(r["input_ids"], r["labels"]) for r in trainer.train_dataset}
        cases.append(case)

    sft("smollm3 assistant_only_loss", "smollm3", messages_rows, assistant_only_loss=True, eos_token="<|im_end|>",
        max_length=None)
    sft("smollm3 assistant_only_loss max_length 230", "smollm3", messages_rows, assistant_only_loss=True, max_length=230)
    sft("smollm3 every token", "smollm3", messages_rows, max_length=None)
    sft("smollm3 prompt-completion assistant_only_loss", "smollm3", prompt_completion_rows, assistant_only_loss=True,
        max_length=None)
    sft("zephyr-generation eos_token override", "zephyr-generation", messages_rows, assistant_only_loss=True,
        eos_token="<|endoftext|>", max_length=None)
    sft("text eos_token override", "smollm3", text_rows, eos_token="<|endoftext|>", max_length=None)
    sft("no generation markers", "smollm2-135m-instruct", messages_rows, assistant_only_loss=True, max_length=None)
    sft("unknown eos_token", "smollm3", messages_rows, eos_token="<|not_a_token|>", max_length=None)

    pair_names = ["simple", "with_system", "multi_turn", "unicode", "whitespace", "empty_rejected"]
    pair_rows = [dict(PAIRS[p], chat_template_kwargs=thinking[i % 3]) for i, p in enumerate(pair_names)]
    tok = tokenizer("smollm3")
    table = datasets.Dataset.from_list(pair_rows).to_list()
    prepared = dpo_prepare(tok, [{k: v for k, v in r.items()} for r in table], None, "keep_start")
    dpo = {"name": "smollm3 dpo", "objective": "dpo", "template": "smollm3", "rows": table, "examples": {}}
    for i in range(len(table)):
        dpo["examples"][str(i)] = {k: prepared[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    cases.append(dpo)
    orpo = {"name": "smollm3 orpo", "objective": "orpo", "template": "smollm3", "rows": table, "max_length": 1024,
            "examples": {}}
    for i, row in enumerate(table):
        # `datasets.map` keeps the columns a function does not return (`chat_template_kwargs` here).
        texts = maybe_apply_chat_template(dict(row, **maybe_extract_prompt(copy.deepcopy(row))), tok)
        o = orpo_tokenize(tok, texts["prompt"], texts["chosen"], texts["rejected"], 1024)
        orpo["examples"][str(i)] = {k: o[k] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                      "rejected_labels")}
    cases.append(orpo)

    out = {"about": f"made by scripts/make_chat_template_goldens.py with trl {trl.__version__}, transformers "
                    f"{transformers.__version__}; tokenizer crates/data/tests/fixtures/tokenization/tiny-chatml",
           "now": FIXED_NOW.isoformat(), "cases": cases}
    path = os.path.join(FIXTURES, "trl_templates.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {len(cases)} cases")


if __name__ == "__main__":
    main()
