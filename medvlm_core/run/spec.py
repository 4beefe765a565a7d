"""What a chunk's work is made of: the run's ``RunSpec`` (everything a chunk needs, plain data) and a ``PageWork``
(one page for the engine, or the error that replaced it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from medvlm_core.errors import DocumentError
from medvlm_core.inputs.images import PageImage
from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.inputs.prompts import Prompt
from medvlm_core.model.files import ModelIdentity
from medvlm_core.output.paths import OutputLayout
from medvlm_core.run.options import DocumentOptions
from medvlm_core.run.params import EngineConfig, GenerationParams, ImageOptions


@dataclass(frozen=True)
class RunSpec:
    """Everything a chunk of a run needs. Plain data: picklable, and free of secrets and document data."""

    run_id: str
    layout: OutputLayout
    engine: EngineConfig
    model: ModelIdentity
    generation: GenerationParams
    images: ImageOptions
    default_prompt: Prompt
    params_json: str
    fetch_workers: int = 4  # MEDVLM_FETCH_WORKERS
    # Re-run pages whose result key already has an ok row (default: skip them).
    force: bool = False
    # Page scope (one answer per page) or document scope (one per document), and how documents are answered.
    documents: DocumentOptions = field(default_factory=DocumentOptions)


@dataclass
class PageWork:
    """One unit for the engine: a page image, or the error that replaced it."""

    row: ManifestRow
    page: int | None
    page_count: int | None = None
    image: PageImage | None = None
    error: DocumentError | None = None
    image_sha256: str | None = None
    fetch_ms: float | None = None
    preprocess_ms: float | None = None
    skipped: bool = False
