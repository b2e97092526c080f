"""A real S3-compatible server on 127.0.0.1 for the object-storage tests: moto in server mode, as a subprocess.

    with s3_server() as s3:          # s3.env: the standard variables a user sets; s3.url("bucket/key")
        with s3.environment():       # os.environ holds them for the block (Ray workers started inside inherit them)
            ...

Only the standard variables are set (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``MLFLOW_S3_ENDPOINT_URL``): what README tells users, nothing more.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import unittest.mock
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def environment(self):
        """``os.environ`` holds :attr:`env` for the block, as it was after it."""
        return unittest.mock.patch.dict(os.environ, self.env)

    def client(self):
        import boto3

        env = self.env
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket (what any reader of the bucket can see)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@contextlib.contextmanager
def s3_server(bucket: str = "mdlm") -> Iterator[S3Server]:
    """Start ``moto.server`` on a free 127.0.0.1 port, create ``bucket``, stop the server (by PID) after."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        server = S3Server(endpoint, bucket, process)
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
