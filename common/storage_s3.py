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
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from common.storage import ObjectNotFound, StoragePermanentError, StorageUnavailable, StoredObject

log = logging.getLogger("common.storage_s3")

NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
# a missing bucket, refused or unknown credentials, a request signed for the wrong region: a deployment error
# that no retry fixes
PERMANENT_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidBucketName",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
}
# what the operator should look at, appended to a check's message
HINTS = {
    "NoSuchBucket": "create the bucket or fix SDXL_S3_BUCKET",
    "AccessDenied": "the credentials lack s3:ListBucket (and object read/write) on this bucket",
    "InvalidAccessKeyId": "the store does not know this access key: check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret does not match the access key: check AWS_SECRET_ACCESS_KEY",
    "AuthorizationHeaderMalformed": "the requests are signed for another region: check SDXL_S3_REGION",
    "NoCredentialsError": "no credentials in the AWS chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, an instance role)",
    "EndpointConnectionError": "nothing answers at the endpoint: check SDXL_S3_ENDPOINT_URL and the network",
}
# no usable credentials at all: a deployment error at a check (a job's put still retries it: an instance role's
# credentials can be missing for a moment)
CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError)


class S3Settings(Protocol):
    s3_bucket: str
    s3_region: str | None
    s3_endpoint_url: str | None
    s3_public_endpoint_url: str | None
    s3_addressing_style: Literal["path", "virtual", "auto"]
    presign_expiry_seconds: int


def _describe(exc: Exception) -> tuple[str, str, bool]:
    """(code, detail, permanent): the S3 error code (or botocore's exception name) and what it said."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(err.get("Code", "error"))
        message = err.get("Message")
        detail = f"{code} (HTTP {status})" + (f": {message}" if message and message != code else "")
        return code, detail, code in PERMANENT_CODES
    code = type(exc).__name__
    return code, f"{code}: {exc}", False


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
        # the readiness check's own client: one attempt with short timeouts, so that /readyz answers quickly
        # and a check never waits out botocore's backoff
        self.probe = session.client(
            "s3",
            region_name=self.region,
            endpoint_url=endpoint_url,
            config=config.merge(
                Config(connect_timeout=2, read_timeout=5, retries={"mode": "standard", "total_max_attempts": 1})
            ),
        )
        self.endpoint = str(self.client.meta.endpoint_url)

    @property
    def location(self) -> str:
        return f"s3 bucket `{self.bucket}` at {self.endpoint}"

    def _unavailable(self, op: str, key: str, exc: Exception) -> StorageUnavailable:
        """StoragePermanentError for the PERMANENT_CODES, else StorageUnavailable; the message names the
        bucket, the endpoint and the S3 error code (a job's `storage_unavailable` error carries it)."""
        code, detail, permanent = _describe(exc)
        cls = StoragePermanentError if permanent else StorageUnavailable
        return cls(f"s3 {op} of `{key}` in {self.location} failed: {detail}", code=code)

    def check(self) -> None:
        """HEAD on the bucket. A HEAD answer carries no error code, so a refused one is asked again as a
        one-key listing (the same s3:ListBucket permission), whose answer names it: NoSuchBucket,
        AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch..."""
        try:
            self.probe.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            head = exc
        except ParamValidationError as exc:  # a bucket name botocore refuses to send
            raise StoragePermanentError(f"{self.location} is not usable: {exc}", code="InvalidBucketName") from exc
        except BotoCoreError as exc:
            raise self._check_error(exc) from exc
        try:
            self.probe.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except (BotoCoreError, ClientError) as exc:
            raise self._check_error(exc) from exc
        # the listing works where the HEAD did not (a store that refuses HEAD on buckets): usable
        log.info("HEAD on %s answered %s, a listing works: treated as usable", self.location,
                 _describe(head)[1])

    def _check_error(self, exc: Exception) -> StorageUnavailable:
        code, detail, permanent = _describe(exc)
        permanent = permanent or isinstance(exc, CREDENTIAL_ERRORS)
        hint = HINTS.get(code)
        cls = StoragePermanentError if permanent else StorageUnavailable
        return cls(f"{self.location} is not usable: {detail}" + (f" ({hint})" if hint else ""), code=code)

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
            raise self._unavailable("put", key, exc) from exc

    def get(self, key: str) -> StoredObject:
        try:
            res = self.client.get_object(Bucket=self.bucket, Key=key)
            data = res["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in NOT_FOUND_CODES:
                raise ObjectNotFound(key) from exc
            raise self._unavailable("get", key, exc) from exc
        except (BotoCoreError, OSError) as exc:  # includes a body cut off mid-read
            raise self._unavailable("get", key, exc) from exc
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
            raise self._unavailable("delete", prefix, exc) from exc
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
