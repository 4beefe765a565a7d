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
from medvlm_core.options import StorageOptions
from medvlm_core.settings import Settings
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


def build_storage(options: StorageOptions, settings: Settings) -> Storage:
    """The run's Storage: explicit options, then the block's credentials, then the AWS environment.

    Args:
        options: the run's storage options (``sse`` asks S3 to encrypt every object the run writes).
        settings: the process settings (the endpoint when the run names none, the retry policy).

    Returns:
        The storage.

    Raises:
        RunError: the credentials block cannot be used.
    """
    creds = load_credentials_block(options.credentials_block) if options.credentials_block else {}
    extra = dict(options.storage_options or {})
    if options.sse:
        sse = dict(extra.get("s3_additional_kwargs") or {}, ServerSideEncryption=options.sse)
        if options.sse_kms_key_id:
            sse["SSEKMSKeyId"] = options.sse_kms_key_id
        extra["s3_additional_kwargs"] = sse
    s3 = s3_options(
        endpoint_url=options.s3_endpoint or creds.get("endpoint_url") or settings.s3_endpoint,
        key=creds.get("aws_access_key_id"),
        secret=creds.get("aws_secret_access_key"),
        token=creds.get("aws_session_token"),
        profile=creds.get("profile_name"),
        extra=extra,
    )
    return Storage({"s3": s3}, retry=settings.retry_policy())
