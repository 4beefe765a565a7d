"""S3 credentials from an Airflow connection, for the core's storage (``medvlm_core.run.context.build_storage``).

The connection is of type ``aws``, in the fields the Amazon provider uses (which need not be installed): login is
the access key id, password the secret access key; extra may hold ``region_name``, ``endpoint_url`` (an
S3-compatible store; also read from ``service_config.s3.endpoint_url``), ``aws_session_token`` and
``profile_name``. Errors name the connection, never a value of it; Airflow masks the password in task logs.
"""

from __future__ import annotations

from typing import Any, Callable

from medvlm_core.errors import RunError
from medvlm_core.run.options import StorageOptions


def read_connection(conn_id: str) -> dict[str, Any]:
    """The S3 settings of the Airflow connection ``conn_id``.

    Args:
        conn_id: the connection's id.

    Returns:
        ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``, ``profile_name``,
        ``region_name``, ``endpoint_url`` (those it sets).

    Raises:
        RunError: the connection cannot be read (naming it only).
    """
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
        extra = conn.extra_dejson or {}
    except Exception as exc:  # missing connection, unreadable extra, secrets backend down
        raise RunError(f"Airflow connection {conn_id!r} cannot be read ({type(exc).__name__}); define it as an "
                       "aws connection (login: access key id, password: secret key, extra: region_name, "
                       "endpoint_url)") from None
    endpoint = extra.get("endpoint_url") or ((extra.get("service_config") or {}).get("s3") or {}).get("endpoint_url")
    values = {
        "aws_access_key_id": conn.login,
        "aws_secret_access_key": conn.password,
        "aws_session_token": extra.get("aws_session_token"),
        "profile_name": extra.get("profile_name"),
        "region_name": extra.get("region_name"),
        "endpoint_url": endpoint,
    }
    return {k: v for k, v in values.items() if v}


def connection_credentials(conn_id: str | None) -> Callable[[StorageOptions], dict[str, Any]]:
    """The ``CredentialsSource`` of an Airflow task: the connection ``conn_id``, or the AWS environment.

    Args:
        conn_id: an ``aws`` connection's id, or None.

    Returns:
        What ``medvlm_core.run.lifecycle.start_run`` calls with the run's storage options.
    """

    def resolve(options: StorageOptions) -> dict[str, Any]:
        if options.credentials_block:
            raise RunError("option credentials_block names a Prefect block; under Airflow the S3 credentials come "
                           "from the operator's aws_conn_id (an Airflow connection) or the AWS environment")
        return read_connection(conn_id) if conn_id else {}

    return resolve
