"""tunejob.graders: OpenAI's RFT graders, checked against OpenAI's published spec (its examples and
schemas, tests/openai_schema.py), against the reference libraries each metric comes from, and
against hand-worked numbers. Python graders: test_graders_python.py; score_model, label_model and
cosine over HTTP: test_graders_model.py."""

from __future__ import annotations

import ast
import json
import math
import re

import pytest

from openai_schema import errors, openapi
from tunejob.graders import (GraderError, check_grader, grade, grade_many, make_sample, referenced_item_fields,
                             run_grader_response, validate_grader_response)
from vllm_stub import BASE

VALIDATE = "/fine_tuning/alpha/graders/validate"


def string_check(operation="eq", input="{{sample.output_text}}", reference="{{item.label}}", name="check") -> dict:
    return {"type": "string_check", "name": name, "input": input, "reference": reference, "operation": operation}


def similar(metric: str, input="{{sample.output_text}}", reference="{{item.reference}}", name="similar") -> dict:
    return {"type": "text_similarity", "name": name, "input": input, "reference": reference, "evaluation_metric": metric}


def python(source: str, name="py") -> dict:
    return {"type": "python", "name": name, "source": source}


def score_model(prompt: str, **extra) -> dict:
    return {"type": "score_model", "name": "judge", "model": BASE, "input": [{"role": "user", "content": prompt}], **extra}


# ---------------------------------------------------------------- OpenAI's spec, its examples

def spec_example(schema: str):
    """A grader schema's x-oaiMeta example: JSON, or (python, score_model) a Python literal."""
    text = openapi()["components"]["schemas"][schema]["x-oaiMeta"]["example"]
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(re.sub(r"\bnull\b", "None", text))


def curl_body(curl: str) -> dict:
    return json.loads(re.search(r"-d '(.*)'\s*$", curl, re.S).group(1))


@pytest.mark.parametrize("schema", ["GraderStringCheck", "GraderTextSimilarity", "GraderPython", "GraderScoreModel"])
def test_the_specs_grader_examples_are_valid_here_too(schema):
    grader = spec_example(schema)
    assert errors(schema, grader) == []
    check_grader(grader)


def test_the_specs_label_model_example_is_valid_as_a_multis_sub_grader():
    label = spec_example("GraderLabelModel")
    assert errors("GraderLabelModel", label) == []
    with pytest.raises(GraderError, match="grader.type: 'label_model' is not one of"):
        check_grader(label)  # the spec allows it only inside a multi (GraderMulti.graders)
    check_grader({"type": "multi", "name": "m", "graders": {"sentiment": label}, "calculate_output": "sentiment"})


def test_the_specs_multi_example_is_refused_and_why():
    # The spec's own example does not fit its schema: `graders` is a list (the schema says one
    # grader object, the guide a map of key -> grader), and its formula has an unmatched ')'.
    example = spec_example("GraderMulti")
    assert errors("GraderMulti", example) != []
    with pytest.raises(GraderError, match=r"grader.graders: must be a map"):
        check_grader(example)


def test_the_validate_example_answers_as_documented():
    example = openapi()["paths"][VALIDATE]["post"]["x-oaiMeta"]["examples"]
    body = curl_body(example["request"]["curl"])
    assert errors("ValidateGraderRequest", body) == []
    response = validate_grader_response(body)
    assert response == json.loads(example["response"]) and errors("ValidateGraderResponse", response) == []
    with pytest.raises(GraderError, match="grader.operation: 'contains' is not one of eq, ne, like, ilike"):
        validate_grader_response({"grader": {**body["grader"], "operation": "contains"}})
    with pytest.raises(GraderError, match="^grader: missing"):
        validate_grader_response({})


# ---------------------------------------------------------------- templates and string_check

@pytest.mark.parametrize("operation,text,reference,expected", [
    ("eq", "Paris", "Paris", 1.0), ("eq", "Paris", "paris", 0.0), ("eq", "Paris\n", "Paris", 0.0),
    ("ne", "Paris", "Rome", 1.0), ("ne", "Paris", "Paris", 0.0),
    ("like", "It is Paris.", "Paris", 1.0), ("like", "It is paris.", "Paris", 0.0),
    ("ilike", "It is PARIS.", "paris", 1.0), ("ilike", "It is Rome.", "paris", 0.0),
])
def test_string_check_operations(operation, text, reference, expected):
    assert grade(string_check(operation), make_sample(text), {"label": reference}).score == expected


def test_templates_reach_nested_item_fields_output_json_and_list_items():
    item = {"answer": {"city": "Paris", "tags": ["capital", "france"]}, "n": 3, "flag": True}
    sample = make_sample('{"city": "Paris", "meta": {"n": 3}}')
    cases = [("{{ item.answer.city }}", "Paris"), ("{{item.answer.tags[1]}}", "france"), ("{{item.answer.tags[-1]}}", "france"),
             ("{{sample.output_json.city}}", "Paris"), ("{{sample.output_json.meta.n}}", "3"), ("{{item.n}}", "3"),
             ("{{item.flag}}", "true"), ("{{item.answer.tags}}", '["capital", "france"]'),  # non-strings render as JSON
             ("{{sample.output_json.meta}}", '{"n": 3}'), ("x{{item.n}}y{{item.n}}", "x3y3")]
    for text, rendered in cases:
        assert grade(string_check("eq", input=text, reference=rendered), sample, item).score == 1.0, text
    assert referenced_item_fields(string_check(input="{{ item.answer.city }}", reference="{{item.answer.tags[0]}}")) == {"answer.city", "answer.tags[0]"}


def test_a_missing_field_scores_0_with_the_flag_that_says_which():
    missing = grade(string_check(reference="{{item.label}}"), make_sample("x"), {"other": 1})
    assert missing.score == 0.0 and missing.error_flags["invalid_variable_error"] and "item has no 'label'" in missing.errors[0]
    deep = grade(string_check(reference="{{item.a.b[2]}}"), make_sample("x"), {"a": {"b": [1]}})
    assert deep.error_flags["invalid_variable_error"] and "item.a.b has no '[2]'" in deep.errors[0]
    not_json = grade(string_check(input="{{sample.output_json.city}}"), make_sample("Paris"), {"label": "Paris"})
    assert not_json.score == 0.0 and not_json.error_flags["sample_parse_error"] and not not_json.error_flags["invalid_variable_error"]


def test_make_sample_is_openais_sample_namespace():
    assert make_sample('{"a": 1}')["output_json"] == {"a": 1}
    assert make_sample("0.9")["output_json"] is None and make_sample("not json")["output_json"] is None  # "as a JSON object"
    sample = make_sample("hi")
    assert sample["output_text"] == "hi" and sample["output_tools"] == [] and sample["choices"][0]["message"]["content"] == "hi"


# ---------------------------------------------------------------- text_similarity against its libraries

PAIRS = [("the cat sat on the mat", "the cat is on the mat"), ("Paris is the capital of France.", "The capital of France is Paris."),
         ("fuzzy wuzzy was a bear", "fuzzy wuzzy had no hair"), ("completely different words", "nothing alike here at all")]


class NoSynonyms:
    def synsets(self, word):
        return []


def reference_score(metric: str, text: str, reference: str) -> float:
    """Each metric from its library, called directly."""
    from nltk.tokenize import wordpunct_tokenize as tok

    if metric == "fuzzy_match":
        from rapidfuzz import fuzz, utils

        return fuzz.WRatio(text, reference, processor=utils.default_process) / 100
    if metric == "bleu":
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        return sentence_bleu([tok(reference)], tok(text), smoothing_function=SmoothingFunction().method1, auto_reweigh=True)
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return sentence_gleu([tok(reference)], tok(text))
    if metric == "meteor":
        from nltk.translate.meteor_score import single_meteor_score

        return single_meteor_score(tok(reference), tok(text), wordnet=NoSynonyms())
    from rouge_score import rouge_scorer

    key = "rougeL" if metric == "rouge_l" else "rouge" + metric[-1]
    return rouge_scorer.RougeScorer([key]).score(reference, text)[key].fmeasure


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"])
def test_each_metric_is_its_reference_librarys_score(metric):
    samples = [make_sample(text) for text, _ in PAIRS]
    results = grade_many(similar(metric), samples, [{"reference": ref} for _, ref in PAIRS])
    assert [r.score for r in results] == pytest.approx([reference_score(metric, t, r) for t, r in PAIRS])
    assert all(0.0 <= r.score <= 1.0 and not r.errors for r in results)


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"])
def test_identical_text_scores_1_and_disjoint_text_0(metric):
    text = "the quick brown fox jumps over the lazy dog"  # 9 words: every ROUGE-n up to 5 has n-grams to match
    assert grade(similar(metric), make_sample(text), {"reference": text}).score == pytest.approx(1.0)
    assert grade(similar(metric), make_sample("abc"), {"reference": "xyz"}).score == 0.0


def test_hand_worked_anchors():
    text, ref = "the cat sat on the mat", "the cat is on the mat"
    score = lambda metric: grade(similar(metric), make_sample(text), {"reference": ref}).score  # noqa: E731
    assert score("rouge_1") == pytest.approx(5 / 6)  # 5 of 6 unigrams shared each way
    assert score("gleu") == pytest.approx(9 / 18)  # matching 1-4 grams 5+3+1+0 of 6+5+4+3
    assert score("bleu") == pytest.approx(math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(0.1 / 3)) / 4))  # smoothing 1


def test_meteor_here_has_no_wordnet_synonyms():
    # No WordNet corpus can be installed here (see similarity.py): METEOR matches exact words and
    # Porter stems only, so a synonym earns what any other word does, while a stem still matches.
    reference = {"reference": "a large house"}
    synonym = grade(similar("meteor"), make_sample("a big house"), reference).score
    assert synonym == grade(similar("meteor"), make_sample("a xyz house"), reference).score
    assert grade(similar("meteor"), make_sample("a large houses"), reference).score > synonym
    assert 0.9 < grade(similar("meteor"), make_sample("a large house"), reference).score < 1.0  # METEOR's fragmentation penalty


# ---------------------------------------------------------------- multi and its formula

def multi(formula: str, **graders) -> dict:
    graders = graders or {"name": similar("fuzzy_match", reference="{{item.name}}", name="name_grader"),
                          "email": string_check(input="{{sample.output_json.email}}", reference="{{item.email}}", name="email_grader")}
    return {"type": "multi", "name": "combined", "graders": graders, "calculate_output": formula}


def test_the_guides_multi_example_averages_its_graders():
    sample = make_sample(json.dumps({"name": "John Doe", "email": "john.doe@gmail.com"}))
    sample["output_text"] = "John Do"  # the name grader reads output_text here
    result = grade(multi("(name + email) / 2"), sample, {"name": "John Doe", "email": "john.doe@gmail.com"})
    fuzzy = reference_score("fuzzy_match", "John Do", "John Doe")
    assert result.sub_scores == {"name": pytest.approx(fuzzy), "email": 1.0} and result.score == pytest.approx((fuzzy + 1) / 2)
    response = run_grader_response(multi("(name + email) / 2"), json.dumps({"email": "x@y"}), {"name": "n", "email": "x@y"})
    assert errors("RunGraderResponse", response) == [] and set(response["sub_rewards"]) == {"name", "email"}


@pytest.mark.parametrize("formula,expected", [
    ("a + b", 1.5), ("a - b", -0.5), ("a * b", 0.5), ("a / b", 0.5), ("b ^ 3", 1.0), ("2 * b ^ 2", 2.0), ("-a ^ 2", -0.25),
    ("a ** 2", 0.25), ("min(a, b)", 0.5), ("max(a, b, 0.7)", 1.0), ("abs(a - b)", 0.5), ("floor(a + b)", 1.0), ("ceil(a)", 1.0),
    ("exp(0)", 1.0), ("sqrt(a * 0.5)", 0.5), ("log(b)", 0.0), ("(a + b) / 2 * 0.9", 0.675),
])
def test_formulas(formula, expected):
    grader = multi(formula, a=python("def grade(s, i):\n    return 0.5\n"), b=python("def grade(s, i):\n    return 1.0\n"))
    assert grade(grader, make_sample("x"), {}).score == pytest.approx(expected)


@pytest.mark.parametrize("formula,why", [
    ("name.upper", "attribute access (a.b) is not allowed"), ("phone + name", "graders has no key 'phone'"),
    ("round(name)", "round() is not one of the functions"), ("__import__('os')", "__import__() is not one of the functions"),
    ("__import__('os').system('id')", "calling attribute access (a.b) is not allowed"),
    ("name if email else 0", "if/else is not allowed"), ("name > email", "a comparison is not allowed"), ("'1' + name", "'1' is not a number"),
    ("min(name)", "min() needs two or more arguments"), ("log(name, base=2)", "no keywords"), ("(lambda: 1)()", "calling lambda is not allowed"),
    ("name +", "cannot parse"), ("max", "max(...) is a function: call it"), ("name[0]", "indexing (a[b]) is not allowed"),
])
def test_formulas_that_are_refused_before_grading(formula, why):
    with pytest.raises(GraderError) as err:
        check_grader(multi(formula))
    assert str(err.value).startswith("grader.calculate_output: ") and why in str(err.value)


def test_formula_arithmetic_errors_score_0_with_the_reason():
    zero = python("def grade(s, i):\n    return 0.0\n")
    result = grade(multi("1 / z", z=zero), make_sample("x"), {})
    assert result.score == 0.0 and result.errors == ["calculate_output: division by zero"] and result.error_flags["other_error"]
    assert "math error" in grade(multi("log(z)", z=zero), make_sample("x"), {}).errors[0]
    assert "math error" in grade(multi("10 ^ 10 ^ 10 + z", z=zero), make_sample("x"), {}).errors[0]  # float overflow, not a huge integer


def test_a_failed_sub_grader_fails_the_multi():
    result = grade(multi("(name + email) / 2"), make_sample("John"), {"name": "John", "email": "j@x"})  # output_text is not JSON
    assert result.score == 0.0 and result.sub_scores["name"] == 1.0 and result.error_flags["sample_parse_error"]
    assert result.errors[0].startswith("graders.email: {{sample.output_json.email}}")


# ---------------------------------------------------------------- check_grader

@pytest.mark.parametrize("grader,line", [
    (string_check("contains"), "grader.operation: 'contains' is not one of eq, ne, like, ilike"),
    ({"type": "multi", "name": "m", "graders": {"fmt": string_check("contains")}, "calculate_output": "fmt"},
     "grader.graders.fmt.operation: 'contains' is not one of eq, ne, like, ilike"),
    ({"type": "string_check", "name": "x", "input": "a"}, "grader.reference: missing; a string_check grader needs type, name, input, reference, operation"),
    ({**similar("fuzzy"), "refrence": "x"}, "grader.refrence: unknown key for a text_similarity grader; did you mean reference?"),
    (similar("fuzzy"), "grader.evaluation_metric: 'fuzzy' is not one of cosine, fuzzy_match, bleu"),
    ({"type": "contains", "name": "x"}, "grader.type: 'contains' is not one of string_check, text_similarity, python, score_model, multi"),
    (string_check(input="{{ output_text }}"), "grader.input: {{ output_text }} names no namespace"),
    (string_check(input="{{item.a"), "grader.input: '{{' at character 0 is never closed"),
    (string_check(reference="{{item}}"), "grader.reference: {{ item }} names a namespace but no variable"),
    (python("def grade(sample):\n    return 1.0\n"), "grader.source: grade(sample) cannot be called as grade(sample, item)"),
    (python("def score(sample, item):\n    return 1.0\n"), "grader.source: defines no function grade"),
    (python("def grade(sample, item)\n    return 1.0\n"), "grader.source: line 1: expected ':'"),
    (python("x = 1\n" * 50_000), "grader.source: 300,000 bytes; OpenAI takes less than 256 kB"),
    ({**score_model("hi"), "sampling_parameters": {}}, "grader.sampling_parameters: unknown key for a score_model grader; did you mean sampling_params?"),
    (score_model("hi", sampling_params={"max_completion_tokens": 5}), "grader.sampling_params.max_completion_tokens: unknown; did you mean max_completions_tokens?"),
    (score_model("hi", range=[1, 0]), "grader.range: [1, 0] is not two numbers [low, high] with low < high"),
    ({**score_model("hi"), "input": [{"role": "judge", "content": "x"}]}, "grader.input[0].role: 'judge' is not one of user, assistant, system, developer"),
    ({"type": "multi", "name": "m", "graders": {"inner": multi("name")}, "calculate_output": "inner"},
     "grader.graders.inner.type: a multi grader cannot hold another multi"),
    ({"type": "multi", "name": "m", "graders": {"l": {**spec_example("GraderLabelModel"), "passing_labels": ["great"]}}, "calculate_output": "l"},
     "grader.graders.l.passing_labels: must be a subset of labels"),
])
def test_check_grader_names_the_key_and_the_fix(grader, line):
    with pytest.raises(GraderError) as err:
        check_grader(grader)
    assert line in str(err.value)
    assert all(not p.startswith("grader") or ": " in p for p in str(err.value).splitlines())


def test_a_grader_error_can_be_one_line():
    err = GraderError("grader.reference: missing; add it")
    assert str(err) == "grader.reference: missing; add it" and err.param == "grader.reference"


def test_check_grader_lists_every_problem_at_once():
    with pytest.raises(GraderError) as err:
        check_grader({"type": "string_check", "name": 3, "input": "{{x.y}}", "operation": "contains"})
    assert [line.split(":")[0] for line in str(err.value).splitlines()] == ["grader.reference", "grader.name", "grader.operation", "grader.input"]
    assert err.value.param == "grader.reference"


def test_referenced_item_fields_walks_sub_graders_and_messages():
    grader = multi("a + b", a=string_check(reference="{{item.label}}"),
                   b={**score_model("Ref: {{ item.ref.text }} / {{sample.output_text}}"),
                      "input": [{"role": "user", "content": [{"type": "input_text", "text": "{{item.q}}"}, {"type": "input_image", "image_url": "{{item.img}}"}]}]})
    assert referenced_item_fields(grader) == {"label", "q", "img"}
    assert referenced_item_fields(python("def grade(s, i):\n    return i['x']\n")) == set()
