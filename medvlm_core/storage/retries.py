"""Which object-store failures are worth another try, and how long to wait between tries.

``Storage`` (``filesystem.py``) makes every retry itself, with one ``RetryPolicy``: the client libraries' own
hidden retries are turned off so that each retry is counted (the runs row's ``storage_retries``).
"""

from __future__ import annotations

import http.client
import random
from dataclasses import dataclass

from medvlm_core.errors import DocumentError


@dataclass(frozen=True)
class RetryPolicy:
    """How object-store calls are retried: at most ``max_attempts`` tries per call, sleeping a random
    ``uniform(0, min(max_delay_s, base_delay_s * 2**n))`` after the n-th failure ("full jitter", so
    workers throttled together do not retry together)."""

    max_attempts: int = 8
    base_delay_s: float = 0.1
    max_delay_s: float = 5.0

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to sleep after ``failures`` failed tries (1-based)."""
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2 ** (failures - 1)))


# Never transient: retrying cannot help, and for a conditional PUT it would be wrong.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
              DocumentError)
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "XAmzContentSHA256Mismatch"}


def _transient_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError, http.client.HTTPException]
    try:
        from botocore.exceptions import BotoCoreError

        types.append(BotoCoreError)  # endpoint/connection errors, read timeouts, incomplete reads, bad XML
    except ImportError:  # pragma: no cover - s3fs not installed
        pass
    try:
        from aiohttp import ClientError as AiohttpClientError

        types.append(AiohttpClientError)  # disconnects and truncated payloads under aiobotocore
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_transient(exc: BaseException) -> bool:
    """True when an object-store error may go away if the call is repeated (looks through the causes)."""
    transient = _transient_types()
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        if isinstance(current, _PERMANENT):
            return False
        if isinstance(current, transient):
            return True
        response = getattr(current, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code in _TRANSIENT_CODES or int(status) >= 500 or int(status) == 429
        current, seen = current.__cause__ or current.__context__, seen + 1
    return False
