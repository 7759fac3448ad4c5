"""tunejob serve's limits (issue 31, findings 8, 9 and 10): a byte cap on every JSON body, OpenAI's
context_length_exceeded, caps on what one job may ask, the local executor holding each job's
resources, a failed-key throttle on /v1 and a minimum key length, and merged adapters that do
not evict each other. Against one real `tunejob serve` on 127.0.0.1 with the official SDK, where
there is a server; the executor and the merge budget on their own, with a tiny model. A chunked
body's cap is tested beside the upload's, in test_server_security.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx2 as httpx  # the HTTP library openai 3.x is built on
import openai
import pytest

from conftest import run_cli, write_chat_data
from test_serve import KEY_A, Server, client
from tunejob.server.run import free_port

ONE_TOKEN_WORD = " alpha"  # one token of the embedded tokenizer, whatever comes before it


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    """One server with the defaults for every limit here."""
    s = Server(tmp_path_factory.mktemp("limits") / "data", tiny_model).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def training_file(served, tmp_path_factory):
    path = write_chat_data(tmp_path_factory.mktemp("files") / "t.jsonl", 8)
    return client(served).files.create(file=open(path, "rb"), purpose="fine-tune").id


# ---------------------------------------------------------------- finding 8: body cap, context


def test_a_json_body_over_16_mb_is_413_before_it_is_parsed(served):
    """A 17 MB job body: parsed, it was a 400 on its unknown field; now the cap answers first."""
    with pytest.raises(openai.APIStatusError) as exc:
        client(served).fine_tuning.jobs.create(training_file="file-x", model="default", extra_body={"padding": "x" * (17 << 20)})
    assert exc.value.status_code == 413
    assert exc.value.body == {"message": exc.value.body["message"], "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    assert "16,777,216 bytes" in exc.value.body["message"]


def _prompt_tokens(tiny_model: Path, messages: list[dict]) -> int:
    """The prompt's length as transformers renders it: the expected value, not the server's count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def test_a_prompt_past_the_context_is_openais_context_length_exceeded(served, tiny_model):
    context = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]  # 2048
    messages = [{"role": "user", "content": "Say hi." + ONE_TOKEN_WORD * (context - 100)}]
    prompt = _prompt_tokens(tiny_model, messages)
    assert context - 100 < prompt < context - 20
    c = client(served)
    for stream in (False, True):  # a stream gets the 400 too, not an error event after its first chunk
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(model="default", messages=messages, max_tokens=100, stream=stream)
        assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"
        assert exc.value.body["message"] == (f"This model's maximum context length is {context} tokens. However, you requested "
                                             f"{prompt + 100} tokens ({prompt} in the messages, 100 in the completion). "
                                             "Please reduce the length of the messages or completion.")
    # without max_tokens the prompt alone must fit, and the answer is cut to the room left
    longer = [{"role": "user", "content": messages[0]["content"] + ONE_TOKEN_WORD * 200}]
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="default", messages=longer)
    assert re.fullmatch(rf"This model's maximum context length is {context} tokens\. However, your messages resulted in "
                        rf"{_prompt_tokens(tiny_model, longer)} tokens\. Please reduce the length of the messages\.", exc.value.body["message"])
    answer = c.chat.completions.create(model="default", messages=messages, temperature=0)
    assert answer.usage.prompt_tokens == prompt and answer.usage.completion_tokens <= context - prompt


# ---------------------------------------------------------------- finding 10: caps, resources


def test_a_job_over_the_servers_caps_is_a_400_naming_the_param_and_the_cap(served, training_file):
    cores = len(os.sched_getaffinity(0))  # --max-processes defaults to the cores on a host without a GPU
    c = client(served)
    too_many = {"distributed": {"processes": cores + 1}, "hyperparameters": {"batch_size": cores + 1}}  # a batch they can split
    for extra, param, cap in ((too_many, "tunejob.distributed.processes", cores),
                              ({"hyperparameters": {"batch_size": 512}}, "tunejob.hyperparameters.batch_size", 256),
                              ({"resources": {"gpus": 1}}, "tunejob.resources.gpus", 0)):
        with pytest.raises(openai.BadRequestError) as exc:
            c.fine_tuning.jobs.create(training_file=training_file, model="default", extra_body={"tunejob": extra})
        assert exc.value.param == param, exc.value.body
        assert f"over this server's limit of {cap}" in exc.value.body["message"]


class _Proc:
    """A child that runs until told otherwise; records its environment."""

    pid = 4242

    def __init__(self, argv, env, **kwargs):
        self.env, self.rc = env, None

    def poll(self):
        return self.rc


def _launch(tmp_path: Path, job: str, processes: int = 1, **resources):
    from tunejob.server.jobs.executor import Launch, Resources

    return Launch(job, tmp_path / "job.yaml", tmp_path / f"{job}.log", Resources(**resources), processes)


def test_the_local_executor_gives_each_job_its_cpus_and_queues_what_does_not_fit(tmp_path, monkeypatch):
    """4 training threads, 3 slots: a job asking 3 CPUs trains on 3 threads, the next asking 2
    waits for them (not 4 threads each, whatever they asked); 2 processes split their CPUs."""
    from tunejob.server.jobs import executor

    monkeypatch.setattr(executor.subprocess, "Popen", _Proc)
    ex = executor.LocalExecutor(slots=3, threads=4)
    ex.submit("r-a", _launch(tmp_path, "ftjob-a", cpus=3))
    assert ex._children["r-a"].proc.env["TUNEJOB_THREADS"] == "3"
    assert ex.waiting_for(_launch(tmp_path, "ftjob-b", cpus=2)) == "2 free CPU(s) (1 of the 4 training threads free; in use by ftjob-a)"
    ex._children["r-a"].proc.rc = 0
    assert ex.poll("r-a").state == "succeeded" and ex.waiting_for(_launch(tmp_path, "ftjob-b", cpus=2)) is None
    ex.submit("r-c", _launch(tmp_path, "ftjob-c", processes=2, cpus=4))
    assert ex._children["r-c"].proc.env["TUNEJOB_THREADS"] == "2"  # 2 each, 4 in all
    assert ex.waiting_for(_launch(tmp_path, "ftjob-d", cpus=1)).startswith("1 free CPU(s) (0 of the 4")
    assert ex.default_cpus == 1  # a job asking none gets a slot's share: 4 threads // 3 slots


# ---------------------------------------------------------------- finding 10: keys


def test_wrong_keys_from_one_address_are_throttled_with_openais_429(served):
    """Five wrong keys from 127.0.0.2: the next request from there waits, the right key included
    (else a 200 among 429s would tell a guesser it found one); 127.0.0.1 is still served."""
    def from_address(key: str) -> openai.OpenAI:
        http = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        return openai.OpenAI(base_url=served.url, api_key=key, max_retries=0, http_client=http)

    for i in range(5):
        with pytest.raises(openai.AuthenticationError):
            from_address(f"sk-guess-{i:016d}").models.list()
    with pytest.raises(openai.RateLimitError) as exc:
        from_address(KEY_A).models.list()
    assert exc.value.code == "rate_limit_exceeded" and set(exc.value.body) == {"message", "type", "param", "code"}
    assert 0 < int(exc.value.response.headers["retry-after"]) <= 60
    assert client(served).models.list().data  # another address, the same key: served


def test_the_server_refuses_to_start_with_a_short_key(tmp_path):
    try:
        out = run_cli("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "d"), "--api-key", "sk-short-key",
                      "--max-processes", "2", "--max-batch-size", "64", "--max-body-mb", "4", "--chat-merged-copies", "3", timeout=30)
    except Exception as exc:  # the old server started, and served until the timeout
        pytest.fail(f"the server did not refuse the key: {exc}")
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if not line.startswith("warning: --api-key")]
    assert lines == ["error: 1 API key(s) shorter than 16 characters (12): a short key can be guessed; make one with: "
                     "python -c \"import secrets; print('sk-' + secrets.token_urlsafe(24))\""], out.stderr
    assert "sk-short-key" not in out.stderr


# ---------------------------------------------------------------- finding 9: merge budget


def _adapters(tiny_model: Path, tmp_path: Path) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(2):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(tmp_path / f"adapter-{i}")
        out.append(str(tmp_path / f"adapter-{i}"))
    return out


def test_two_alternating_adapters_stay_merged_with_the_default_budget(tiny_model, tmp_path, monkeypatch):
    """Two users alternating two fine-tuned models of the embedded 135M base: its copy weighs 513 MB
    in fp32 (SmolLM2-135M's 134.5M parameters x 4 bytes), which the tiny model here is made to
    report. The old 1024 MB default held one such copy, so each request evicted the other's and
    merged again; the default now holds two copies, so each adapter is merged once."""
    from tunejob.server.inference import weights
    from tunejob.server.inference.generation import Engine, EngineOptions
    from tunejob.train import threads

    monkeypatch.setattr(weights, "parameter_bytes", lambda model: 134_515_008 * 4)
    logs: list[str] = []
    engine = Engine(threads.budget(1, 1), options=EngineOptions(dtype="float32"), log=logs.append)
    a, b = _adapters(tiny_model, tmp_path)
    paths = []
    for adapter in (a, b) * 4:
        target = engine.weights.target(str(tiny_model), Path(adapter))
        paths.append(target.path)
        engine.weights.release(target)
    merges = [line for line in logs if "merged into a copy" in line]
    assert len(merges) == 2, logs
    assert paths == ["unmerged", "unmerged"] + ["merged"] * 6
