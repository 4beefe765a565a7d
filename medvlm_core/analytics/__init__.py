"""DuckDB over the output tables: the history and current views (``views``), the rule that says which row is
current (``current_rule``) and the built-in queries (``queries``).

``from medvlm_core.analytics import query, EXAMPLE_QUERIES`` is the entry point most callers need.
"""

from medvlm_core.analytics.current_rule import CURRENT_SUFFIX, DOCUMENT_STATUS
from medvlm_core.analytics.queries import EXAMPLE_QUERIES
from medvlm_core.analytics.views import (
    connect,
    document_status,
    query,
    register_views,
    table_files,
    table_names,
    table_names_of,
)

__all__ = [
    "CURRENT_SUFFIX", "DOCUMENT_STATUS", "EXAMPLE_QUERIES", "connect", "document_status", "query",
    "register_views", "table_files", "table_names", "table_names_of",
]
