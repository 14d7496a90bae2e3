"""S3-compatible object store (AWS S3, MinIO, Ceph RGW, Cloudflare R2...) behind the ObjectStore protocol.

Credentials come from the standard AWS chain (env, shared files, instance/task roles): no key settings here.
Two clients: one talks to the store where this process reaches it (`minio:9000` inside compose), the other
only signs presigned URLs for the endpoint clients reach (`localhost:9000`); the signature covers the host,
so a URL signed for the internal name would not work from outside.
"""

import base64
import hashlib
import logging
from typing import Any, Literal, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from common.storage import ObjectNotFound, StoragePermanentError, StorageUnavailable, StoredObject

log = logging.getLogger("common.storage_s3")

NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
# a missing bucket, refused or unknown credentials: a deployment error that no retry fixes
PERMANENT_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidBucketName",
}


class S3Settings(Protocol):
    s3_bucket: str
    s3_region: str | None
    s3_endpoint_url: str | None
    s3_public_endpoint_url: str | None
    s3_addressing_style: Literal["path", "virtual", "auto"]
    presign_expiry_seconds: int


def _unavailable(op: str, key: str, exc: Exception) -> StorageUnavailable:
    """StoragePermanentError for the PERMANENT_CODES, else StorageUnavailable; the S3 error code in both."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(err.get("Code", "error"))
        detail = f"{code} (HTTP {status})"
        if code in PERMANENT_CODES:
            return StoragePermanentError(f"s3 {op} of `{key}` failed: {detail}")
    else:
        detail = type(exc).__name__
    return StorageUnavailable(f"s3 {op} of `{key}` failed: {detail}")


class S3Store:
    def __init__(
        self,
        bucket: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        addressing_style: Literal["path", "virtual", "auto"] = "auto",
        presign_expiry_seconds: int = 3600,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise ValueError("SDXL_S3_BUCKET must be set when SDXL_STORAGE_BACKEND is `s3`")
        self.bucket = bucket
        self.expiry = presign_expiry_seconds
        session = boto3.session.Session()
        # both clients must sign for the same region, or presigned URLs fail where uploads work
        self.region = region or session.region_name or "us-east-1"
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # short in-call retries of throttling, 5xx and dropped connections (botocore's standard mode, with
            # its retry quota); it never retries the PERMANENT_CODES. `common.storage.put_with_retry` rides
            # out longer outages on top of this, with a time budget botocore's attempt count cannot express
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            # botocore >= 1.36 adds CRC checksums by default, which several S3-compatible stores reject;
            # integrity is checked with Content-MD5 instead, which all of them verify
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
        )
        self.client = session.client("s3", region_name=self.region, endpoint_url=endpoint_url, config=config)
        self.presigner = (
            session.client("s3", region_name=self.region, endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self.client
        )

    @classmethod
    def from_settings(cls, settings: Any) -> "S3Store":
        s: S3Settings = settings
        return cls(
            s.s3_bucket,
            region=s.s3_region,
            endpoint_url=s.s3_endpoint_url,
            public_endpoint_url=s.s3_public_endpoint_url,
            addressing_style=s.s3_addressing_style,
            presign_expiry_seconds=s.presign_expiry_seconds,
        )

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                ContentMD5=md5,
                Metadata={**metadata, "size": str(len(data))},
            )
        except ParamValidationError:
            raise  # a programming error, not an outage: retrying cannot help
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable("put", key, exc) from exc

    def get(self, key: str) -> StoredObject:
        try:
            res = self.client.get_object(Bucket=self.bucket, Key=key)
            data = res["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in NOT_FOUND_CODES:
                raise ObjectNotFound(key) from exc
            raise _unavailable("get", key, exc) from exc
        except (BotoCoreError, OSError) as exc:  # includes a body cut off mid-read
            raise _unavailable("get", key, exc) from exc
        return StoredObject(data=data, content_type=res.get("ContentType") or "application/octet-stream")

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("refusing to delete an empty prefix (the whole bucket)")
        deleted = 0
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                # one DeleteObject per key: a generation has a handful of images, and some S3-compatible
                # stores (GCS interop, older Ceph) lack or reject multi-object DeleteObjects
                for obj in page.get("Contents", []):
                    self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
                    deleted += 1
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable("delete", prefix, exc) from exc
        return deleted

    def presigned_url(self, key: str) -> str | None:
        """Signed locally (no request to the store); None falls back to the API's own image URL."""
        try:
            url: str = self.presigner.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expiry
            )
        except BotoCoreError as exc:  # e.g. no credentials in the chain
            log.warning("could not presign %s: %s", key, type(exc).__name__)
            return None
        return url
