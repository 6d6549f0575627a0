"""A real S3-compatible HTTP server on 127.0.0.1 for tests: moto's ``moto_server``.

``S3Server`` runs the venv's ``moto_server`` (from ``moto[server]``, a dev dependency) as a
subprocess on a free port. Nothing is mocked inside the test process: pyarrow and Ray Train
talk HTTP to it as they would to AWS, through the environment alone (Ray Data resolves
``s3://`` through the same ``from_uri``)::

    server = S3Server()
    server.start()
    os.environ.update(server.env())
    server.create_bucket("bkt")
    fs, path = pyarrow.fs.FileSystem.from_uri("s3://bkt/x.parquet")  # talks to the server

What the environment does (pyarrow 26, checked by experiment):

* ``pyarrow.fs.FileSystem.from_uri("s3://...")`` - and so Ray Train's ``storage_path`` and
  ``ray.train.Checkpoint(path="s3://...")`` - takes the endpoint from ``AWS_ENDPOINT_URL_S3``,
  else ``AWS_ENDPOINT_URL``. The scheme must be in the value (``http://127.0.0.1:PORT``):
  without one pyarrow speaks HTTPS and fails with a TLS "wrong version number" error.
  ``s3://bkt/key?endpoint_override=127.0.0.1:PORT&scheme=http`` (or
  ``endpoint_override=http://127.0.0.1:PORT``) works too, without any endpoint variable.
* ``pyarrow.fs.S3FileSystem()`` built with no arguments IGNORES both endpoint variables and
  goes to ``<bucket>.s3.<region>.amazonaws.com`` (apache/arrow#49643); pass
  ``endpoint_override=`` (``S3Server.filesystem()`` does).
* credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; region:
  ``AWS_DEFAULT_REGION`` or ``AWS_REGION`` (us-east-1 when neither is set).
  ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` are ignored: pyarrow installs its own retry
  strategy (3 attempts), so with the environment alone a refused connection fails after about
  6 s and a server that accepts but never answers after about 100 s. Only
  ``S3FileSystem(retry_strategy=..., connect_timeout=..., request_timeout=...)`` changes that;
  ``from_uri`` accepts no such query parameters.

moto quirks that matter for tests:

* It keeps everything in memory and has no persistence: a stopped server has lost every
  bucket and object when started again. (Its request recorder, ``MOTO_ENABLE_RECORDING``,
  cannot stand in: it does not record pyarrow's chunked upload bodies and its replay reuses
  the old multipart upload ids, so replayed uploads fail.) ``stop(keep_data=True)`` copies
  the buckets and objects out first and ``start()`` puts them back: an outage that loses
  nothing but unfinished uploads and whatever was written during the copy.
* It accepts any credentials, and requests with none: pyarrow then sends unsigned
  ``aws-chunked`` uploads, which moto stores *with the chunk framing in the object* (a
  Parquet file written that way no longer reads). ``env()`` therefore always carries keys.
  ``require_auth()`` makes moto check keys (wrong ones then fail with ACCESS_DENIED /
  INVALID_ACCESS_KEY_ID / SIGNATURE_DOES_NOT_MATCH, as on AWS), but unsigned requests then
  get HTTP 500 with retries rather than AWS's 403: missing credentials cannot be reproduced
  faithfully.

Ray workers read their environment when they start: variables set in the driver after
``ray.init`` never reach the workers of that Ray. Apply ``env()`` before ``ray.init``
(``session_server()`` fixes the port early so that can happen before the server runs), or
hand it to a cluster: ``LocalRayCluster(env=server.env())``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
# Settings that could make pyarrow or boto3 look elsewhere for credentials or endpoints.
UNSET_VARS = (
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """``moto_server -H 127.0.0.1 -p PORT`` in its own process group.

    The port is fixed at construction, so ``env()`` is known before ``start()``; ``start()``
    after ``stop()`` comes back on the same port (and ``env()`` stays valid)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.workdir = tempfile.mkdtemp(prefix="moto")
        self.log_path = os.path.join(self.workdir, "moto_server.log")
        self._process: subprocess.Popen | None = None
        self._log_start = 0
        self._snapshot: dict[str, dict[str, bytes]] | None = None
        self._credentials = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    # -- process ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it answers HTTP; restores a ``keep_data`` copy."""
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        log = open(self.log_path, "a")
        self._log_start = log.tell()  # this start's part of the log (restarts append)
        try:
            self._process = subprocess.Popen(
                [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)],
                cwd=self.workdir,  # anything moto writes lands here
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # stop() kills the whole group
            )
        finally:
            log.close()
        atexit.register(self.stop)  # no server outlives a test process that forgot stop()
        self._wait_until_up(timeout)
        if self._snapshot is not None:
            self._restore(self._snapshot)
            self._snapshot = None

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"moto_server on port {self.port} exited with {self._process.returncode}:\n"
                    f"{self.log()}"
                )
            # Werkzeug logs "Running on" once it holds the port: an answer before that could
            # come from another program on the port (then moto exits: "Address already in use").
            if f"Running on {self.endpoint}" in self._log_since_start():
                try:
                    urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                    return
                except urllib.error.HTTPError:
                    return  # an HTTP answer, even an error, means it is serving
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"moto_server did not answer on {self.endpoint} within {timeout} s:\n"
                    f"{self.log()}"
                )
            time.sleep(0.1)

    def stop(self, keep_data: bool = False) -> None:
        """Kill the server (SIGKILL to its process group). Its data is gone, unless
        ``keep_data``: then buckets and objects are copied out first and the next
        ``start()`` puts them back. Uploads in flight are lost either way."""
        if keep_data and self.running:
            self._snapshot = self._copy_out()
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
            self._process = None
            atexit.unregister(self.stop)

    def _log_since_start(self) -> str:
        with open(self.log_path, errors="replace") as f:
            f.seek(self._log_start)
            return f.read()

    def log(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError), open(self.log_path) as f:
            return f.read()[-chars:]
        return ""

    @contextlib.contextmanager
    def running_server(self) -> Iterator[S3Server]:
        try:
            self.start()
            yield self
        finally:
            self.stop()

    # -- how clients reach it -------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Variables that point ``from_uri("s3://...")``, boto3 and Ray at this server."""
        return {
            # from_uri reads AWS_ENDPOINT_URL_S3 first: set both so neither can point away.
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            **self._credentials,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an EC2 metadata service
        }

    def filesystem(self, timeout: float = 2, **kwargs):
        """A ``pyarrow.fs.S3FileSystem`` on this server that fails fast: one attempt and
        ``timeout`` seconds to connect or to see a byte, where the environment-only path
        retries for 6 s (refused) to 100 s (no answer)."""
        import pyarrow.fs

        options = dict(
            endpoint_override=self.endpoint,
            access_key=self._credentials["AWS_ACCESS_KEY_ID"],
            secret_key=self._credentials["AWS_SECRET_ACCESS_KEY"],
            region=REGION,
            connect_timeout=timeout,
            request_timeout=timeout,
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        options.update(kwargs)
        return pyarrow.fs.S3FileSystem(**options)

    def client(self, service: str = "s3"):
        """A boto3 client on this server (explicit settings: no environment needed)."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=self._credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self._credentials["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
        )

    # -- contents ---------------------------------------------------------------------------

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 lowercase letters, digits, dots, hyphens); returns
        ``s3://name``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def _copy_out(self) -> dict[str, dict[str, bytes]]:
        s3 = self.client()
        return {
            bucket["Name"]: {
                key: s3.get_object(Bucket=bucket["Name"], Key=key)["Body"].read()
                for key in self.list_keys(bucket["Name"])
            }
            for bucket in s3.list_buckets()["Buckets"]
        }

    def _restore(self, snapshot: dict[str, dict[str, bytes]]) -> None:
        s3 = self.client()
        for bucket, objects in snapshot.items():
            s3.create_bucket(Bucket=bucket)
            for key, body in objects.items():
                s3.put_object(Bucket=bucket, Key=key, Body=body)

    def require_auth(self) -> dict[str, str]:
        """From now on moto checks keys. Creates an IAM user allowed everything and returns
        its keys as environment variables; ``env()`` carries them from then on. Keys that
        are wrong then fail as on AWS; requests with none get HTTP 500 (see the module
        docstring). A restart turns the check off again. ``os.environ`` is not changed: apply
        ``env()`` again. Use it on a server of a test's own, not on ``session_server()``."""
        import json

        # The three IAM calls below are the last ones moto lets through unchecked.
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"3",
            method="POST",
            headers={"Content-Type": "text/plain"},  # the count is read from the raw body
        )
        urllib.request.urlopen(request, timeout=10).read()
        iam = self.client("iam")
        iam.create_user(UserName="rayrm-test")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="rayrm-test", PolicyName="all", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="rayrm-test")["AccessKey"]
        self._credentials = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }
        return dict(self._credentials)


_SESSION_SERVER: S3Server | None = None


def session_server() -> S3Server:
    """The test session's one server: its port (and so ``env()``) is fixed by the first call,
    before it is started, so a ``ray.init`` can be given the environment ahead of time."""
    global _SESSION_SERVER
    if _SESSION_SERVER is None:
        _SESSION_SERVER = S3Server()
    return _SESSION_SERVER


@contextlib.contextmanager
def patched_environ(values: dict[str, str], unset=UNSET_VARS) -> Iterator[None]:
    """``os.environ`` with ``values`` set and ``unset`` removed; restored afterwards."""
    saved = {k: os.environ.get(k) for k in (*values, *unset)}
    for name in unset:
        os.environ.pop(name, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's running moto server, its ``env()`` in ``os.environ`` for the session.

    Only this process and the processes it starts from now on see the variables: a Ray
    already running (conftest's ``ray_session``) keeps the environment it started with,
    unless it was started with ``session_server().env()`` (see the module docstring)."""
    server = session_server()
    with patched_environ(server.env()):
        server.start()
        try:
            yield server
        finally:
            server.stop()
