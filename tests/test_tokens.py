"""Offline tiktoken encodings and the cookbook's token arithmetic."""

from tunejob.data.tokens import ApproximateCounter, TiktokenCounter, counter_for, load_encoding


def test_offline_encodings_give_openais_ids():
    o200k, cl100k = load_encoding("o200k_base"), load_encoding("cl100k_base")
    assert o200k.encode("hello world") == [24912, 2375]
    assert cl100k.encode("hello world") == [15339, 1917]
    assert o200k.encode("Prep me for the Globex call") == [110212, 668, 395, 290, 88372, 490, 2421]


def test_counter_by_model_family():
    assert counter_for("gpt-4o-mini-2024-07-18").name == "o200k_base"
    assert counter_for("gpt-3.5-turbo").name == "cl100k_base"
    assert counter_for("gpt-4.1-nano").context_limit == 32768
    assert counter_for(None).name == "o200k_base"
    assert counter_for("some-local-model").approximate is True


def test_cookbook_arithmetic_by_hand():
    enc = load_encoding("o200k_base")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Prep me for the Globex call", "name": "ana"},
            {"role": "assistant", "content": "Lead with the renewal date."}]
    n = lambda s: len(enc.encode(s))  # noqa: E731
    by_hand = 3 * 3 + 3  # 3 per message + 3 reply priming
    by_hand += n("system") + n("Be brief.") + n("user") + n("Prep me for the Globex call") + n("ana") + 1
    by_hand += n("assistant") + n("Lead with the renewal date.")
    [(total, assistant)] = TiktokenCounter(enc).count([msgs])
    assert (total, assistant) == (by_hand, n("Lead with the renewal date."))


def test_special_token_text_is_counted_as_text():
    enc = load_encoding("o200k_base")
    [(total, _)] = TiktokenCounter(enc).count([[{"role": "user", "content": "<|endoftext|>"}]])
    assert total > 3 + 3 + 1


def test_approximation_says_so():
    c = ApproximateCounter()
    assert c.approximate and c.count([[{"role": "user", "content": "abcdefgh"}]]) == [(3 + 3 + 1 + 2, 0)]
