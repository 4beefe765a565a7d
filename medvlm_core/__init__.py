"""medvlm_core: the orchestration-free library behind medvlm.

Manifests, storage (fsspec URLs), document images, prompts, the llama.cpp vision-language engine and the
Parquet result tables. Nothing in this package imports Prefect; ``tasks`` and ``flows`` wrap it.
"""

__version__ = "0.1.0"
