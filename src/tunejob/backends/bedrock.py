"""The Bedrock backend: Anthropic Claude (and other customizable models) through Amazon Bedrock
model customization, with boto3.

    validate with Bedrock's rules -> convert to {"system", "messages"} -> upload to S3
    -> CreateModelCustomizationJob (clientRequestToken and a job name both derived from the
       job's tag, so a retried create finds the first job) -> poll GetModelCustomizationJob
    -> read the metrics CSVs the job writes under its S3 output into the common stream

Bedrock writes training_artifacts/step_wise_training_metrics.csv (step_number from 0,
epoch_number, training_loss, perplexity) and validation_artifacts/post_fine_tuning_validation/
validation_metrics.csv (the same with validation_loss) under the output prefix (AWS, "Analyze the
results of a model customization job"). Hyperparameters are each base model's own
(bedrock_params.py), and the whole request is checked against botocore's service model for
CreateModelCustomizationJob before it is sent.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from tunejob.backends import bedrock_params
from tunejob.backends.remote_run import RemoteRun, say
from tunejob.data.dataset import as_messages, load_examples, split_examples
from tunejob.errors import BackendError
from tunejob.backends.jobstore import JobRecord, JobStore
from tunejob.spec import BedrockSettings, JobSpec, parse_spec

STATUS = {"InProgress": "running", "Completed": "succeeded", "Failed": "failed", "Stopping": "running", "Stopped": "cancelled"}
TRAIN_CSV, VALID_CSV = "step_wise_training_metrics.csv", "validation_metrics.csv"


def to_bedrock(example: dict) -> dict:
    """OpenAI chat example -> Bedrock's format: the system prompt beside user/assistant turns."""
    messages = as_messages(example)
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if system:
        out = {"system": system, **out}
    return out


def _clients(settings: BedrockSettings):
    import boto3

    kw = {"region_name": settings.region}
    if settings.endpoint_url:
        kw["endpoint_url"] = settings.endpoint_url
    return boto3.client("bedrock", **kw), boto3.client("s3", **kw)


def check_request(request: dict) -> None:
    """The request against botocore's own model of CreateModelCustomizationJob (shipped with
    boto3): names, types and required members, as the service itself would check them."""
    import botocore.session
    from botocore.exceptions import ParamValidationError
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("bedrock").operation_model("CreateModelCustomizationJob").input_shape
    report = ParamValidator().validate(request, shape)
    if report.has_errors():
        raise BackendError(f"the CreateModelCustomizationJob request does not match AWS's API: {ParamValidationError(report=report.generate_report())}")


def _explain(exc: Exception) -> BackendError:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return BackendError("no AWS credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile (never in the spec)")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return BackendError(f"Bedrock/S3 refused {exc.operation_name}: {err.get('Code')}: {err.get('Message')}")
    if isinstance(exc, BotoCoreError):
        return BackendError(f"cannot reach AWS: {exc}")
    return BackendError(f"{exc.__class__.__name__}: {exc}")


class BedrockBackend:
    def submit(self, spec: JobSpec, store: JobStore) -> JobRecord:
        from botocore.exceptions import BotoCoreError, ClientError

        from tunejob.data.validate import require_valid

        params = bedrock_params.hyperparameters(spec)  # this model's names and ranges, before any upload
        for path in filter(None, [spec.data.train, spec.data.validation]):
            require_valid(path, format="bedrock", method="supervised")
        settings = spec.bedrock
        record = store.create("bedrock", spec.name, spec.to_yaml(), spec.run_dir)
        say(f"job {record.id} recorded in {store.path} (re-attach any time: tunejob watch {record.id})")
        bedrock, s3 = _clients(settings)
        prefix = f"{settings.s3_prefix.strip('/')}/{spec.name}/{record.tag}"
        try:
            uris = self._upload(s3, spec, settings.s3_bucket, prefix)
            request = dict(
                jobName=record.tag, customModelName=f"{spec.name}-{record.tag[-8:]}", roleArn=settings.role_arn,
                baseModelIdentifier=spec.model, customizationType="FINE_TUNING", clientRequestToken=record.tag,
                trainingDataConfig={"s3Uri": uris["train"]}, validationDataConfig={"validators": [{"s3Uri": uris["validation"]}]},
                outputDataConfig={"s3Uri": f"s3://{settings.s3_bucket}/{prefix}/output/"}, hyperParameters=params,
            )
            check_request(request)
            arn = self._create_once(bedrock, request)
        except (ClientError, BotoCoreError) as exc:
            store.update(record.id, status="failed", detail={"error": str(_explain(exc))})
            raise _explain(exc) from None
        say(f"created {arn}")
        return store.update(record.id, remote_id=arn, status="running", detail={"output": f"{prefix}/output/"})

    def _upload(self, s3, spec: JobSpec, bucket: str, prefix: str) -> dict:
        train = load_examples(spec.data.train)
        val = load_examples(spec.data.validation) if spec.data.validation else None
        if val is None:
            train, val = split_examples(train, spec.data.val_fraction, spec.data.seed)
        uris = {}
        for role, rows in (("train", train), ("validation", val)):
            import json

            body = "".join(json.dumps(to_bedrock(ex), ensure_ascii=False) + "\n" for ex in rows).encode()
            key = f"{prefix}/{role}.jsonl"
            s3.put_object(Bucket=bucket, Key=key, Body=body)
            uris[role] = f"s3://{bucket}/{key}"
        return uris

    @staticmethod
    def _create_once(bedrock, request: dict) -> str:
        """The token makes Bedrock itself idempotent; the name lets a retry find the first job
        when a create's answer was lost (a second create with the name fails as in use)."""
        from botocore.exceptions import ClientError

        try:
            return bedrock.create_model_customization_job(**request)["jobArn"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("ResourceInUseException", "ConflictException"):
                return bedrock.get_model_customization_job(jobIdentifier=request["jobName"])["jobArn"]
            raise

    def watch(self, record: JobRecord, store: JobStore) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        spec = parse_spec(record.spec)
        settings = spec.bedrock
        bedrock, s3 = _clients(settings)
        run = RemoteRun(Path(record.run_dir), record.spec)
        try:
            while True:
                job = bedrock.get_model_customization_job(jobIdentifier=record.remote_id)
                status = STATUS.get(job["status"], job["status"])
                for r in self._metrics(s3, settings.s3_bucket, record.detail.get("output", "")):
                    run.emit(r)
                record = store.update(record.id, status=status)
                if job["status"] in ("Completed", "Failed", "Stopped"):
                    break
                time.sleep(settings.poll_interval)
        except (ClientError, BotoCoreError) as exc:
            run.stream.close()
            raise _explain(exc) from None
        summary = run.finish({"status": status, "stop_reason": status, "remote_id": record.remote_id, "provider": "bedrock",
                              "custom_model": job.get("outputModelArn"), "error": job.get("failureMessage") if status == "failed" else None})
        if status == "failed":
            raise BackendError(f"Bedrock job failed: {summary['error']}")
        return summary

    @staticmethod
    def _metrics(s3, bucket: str, output_prefix: str) -> list[dict]:
        """Metric rows the job has written so far, as stream records (per step: train, then eval)."""
        out: dict[int, dict] = {}
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=output_prefix).get("Contents", [])
        for obj in listing:
            name = obj["Key"].rsplit("/", 1)[-1]
            if name not in (TRAIN_CSV, VALID_CSV):
                continue
            text = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            for row in csv.DictReader(io.StringIO(text)):
                step = int(float(row["step_number"])) + 1  # AWS counts steps from 0; the stream from 1
                if name == TRAIN_CSV:
                    out.setdefault(step, {})["train"] = {"kind": "train", "step": step, "train_loss": float(row["training_loss"]),
                                                         "train_mean_token_accuracy": 0.0, "learning_rate": 0.0, "tokens_per_second": 0.0,
                                                         "epoch": float(row.get("epoch_number") or 0)}
                else:
                    loss = float(row["validation_loss"])
                    out.setdefault(step, {})["eval"] = {"kind": "eval", "step": step, "valid_loss": loss, "valid_mean_token_accuracy": 0.0,
                                                        "full_valid_loss": loss, "full_valid_mean_token_accuracy": None}
        return [rec for step in sorted(out) for rec in (out[step].get("train"), out[step].get("eval")) if rec]

    def cancel(self, record: JobRecord) -> str:
        spec = parse_spec(record.spec)
        bedrock, _ = _clients(spec.bedrock)
        bedrock.stop_model_customization_job(jobIdentifier=record.remote_id)
        return STATUS.get(bedrock.get_model_customization_job(jobIdentifier=record.remote_id)["status"], "cancelled")
