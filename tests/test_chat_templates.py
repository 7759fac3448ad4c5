"""`chat_template:` in a job spec: a packaged name or a file, for a model without a template."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli, write_chat_data
from tunejob.data.sequences import encode_example
from tunejob.data.templates import PACKAGED, packaged_template
from tunejob.errors import ModelError
from tunejob.train.models import load_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def untemplated(tiny_model, tmp_path_factory):
    """The tiny model with its tokenizer's chat template taken out, as a base GGUF's would be."""
    out = tmp_path_factory.mktemp("untemplated") / "model"
    shutil.copytree(tiny_model, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_a_model_without_a_template_fails_in_one_line_naming_chat_template(untemplated, tmp_path):
    data = write_chat_data(tmp_path / "train.jsonl", 4)
    (tmp_path / "job.yaml").write_text(f"model: {untemplated}\ndata: {{train: {data}}}\n")
    done = run_cli("plan", str(tmp_path / "job.yaml"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "chat_template:" in line and "no chat template" in line


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_a_packaged_name_or_a_file_sets_the_template_and_its_generation_blocks_label_the_answer(untemplated, tmp_path, name):
    (tmp_path / "mine.jinja").write_text(packaged_template(name))
    for value, base in ((name, None), ("mine.jinja", tmp_path)):
        tokenizer = load_tokenizer(str(untemplated), value, base)
        assert tokenizer.chat_template == packaged_template(name)
        seq = encode_example(tokenizer, CONVERSATION, 256)
        trained = tokenizer.decode([t for t in seq.labels if t != -100])
        # the template's own rendering: what follows the user's turn's generation prompt
        text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
        prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
        assert text.startswith(prompt) and text[len(prompt):].startswith(trained) and trained.startswith("Hello.")


def test_an_unknown_template_is_one_line_naming_the_packaged_ones(untemplated):
    with pytest.raises(ModelError, match="neither a template file nor one of chatml, gemma, llama3"):
        load_tokenizer(str(untemplated), "mistral")
