"""Tool calling, assistant-only labels on awkward templates, and honest train_on: all counts."""

from __future__ import annotations

import json

import pytest

from tunejob.data import sequences as S
from tunejob.data import tool_calls as T
from tunejob.errors import DataError

# SmolLM2's template, with each assistant turn's content and end marker in a generation block.
GEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3-style: assistant turns before the last user turn lose their <think>...</think> reasoning.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Llama-3.1-style date header in the system turn. The header also counts the messages, standing in
# for a header that changes between renders (Llama 3.1/3.2 call strftime_now for "Today Date"),
# so a shorter conversation's rendering is not a prefix of the full one.
DATE_HEADER = (
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{{- '<|im_start|>system\nCutting Knowledge Date: December 2023\nToday Date: ' + date_string"
    " + '\nMessages: ' + (messages|length|string) + '\n\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- set rest = messages[1:] %}"
    "{%- else %}{%- set rest = messages %}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- for message in rest %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Qwen3 with thinking off: the generation prompt adds an empty think block no rendered turn has.
EMPTY_THINK_PROMPT = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{%- endif %}"
)

# Qwen2.5-Instruct's tool-use template (native tool support), written inline.
QWEN25_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n\" }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\n<tool_call>\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

CHAT = [
    {"role": "system", "content": "You help sales reps."},
    {"role": "user", "content": "Prep me for Globex."},
    {"role": "assistant", "content": "Lead with the renewal date."},
    {"role": "user", "content": "And pricing?"},
    {"role": "assistant", "content": "Team plan at $59."},
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
]


def call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


TOOL_CHAT = [
    {"role": "system", "content": "You are a travel helper."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [call("call_a", "get_weather", {"city": "Paris"}),
                                                          call("call_b", "get_time", {"tz": "Europe/Paris"})]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18C, cloudy"},
    {"role": "tool", "tool_call_id": "call_b", "content": "12:04"},
    {"role": "assistant", "content": "It is 18C and cloudy; the time is 12:04."},
]


@pytest.fixture(scope="module")
def path():
    from tunejob.train.models import default_tokenizer_path

    return default_tokenizer_path()


def load(path, template=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if template is not None:
        tok.chat_template = template
    return tok


def trained(tok, seq) -> str:
    return tok.decode([t for t, lab in zip(seq.input_ids, seq.labels) if lab != S.IGNORE])


def check_against_template(tok, seq, msgs, tools=None):
    """The ids are the template's own tokens, and every label is the token at its position."""
    assert seq.input_ids == tok.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=False)
    assert all(lab in (S.IGNORE, t) for t, lab in zip(seq.input_ids, seq.labels))


def assert_one_line_data_error(excinfo, index):
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text and text.startswith(f"example {index}:")


# ---------------------------------------------------------------- tool calls


def test_smollm2_has_no_tool_support_and_gets_the_fallback(path):
    tok = load(path)
    assert T.tool_rendering(tok) == "fallback"
    assert T.tool_rendering(load(path, QWEN25_TOOLS)) == "template"
    assert T.tool_rendering(load(path, GEN_TEMPLATE)) == "fallback"


def test_fallback_trains_calls_with_name_and_json_arguments(path):
    tok = load(path)
    seq = S.encode_example(tok, TOOL_CHAT, 4096, tools=TOOLS, index=3)
    text = trained(tok, seq)
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call><|im_end|>\n') in text
    assert text.endswith("It is 18C and cloudy; the time is 12:04.<|im_end|>\n")
    assert "18C, cloudy" not in text.split("</tool_call>")[-1].split("It is")[0]  # tool results are context
    assert "<tool_response>" not in text and "<tools>" not in text and "travel helper" not in text
    rendered, tools = T.render_inputs(tok, TOOL_CHAT, TOOLS)
    assert tools is None and '"name": "get_weather"' in rendered[0]["content"]  # tool list in the system turn
    check_against_template(tok, seq, rendered)


def test_native_tool_template_trains_calls(path):
    tok = load(path, QWEN25_TOOLS)
    seq = S.encode_example(tok, TOOL_CHAT, 4096, tools=TOOLS)
    text = trained(tok, seq)
    assert text == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call><|im_end|>\n'
                    "It is 18C and cloudy; the time is 12:04.<|im_end|>\n")
    rendered, tools = T.render_inputs(tok, TOOL_CHAT, TOOLS)
    assert tools == TOOLS and rendered[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    full = tok.apply_chat_template(rendered, tools=tools, tokenize=False)
    assert "# Tools" in full and "<tool_response>\n18C, cloudy\n</tool_response>" in full
    check_against_template(tok, seq, rendered, tools)


@pytest.mark.parametrize("template", [None, QWEN25_TOOLS])
def test_weight_zero_leaves_a_call_turn_untrained(path, template):
    tok = load(path, template)
    msgs = [dict(m) for m in TOOL_CHAT]
    msgs[2]["weight"] = 0
    text = trained(tok, S.encode_example(tok, msgs, 4096, tools=TOOLS))
    assert text == "It is 18C and cloudy; the time is 12:04.<|im_end|>\n"
    msgs[5]["weight"] = 0
    seqs, stats = S.encode_examples(tok, [{"messages": msgs, "tools": TOOLS}], 4096)
    assert seqs == [] and stats.dropped_no_trained_tokens == 1


def test_legacy_functions_become_tools(path):
    tok = load(path, QWEN25_TOOLS)
    legacy = {"functions": [TOOLS[0]["function"]], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
        {"role": "function", "name": "get_weather", "content": "-3C"},
        {"role": "assistant", "content": "It is -3C."},
    ]}
    msgs, tools = T.normalize(legacy["messages"], functions=legacy["functions"])
    assert tools == [TOOLS[0]] and msgs[2]["role"] == "tool" and msgs[2]["tool_call_id"] == msgs[1]["tool_calls"][0]["id"]
    seqs, _ = S.encode_examples(tok, [legacy], 4096)
    text = trained(tok, seqs[0])
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text and "It is -3C." in text
    assert "-3C" not in text.replace("It is -3C.", "")


def test_parse_tool_calls_round_trips_the_fallback():
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Checking both.", "tool_calls": TOOL_CHAT[2]["tool_calls"]}]
    rendered = T.fallback_messages(msgs, TOOLS)[-1]["content"]
    content, calls = T.parse_tool_calls(rendered)
    assert content == "Checking both."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    # a call-only turn, and a block that is not a call stays text
    assert T.parse_tool_calls(T.fallback_messages([TOOL_CHAT[2]])[0]["content"])[0] == ""
    assert T.parse_tool_calls("a <tool_call>not json</tool_call>") == ("a <tool_call>not json</tool_call>", [])


# ---------------------------------------------------------------- labels on every template


def test_labels_are_exactly_the_assistant_turns(path):
    tok = load(path)
    seq = S.encode_example(tok, CHAT, 512)
    assert trained(tok, seq) == "Lead with the renewal date.<|im_end|>\nTeam plan at $59.<|im_end|>\n"
    check_against_template(tok, seq, CHAT)


def test_generation_mask_matches_the_prefix_method(path):
    plain, marked = load(path), load(path, GEN_TEMPLATE)
    a, b = S.encode_example(plain, CHAT, 512), S.encode_example(marked, CHAT, 512)
    assert a.input_ids == b.input_ids and a.labels == b.labels
    weighted = [dict(m) for m in CHAT]
    weighted[2]["weight"] = 0
    a, b = S.encode_example(plain, weighted, 512), S.encode_example(marked, weighted, 512)
    assert a.labels == b.labels and trained(marked, b) == "Team plan at $59.<|im_end|>\n"
    # the mask really is what is used (not the span method quietly taking over)
    out = marked.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(out["assistant_masks"]) == S.encode_example(marked, CHAT, 512).trained_tokens


def test_date_header_template_labels_by_search(path):
    tok = load(path, DATE_HEADER)
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert not full.startswith(tok.apply_chat_template(CHAT[:3], tokenize=False))  # prefix property broken
    seq = S.encode_example(tok, CHAT, 512)
    assert trained(tok, seq) == "Lead with the renewal date.<|im_end|>\nTeam plan at $59.<|im_end|>\n"
    check_against_template(tok, seq, CHAT)


def test_qwen3_style_reasoning_drop_is_refused_in_one_line_or_trained_exactly(path):
    tok = load(path, QWEN3_STYLE)
    msgs = [dict(m) for m in CHAT]
    msgs[2]["content"] = "<think>Globex renews in May.</think>Lead with the renewal date."
    msgs[4]["content"] = "<think>Team is their tier.</think>Team plan at $59."
    with pytest.raises(DataError) as excinfo:
        S.encode_example(tok, msgs, 512, index=3)
    assert_one_line_data_error(excinfo, 3)
    assert "assistant turn 1" in str(excinfo.value) and "weight: 0" in str(excinfo.value)
    msgs[2]["weight"] = 0  # the documented fix: train only the turn whose reasoning survives
    seq = S.encode_example(tok, msgs, 512, index=3)
    assert trained(tok, seq) == "<think>Team is their tier.</think>Team plan at $59.<|im_end|>\n"
    check_against_template(tok, seq, [{k: v for k, v in m.items() if k != "weight"} for m in msgs])
    seq = S.encode_example(tok, CHAT, 512)  # nothing to drop: trained normally
    assert trained(tok, seq) == "Lead with the renewal date.<|im_end|>\nTeam plan at $59.<|im_end|>\n"


def test_generation_prompt_unlike_rendered_turns_is_refused(path):
    tok = load(path, EMPTY_THINK_PROMPT)
    with pytest.raises(DataError) as excinfo:
        S.encode_example(tok, CHAT, 512, index=5)
    assert_one_line_data_error(excinfo, 5)
    assert "train_on: all" in str(excinfo.value)
    seq = S.encode_example(tok, CHAT, 512, train_on="all")  # the offered fix works
    assert seq.trained_tokens == len(seq.input_ids) - 1


def test_train_on_all_counts_only_scored_positions(path):
    tok = load(path)
    seq = S.encode_example(tok, TOOL_CHAT, 4096, train_on="all", tools=TOOLS)
    assert seq.labels[0] == S.IGNORE and seq.labels[1:] == seq.input_ids[1:]
    assert seq.trained_tokens == len(seq.input_ids) - 1


def test_truncation_still_counts(path):
    tok = load(path)
    seqs, stats = S.encode_examples(tok, [{"messages": CHAT}, {"messages": CHAT[:3]}], max_len=8)
    assert stats.truncated == 2 and stats.dropped_no_trained_tokens == 2 and seqs == []
