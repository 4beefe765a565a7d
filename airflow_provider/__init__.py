"""medvlm's Airflow 3 provider (installed as ``medvlm.airflow``): operators over the same run API as the Prefect
flows (``medvlm_core.run.lifecycle`` and ``medvlm_core.run.fanout``), and example DAGs.

Install it with ``pip install 'medvlm[airflow]'`` (Airflow 3, no Prefect). Airflow finds it through the
``apache_airflow_provider`` entry point, which names ``get_provider_info``.
"""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    """What Airflow lists for this provider (``airflow providers list``).

    Returns:
        The provider's metadata, in the form of Airflow's provider schema.
    """
    from medvlm_core import __version__

    return {
        "package-name": "medvlm",
        "name": "medvlm",
        "description": "Scanned clinical documents to Parquet tables with a llama.cpp vision-language model: "
                       "batch and fan-out operators, example DAGs.",
        "versions": [__version__],
        "integrations": [{
            "integration-name": "medvlm",
            "external-doc-url": "https://github.com/medvlm/medvlm",
            "tags": ["software"],
        }],
        "operators": [{"integration-name": "medvlm", "python-modules": ["medvlm.airflow.operators"]}],
    }
