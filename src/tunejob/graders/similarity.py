"""text_similarity: how close the rendered input is to the rendered reference, from 0 to 1 (cosine
from -1). Each metric is a maintained library's own function, chosen to match OpenAI's graders:
its guide names rapidfuzz for fuzzy_match and "the rouge python library" for ROUGE, and its python
graders' image ships rapidfuzz, rouge-score and nltk, so BLEU, GLEU and METEOR come from
nltk.translate. Where the guide is silent on a variant, the choice and its reason are below.

- Tokens (BLEU, GLEU, METEOR): nltk's wordpunct_tokenize, a regex (runs of letters and digits,
  runs of punctuation), so no tokenizer model has to be downloaded; case is kept (METEOR lowers
  it itself, as nltk's METEOR does by default).
- fuzzy_match: rapidfuzz's WRatio over default_process (lower case, no punctuation), / 100: the
  function of the guide's own fuzzy-match example grader.
- bleu: sentence BLEU-4 with Chen & Cherry's smoothing 1 (an n-gram order with no match counts
  0.1 instead of zeroing the whole score) and auto_reweigh (a 3-token answer is scored on its 1-3
  grams, so an exact short answer is 1.0): the guide asks for "a smooth score, not a pass/fail
  stamp", which unsmoothed sentence BLEU is not (0 for any answer without a 4-gram match).
- gleu: nltk's sentence_gleu (Google's, 1- to 4-grams).
- meteor: nltk's METEOR (exact and Porter-stem matches) WITHOUT WordNet synonyms: its synonym
  stage needs the WordNet corpus, which cannot be downloaded here and no PyPI package ships in
  the form nltk reads (Debian's wordnet-base has the data but not the `lexnames` file nltk's
  reader opens, and nltk 3.10 refuses corpus roots outside nltk.data.path). So "big" and "large"
  do not match here, where OpenAI's METEOR (with WordNet) may count them; exact and stemmed
  words score the same. METEOR's fragmentation penalty keeps even identical text under 1.0.
- rouge_1..rouge_5, rouge_l: rouge-score's F-measure, with its defaults (its tokenizer, no stemmer).
- cosine: the cosine of the two texts' embeddings from an OpenAI-compatible /embeddings endpoint
  (OpenAI uses text-embedding-3-large and offers cosine for evals only); one request per batch.
"""

from __future__ import annotations

import functools
import math

from tunejob.graders.context import openai_client


class _NoSynonyms:
    """Stands in for nltk's WordNet reader in METEOR: no word has synonyms (see the docstring)."""

    def synsets(self, word: str) -> list:
        return []


def similarity(metric: str, text: str, reference: str) -> float:
    """Every metric but cosine (see cosine_scores)."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz, utils

        return fuzz.WRatio(text, reference, processor=utils.default_process) / 100.0
    if metric.startswith("rouge_"):
        key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
        return float(_rouge(key).score(reference, text)[key].fmeasure)  # score(target, prediction)
    from nltk.tokenize import wordpunct_tokenize

    hypothesis, ref = wordpunct_tokenize(text), wordpunct_tokenize(reference)
    if not hypothesis or not ref:
        return 0.0  # nothing to compare (nltk warns and returns 0 too)
    if metric == "bleu":
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        return float(sentence_bleu([ref], hypothesis, smoothing_function=SmoothingFunction().method1, auto_reweigh=True))
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([ref], hypothesis))
    if metric == "meteor":
        from nltk.translate.meteor_score import single_meteor_score

        return float(single_meteor_score(ref, hypothesis, wordnet=_NoSynonyms()))
    raise ValueError(f"unknown evaluation_metric {metric!r}")  # schema.check_grader refuses it first


@functools.lru_cache(maxsize=8)
def _rouge(key: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([key], use_stemmer=False)


def cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b)) / norm if norm else 0.0


def cosine_scores(pairs: list[tuple[str, str]], base_url: str, api_key: str | None, model: str) -> list[float]:
    """cosine(embedding(text), embedding(reference)) for each pair, from one embeddings request;
    the SDK's errors propagate (the caller scores the batch 0 with model_grader_server_error)."""
    client = openai_client(base_url, api_key)
    texts = [t for pair in pairs for t in pair]
    data = sorted(client.embeddings.create(model=model, input=texts).data, key=lambda d: d.index)
    vectors = [d.embedding for d in data]
    return [cosine(vectors[2 * i], vectors[2 * i + 1]) for i in range(len(pairs))]
