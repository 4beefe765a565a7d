"""Process settings: every environment variable medvlm reads, in one typed object.

``Settings()`` reads ``MEDVLM_*`` (and the few standard variables medvlm honours: the S3 endpoint, the GPU
pin) once, when a run starts; the run passes the object down to its storage, its engine and the isolated
inference child, so nothing below reads the environment again. This is the only module of the library that
looks at ``os.environ`` (through pydantic-settings, as Prefect and prefect-aws do); a test checks it, and
another that the docs' settings table (docs/settings.md) lists exactly these fields.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from medvlm_core.storage import RetryPolicy


class Settings(BaseSettings):
    """Settings of a worker process. Each field is set by ``MEDVLM_<FIELD>`` unless its alias says otherwise."""

    model_config = SettingsConfigDict(env_prefix="MEDVLM_", frozen=True, extra="ignore", populate_by_name=True)

    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "medvlm",
        description="local cache for downloaded models, extracted model bundles and file hashes",
    )
    # Large enough to amortise task overhead (Prefect creates one task run per chunk: at 128, a million pages
    # make under 8,000), small enough that a failed task loses little work.
    chunk_size: int = Field(128, ge=1, description="least manifest rows per inference task (at least 8 x n_parallel are used)")
    log_phi: bool = Field(
        False,
        description="debug only: inference error messages include llama.cpp's text, which can echo document "
        "content (see PHI and logs)",
    )
    fetch_workers: int = Field(4, ge=1, le=64, description="documents read from storage concurrently per inference task")
    lease_ttl_s: float = Field(
        120.0, gt=0,
        description="an output lease's life without renewal (renewed every quarter of it): how soon a run that "
        "died on another machine is taken over",
    )
    lease_poll_s: float = Field(2.0, gt=0, description="how often a run waiting for an output's lease looks again")
    retry_max_attempts: int = Field(8, ge=1, description="tries per object-store call on a transient failure")
    retry_base_delay_s: float = Field(0.1, gt=0, description="backoff after the first failed try, doubling after each")
    retry_max_delay_s: float = Field(5.0, gt=0, description="longest backoff between two tries")
    memory_budget_mb: float | None = Field(
        None, gt=0,
        description="memory the engine may plan with (default: the GPU's free memory when offloading, else the "
        "host's available memory); n_parallel is lowered to fit",
    )
    s3_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("MEDVLM_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        description="endpoint of an S3-compatible store when a run names none (standard AWS variables too)",
    )
    review_token: SecretStr | None = Field(
        None,
        description="the token every request to medvlm review serve must carry (default: a new one, printed at start)",
    )
    cuda_visible_devices: str | None = Field(
        None,
        validation_alias=AliasChoices("CUDA_VISIBLE_DEVICES"),
        description="the GPU a worker is pinned to; recorded in a shard's audit record, never set by medvlm",
    )

    def chunk_rows(self, n_parallel: int = 1) -> int:
        """Rows per inference task for a run decoding ``n_parallel`` pages together.

        Args:
            n_parallel: pages decoded together by the engine.

        Returns:
            ``chunk_size``, raised to 8 batches' worth: each task's batch drains at its end (its last pages
            decode with free slots), so a task must hold several batches.
        """
        return max(self.chunk_size, 8 * n_parallel)

    def retry_policy(self) -> RetryPolicy:
        """The object-store retry policy these settings describe.

        Returns:
            A ``RetryPolicy`` for ``Storage``.
        """
        return RetryPolicy(self.retry_max_attempts, self.retry_base_delay_s, self.retry_max_delay_s)


def environment_names() -> dict[str, str]:
    """The environment variable that sets each field (the first alias where a field has several).

    Returns:
        Field name -> environment variable name, in declaration order.
    """
    names = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names[name] = alias.choices[0] if isinstance(alias, AliasChoices) else f"MEDVLM_{name.upper()}"
    return names


# -- OpenMP's wait policy for llama.cpp's CPU threads (set, not read: before llama.cpp loads) ---------------

OPENMP_WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
OPENMP_WAIT_POLICY = "passive"


def prefer_passive_openmp() -> str:
    """Set ``OMP_WAIT_POLICY=passive`` unless the environment already sets it (an operator's choice wins), for
    llama.cpp loaded after this in the process and for its child processes.

    llama-cpp-python's CPU backend runs each graph on an OpenMP thread team (libgomp), whose idle threads by
    default spin before they sleep; medvlm runs graphs from more than one thread at once (the vision encoder
    ahead of the decode loop, several encoder contexts), and spinning teams take the cores from each other and
    from the page decoding. One graph is one parallel region (ggml synchronises inside it with its own
    barriers), so sleeping threads cost one wake-up per graph (docs/benchmarks.md, the ``openmp`` path). libgomp reads
    the variable when it is loaded, so this runs before the first ``import llama_cpp`` of the process:
    importing ``medvlm_core.engine`` calls it. It is the one variable medvlm writes, never one it reads.

    Returns:
        The policy now in the environment.
    """
    return os.environ.setdefault(OPENMP_WAIT_POLICY_ENV, OPENMP_WAIT_POLICY)


def load_llama_cpp() -> Any:
    """``llama_cpp``, loaded after ``prefer_passive_openmp`` when this is the process's first import of it.

    Where a process is about to open a model, call this before anything imports numpy: on a CUDA build, processes
    that had loaded numpy first crashed inside ``llama_model_load_from_file``, five runs out of five, and ran
    every time with llama_cpp loaded first (measured on an H200).

    Returns:
        The ``llama_cpp`` module.
    """
    prefer_passive_openmp()
    import llama_cpp

    return llama_cpp
