"""One storage interface over local paths and S3: ``Storage`` (``filesystem``), URL helpers (``urls``), the
retry policy (``retries``) and where a run may read and write (``locations``).

The names most callers need are importable from here: ``from medvlm_core.storage import Storage``.
"""

from medvlm_core.storage.filesystem import IO_THREADS, Storage, map_io, s3_options
from medvlm_core.storage.retries import RetryPolicy, is_transient
from medvlm_core.storage.urls import LOCAL, dirname, is_absolute, join, normalize, protocol_of, resolve

__all__ = [
    "IO_THREADS", "LOCAL", "RetryPolicy", "Storage", "dirname", "is_absolute", "is_transient", "join", "map_io",
    "normalize", "protocol_of", "resolve", "s3_options",
]
