"""Chat templates: the ones tunejob ships, the `chat_template:` key, and where an answer ends.

An answer ends at the token that closes the assistant's turn in the template (`<|im_end|>` for
ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma), not only at the tokenizer's
`eos_token`: a base model's eos (Gemma 3's `<eos>`) is not what its chat template closes a turn
with, and a fine-tuned model that learned to close its turn would otherwise repeat its answer
until max_tokens. The token is read off the template itself (render one assistant turn, take the
special token right after its content), so any template, packaged or the model's own, gets it.
`stop_token_ids` is the one answer to "where does generation stop" for every generation path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tunejob.errors import ModelError

# Catalog names for `chat_template:`; each file has {% generation %} blocks around what the
# assistant produces (content + end of turn), so assistant-only labels come from the template.
PACKAGED = {
    "chatml": "ChatML (<|im_start|> / <|im_end|>), as SmolLM2 and Qwen2 publish it",
    "gemma": "Gemma 3's published template (google/gemma-3-270m-it), with {% generation %} blocks added",
    "llama3": "Llama 3's header / <|eot_id|> format, without the date and tools preamble",
}


def packaged_template(name: str) -> str:
    return resources.files("tunejob").joinpath(f"resources/templates/{name}.jinja").read_text(encoding="utf-8")


def template_text(value: str, base_dir: Path | None = None) -> str:
    """A `chat_template:` value (a packaged name or a file, relative to the spec's folder) as its text."""
    if value in PACKAGED:
        return packaged_template(value)
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise ModelError(f"chat_template: {value!r} is neither a template file nor one of {', '.join(PACKAGED)}")
    return path.read_text(encoding="utf-8")


def template_source(tokenizer, chosen: str | None = None) -> str:
    """Where the template in use came from, for `plan`."""
    if chosen:
        return f"chat_template: {chosen}" + (f" ({PACKAGED[chosen]})" if chosen in PACKAGED else "")
    for name, about in PACKAGED.items():
        if tokenizer.chat_template == packaged_template(name):
            return f"tunejob's packaged '{name}' template: {about}"
    return "the model's own (tokenizer_config.json)"


def end_of_turn(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with, found by rendering one;
    None when the turn's content is followed by plain text only."""
    marker = "tunejob-end-of-turn-probe"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    after = text[text.rindex(marker) + len(marker):]
    specials = {str(t) for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
    return next((s for s in sorted(specials, key=len, reverse=True) if s and after.startswith(s)), None)


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Every token that ends an answer: the template's end of turn, the tokenizer's eos and the
    model's generation config's eos ids."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids.append(tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        eot = end_of_turn(tokenizer)
        if eot is not None:
            ids.append(tokenizer.convert_tokens_to_ids(eot))
    return {int(i) for i in ids if i is not None}
