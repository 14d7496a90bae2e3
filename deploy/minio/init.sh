#!/bin/sh
# One-shot MinIO initialisation, run by the `minio-init` compose service with the
# MinIO client image (quay.io/minio/mc). Idempotent: safe on every `docker compose up`.
#
#   1. creates the image bucket (private: clients get presigned URLs);
#   2. creates a bucket-scoped policy and the service account the app uses, so the
#      API and workers never hold MinIO's root credentials.
#
# Environment (set in docker-compose.yml from .env):
#   MINIO_ROOT_USER, MINIO_ROOT_PASSWORD   admin credentials of the MinIO server
#   SDXL_S3_BUCKET                         bucket to create
#   S3_APP_ACCESS_KEY_ID                   access key of the app's MinIO user
#   S3_APP_SECRET_ACCESS_KEY               its secret (MinIO needs 8+ characters)
#   MINIO_URL                              optional, default http://minio:9000
set -eu

: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is not set}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is not set}"
: "${SDXL_S3_BUCKET:?SDXL_S3_BUCKET is not set}"
: "${S3_APP_ACCESS_KEY_ID:?S3_APP_ACCESS_KEY_ID is not set}"
: "${S3_APP_SECRET_ACCESS_KEY:?S3_APP_SECRET_ACCESS_KEY is not set}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"
POLICY_NAME="sdxl-${SDXL_S3_BUCKET}-rw"
POLICY_FILE="$(mktemp)"
trap 'rm -f "$POLICY_FILE"' EXIT

mc alias set sdxl "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null

mc mb --ignore-existing "sdxl/${SDXL_S3_BUCKET}"

cat >"$POLICY_FILE" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::${SDXL_S3_BUCKET}"]
    },
    {
      "Effect": "Allow",
      "Action": [
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts"
      ],
      "Resource": ["arn:aws:s3:::${SDXL_S3_BUCKET}/*"]
    }
  ]
}
EOF

# `policy create` replaces an existing policy of that name, `user add` resets the
# secret of an existing user: both are safe to repeat.
mc admin policy create sdxl "$POLICY_NAME" "$POLICY_FILE"
mc admin user add sdxl "$S3_APP_ACCESS_KEY_ID" "$S3_APP_SECRET_ACCESS_KEY"

# `policy attach` fails when the policy is already attached, so check first. (No grep:
# the mc image is ubi-micro, which has a shell and coreutils but not much more.)
USER_INFO="$(mc admin user info sdxl "$S3_APP_ACCESS_KEY_ID")"
case "$USER_INFO" in
    *"$POLICY_NAME"*)
        echo "policy $POLICY_NAME already attached to $S3_APP_ACCESS_KEY_ID"
        ;;
    *)
        mc admin policy attach sdxl "$POLICY_NAME" --user "$S3_APP_ACCESS_KEY_ID"
        ;;
esac

echo "bucket ${SDXL_S3_BUCKET} ready; app user ${S3_APP_ACCESS_KEY_ID} has ${POLICY_NAME}"
