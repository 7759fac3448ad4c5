"""One place per default (issue 32): `tunejob serve`'s options show the server's own defaults
(server/config.py), and the chat engine's options start from the same ones."""

from __future__ import annotations

from dataclasses import fields

import typer

from tunejob.cli import app
from tunejob.server.config import DEFAULT_BODY_BYTES, MAX_UPLOAD_MB, ServerConfig


def _serve_options() -> dict[str, object]:
    serve = typer.main.get_command(app).commands["serve"]
    return {p.name: p.default for p in serve.params}


def test_serve_help_shows_the_servers_defaults():
    options = _serve_options()
    config = {f.name: f.default for f in fields(ServerConfig) if f.default is not f.default_factory}
    shared = sorted(set(options) & set(config))
    assert len(shared) >= 18, shared  # every setting both name the same
    for name in shared:
        default = options[name].value if hasattr(options[name], "value") else options[name]  # the CLI's enums
        assert default == config[name], f"--{name.replace('_', '-')}: the CLI says {default!r}, the server {config[name]!r}"
    assert options["max_body_mb"] * 2**20 == DEFAULT_BODY_BYTES == ServerConfig.max_body_bytes
    assert options["max_upload_mb"] * 2**20 == MAX_UPLOAD_MB * 2**20 == ServerConfig.max_upload_bytes


def test_the_chat_engine_starts_from_the_servers_defaults():
    from tunejob.server.inference.generation import MAX_PENDING, EngineOptions

    engine = EngineOptions()
    assert (engine.max_batch, engine.dtype, engine.merged_copies, MAX_PENDING) == \
        (ServerConfig.chat_batch, ServerConfig.chat_dtype, ServerConfig.chat_merged_copies, ServerConfig.chat_queue)


def test_a_server_job_and_a_local_job_read_one_learning_rate_and_name_both_autos(tmp_path):
    """learning_rate_multiplier 1 is the local LoRA default (one constant, spec/job.py), and a
    server job's `batch_size: auto` is OPENAI_AUTO_BATCH_SIZE there, beside the local `auto`."""
    from types import SimpleNamespace

    from tunejob.server.api.jobs import job_spec
    from tunejob.spec import LOCAL_AUTO_BATCH_SIZE, LORA_DEFAULT_LR, OPENAI_AUTO_BATCH_SIZE, parse_spec

    state = SimpleNamespace(config=ServerConfig(data_dir=tmp_path, api_keys=set()), base_models={"base": "some/model"})
    spec = job_spec(state, "base", {"learning_rate_multiplier": 2.0, "n_epochs": "auto", "batch_size": "auto"}, None, 1)
    assert spec["hyperparameters"]["learning_rate"] == 2 * LORA_DEFAULT_LR
    assert spec["hyperparameters"]["batch_size"] == OPENAI_AUTO_BATCH_SIZE
    local = parse_spec("model: base\ndata: {train: t}\n")
    assert local.resolved_batch_size() == LOCAL_AUTO_BATCH_SIZE and local.resolved_learning_rate() == LORA_DEFAULT_LR
