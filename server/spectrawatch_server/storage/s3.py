"""S3-compatible blob store (AWS S3, MinIO, Ceph RGW, Garage...), same interface as LocalBlobStore.

``SPECTRAWATCH_BLOB_URL=s3://bucket/prefix`` selects it; ``SPECTRAWATCH_S3_ENDPOINT_URL`` points at
a non-AWS server; credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, a profile, an instance role). Uploads stream into a local temp file
(the API validates the body from it) and become visible with one PUT, which S3 makes atomic:
a reader sees the whole object or none. Large bodies go up as a multipart upload; an upload
abandoned by a crash is aborted by :meth:`S3BlobStore.clear_temp` at start-up.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

from spectrawatch_server.config import ServerSettings, parse_s3_url
from spectrawatch_server.storage.blobs import BlobStoreFull, LocalBlobStore


class S3BlobStore:
    """Blobs as objects ``<prefix>/<key>`` in ``bucket``; keys are relative '/'-paths."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        if client is None:
            import boto3  # the [scale] extra

            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.spool_dir = spool_dir
        if spool_dir is not None:
            spool_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3BlobStore:
        """``s3://bucket/optional/prefix`` -> store."""
        return cls(*parse_s3_url(url), **kwargs)

    def object_key(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(p in {"", ".", ".."} for p in parts):
            raise ValueError(f"invalid blob key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def new_upload(self) -> BinaryIO:
        """A local temp file to stream an upload into (removed when closed)."""
        return tempfile.TemporaryFile(dir=self.spool_dir)

    def commit_upload(self, upload: BinaryIO, key: str) -> None:
        """PUT the upload as ``key`` (atomic for readers), then drop the temp file."""
        from botocore.exceptions import ClientError

        try:
            upload.flush()
            upload.seek(0)
            self.client.upload_fileobj(upload, self.bucket, self.object_key(key))
        except ClientError as exc:
            if _error_code(exc) in {"QuotaExceeded", "EntityTooLarge", "InsufficientStorage"}:
                raise BlobStoreFull(28, f"blob store refused the object: {exc}") from exc
            raise
        finally:
            upload.close()

    def abort_upload(self, upload: BinaryIO) -> None:
        upload.close()

    def exists(self, key: str) -> bool:
        """Whether the object is there (a HEAD request)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _error_code(exc) in {"NoSuchKey", "404", "NotFound"}:
                return False
            raise
        return True

    def read(self, key: str) -> bytes:
        """The object's bytes; a missing object raises FileNotFoundError, as a missing file."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _error_code(exc) in {"NoSuchKey", "404"}:
                raise FileNotFoundError(f"no blob {key!r} in s3://{self.bucket}") from exc
            raise
        body: bytes = response["Body"].read()
        return body

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    def keys(self, min_age_seconds: float = 0.0) -> list[str]:
        """Blob keys whose object was last modified at least ``min_age_seconds`` ago."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=min_age_seconds)
        start = f"{self.prefix}/" if self.prefix else ""
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                if obj["LastModified"] <= cutoff:
                    out.append(obj["Key"][len(start) :])
        return out

    def clear_temp(self, min_age_seconds: float = 0.0) -> int:
        """Abort multipart uploads left unfinished (by a crash) at least that long ago."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=min_age_seconds)
        start = f"{self.prefix}/" if self.prefix else ""
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] <= cutoff:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return aborted


def open_blob_store(settings: ServerSettings) -> LocalBlobStore | S3BlobStore:
    """The store the settings name: ``blob_url`` (S3) when set, else the local ``blob_dir``."""
    if settings.blob_url:
        return S3BlobStore.from_url(
            settings.blob_url,
            endpoint_url=settings.s3_endpoint_url or None,  # compose passes unset as ""
            region=settings.s3_region or None,
            spool_dir=settings.data_dir / "spool",
        )
    return LocalBlobStore(settings.resolved_blob_dir)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
