"""The one URL -> filesystem resolver (`core.storage`), against moto's S3 server: the bucket's
own region, and a missing bucket, a refusal and missing credentials said in one line with exit 2.

What moto enforces (moto 5.2, checked): not regions (any region reads any bucket; HeadBucket does
return the bucket's `x-amz-bucket-region`), so the region tests check that the filesystem the read
tasks get carries the detected region; a bucket policy's Deny on object operations (403 on
GetObject / HeadObject / PutObject, not on HeadBucket or listing), even without IAM auth; and no
signatures: unsigned requests are served, so "no credentials" is a refusal by such a policy."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from prep_factory import plain_shards

from data_prep.sources import reader
from core.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    WrongRegionError,
    read_text,
    resolve,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eu_bucket(s3_server, tmp_path_factory):
    """A bucket in eu-west-1 holding one webdataset shard, while the environment says us-east-1."""
    import boto3

    source = plain_shards(tmp_path_factory.mktemp("eu-src"), shards=1, per_shard=3)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="eu-shards", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.upload_file(str(source / "shard-000.tar"), "eu-shards", "web/shard-000.tar")
    return "eu-shards"


@pytest.fixture(scope="module")
def denied_bucket(s3_server):
    """A bucket whose policy denies every object operation to everyone (moto enforces that much)."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="denied-cache")
    s3.put_object(Bucket="denied-cache", Key="cache/manifest.json", Body=b"{}")
    statement = {"Effect": "Deny", "Principal": "*", "Action": "s3:*", "Resource": ["arn:aws:s3:::denied-cache/*"]}
    s3.put_bucket_policy(Bucket="denied-cache", Policy=json.dumps({"Version": "2012-10-17", "Statement": [statement]}))
    return "denied-cache"


def test_an_s3_url_gets_the_bucket_region_not_the_default(eu_bucket, monkeypatch):
    """The listing's filesystem has eu-west-1 with AWS_DEFAULT_REGION=us-east-1, and keeps it when
    pickled (how Ray hands it to the read tasks). `FileSystem.from_uri` took the default region when
    an endpoint was set."""
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    fs, shards = reader("webdataset").list_shards(f"s3://{eu_bucket}/web/shard-*.tar")
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "eu-west-1"
    assert shards == [(f"s3://{eu_bucket}/web/shard-000.tar", f"{eu_bucket}/web/shard-000.tar")]
    assert pickle.loads(pickle.dumps(fs)).region == "eu-west-1"
    fs, path = resolve(f"s3://{eu_bucket}/cache/")
    assert (fs.region, path) == ("eu-west-1", f"{eu_bucket}/cache")
    assert resolve(f"s3://{eu_bucket}/cache?region=eu-west-1")[1] == f"{eu_bucket}/cache"
    with pytest.raises(WrongRegionError, match=r"s3://eu-shards: the bucket is in region eu-west-1, the URL says \?region=us-east-1"):
        resolve(f"s3://{eu_bucket}/cache?region=us-east-1")


def test_read_tasks_read_with_the_filesystem_of_the_listing(tmp_path):
    """A read task uses the filesystem it is given, never one rebuilt from the shard URL (which would
    take the worker's default region): here the URL names S3, the filesystem is local."""
    from data_prep.config import SourceConfig
    from data_prep.operators import read_shard

    source = plain_shards(tmp_path, shards=1, per_shard=2)
    row = {"shard_url": "s3://elsewhere/shard-000.tar", "path": str(source / "shard-000.tar")}
    samples = list(read_shard(row, SourceConfig(url="unused", format="webdataset"), pafs.LocalFileSystem()))
    assert [s["key"] for s in samples] == ["s0/img0", "s0/img1"] and all(s["drop_reason"] == "" for s in samples)


def test_a_missing_bucket_is_said_not_read_as_an_empty_cache(s3_server):
    with pytest.raises(BucketNotFoundError, match=r"s3://no-such-bucket-here: no such bucket at http://127\.0\.0\.1:\d+\. Create it"):
        resolve("s3://no-such-bucket-here/cache")


def test_a_refused_read_is_access_denied(denied_bucket):
    fs, root = resolve(f"s3://{denied_bucket}/cache")
    with pytest.raises(AccessDeniedError, match=r"s3://denied-cache/cache/manifest.json: access denied"):
        read_text(fs, f"{root}/manifest.json")


def _prep_cli(tmp_path, output: str, env: dict) -> subprocess.CompletedProcess:
    source = plain_shards(tmp_path / "src", shards=1, per_shard=2)
    command = [sys.executable, "-m", "pipelines.prep", "--set", f"source.url={source}", "--set", "source.format=webdataset",
               "--set", f"output.url={output}", "--set", "encode.flavor=tiny", "--set", "encode.resolution=128"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("wuerstchen ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_prep_into_a_missing_bucket_exits_2_saying_so(s3_server, tmp_path):
    line = _one_line_error(_prep_cli(tmp_path, "s3://no-such-prep-bucket/cache", dict(os.environ)))
    assert line.startswith("wuerstchen prep: s3://no-such-prep-bucket: no such bucket")


def test_train_on_a_cache_in_a_missing_bucket_exits_2_saying_so(s3_server):
    """Not "no cache at ...": the bucket itself is missing."""
    command = [sys.executable, "-m", "pipelines.train", "--set", "data.cache=s3://no-such-train-bucket/cache",
               "--set", "model.flavor=tiny"]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    line = _one_line_error(result)
    assert line.startswith("wuerstchen train: s3://no-such-train-bucket: no such bucket")


def test_prep_refused_by_the_bucket_exits_2_saying_so(denied_bucket, tmp_path):
    line = _one_line_error(_prep_cli(tmp_path, f"s3://{denied_bucket}/cache", dict(os.environ)))
    assert line.startswith("wuerstchen prep: s3://denied-cache/cache/manifest.json: access denied")


def test_prep_without_credentials_exits_2_saying_so(denied_bucket, tmp_path):
    """No credentials anywhere (environment, files, instance metadata): the bucket is tried
    anonymously, refused, and the message says that credentials are missing."""
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    line = _one_line_error(_prep_cli(tmp_path, f"s3://{denied_bucket}/cache", env))
    assert line.startswith("wuerstchen prep: s3://denied-cache/cache/manifest.json: no AWS credentials were found")
