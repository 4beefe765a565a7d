"""Where a run may read and write: an allow-list of S3 prefixes and local roots.

Configured per deployment (``allowed_locations``). A document outside it is quarantined with the reason;
a manifest, model or output outside it stops the run before anything is read. Local paths are compared
after resolving ``..`` and symbolic links, so neither can step out of an allowed root. S3 keys are not paths
(S3 does not resolve ``..``, but a client or proxy on the way might), so an S3 URL with a ``.`` or ``..``
segment is never allowed when there is a list.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from medvlm_core import storage as st
from medvlm_core.errors import RunError

if TYPE_CHECKING:
    import polars as pl


# A "." or ".." segment of a URL's path: "s3://b/data/../secret/x".
_DOT_SEGMENT = r"/\.{1,2}(?:/|$)"


class LocationPolicy:
    """An allow-list of URL prefixes (``s3://bucket/prefix``) and local roots. Empty = everything allowed."""

    def __init__(self, allowed: list[str] | None = None):
        self.allowed = [self._canonical(a).rstrip("/") for a in (allowed or [])]

    @staticmethod
    def _canonical(url: str) -> str:
        url = st.normalize(url)
        return os.path.realpath(url) if st.protocol_of(url) == st.LOCAL else url

    def allows(self, url: str) -> bool:
        """True if ``url`` is under one of the allowed locations (always true without a policy)."""
        if not self.allowed:
            return True
        target = self._canonical(url)
        if st.protocol_of(target) != st.LOCAL and re.search(_DOT_SEGMENT, target.split("://", 1)[1]):
            return False
        return any(target == root or target.startswith(root + "/") for root in self.allowed)

    def allows_many(self, urls: "pl.Series") -> "pl.Series":
        """``allows`` for a column of URLs: remote ones by prefix in one expression, local ones (whose symbolic
        links must be resolved) one by one.

        Args:
            urls: normalised URLs (resolved manifest ``image_uri``s).

        Returns:
            A boolean column, True where allowed.
        """
        import polars as pl

        if not self.allowed:
            return pl.Series(urls.name, [True] * len(urls), dtype=pl.Boolean)
        remote = urls.str.contains("://", literal=True)
        by_prefix = pl.Series([False] * len(urls), dtype=pl.Boolean)
        for root in self.allowed:
            by_prefix = by_prefix | (urls == root) | urls.str.starts_with(root + "/")
        by_prefix = by_prefix & ~urls.str.replace(r"^[a-z0-9]+://", "").str.contains(_DOT_SEGMENT)
        local = [self.allows(u) if not r else False for u, r in zip(urls.to_list(), remote.to_list())] if not remote.all() else None
        if local is None:
            return by_prefix
        return (remote & by_prefix) | pl.Series(local, dtype=pl.Boolean)

    def require(self, url: str, what: str) -> None:
        """RunError naming ``what`` if ``url`` is outside the allowed locations."""
        if not self.allows(url):
            raise RunError(f"{what} {url} is outside the allowed locations of this deployment")
