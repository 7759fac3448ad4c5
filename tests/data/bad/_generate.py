"""Regenerate the malformed-dataset corpus and EXPECTED.json in this folder.

    python tests/data/bad/_generate.py

Each file is named after what is wrong with it; EXPECTED.json maps it to the one problem it is
meant to exhibit ({"kind", "line", "args"}). Most files put the bad line after some valid chat
examples so that line numbers are really checked. Everything is deterministic (fixed seeds), so
running this again rewrites identical bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "You are Sales Companion, a concise assistant for account executives."
TOPICS = [
    ("What should I ask Globex in the discovery call?", "Ask about their current vendor, renewal date and who signs off on budget."),
    ("Summarise the Initech account in one line.", "Initech is a mid-size logistics firm evaluating us against two rivals this quarter."),
    ("How do I handle the objection that we are too expensive?", "Tie the price to the hours saved per rep and offer a phased rollout."),
    ("Draft a follow-up email subject for Umbrella Corp.", "Next steps on the pilot: timeline and success criteria for Umbrella."),
    ("Which metric matters most to a CFO buyer?", "Payback period, usually followed by total cost of ownership over three years."),
    ("Give me a one-sentence opener for a cold call.", "I noticed your team doubled its sales hires this year, so onboarding may be on your mind."),
    ("What is a good close for a stalled deal?", "Propose a mutual action plan with dates and ask which step they would change."),
    ("How many stakeholders are typical in enterprise deals?", "Six to ten people usually weigh in, so map each one's goal early."),
    ("Should I discount at the end of the quarter?", "Only in exchange for something concrete such as a longer term or a case study."),
    ("List two risks on the Hooli renewal.", "Their champion just left, and a competitor is running a free pilot there."),
    ("How do I qualify a lead quickly?", "Check budget, authority, need and timing in the first ten minutes of the call."),
    ("What should a demo agenda include?", "Their goals first, three tailored workflows, then a clear next step before ending."),
]


def chat(i: int, system: str | None = SYSTEM) -> dict:
    q, a = TOPICS[i % len(TOPICS)]
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": f"{q} (case {i})"},
        {"role": "assistant", "content": a},
    ]
    return {"messages": msgs}


def bedrock(i: int) -> dict:
    q, a = TOPICS[i % len(TOPICS)]
    return {"system": SYSTEM, "messages": [{"role": "user", "content": f"{q} (case {i})"}, {"role": "assistant", "content": a}]}


def pc(i: int) -> dict:
    q, a = TOPICS[i % len(TOPICS)]
    return {"prompt": f"{q} (case {i})\n\n###\n\n", "completion": f" {a}"}


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def msgs(*pairs, system: str | None = SYSTEM) -> dict:
    """A chat example from (role, content) pairs or raw message dicts, after a system message."""
    out = [{"role": "system", "content": system}] if system else []
    for p in pairs:
        out.append(p if isinstance(p, dict) else {"role": p[0], "content": p[1]})
    return {"messages": out}


EXPECTED: dict[str, dict] = {}


def put(name: str, rows: list, kind: str, line_no: int | None, args: tuple = (), eol: bytes = b"\n", final_eol: bool = True) -> None:
    """Write rows (bytes as they are; anything else as JSON) joined by eol, and record the expectation."""
    parts = [r if isinstance(r, bytes) else line(r) for r in rows]
    data = eol.join(parts) + (eol if final_eol and parts else b"")
    (HERE / name).write_bytes(data)
    EXPECTED[name] = {"kind": kind, "line": line_no, "args": list(args)}


def valid(n: int, start: int = 0) -> list[dict]:
    return [chat(start + i) for i in range(n)]


BEDROCK = ("--format", "bedrock")


def build() -> None:
    for p in HERE.iterdir():
        if p.name != Path(__file__).name and p.is_file():
            p.unlink()

    # -- empty_file: no examples at all ------------------------------------------------------
    put("empty_zero_bytes.jsonl", [], "empty_file", None)
    (HERE / "empty_only_newlines.jsonl").write_bytes(b"\n\n\n\n")
    EXPECTED["empty_only_newlines.jsonl"] = {"kind": "empty_file", "line": None, "args": []}
    (HERE / "empty_whitespace_lines.jsonl").write_bytes(b"   \n\t\n\r\n  \t \n")
    EXPECTED["empty_whitespace_lines.jsonl"] = {"kind": "empty_file", "line": None, "args": []}
    (HERE / "empty_bom_only.jsonl").write_bytes(b"\xef\xbb\xbf\n")
    EXPECTED["empty_bom_only.jsonl"] = {"kind": "empty_file", "line": None, "args": []}

    # -- invalid_utf8 -------------------------------------------------------------------------
    put("invalid_utf8_latin1_bytes.jsonl", valid(2) + [line(chat(2)).replace("(case 2)".encode(), "caf\xe9 (case 2)".encode("latin-1"))], "invalid_utf8", 3)
    put("invalid_utf8_truncated_multibyte.jsonl", valid(3) + [line(chat(3)).replace(b"(case 3)", b"costs 5 \xe2\x82 (case 3)")], "invalid_utf8", 4)
    put("invalid_utf8_overlong_slash.jsonl", valid(2) + [line(chat(2)).replace(b"(case 2)", b"path \xc0\xaf etc (case 2)")], "invalid_utf8", 3)
    put("invalid_utf8_encoded_surrogate.jsonl", valid(2) + [line(chat(2)).replace(b"(case 2)", b"emoji \xed\xa0\xbd\xed\xb8\x80 (case 2)")], "invalid_utf8", 3)
    put("invalid_utf8_cp1252_smart_quotes.jsonl", valid(1) + [line(chat(1)).replace(b"(case 1)", b"\x93quoted\x94 (case 1)")] + valid(2, 2), "invalid_utf8", 2)
    utf16 = "".join(json.dumps(chat(i)) + "\n" for i in range(3)).encode("utf-16")  # with its BOM, FF FE
    (HERE / "utf16_encoded.jsonl").write_bytes(utf16)
    EXPECTED["utf16_encoded.jsonl"] = {"kind": "invalid_utf8", "line": 1, "args": []}
    rnd = random.Random(20240229).randbytes(3000)
    (HERE / "random_bytes.bin.jsonl").write_bytes(rnd)
    EXPECTED["random_bytes.bin.jsonl"] = {"kind": "invalid_utf8", "line": 1, "args": []}

    # -- blank_line ---------------------------------------------------------------------------
    put("blank_line_between_examples.jsonl", valid(2) + [b""] + valid(2, 2), "blank_line", 3)
    put("blank_line_whitespace_only.jsonl", valid(3) + [b"  \t  "] + valid(1, 3), "blank_line", 4)
    put("blank_line_trailing.jsonl", valid(3) + [b""], "blank_line", 4)

    # -- invalid_json -------------------------------------------------------------------------
    put("invalid_json_trailing_comma.jsonl", valid(2) + [line(chat(2))[:-1] + b", }"], "invalid_json", 3)
    put("invalid_json_single_quotes.jsonl", valid(1) + [line(chat(1)).replace(b'"', b"'")] + valid(1, 2), "invalid_json", 2)
    put("invalid_json_truncated_object.jsonl", valid(3) + [line(chat(3))[:70]], "invalid_json", 4)
    put("invalid_json_truncated_mid_file.jsonl", valid(2) + [line(chat(2))[:-3]] + valid(2, 3), "invalid_json", 3)
    put("invalid_json_unquoted_keys.jsonl", valid(2) + [line(chat(2)).replace(b'"messages"', b"messages").replace(b'"role"', b"role")], "invalid_json", 3)
    put("invalid_json_two_objects_one_line.jsonl", valid(2) + [line(chat(2)) + b" " + line(chat(3))], "invalid_json", 3)
    pretty = json.dumps(chat(2), indent=2).encode().split(b"\n")
    put("invalid_json_pretty_printed.jsonl", valid(2) + pretty, "invalid_json", 3)
    put("invalid_json_comment_line.jsonl", valid(1) + [b"// examples for the Globex account"] + valid(2, 1), "invalid_json", 2)
    put("invalid_json_python_literals.jsonl", valid(2) + [b"{'messages': [{'role': 'user', 'content': 'Hi', 'weight': None}], 'ok': True}"], "invalid_json", 3)
    put("invalid_json_nul_byte.jsonl", valid(2) + [line(chat(2)) + b"\x00\x00\x00"], "invalid_json", 3)
    put("invalid_json_raw_tab_in_string.jsonl", valid(2) + [line(chat(2)).replace(b"(case 2)", b"(case\t2)")], "invalid_json", 3)
    put("invalid_json_bom_mid_file.jsonl", valid(3) + [b"\xef\xbb\xbf" + line(chat(3))], "invalid_json", 4)  # two files concatenated
    put("invalid_json_cr_only_line_endings.jsonl", valid(3), "invalid_json", 1, eol=b"\r")  # old Mac endings: one physical line
    put("invalid_json_nested_too_deep_arrays.jsonl", valid(2) + [b"[" * 4000 + b"]" * 4000], "invalid_json", 3)
    deep = b'{"messages": [{"role": "user", "content": ' + b'{"a":' * 1400 + b'"x"' + b"}" * 1400 + b'}, {"role": "assistant", "content": "ok then"}]}'
    put("invalid_json_nested_too_deep_objects.jsonl", valid(2) + [deep], "invalid_json", 3)
    huge = b'{"messages": [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "This many.", "weight": ' + b"9" * 5000 + b"}]}"
    put("invalid_json_huge_integer.jsonl", valid(2) + [huge], "invalid_json", 3)
    put("crlf_invalid_json.jsonl", valid(2) + [line(chat(2))[:-1] + b",}"] + valid(1, 3), "invalid_json", 3, eol=b"\r\n")
    put("bom_then_invalid_json.jsonl", [b"\xef\xbb\xbf" + line(chat(0))] + valid(1, 1) + [line(chat(2))[:-2]], "invalid_json", 3)

    # -- data_type ----------------------------------------------------------------------------
    put("data_type_array_line.jsonl", valid(2) + [[chat(2)["messages"]]], "data_type", 3)
    put("data_type_string_line.jsonl", valid(1) + ["Globex prefers quarterly billing."] + valid(1, 2), "data_type", 2)
    put("data_type_number_line.jsonl", valid(3) + [42], "data_type", 4)
    put("data_type_null_line.jsonl", valid(2) + [None], "data_type", 3)
    put("data_type_boolean_line.jsonl", valid(2) + [True] + valid(1, 3), "data_type", 3)
    put("data_type_message_is_string.jsonl", valid(2) + [{"messages": ["user: hi", {"role": "assistant", "content": "Hello there, how can I help?"}]}], "data_type", 3)

    # -- missing_messages_list ----------------------------------------------------------------
    put("messages_not_a_list_object.jsonl", valid(2) + [{"messages": {"role": "user", "content": "Hi"}}], "missing_messages_list", 3)
    put("messages_not_a_list_string.jsonl", valid(1) + [{"messages": "user: hi / assistant: hello"}] + valid(1, 2), "missing_messages_list", 2)
    put("messages_empty_list.jsonl", valid(2) + [{"messages": []}], "missing_messages_list", 3)
    put("messages_null.jsonl", valid(3) + [{"messages": None}], "missing_messages_list", 4)
    put("messages_key_misspelled.jsonl", valid(2) + [{"message": chat(2)["messages"]}], "missing_messages_list", 3)
    put("messages_empty_object_line.jsonl", valid(1) + [{}] + valid(1, 2), "missing_messages_list", 2)

    # -- message_missing_key / message_unrecognized_key ---------------------------------------
    put("message_missing_role.jsonl", valid(2) + [msgs({"content": "Who owns the Globex budget?"}, ("assistant", "Their VP of operations signs off."))], "message_missing_key", 3)
    put("message_missing_content.jsonl", valid(1) + [msgs(("user", "Who is the champion?"), {"role": "assistant"})] + valid(1, 2), "message_missing_key", 2)
    put("message_unrecognized_key_timestamp.jsonl", valid(2) + [msgs({"role": "user", "content": "Any news on Hooli?", "timestamp": "2024-05-01T10:00:00Z"}, ("assistant", "They signed the pilot last week."))], "message_unrecognized_key", 3)
    put("message_unrecognized_key_text_not_content.jsonl", valid(3) + [msgs(("user", "Pricing tiers?"), {"role": "assistant", "content": "Three tiers.", "text": "Three tiers."})], "message_unrecognized_key", 4)

    # -- unrecognized_role --------------------------------------------------------------------
    put("unrecognized_role_bot.jsonl", valid(2) + [msgs(("user", "Hi there"), ("bot", "Hello, how can I help today?"))], "unrecognized_role", 3)
    put("unrecognized_role_capitalized_user.jsonl", valid(1) + [msgs(("User", "Summarise Initech."), ("assistant", "A logistics firm comparing vendors."))] + valid(1, 2), "unrecognized_role", 2)
    put("unrecognized_role_model.jsonl", valid(3) + [msgs(("user", "Next step for Umbrella?"), ("model", "Book the pilot review for Friday."))], "unrecognized_role", 4)
    put("unrecognized_role_null.jsonl", valid(2) + [msgs(("user", "Who decides?"), {"role": None, "content": "The CFO decides."})], "unrecognized_role", 3)
    put("unrecognized_role_list.jsonl", valid(2) + [msgs({"role": ["user"], "content": "Who decides?"}, ("assistant", "The CFO decides."))], "unrecognized_role", 3)

    # -- missing_content ----------------------------------------------------------------------
    put("missing_content_empty_string.jsonl", valid(2) + [msgs(("user", "Any blockers on Globex?"), ("assistant", ""))], "missing_content", 3)
    put("missing_content_null.jsonl", valid(1) + [msgs(("user", None), ("assistant", "Could you repeat the question?"))] + valid(1, 2), "missing_content", 2)
    put("missing_content_number.jsonl", valid(2) + [msgs(("user", "How many seats?"), ("assistant", 250))], "missing_content", 3)
    put("missing_content_whitespace_only.jsonl", valid(3) + [msgs(("user", "Anything else?"), ("assistant", "  \n\t "))], "missing_content", 4)
    put("missing_content_empty_parts_list.jsonl", valid(2) + [msgs(("user", "Recap the call."), ("assistant", []))], "missing_content", 3)
    put("missing_content_empty_completion.jsonl", [pc(0), pc(1), {"prompt": "Recap the Hooli call.\n\n###\n\n", "completion": "   "}], "missing_content", 3)

    # -- example_missing_assistant_message ----------------------------------------------------
    put("no_assistant_message.jsonl", valid(2) + [msgs(("user", "What is our win rate?"))], "example_missing_assistant_message", 3)
    put("no_assistant_message_system_only.jsonl", valid(1) + [msgs()] + valid(1, 2), "example_missing_assistant_message", 2)

    # -- example_unrecognized_key -------------------------------------------------------------
    put("example_unrecognized_key_metadata.jsonl", valid(2) + [dict(chat(2), metadata={"source": "crm", "rep": "dana"})], "example_unrecognized_key", 3)
    # Key names come from the file: a lone surrogate or a terminal escape must not break (or colour) the text report.
    put("example_unrecognized_key_lone_surrogate.jsonl", valid(2) + [line(chat(2))[:-1] + b', "note\\ud800": 1}'], "example_unrecognized_key", 3)
    put("example_unrecognized_key_terminal_escape.jsonl", valid(2) + [line(chat(2))[:-1] + b', "\\u001b[2J\\u001b[31mred": 1}'], "example_unrecognized_key", 3)
    put("example_unrecognized_key_system_beside_messages.jsonl", valid(1) + [dict(chat(1, system=None), system=SYSTEM)] + valid(1, 2), "example_unrecognized_key", 2)

    # -- invalid_weight -----------------------------------------------------------------------
    def weighted(w, role="assistant"):
        m = msgs(("user", "Should I discount?"), ("assistant", "Only for a longer term."))
        target = m["messages"][1] if role == "user" else m["messages"][2]
        target["weight"] = w
        return m

    put("invalid_weight_two.jsonl", valid(2) + [weighted(2)], "invalid_weight", 3)
    put("invalid_weight_on_user_message.jsonl", valid(1) + [weighted(0, role="user")] + valid(1, 2), "invalid_weight", 2)
    put("invalid_weight_boolean.jsonl", valid(3) + [weighted(True)], "invalid_weight", 4)
    put("invalid_weight_string.jsonl", valid(2) + [weighted("1")], "invalid_weight", 3)

    # -- invalid_tool_calls -------------------------------------------------------------------
    def tool_call(calls):
        return msgs(("user", "Look up the Globex renewal date."), {"role": "assistant", "content": None, "tool_calls": calls})

    good_fn = {"name": "crm_lookup", "arguments": "{\"account\": \"Globex\"}"}
    put("invalid_tool_calls_not_a_list.jsonl", valid(2) + [tool_call({"id": "call_1", "type": "function", "function": good_fn})], "invalid_tool_calls", 3)
    put("invalid_tool_calls_missing_function_name.jsonl", valid(2) + [tool_call([{"id": "call_1", "type": "function", "function": {"arguments": "{}"}}])], "invalid_tool_calls", 3)
    put("invalid_tool_calls_arguments_object.jsonl", valid(1) + [tool_call([{"id": "call_1", "type": "function", "function": {"name": "crm_lookup", "arguments": {"account": "Globex"}}}])] + valid(1, 2), "invalid_tool_calls", 2)
    put("invalid_tool_calls_empty_list.jsonl", valid(3) + [tool_call([])], "invalid_tool_calls", 4)
    put("invalid_tool_calls_item_is_string.jsonl", valid(2) + [tool_call(["crm_lookup(Globex)"])], "invalid_tool_calls", 3)

    # -- prompt_completion_invalid ------------------------------------------------------------
    put("prompt_completion_missing_completion.jsonl", [pc(0), pc(1), {"prompt": "Who signs at Initech?\n\n###\n\n"}], "prompt_completion_invalid", 3)
    put("prompt_completion_missing_prompt.jsonl", [pc(0), {"completion": " The CFO signs."}, pc(2)], "prompt_completion_invalid", 2)
    put("prompt_completion_extra_key.jsonl", [pc(0), pc(1), dict(pc(2), label="won")], "prompt_completion_invalid", 3)
    put("prompt_completion_non_string.jsonl", [pc(0), pc(1), pc(2), {"prompt": "Seats at Hooli?\n\n###\n\n", "completion": 250}], "prompt_completion_invalid", 4)

    # -- mixed_formats ------------------------------------------------------------------------
    put("mixed_formats_chat_then_prompt.jsonl", valid(2) + [pc(2)], "mixed_formats", 3)
    put("mixed_formats_prompt_then_chat.jsonl", [pc(0), pc(1), chat(2)], "mixed_formats", 3)

    # -- duplicate_example --------------------------------------------------------------------
    put("duplicate_example_exact.jsonl", valid(3) + [chat(1)], "duplicate_example", 4)
    # Same example twice, once with CRLF and once with LF: the line ending must not hide the repeat.
    (HERE / "duplicate_example_crlf_vs_lf.jsonl").write_bytes(line(chat(0)) + b"\n" + line(chat(1)) + b"\r\n" + line(chat(1)) + b"\n")
    EXPECTED["duplicate_example_crlf_vs_lf.jsonl"] = {"kind": "duplicate_example", "line": 3, "args": []}

    # -- too_many_tokens: one example far over gpt-3.5-turbo's 16,385 tokens --------------------
    rng = random.Random(16385)
    letters = "bcdfghjklmnpqrstvwxz" + "aeiou" * 2
    words = []
    while sum(len(w) + 1 for w in words) < 90_000:
        words.append("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) + rng.choice(["", "", "", ",", ".", " 17", " 2048"]))
    long_answer = " ".join(words)
    put("too_many_tokens_gpt35.jsonl", [chat(0), msgs(("user", "Paste the whole call transcript."), ("assistant", long_answer)), chat(1)], "too_many_tokens", 2, args=("--model", "gpt-3.5-turbo"))

    # -- too_few_examples ---------------------------------------------------------------------
    put("too_few_examples_three.jsonl", valid(3), "too_few_examples", None)
    put("too_few_examples_nine.jsonl", valid(9), "too_few_examples", None)

    # -- Bedrock rules (--format bedrock) -----------------------------------------------------
    def br(*pairs, **top):
        return dict({"system": SYSTEM, "messages": [{"role": r, "content": c} for r, c in pairs]}, **top)

    put("bedrock_unrecognized_key_top_level.jsonl", [bedrock(0), bedrock(1), br(("user", "Hi"), ("assistant", "Hello, what can I do?"), metadata={"rep": "dana"})], "bedrock_unrecognized_key", 3, BEDROCK)
    weighted_br = bedrock(5)
    weighted_br["messages"][1]["weight"] = 1
    put("bedrock_unrecognized_key_message_weight.jsonl", [bedrock(0), weighted_br, bedrock(2)], "bedrock_unrecognized_key", 2, BEDROCK)
    put("bedrock_unrecognized_key_tools.jsonl", [bedrock(0), bedrock(1), dict(bedrock(2), tools=[{"type": "function", "function": {"name": "crm_lookup"}}])], "bedrock_unrecognized_key", 3, BEDROCK)
    put("bedrock_system_not_string.jsonl", [bedrock(0), bedrock(1), dict(bedrock(2), system=["Be brief.", "Be kind."])], "bedrock_unrecognized_key", 3, BEDROCK)
    put("bedrock_too_few_messages.jsonl", [bedrock(0), bedrock(1), br(("assistant", "Here is the Globex summary you asked for."))], "bedrock_too_few_messages", 3, BEDROCK)
    put("bedrock_first_not_user.jsonl", [bedrock(0), br(("assistant", "Hi, ready for the call?"), ("user", "Yes, brief me."), ("assistant", "Globex wants a pilot.")), bedrock(2)], "bedrock_first_not_user", 2, BEDROCK)
    put("bedrock_last_not_assistant.jsonl", [bedrock(0), bedrock(1), br(("user", "Brief me on Hooli."), ("assistant", "Their champion left."), ("user", "Who replaces them?"))], "bedrock_last_not_assistant", 3, BEDROCK)
    put("bedrock_not_alternating_two_users.jsonl", [bedrock(0), bedrock(1), br(("user", "Brief me on Hooli."), ("user", "Keep it short."), ("assistant", "Champion left; rival pilot running."))], "bedrock_not_alternating", 3, BEDROCK)
    put("bedrock_not_alternating_two_assistants.jsonl", [bedrock(0), br(("user", "Brief me on Initech."), ("assistant", "Logistics firm."), ("assistant", "Evaluating two rivals.")), bedrock(2)], "bedrock_not_alternating", 2, BEDROCK)
    put("bedrock_system_misplaced.jsonl", [bedrock(0), bedrock(1), {"messages": [{"role": "user", "content": "Brief me."}, {"role": "system", "content": SYSTEM}, {"role": "assistant", "content": "Globex wants a pilot."}]}], "bedrock_system_misplaced", 3, BEDROCK)

    # -- reinforcement prompts (--format reinforcement; --grader names the fields each line needs) --
    RFT = ("--format", "reinforcement", "--min-examples", "1")

    def prompt(i: int, **fields) -> dict:
        return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Which rep owns account {i}?"}], **fields}

    put("rft_prompt_ends_with_answer.jsonl", [prompt(0), prompt(1), msgs(("user", "Who owns Globex?"), ("assistant", "Dana."))],
        "prompt_ends_with_answer", 3, RFT)
    # the grader (tests/data/rft_grader.json) reads {{item.owner}}; line 2 calls it rep
    put("rft_missing_item_field.jsonl", [prompt(0, owner="Dana"), prompt(1, rep="Sam"), prompt(2, owner="Lee")], "missing_item_field", 2,
        ("--grader", "tests/data/rft_grader.json", "--min-examples", "1"))

    (HERE / "EXPECTED.json").write_text(json.dumps(dict(sorted(EXPECTED.items())), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    build()
    print(f"{len(EXPECTED)} files written to {HERE}")
