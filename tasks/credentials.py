"""S3 settings for a flow run: from the environment, a Prefect Secret block, and non-secret options.

Deployments should not carry secrets in their parameters (Prefect stores parameters with every flow run).
Instead, ``credentials_block`` names a Prefect ``Secret`` block whose JSON value holds the same fields as
prefect-aws's ``AwsCredentials``: ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``,
``profile_name`` and optionally ``endpoint_url``.
"""

from __future__ import annotations

import json
from typing import Any

from medvlm_core.errors import RunError
from medvlm_core.storage import Storage, s3_options


def load_credentials_block(name: str) -> dict[str, Any]:
    """The JSON value of the Prefect Secret block ``name``; RunError (naming the block only) if unusable."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except Exception as exc:  # ValueError for a missing block, others for a server problem
        raise RunError(f"credentials block {name!r} cannot be loaded ({type(exc).__name__})") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RunError(f"credentials block {name!r} must hold a JSON object") from None
    if not isinstance(value, dict):
        raise RunError(f"credentials block {name!r} must hold a JSON object")
    return value


def build_storage(
    s3_endpoint: str | None = None,
    storage_options: dict[str, Any] | None = None,
    credentials_block: str | None = None,
    sse: str | None = None,
    sse_kms_key_id: str | None = None,
) -> Storage:
    """The run's Storage: explicit options, then the block's credentials, then the AWS environment.

    ``sse`` ("AES256" or "aws:kms", with ``sse_kms_key_id``) asks S3 to encrypt every object the run writes.
    """
    creds = load_credentials_block(credentials_block) if credentials_block else {}
    storage_options = dict(storage_options or {})
    if sse:
        if sse not in ("AES256", "aws:kms"):
            raise RunError(f"sse must be AES256 or aws:kms, got {sse!r}")
        extra = dict(storage_options.get("s3_additional_kwargs") or {}, ServerSideEncryption=sse)
        if sse_kms_key_id:
            extra["SSEKMSKeyId"] = sse_kms_key_id
        storage_options["s3_additional_kwargs"] = extra
    options = s3_options(
        endpoint_url=s3_endpoint or creds.get("endpoint_url"),
        key=creds.get("aws_access_key_id"),
        secret=creds.get("aws_secret_access_key"),
        token=creds.get("aws_session_token"),
        profile=creds.get("profile_name"),
        extra=storage_options,
    )
    return Storage({"s3": options})
