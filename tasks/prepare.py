"""Tasks that prepare a run: read the manifest, identify the model, load it."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvlm_core import storage as st
from medvlm_core.config import EngineConfig
from medvlm_core.engine import shared_engine
from medvlm_core.manifest import ManifestRow, QuarantinedRow, parse_rows, read_manifest_frame
from medvlm_core.models import choose_chat_format, file_sha256, inspect_model
from medvlm_core.pipeline import ModelIdentity
from medvlm_core.storage import Storage


@dataclass
class ManifestPlan:
    """The manifest's rows split into those to process and those refused."""

    rows: list[ManifestRow]
    quarantined: list[QuarantinedRow]
    total_rows: int


@task(name="read-manifest", cache_policy=NO_CACHE)
def read_manifest(manifest: str, storage: Storage) -> ManifestPlan:
    """Read and check a manifest; RunError (no retry) for table-level problems."""
    url = st.normalize(manifest)
    frame = read_manifest_frame(url, storage)
    rows, quarantined = parse_rows(frame, st.dirname(url))
    return ManifestPlan(rows=rows, quarantined=quarantined, total_rows=frame.height)


@task(name="identify-model", cache_policy=NO_CACHE)
def identify_model(engine: EngineConfig, requested_chat_format: str | None, cache_dir: str) -> ModelIdentity:
    """Check the GGUF pair, pick the chat format and hash both files (cached per host)."""
    info = inspect_model(engine.model_path, engine.mmproj_path)
    chat_format = choose_chat_format(info, requested_chat_format)
    return ModelIdentity(
        model_name=info.model_name,
        model_sha256=file_sha256(engine.model_path, cache_dir),
        mmproj_sha256=file_sha256(engine.mmproj_path, cache_dir),
        chat_format=chat_format,
    )


@task(name="load-model", cache_policy=NO_CACHE)
def load_model(engine: EngineConfig, chat_format: str) -> float:
    """Load the model into this process's shared engine (once per process). Returns load seconds."""
    return shared_engine(engine, chat_format).load_seconds
