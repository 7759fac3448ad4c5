"""An Ollama Modelfile for an exported GGUF: `FROM`, a Go `TEMPLATE` equal to the model's chat
template, `PARAMETER stop` at the end-of-turn token, and the `SYSTEM` prompt the run trained with.

Ollama does not run Jinja: the template is rewritten in Go's text/template. ChatML (SmolLM2, Qwen2,
and any template that renders exactly as ChatML) and Gemma 3's format are rewritten so far; each is
recognised by rendering a probe conversation with the model's own template, not by reading its source.
"""

from __future__ import annotations

from pathlib import Path

from tunejob.errors import ModelError

# Ollama passes the system prompt as .System and the turns as .Messages (user/assistant); the
# generation prompt is opened after the last message unless it is the assistant's own.
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (not $last) (ne .Role "assistant") }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""


# Gemma 3: the system prompt opens the first user turn; the assistant is "model".
GEMMA_TEMPLATE = """{{- $system := "" }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}{{ $system = printf "%s\\n\\n" .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ $system }}{{ .Content }}<end_of_turn>
{{ $system = "" }}
{{- if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


def _chatml(messages: list[dict], generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def _gemma(messages: list[dict], generation_prompt: bool) -> str:
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    turns = messages[1:] if system else messages
    text = "<bos>" + "".join(f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n"
                             f"{system if i == 0 else ''}{m['content']}<end_of_turn>\n" for i, m in enumerate(turns))
    return text + ("<start_of_turn>model\n" if generation_prompt else "")


STYLES = {"chatml": (_chatml, CHATML_TEMPLATE), "gemma": (_gemma, GEMMA_TEMPLATE)}


def default_system(tokenizer) -> str | None:
    """The system prompt a template inserts when the conversation has none (SmolLM2 names itself)."""
    probe = [{"role": "user", "content": "u"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>\n" in text:
        return text[len(head):text.index("<|im_end|>\n")]
    return None


def template_style(tokenizer) -> str:
    """'chatml' or 'gemma' when the model's template renders a conversation exactly so; else an error."""
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    for style, (render, _) in STYLES.items():
        if rendered == render(turns, True):
            return style
    raise ModelError("--ollama: this model's chat template is not ChatML or Gemma 3's; tunejob writes Ollama templates for "
                     "ChatML models (SmolLM2, Qwen2) and Gemma 3 so far; use --gguf and give Ollama your own TEMPLATE")


def training_system_prompt(examples: list[dict]) -> str | None:
    """The system prompt every training example starts with, if they all share one."""
    prompts = set()
    for example in examples:
        messages = example.get("messages") or []
        first = messages[0] if messages else {}
        prompts.add(first.get("content") if first.get("role") == "system" else None)
    return prompts.pop() if len(prompts) == 1 and None not in prompts else None


def modelfile_text(gguf_name: str, template: str, stops: list[str], system: str | None) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        if '"""' in system:
            raise ModelError('--ollama: the system prompt contains """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: Path, tokenizer, eot: str | None, system: str | None, gguf_name: str = "model.gguf") -> Path:
    template = STYLES[template_style(tokenizer)][1]
    stops = [eot] if eot else []
    path = out_dir / "Modelfile"
    path.write_text(modelfile_text(gguf_name, template, stops, system or default_system(tokenizer)), encoding="utf-8")
    return path


def run_system_prompt(run_dir: Path) -> tuple[str | None, str]:
    """(the system prompt the run's training data shares, or None; why, in words)."""
    from tunejob.data.dataset import load_examples
    from tunejob.evaluate.evaluation import load_run_spec

    spec = load_run_spec(run_dir)
    train = Path(spec.data.train)
    if not train.is_file():
        return None, f"{train}: the run's training data is gone (paths are relative to where `tunejob run` ran); no SYSTEM written"
    system = training_system_prompt(load_examples(train))
    return system, ("SYSTEM: the system prompt all training examples share" if system
                    else "no SYSTEM from the data: the training examples do not share one system prompt")


def export_ollama(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best", kind: str = "q8_0") -> dict:
    """`tunejob export RUN_DIR --ollama DIR`: DIR/model.gguf + DIR/Modelfile, and the create line."""
    from tunejob.export.gguf_model import choose_checkpoint, merged_model, write_gguf

    run_dir, out = Path(run_dir), Path(out_dir)
    ckpt = choose_checkpoint(run_dir, checkpoint)
    model, tokenizer, base_dir = merged_model(ckpt)
    template_style(tokenizer)  # refuse before the (long) write, not after
    system, why = run_system_prompt(run_dir) if (run_dir / "config.yaml").is_file() else (None, "no run config; no SYSTEM")
    out.mkdir(parents=True, exist_ok=True)
    eot = write_gguf(model, tokenizer, base_dir, out / "model.gguf", kind, name=run_dir.resolve().name)
    path = write_modelfile(out, tokenizer, eot, system)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in run_dir.resolve().name.lower())
    return {"path": str(path), "gguf": str(out / "model.gguf"), "system": why, "end_of_turn": eot,
            "create": f"ollama create {name} -f {path}"}
