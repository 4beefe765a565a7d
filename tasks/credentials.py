"""S3 settings for a flow run: from the environment, a Prefect block, and non-secret options.

Deployments should not carry secrets in their parameters (Prefect stores parameters with every flow run).
Instead, ``credentials_block`` names a block saved on the Prefect server:

* ``aws-credentials/NAME``: a prefect-aws ``AwsCredentials`` block (keys, session token, profile, region; the
  endpoint of an S3-compatible store in its ``aws_client_parameters.endpoint_url``);
* ``s3-bucket/NAME``: a prefect-aws ``S3Bucket`` block: its ``credentials`` are used;
* ``NAME`` (or ``secret/NAME``): a ``Secret`` block whose JSON value holds ``aws_access_key_id``,
  ``aws_secret_access_key``, ``aws_session_token``, ``profile_name``, ``region_name`` and ``endpoint_url``.

Errors name the block, never a value of it.
"""

from __future__ import annotations

import json
from typing import Any

from medvlm_core.errors import RunError
from medvlm_core.run import context
from medvlm_core.run.options import StorageOptions
from medvlm_core.settings import Settings
from medvlm_core.storage import Storage


def load_credentials_block(name: str) -> dict[str, Any]:
    """The S3 settings held by the block ``name`` (see the module's docstring for the kinds).

    Args:
        name: ``aws-credentials/NAME``, ``s3-bucket/NAME``, ``secret/NAME`` or ``NAME`` (a Secret block).

    Returns:
        ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``, ``profile_name``,
        ``region_name``, ``endpoint_url`` (those it sets).

    Raises:
        RunError: the block cannot be loaded or used (naming the block only).
    """
    kind, _, block_name = name.rpartition("/")
    kind = kind or "secret"
    if kind == "secret":
        return _secret_block(block_name)
    if kind not in ("aws-credentials", "s3-bucket"):
        raise RunError(f"credentials block {name!r}: use aws-credentials/NAME, s3-bucket/NAME or a Secret block's name")
    try:
        import prefect_aws  # noqa: F401  (registers the block types)
        from prefect.blocks.core import Block

        block = Block.load(f"{kind}/{block_name}")
        credentials = block.credentials if kind == "s3-bucket" else block
        secret = credentials.aws_secret_access_key
        client = credentials.aws_client_parameters
        values = {
            "aws_access_key_id": credentials.aws_access_key_id,
            "aws_secret_access_key": secret.get_secret_value() if secret is not None else None,
            "aws_session_token": credentials.aws_session_token,
            "profile_name": credentials.profile_name,
            "region_name": credentials.region_name,
            "endpoint_url": client.endpoint_url if client is not None else None,
        }
    except Exception as exc:  # ValueError for a missing block, others for a server or type problem
        what = "an AwsCredentials" if kind == "aws-credentials" else "an S3Bucket"
        raise RunError(f"credentials block {name!r} cannot be loaded as {what} block ({type(exc).__name__}); "
                       f"the forms are aws-credentials/NAME, s3-bucket/NAME or a Secret block's NAME") from None
    return {k: v for k, v in values.items() if v}


def _loads(slug: str) -> bool:
    """Whether the block ``type/name`` can be loaded (a probe for a better error message)."""
    try:
        import prefect_aws  # noqa: F401  (registers the block types)
        from prefect.blocks.core import Block

        Block.load(slug)
        return True
    except Exception:  # missing, unknown type, server down: not that block
        return False


def _secret_block(name: str) -> dict[str, Any]:
    """The JSON value of the Prefect Secret block ``name``; RunError (naming the block only) if unusable.

    A bare name is a Secret block's: when there is none but a prefect-aws block of that name exists, the error
    says which ``type/NAME`` to pass instead.
    """
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except Exception as exc:  # ValueError for a missing block, others for a server problem
        typed = [f"{kind}/{name}" for kind in ("aws-credentials", "s3-bucket") if _loads(f"{kind}/{name}")]
        if typed:
            raise RunError(f"credentials block {name!r}: a bare name is a Secret block's, and there is no Secret "
                           f"block {name!r}; a prefect-aws block of that name exists: pass {typed[0]!r}") from None
        raise RunError(f"credentials block {name!r} cannot be loaded: tried a Secret block of that name "
                       f"({type(exc).__name__}); name a prefect-aws block with its type, aws-credentials/NAME or "
                       f"s3-bucket/NAME") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RunError(f"credentials block {name!r} must hold a JSON object") from None
    if not isinstance(value, dict):
        raise RunError(f"credentials block {name!r} must hold a JSON object")
    return value


def block_credentials(options: StorageOptions) -> dict[str, Any]:
    """The ``CredentialsSource`` of a Prefect flow run (``medvlm_core.run.context.build_storage``): the block the
    run's ``credentials_block`` names, if any.

    Args:
        options: the run's storage options.

    Returns:
        The block's S3 settings (empty without a block: the AWS environment applies).

    Raises:
        RunError: the block cannot be used.
    """
    return load_credentials_block(options.credentials_block) if options.credentials_block else {}


def build_storage(options: StorageOptions, settings: Settings) -> Storage:
    """The Storage of a flow that is not a run (eval, report): explicit options, then the block's credentials,
    then the AWS environment.

    Args:
        options: the storage options.
        settings: the process settings.

    Returns:
        The storage.

    Raises:
        RunError: the credentials block cannot be used.
    """
    return context.build_storage(options, settings, block_credentials)
