"""method: {type: dpo, beta}: defaults, cross-field checks, one line per problem naming key and fix."""

from __future__ import annotations

import pytest

from tunejob.errors import SpecError
from tunejob.spec import parse_spec


def errors_of(text: str) -> str:
    with pytest.raises(SpecError) as exc:
        parse_spec(text, "job.yaml")
    return str(exc.value)


def test_supervised_is_the_default_and_saves_as_before():
    spec = parse_spec("data: {train: t.jsonl}\n")
    assert spec.method.type == "supervised"
    assert "method" not in spec.to_yaml()


def test_dpo_with_beta_and_the_shorthand():
    spec = parse_spec("data: {train: t.jsonl}\nmethod: {type: dpo, beta: 0.2}\n")
    assert spec.method.type == "dpo" and spec.method.resolved_beta == 0.2
    assert "type: dpo" in spec.to_yaml()
    assert parse_spec("data: {train: t.jsonl}\nmethod: dpo\n").method.resolved_beta == 0.1


@pytest.mark.parametrize("text, expected", [
    ("method: {type: dpo, beta: 0}\n", "job.yaml:2: method.beta: 0 is invalid: input should be greater than 0"),
    ("method: {type: dpo}\nhyperparameters: {train_on: all}\n", "hyperparameters.train_on: 'all' with method dpo"),
    ("method: {type: supervised, beta: 0.1}\n", "beta: applies to method types dpo and reinforcement; remove it or set method.type: dpo"),
    ("method: {type: reinforcement}\n", "grader: method reinforcement needs a grader"),
    ("method: {type: rlhf}\n", "method.type: 'rlhf' is invalid"),
])
def test_bad_method_is_one_line_naming_key_and_fix(text, expected):
    msg = errors_of("data: {train: t.jsonl}\n" + text)
    assert expected in msg


def test_dpo_is_refused_where_it_cannot_run():
    msg = errors_of("data: {train: t.jsonl}\nmethod: dpo\nbackend: bedrock\nmodel: amazon.nova-micro-v1:0:128k\n"
                    "bedrock: {role_arn: r, s3_bucket: b}\n")
    assert "method: dpo runs on backends local and openai" in msg
