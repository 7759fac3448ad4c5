"""backend: bedrock against moto in server mode on 127.0.0.1 (real boto3 clients over HTTP).

moto cannot emulate: a job ever reaching Completed (it stays InProgress until stopped), Bedrock
writing the metrics CSVs (the test writes them where Bedrock would), clientRequestToken semantics
(moto rejects a second create by name, which tunejob's lookup handles), and validation of
hyperparameters or data. Those parts are marked below."""

from __future__ import annotations

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
        f"name: claude-job\nbackend: bedrock\nmodel: anthropic.claude-3-haiku-20240307-v1:0\ndata: {{train: {data}}}\n"
        f"hyperparameters: {{epochs: 2, batch_size: 8, learning_rate_multiplier: 1.0}}\noutput_dir: {tmp_path / 'run'}\n"
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
    assert job["hyperParameters"]["epochCount"] == "2" and job["hyperParameters"]["earlyStoppingEnabled"] == "true"
    assert job["clientRequestToken"] == record.tag

    # Simulated: what Bedrock writes under the output prefix as training goes (moto does not).
    out = record.detail["output"]
    s3.put_object(Bucket=BUCKET, Key=f"{out}training_artifacts/step_wise_training_metrics.csv",
                  Body=b"step_number,epoch_number,training_loss\n1,0,2.5\n2,0,2.1\n3,1,1.8\n4,1,1.6\n")
    s3.put_object(Bucket=BUCKET, Key=f"{out}validation_artifacts/post_fine_tuning_validation/validation/validation_metrics.csv",
                  Body=b"step_number,epoch_number,validation_loss\n2,0,2.2\n4,1,1.9\n")
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
                   baseModelIdentifier="anthropic.claude-3-haiku-20240307-v1:0", customizationType="FINE_TUNING",
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
