"""A real S3-compatible server on loopback for tests: moto's threaded server on a free port of 127.0.0.1.

``running_s3_server()`` starts it, points the AWS environment at it (``AWS_ENDPOINT_URL``, dummy keys, a
region: what ``pyarrow.fs`` and boto3 read, and what regionflow forwards to Ray read tasks), creates a
bucket, and on exit stops the server and restores the environment exactly. Nothing leaves the machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
DEFAULT_BUCKET = "regionflow-test"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """A running server and a bucket on it.

    Attributes:
        endpoint_url: ``http://127.0.0.1:<port>``.
        bucket: the bucket created at start.
        client: a boto3 S3 client bound to the server.
    """

    endpoint_url: str
    bucket: str
    client: Any

    def url(self, key: str) -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.bucket}/{key}"

    def upload(self, path: Path, key: str) -> str:
        """Upload a local file to ``key``; returns its ``s3://`` URL."""
        self.client.upload_file(str(path), self.bucket, key)
        return self.url(key)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix``, sorted."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)


def aws_environment(endpoint_url: str) -> dict[str, str]:
    """The variables that point pyarrow.fs and boto3 at ``endpoint_url`` (dummy credentials)."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",  # never probe the instance-metadata service for credentials
    }


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the ``with`` block; restore each one exactly (unset if it was) after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def running_s3_server(bucket: str = DEFAULT_BUCKET) -> Iterator[S3Server]:
    """Start moto's S3 server on a free loopback port, set the AWS environment, create ``bucket``.

    Raises:
        ImportError: moto[server] or boto3 is not installed (callers ``pytest.importorskip`` first).
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with environment(**aws_environment(endpoint)):
            client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
            client.create_bucket(Bucket=bucket)
            yield S3Server(endpoint, bucket, client)
    finally:
        server.stop()
