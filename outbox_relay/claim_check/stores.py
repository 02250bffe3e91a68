"""Where large payloads go: a filesystem path or an S3-compatible bucket.

Both are written the same way: an object is named by its message id (or, for
`enqueue_large`, by an upload id under `uploads/`), written whole or not at all, and
never changed: a second put of the same name with the same SHA-256 reuses the object
(a relay killed between the upload and the broker's ack uploads nothing twice).

Credentials for S3 come from the environment only (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a role: boto3's own chain); the config names the
bucket, never a secret. boto3 is synchronous: the relay calls these in threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from outbox_relay.claim_check.envelope import ClaimCheckError
from outbox_relay.config import FileStoreConfig, S3StoreConfig
from outbox_relay.errors import ConfigError

UPLOADS = "uploads/"  # enqueue_large's objects: the only ones `claim-check sweep` considers


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store(Protocol):
    @property
    def where(self) -> str:
        """The store's place, as logs and /readyz name it (no secret in it)."""

    def put(self, name: str, data: bytes, sha256: str, content_type: str) -> str:
        """Write `data` as `name` (reusing an object of that name and hash); its URL."""

    def get(self, url: str, max_size: int | None = None) -> bytes:
        """The object's bytes; ClaimCheckError when it is missing or over `max_size`."""

    def uploads(self) -> Iterator[tuple[str, datetime]]:
        """Every object under uploads/, with when it was written."""

    def delete(self, url: str) -> None: ...

    def probe(self) -> None:
        """Raise if the store does not answer, or refuses the relay (`check`)."""


class FileStore:
    def __init__(self, path: str | os.PathLike[str]):
        self._root = Path(path).absolute()

    @property
    def where(self) -> str:
        return self._root.as_uri()

    def _path(self, name: str) -> Path:
        return self._root / name

    def put(self, name: str, data: bytes, sha256: str, content_type: str) -> str:
        target = self._path(name)
        try:
            if target.stat().st_size == len(data) and sha256_of(target.read_bytes()) == sha256:
                return target.as_uri()
        except FileNotFoundError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: written aside, flushed, then renamed over the name.
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                # Readable by the consumers that share the volume (mkstemp makes 0600),
                # as far as the process's umask allows, as a file it wrote plainly.
                os.fchmod(out.fileno(), 0o666 & ~_umask())
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        # The rename itself made durable: the broker's ack comes after this returns.
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return target.as_uri()

    def _local(self, url: str) -> Path:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "file":
            raise ClaimCheckError(f"not a file URL: {url}")
        return Path(urllib.parse.unquote(parts.path))

    def get(self, url: str, max_size: int | None = None) -> bytes:
        path = self._local(url)
        try:
            size = path.stat().st_size
            if max_size is not None and size > max_size:
                raise ClaimCheckError(f"claim-check object {url} has {size} bytes, the envelope says {max_size}")
            return path.read_bytes()
        except FileNotFoundError:
            raise ClaimCheckError(f"claim-check object {url} does not exist") from None
        except PermissionError:
            raise ClaimCheckError(f"claim-check object {url} is not readable by this process") from None

    def uploads(self) -> Iterator[tuple[str, datetime]]:
        root = self._path(UPLOADS)
        if not root.is_dir():
            return
        for path in sorted(root.iterdir()):
            if path.is_file() and not path.name.startswith(".upload-"):
                yield path.as_uri(), datetime.fromtimestamp(path.stat().st_mtime, UTC)

    def delete(self, url: str) -> None:
        self._local(url).unlink(missing_ok=True)

    def probe(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        if not os.access(self._root, os.W_OK | os.X_OK):
            raise ClaimCheckError(f"{self._root} is not writable by this process")


class S3Store:
    def __init__(self, config: S3StoreConfig):
        try:  # the s3 extra: only a relay that uses an S3 store needs it
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError:
            raise ConfigError(
                "an s3 claim-check store needs boto3: pip install 'outbox-relay[s3]'", path="claim_check.store"
            ) from None

        self._config = config
        self._bucket = config.bucket
        self._prefix = config.prefix
        boto = BotoConfig(
            connect_timeout=5,
            read_timeout=config.timeout,
            retries={"max_attempts": 2, "mode": "standard"},
            # An endpoint of our own (SeaweedFS, MinIO, Ceph) serves buckets by path.
            s3={"addressing_style": "path"} if config.endpoint_url else None,
        )
        # A session of its own: the environment as it is now, not credentials a default
        # session resolved earlier in this process.
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            # The config's region, else the environment's (AWS_REGION...), else us-east-1,
            # which S3-compatible servers accept whatever they call theirs.
            region_name=config.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
            verify=config.ca_file or None,
            config=boto,
        )

    @property
    def where(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}"

    def _url(self, key: str) -> str:
        return f"s3://{self._bucket}/{key}"

    def _key(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "s3" or parts.netloc != self._bucket:
            raise ClaimCheckError(f"{url} is not in bucket {self._bucket}")
        return parts.path.lstrip("/")

    def put(self, name: str, data: bytes, sha256: str, content_type: str) -> str:
        from botocore.exceptions import ClientError

        key = self._prefix + name
        try:
            head = self._client.head_object(Bucket=self._bucket, Key=key)
            if head.get("ContentLength") == len(data) and head.get("Metadata", {}).get("sha256") == sha256:
                return self._url(key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
        extra: dict[str, str] = {}
        if self._config.server_side_encryption:
            extra["ServerSideEncryption"] = self._config.server_side_encryption
            if self._config.kms_key_id:
                extra["SSEKMSKeyId"] = self._config.kms_key_id
        self._client.put_object(
            Bucket=self._bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            Metadata={"sha256": sha256},
            **extra,
        )
        return self._url(key)

    def get(self, url: str, max_size: int | None = None) -> bytes:
        from botocore.exceptions import ClientError

        try:
            answer = self._client.get_object(Bucket=self._bucket, Key=self._key(url))
            size = answer.get("ContentLength")
            if max_size is not None and size is not None and size > max_size:
                answer["Body"].close()
                raise ClaimCheckError(f"claim-check object {url} has {size} bytes, the envelope says {max_size}")
            return bytes(answer["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ClaimCheckError(f"claim-check object {url} does not exist") from None
            raise

    def uploads(self) -> Iterator[tuple[str, datetime]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=self._prefix + UPLOADS
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield self._url(item["Key"]), item["LastModified"]

    def delete(self, url: str) -> None:
        self._client.delete_object(Bucket=self._bucket, Key=self._key(url))

    def probe(self) -> None:
        # The bucket (HeadBucket: a missing one is a 404 here), then what an upload does
        # first (HeadObject) on a name no upload uses: a 404 says the identity is let in.
        from botocore.exceptions import ClientError

        self._client.head_bucket(Bucket=self._bucket)
        try:
            self._client.head_object(Bucket=self._bucket, Key=f"{self._prefix}.outbox-relay-check")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise


def _proc_umask() -> int | None:
    """The process's umask as Linux tells it (/proc): reading it changes nothing."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return None


def _read_umask() -> int:
    """The umask, from /proc, else by setting and restoring it: once, at import, before
    any upload thread runs (two threads doing that at once could leave it at 0 for the
    whole process)."""
    mask = _proc_umask()
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK = _read_umask()


def _umask() -> int:
    """The umask now (an application may set it after importing this); where /proc does
    not say, the one read at import."""
    mask = _proc_umask()
    return _UMASK if mask is None else mask


def open_store(config: FileStoreConfig | S3StoreConfig) -> Store:
    """The store a `claim_check.store` block names: a FileStore or an S3Store."""
    if isinstance(config, FileStoreConfig):
        return FileStore(config.path)
    return S3Store(config)
