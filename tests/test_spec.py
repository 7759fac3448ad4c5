from pathlib import Path

import pytest

from tunejob.errors import SpecError
from tunejob.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]


def errors_of(text: str, **kw) -> str:
    with pytest.raises(SpecError) as exc:
        parse_spec(text, "job.yaml", **kw)
    return str(exc.value)


def test_defaults_follow_the_guide_starting_point():
    spec = parse_spec("data: {train: t.jsonl}\n")
    assert spec.backend == "local" and spec.model == "default"
    assert spec.hyperparameters.epochs == 3 and spec.hyperparameters.batch_size == 8
    assert spec.lora.r == 16 and spec.lora.resolved_alpha == 32 and spec.lora.target_modules == "attention"
    assert spec.checkpointing.early_stopping_patience == 2
    assert spec.data.val_fraction == 0.1
    assert spec.resolved_learning_rate() == pytest.approx(2e-4)


def test_every_problem_is_listed_with_line_key_and_fix():
    msg = errors_of(
        "data:\n  train: t.jsonl\n  val_fractoin: 0.2\nhyperparameters:\n  epochs: three\n  batch_size: -4\nlora:\n  target_modules: banana\n"
    )
    assert "4 problems" in msg
    assert "job.yaml:3: data.val_fractoin: unknown key; did you mean 'val_fraction'?" in msg
    assert "job.yaml:5: hyperparameters.epochs: 'three' is invalid" in msg
    assert "job.yaml:6: hyperparameters.batch_size: -4 is invalid: input should be greater than 0" in msg
    assert "job.yaml:8: lora.target_modules: 'banana'" in msg and "'attention'" in msg


def test_missing_required_key():
    assert "data.train: required key is missing" in errors_of("data: {}\n")
    assert "data: required key is missing" in errors_of("model: default\n")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("backend: openai\nmodel: gpt-4o-mini\nquantization: 4bit\ndata: {train: t}\n", "quantization: '4bit' applies to backend 'local' only"),
        ("backend: openai\ndata: {train: t}\n", "model: name the openai base model"),
        ("backend: openai\nmodel: gpt-4o-mini\nlora: {r: 8}\ndata: {train: t}\n", "lora: the openai service chooses its own adapter"),
        ("backend: openai\nmodel: gpt-4o-mini\ndata: {train: t}\nhyperparameters: {learning_rate: 0.001}\n", "takes learning_rate_multiplier instead"),
        ("backend: openai\nmodel: gpt-4o-mini\ndata: {train: t}\nhyperparameters: {epochs: 51}\n", "epochs: 51 is outside openai's range 1-50"),  # Bedrock's ranges are per model: test_bedrock_backend
        ("data: {train: t}\nhyperparameters: {learning_rate_multiplier: 2}\n", "only for API backends"),
        ("data: {train: t}\nhyperparameters: {batch_size: 6, gradient_accumulation: 4}\n", "not divisible by gradient_accumulation"),
        ("data: {train: t}\ncheckpointing: {eval_steps: 20, save_steps: 50}\n", "set save_steps: 40"),
    ],
)
def test_impossible_combinations(text, expected):
    assert expected in errors_of(text)


def test_yaml_syntax_and_shape_errors():
    assert "job.yaml:2: invalid YAML" in errors_of("data: [\n")
    assert "a job spec is a YAML mapping" in errors_of("- a\n- b\n")


def test_set_overrides_typed_values_and_report_bad_keys():
    spec = parse_spec("data: {train: t}\n", overrides=["hyperparameters.epochs=2", "lora.target_modules=[q_proj, k_proj]", "quantization=4bit"])
    assert spec.hyperparameters.epochs == 2 and spec.lora.target_modules == ["q_proj", "k_proj"] and spec.quantization == "4bit"
    assert "hyperparameters.epoch: unknown key; did you mean 'epochs'?" in errors_of("data: {train: t}\n", overrides=["hyperparameters.epoch=2"])
    assert "write it as key.sub=value" in errors_of("data: {train: t}\n", overrides=["nonsense"])


def test_paths_resolve_against_the_spec_file(tmp_path):
    (tmp_path / "job.yaml").write_text("data: {train: data/t.jsonl}\n")
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.data.train == tmp_path / "data" / "t.jsonl"
    assert spec.name == "job" and spec.run_dir == Path("runs/job")


def test_missing_spec_file_is_one_clear_error(tmp_path):
    with pytest.raises(SpecError, match="no such job spec file"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def test_every_example_spec_loads_and_names_its_command():
    specs = sorted((REPO / "examples").glob("*.yaml"))
    assert specs, "examples/ must hold job specs"
    for path in specs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "tunejob " in first, f"{path.name}: first line must be the command that runs it"
        spec = load_spec(path)
        assert spec.data.train.is_file(), f"{path.name}: {spec.data.train} does not exist"


def test_resolved_yaml_round_trips():
    spec = parse_spec("data: {train: t}\nlora: {r: 8}\n")
    again = parse_spec(spec.to_yaml())
    assert again == spec.model_copy(update={"lora": spec.lora.model_copy(update={"alpha": 16.0})})


def test_api_specs_round_trip_without_local_sections():
    spec = parse_spec("backend: openai\nmodel: gpt-4o-mini\ndata: {train: t}\nopenai: {base_url: 'http://x/v1'}\n")
    again = parse_spec(spec.to_yaml())
    assert again.openai.base_url == "http://x/v1" and "lora" not in spec.to_yaml()


def test_secrets_in_a_spec_are_refused_with_the_fix():
    msg = errors_of("backend: openai\nmodel: gpt-4o-mini\ndata: {train: t}\nopenai: {api_key: sk-123}\n")
    assert "secrets never go in a job spec" in msg and "OPENAI_API_KEY" in msg


def test_auto_batch_and_epochs_resolve_to_the_guides_starting_point_on_the_local_backend():
    auto = parse_spec("data: {train: t}\nhyperparameters: {batch_size: auto, epochs: auto, learning_rate: auto}\n")
    assert (auto.resolved_batch_size(), auto.resolved_epochs(), auto.resolved_learning_rate()) == (8, 3, 2e-4)
    set_ = parse_spec("data: {train: t}\nhyperparameters: {batch_size: 4, epochs: 2, learning_rate: 1.0e-4}\n")
    assert (set_.resolved_batch_size(), set_.resolved_epochs(), set_.resolved_learning_rate()) == (4, 2, 1e-4)
