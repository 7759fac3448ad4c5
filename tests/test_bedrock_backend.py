"""backend: bedrock against moto in server mode on 127.0.0.1 (real boto3 clients over HTTP).

moto cannot emulate: a job ever reaching Completed (it stays InProgress until stopped), Bedrock
writing the metrics CSVs (the test writes them where Bedrock would), clientRequestToken semantics
(moto rejects a second create by name, which tunejob's lookup handles), and validation of
hyperparameters or data. Those parts are marked below."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from conftest import run_cli, write_chat_data
from tunejob.backends.jobstore import JobStore
from tunejob.monitor.metrics import read_metrics

# AWS's documented columns ("Analyze the results of a model customization job"): steps from 0.
TRAIN_CSV = b"step_number,epoch_number,training_loss,perplexity\n0,0,2.5,12.18\n1,0,2.1,8.17\n2,1,1.8,6.05\n3,1,1.6,4.95\n"
VALID_CSV = b"step_number,epoch_number,validation_loss,perplexity\n1,0,2.2,9.03\n3,1,1.9,6.69\n"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-west-2"}
BUCKET = "tunejob-test-bucket"


@pytest.fixture
def moto_url():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    # moto keeps its state per process, across server instances: start each test from nothing
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))
    boto3.client("s3", endpoint_url=url, region_name="us-west-2").create_bucket(
        Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    yield url
    server.stop()


def spec_for(tmp_path: Path, url: str, data: Path) -> Path:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: nova-job\nbackend: bedrock\nmodel: amazon.nova-micro-v1:0:128k\ndata: {{train: {data}}}\n"
        f"hyperparameters: {{epochs: 2, learning_rate: 0.00002}}\noutput_dir: {tmp_path / 'run'}\n"
        f"bedrock: {{role_arn: 'arn:aws:iam::123456789012:role/ft', s3_bucket: {BUCKET}, endpoint_url: '{url}', poll_interval: 0.3}}\n"
    )
    return spec


def test_submit_convert_metrics_and_cancel(tmp_path, moto_url):
    data = write_chat_data(tmp_path / "d.jsonl", 30)
    env = {**os.environ, **AWS, "TUNEJOB_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(spec_for(tmp_path, moto_url, data))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    store = tmp_path / "home" / "jobs.sqlite3"
    deadline = time.time() + 120
    while time.time() < deadline and not (store.exists() and JobStore(store).list() and JobStore(store).list()[0].remote_id):
        time.sleep(0.2)
    record = JobStore(store).list()[0]
    assert record.remote_id.startswith("arn:aws:bedrock:us-west-2:")
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-west-2")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    train_key = next(k for k in keys if k.endswith("/train.jsonl"))
    rows = [json.loads(line) for line in s3.get_object(Bucket=BUCKET, Key=train_key)["Body"].read().decode().splitlines()]
    assert len(rows) == 27 and all(set(r) == {"system", "messages"} for r in rows)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    job = boto3.client("bedrock", endpoint_url=moto_url, region_name="us-west-2").get_model_customization_job(jobIdentifier=record.remote_id)
    assert job["hyperParameters"] == {"epochCount": "2", "learningRate": "2e-05"}  # Nova's names; warmup left to AWS
    assert job["clientRequestToken"] == record.tag

    # Simulated: what Bedrock writes under the output prefix as training goes (moto does not).
    out = record.detail["output"]
    s3.put_object(Bucket=BUCKET, Key=f"{out}training_artifacts/step_wise_training_metrics.csv",
                  Body=TRAIN_CSV)
    s3.put_object(Bucket=BUCKET, Key=f"{out}validation_artifacts/post_fine_tuning_validation/validation_metrics.csv", Body=VALID_CSV)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and len([r for r in read_metrics(metrics) if r["kind"] == "eval"]) == 2):
        time.sleep(0.2)
    res = run_cli("cancel", record.id, env={**AWS, "TUNEJOB_HOME": str(tmp_path / "home")})
    assert res.returncode == 0 and res.stdout.strip() == "cancelled"
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "cancelled" and summary["best_step"] == 4 and summary["best_valid_loss"] == 1.9
    recs = read_metrics(metrics)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["valid_loss"] for r in recs if r["kind"] == "eval"] == [2.2, 1.9]


def test_retried_create_makes_no_second_job(moto_url):
    from tunejob.backends.bedrock import BedrockBackend

    bedrock = boto3.client("bedrock", endpoint_url=moto_url, region_name="us-west-2")
    request = dict(jobName="tunejob-abc", customModelName="m", roleArn="arn:aws:iam::123456789012:role/ft",
                   baseModelIdentifier="amazon.nova-micro-v1:0:128k", customizationType="FINE_TUNING",
                   clientRequestToken="tunejob-abc", trainingDataConfig={"s3Uri": f"s3://{BUCKET}/t.jsonl"},
                   outputDataConfig={"s3Uri": f"s3://{BUCKET}/out/"}, hyperParameters={"epochCount": "1"})
    first = BedrockBackend._create_once(bedrock, request)
    again = BedrockBackend._create_once(bedrock, request)  # as after a lost response
    assert first == again
    assert len(bedrock.list_model_customization_jobs()["modelCustomizationJobSummaries"]) == 1


def test_bedrock_rules_fail_before_anything_is_sent(tmp_path, moto_url):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} ok"}]} for i in range(12)]
    rows[4] = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "a"}]}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_cli("run", str(spec_for(tmp_path, moto_url, data)), env={**AWS, "TUNEJOB_HOME": str(tmp_path / "home")})
    assert res.returncode == 2 and f"{data}:5:" in res.stderr and "--format bedrock" in res.stderr
    assert "Contents" not in boto3.client("s3", endpoint_url=moto_url, region_name="us-west-2").list_objects_v2(Bucket=BUCKET)


# ---------------------------------------------------------------- each model's own hyperparameters

def nova_spec(extra: str = "", model: str = "amazon.nova-micro-v1:0:128k"):
    from tunejob.spec import parse_spec

    return parse_spec(f"backend: bedrock\nmodel: {model}\ndata: {{train: x.jsonl}}\n{extra}"
                      "bedrock: {role_arn: 'arn:aws:iam::123456789012:role/ft', s3_bucket: b}\n")


# The names and ranges AWS documents per family (docs.aws.amazon.com/bedrock/latest/userguide/
# cm-hp-nova-mm.html, cm-hp-meta-llama31.html, cm-hp-anth-claude-3.html; read 2026-11-30).
DOCUMENTED = {
    "amazon.nova-micro-v1:0:128k": {"epochCount", "learningRate", "learningRateWarmupSteps"},
    "meta.llama3-1-8b-instruct-v1:0:128k": {"epochCount", "batchSize", "learningRate"},
    "anthropic.claude-3-haiku-20240307-v1:0": {"epochCount", "batchSize", "learningRateMultiplier", "earlyStoppingThreshold", "earlyStoppingPatience"},
}


@pytest.mark.parametrize("model, extra, expected", [
    ("amazon.nova-micro-v1:0:128k", "hyperparameters: {epochs: 3, learning_rate: 0.00005, warmup: 20}\n",
     {"epochCount": "3", "learningRate": "5e-05", "learningRateWarmupSteps": "20"}),
    ("amazon.nova-pro-v1:0:300k", "hyperparameters: {epochs: auto}\n", {}),  # auto: AWS's defaults
    ("meta.llama3-1-8b-instruct-v1:0:128k", "hyperparameters: {epochs: 5, batch_size: 1, learning_rate: 0.0001}\n",
     {"epochCount": "5", "batchSize": "1", "learningRate": "0.0001"}),
])
def test_hyperparameters_use_each_familys_documented_names(model, extra, expected):
    from tunejob.backends.bedrock_params import hyperparameters

    got = hyperparameters(nova_spec(extra, model))
    assert got == expected
    family = next(m for m in DOCUMENTED if m.split(".")[0] == model.split(".")[0])
    assert set(got) <= DOCUMENTED[family]


def test_claude_3_haiku_maps_until_its_end_of_life():
    import datetime

    from tunejob.backends.bedrock_params import hyperparameters
    from tunejob.errors import SpecError

    spec = nova_spec("hyperparameters: {epochs: 2, batch_size: 8, learning_rate_multiplier: 1.5}\n"
                     "checkpointing: {early_stopping_patience: 3}\n", "anthropic.claude-3-haiku-20240307-v1:0")
    before = hyperparameters(spec, today=datetime.date(2026, 6, 1))
    assert before == {"epochCount": "2", "batchSize": "8", "learningRateMultiplier": "1.5", "earlyStoppingPatience": "3"}
    assert set(before) <= DOCUMENTED["anthropic.claude-3-haiku-20240307-v1:0"]
    with pytest.raises(SpecError, match="end of life on 2026-09-10.*amazon.nova-micro.*backend: local"):
        hyperparameters(spec, today=datetime.date(2026, 11, 30))


@pytest.mark.parametrize("model, extra, message", [
    ("amazon.nova-micro-v1:0:128k", "hyperparameters: {batch_size: 8}\n", "hyperparameters.batch_size: amazon.nova-micro-v1:0:128k has no such setting"),
    ("amazon.nova-micro-v1:0:128k", "hyperparameters: {learning_rate_multiplier: 1.0}\n", "hyperparameters.learning_rate_multiplier: amazon.nova-micro"),
    ("amazon.nova-micro-v1:0:128k", "hyperparameters: {epochs: 6}\n", "outside amazon.nova-micro-v1:0:128k's range for epochCount, 1-5"),
    ("amazon.nova-micro-v1:0:128k", "hyperparameters: {warmup: 0.1}\n", "takes steps"),
    ("meta.llama3-2-1b-instruct-v1:0:128k", "hyperparameters: {batch_size: 2}\n", "range for batchSize, 1-1"),
    ("amazon.titan-text-express-v1", "", "cannot be fine-tuned on Bedrock; customizable: amazon.nova-micro"),
])
def test_a_setting_the_model_lacks_fails_in_one_line(model, extra, message):
    from tunejob.backends.bedrock_params import hyperparameters
    from tunejob.errors import SpecError

    with pytest.raises(SpecError) as err:
        hyperparameters(nova_spec(extra, model))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_requests_are_checked_against_botocores_service_model():
    from tunejob.backends.bedrock import check_request
    from tunejob.errors import BackendError

    good = dict(jobName="j", customModelName="m", roleArn="arn:aws:iam::123456789012:role/ft", baseModelIdentifier="amazon.nova-micro-v1:0:128k",
                trainingDataConfig={"s3Uri": "s3://b/t.jsonl"}, outputDataConfig={"s3Uri": "s3://b/out/"}, hyperParameters={"epochCount": "2"})
    check_request(good)
    for bad in ({**good, "hyperParameters": {"epochCount": 2}},  # the API takes strings
                {k: v for k, v in good.items() if k != "roleArn"}, {**good, "earlyStopping": True}):
        with pytest.raises(BackendError, match="does not match AWS's API"):
            check_request(bad)


# ---------------------------------------------------------------- a job to its end

@pytest.mark.parametrize("final, failure", [("Completed", None), ("Failed", "Internal error: the training data has too few tokens"), ("Stopped", None)])
def test_job_lifecycle_to_the_end(tmp_path, moto_url, monkeypatch, final, failure):
    """Moto never finishes a job, so Bedrock's answers come from botocore's Stubber (validated
    against the service model); S3 is moto's, holding the metric files where AWS writes them."""
    from botocore.stub import Stubber

    from tunejob.backends import bedrock as bedrock_mod
    from tunejob.backends.jobstore import JobStore
    from tunejob.errors import BackendError
    from tunejob.monitor.report import diagnose_run, load_run, write_report

    out = "tunejob/job/tag/output/"
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-west-2")
    s3.put_object(Bucket=BUCKET, Key=f"{out}model-customization-job-abc/training_artifacts/step_wise_training_metrics.csv", Body=TRAIN_CSV)
    s3.put_object(Bucket=BUCKET, Key=f"{out}model-customization-job-abc/validation_artifacts/post_fine_tuning_validation/validation_metrics.csv", Body=VALID_CSV)
    client = boto3.client("bedrock", region_name="us-west-2", aws_access_key_id="x", aws_secret_access_key="x")
    stub = Stubber(client)
    arn = "arn:aws:bedrock:us-west-2:123456789012:model-customization-job/amazon.nova-micro-v1:0:128k/abc"
    base = {"jobArn": arn, "jobName": "tag", "outputModelName": "m", "roleArn": "arn:aws:iam::123456789012:role/ft",
            "creationTime": datetime.datetime(2026, 11, 30), "baseModelArn": "arn:aws:bedrock:us-west-2::foundation-model/amazon.nova-micro-v1:0:128k",
            "hyperParameters": {"epochCount": "2"}, "trainingDataConfig": {"s3Uri": f"s3://{BUCKET}/t.jsonl"},
            "validationDataConfig": {"validators": [{"s3Uri": f"s3://{BUCKET}/v.jsonl"}]}, "outputDataConfig": {"s3Uri": f"s3://{BUCKET}/{out}"}}
    stub.add_response("get_model_customization_job", {**base, "status": "InProgress"}, {"jobIdentifier": arn})
    done = {**base, "status": final, **({"outputModelArn": arn.replace("model-customization-job", "custom-model")} if final == "Completed" else {}),
            **({"failureMessage": failure} if failure else {})}
    stub.add_response("get_model_customization_job", done, {"jobIdentifier": arn})
    stub.activate()
    monkeypatch.setattr(bedrock_mod, "_clients", lambda settings: (client, s3))
    data = write_chat_data(tmp_path / "d.jsonl", 12)
    spec_text = spec_for(tmp_path, moto_url, data).read_text().replace("poll_interval: 0.3", "poll_interval: 0.01")
    store = JobStore(tmp_path / "jobs.sqlite3")
    record = store.create("bedrock", "nova-job", spec_text, tmp_path / "run")
    record = store.update(record.id, remote_id=arn, status="running", detail={"output": out})
    if final == "Failed":
        with pytest.raises(BackendError, match="too few tokens"):
            bedrock_mod.BedrockBackend().watch(record, store)
    else:
        bedrock_mod.BedrockBackend().watch(record, store)
    stub.assert_no_pending_responses()
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == {"Completed": "succeeded", "Failed": "failed", "Stopped": "cancelled"}[final]
    assert summary["best_step"] == 4 and summary["best_valid_loss"] == 1.9 and summary["error"] == failure
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["train_loss"] for r in recs if r["kind"] == "train"] == [2.5, 2.1, 1.8, 1.6]
    assert [(r["step"], r["valid_loss"]) for r in recs if r["kind"] == "eval"] == [(2, 2.2), (4, 1.9)]
    assert diagnose_run(load_run(run))["verdict"]  # diagnosis reads the same stream as a local run's
    assert all(p.exists() for p in write_report(run))
