"""medvlm as a library: load a model once, annotate images, documents or a manifest in memory. No Prefect, no
output folder; nothing is written.

Spark NLP's MedicalVisionLLM shape, medvlm's semantics::

    from medvlm_core.api import MedicalVisionLLM

    with MedicalVisionLLM.load("model.gguf", "mmproj.gguf", max_tokens=256) as vlm:
        result = vlm.annotate(["scan-001.png", "s3://bucket/fax-17.pdf"])    # paths, URIs, bytes or PIL images
        result.completions.to_pandas()                                       # one row per page
        result = vlm.transform("s3://bucket/manifest.csv")                   # or an Arrow table / polars frame

The rows are exactly those a flow run writes to ``completions`` (same engine, same columns, same
``result_key``; the structured tables in structured mode), with the run's options given as keyword arguments
(the CLI's names, ``medvlm_core.run.options``). A model may be a local path, an ``s3://`` URI or a Spark NLP model zip.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable

import polars as pl
import pyarrow as pa

from medvlm_core import storage as st
from medvlm_core.engine.registry import create_engine
from medvlm_core.engine.types import Engine
from medvlm_core.errors import RunError
from medvlm_core.inputs.manifest import COLUMNS, ManifestPlan, plan_manifest
from medvlm_core.output import results
from medvlm_core.output.results import utc_now
from medvlm_core.output.tables import validate_table
from medvlm_core.run.chunks import structured_tables
from medvlm_core.run.context import RunContext, make_run_id, make_spec, open_run, prepare_model
from medvlm_core.run.documents import process_documents
from medvlm_core.run.pages import process_rows
from medvlm_core.run.result_rows import completion_columns
from medvlm_core.run.spec import RunSpec
from medvlm_core.settings import Settings
from medvlm_core.storage import Storage, s3_options


@dataclass
class Annotations:
    """What ``annotate`` and ``transform`` return: Arrow tables in the output tables' schemas.

    Attributes:
        completions: one row per document page (``results.COMPLETIONS_SCHEMA``): ``ok``, ``error`` or ``truncated``.
        quarantine: the manifest rows refused before processing, with the reasons.
        tables: the structured tables (structured mode), by name.
    """

    completions: pa.Table
    quarantine: pa.Table
    tables: dict[str, pa.Table] = field(default_factory=dict)


class MedicalVisionLLM:
    """A loaded vision-language model that annotates documents in this process.

    Use ``load``; close it (or use it as a context manager) to free the model.
    """

    def __init__(self, ctx: RunContext, spec: RunSpec, engine: Engine, scratch: str):
        self._ctx, self._spec, self._engine, self._scratch = ctx, spec, engine, scratch

    @classmethod
    def load(cls, model: str, mmproj: str | None = None, options: dict[str, Any] | None = None,
             storage: Storage | None = None, **more: Any) -> "MedicalVisionLLM":
        """Load a model once (fetched into the model cache first if remote, checked, identified).

        Args:
            model: the model GGUF (local path or ``s3://``), or a Spark NLP model zip.
            mmproj: the projector GGUF (None with a zip).
            options: run options, flat (CLI names) or grouped, as a flow's ``options`` parameter.
            storage: where documents and models are (default: S3 from the environment / ``MEDVLM_S3_ENDPOINT``).
            **more: more options by name (``max_tokens=256``, ``prompt_id="clinical_extraction"`` for structured mode, ``n_parallel=4`` ...).

        Returns:
            The loaded model.

        Raises:
            RunError: bad options, or a model that cannot be used (one clear message).
        """
        settings = Settings()
        storage = storage or Storage({"s3": s3_options(endpoint_url=settings.s3_endpoint)}, retry=settings.retry_policy())
        scratch = tempfile.mkdtemp(prefix="medvlm-api-")
        try:
            started = utc_now()
            # The layout only names places: annotating in memory writes nothing under it.
            ctx = open_run(make_run_id(started), started, os.path.join(scratch, "output"), st.normalize(model),
                           st.normalize(mmproj) if mmproj else None, {**(options or {}), **more}, settings, storage)
            config, identity = prepare_model(ctx)
            spec = make_spec(ctx, config, identity)
            engine = create_engine(config, identity.chat_format, settings.log_phi)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return cls(ctx, spec, engine, scratch)

    @property
    def model_name(self) -> str:
        """The model's name (from its GGUF metadata)."""
        return self._spec.model.model_name

    @property
    def params_json(self) -> str:
        """The generation parameters every row records (part of its ``result_key``)."""
        return self._spec.params_json

    def annotate(self, documents: Iterable[Any], document_ids: Iterable[str] | None = None,
                 prompt_id: str | None = None, prompt: str | None = None) -> Annotations:
        """Annotate documents: every page of each.

        Args:
            documents: paths, ``s3://`` URIs, encoded bytes (PNG, JPEG, TIFF, PDF) or PIL images. A PIL image is
                encoded as PNG first, so its ``image_sha256`` is that PNG's.
            document_ids: one id each (default: the path or URI, else ``document-N``).
            prompt_id: a prompt of the library for all of them (default: the model's options').
            prompt: free prompt text for all of them.

        Returns:
            The annotations.
        """
        documents = list(documents)
        ids = list(document_ids) if document_ids is not None else [None] * len(documents)
        if len(ids) != len(documents):
            raise RunError(f"annotate: {len(documents)} documents but {len(ids)} document_ids")
        records = []
        for n, (document, document_id) in enumerate(zip(documents, ids), start=1):
            uri = self._as_uri(document, n)
            records.append({"document_id": document_id or (uri if isinstance(document, (str, os.PathLike)) else f"document-{n}"),
                            "image_uri": uri, "prompt_id": prompt_id, "prompt": prompt})
        return self.transform(pa.Table.from_pylist(records))

    def transform(self, manifest: str | pa.Table | pl.DataFrame | list[dict]) -> Annotations:
        """Annotate a manifest (Spark NLP's ``transform``): validated like a run's, bad rows quarantined.

        Args:
            manifest: a manifest URI (CSV, JSONL or Parquet), or its rows as an Arrow table, a polars frame or
                a list of dicts (relative ``image_uri``s are relative to the current folder).

        Returns:
            The annotations.

        Raises:
            RunError: a manifest that cannot be read or lacks a required column.
        """
        plan = self._plan(manifest)
        process = process_documents if self._spec.documents.scope == "document" else process_rows
        out = [r for r in process(self._engine, plan.rows, self._spec, self._ctx.storage)]
        out.sort(key=lambda r: (r["manifest_row"], r["page"] or 0))  # pages finish in any order; give them in order
        completions = results.to_table([completion_columns(r) for r in out], results.COMPLETIONS_SCHEMA)
        validate_table("completions", completions)
        created = utc_now()
        quarantine = results.to_table(
            [dict(q, run_id=self._spec.run_id, manifest_uri=manifest if isinstance(manifest, str) else None,
                  created_at=created) for q in plan.quarantined], results.QUARANTINE_SCHEMA)
        tables = {name: results.to_table(rows, schema) for name, (rows, schema) in structured_tables(self._spec, out).items()}
        return Annotations(completions, quarantine, tables)

    def close(self) -> None:
        """Free the model and the scratch folder; safe to call twice."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> "MedicalVisionLLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------------
    def _plan(self, manifest: str | pa.Table | pl.DataFrame | list[dict]) -> ManifestPlan:
        if self._engine is None:
            raise RunError("this model was closed")
        if isinstance(manifest, (str, os.PathLike)):
            return plan_manifest(str(manifest), self._ctx.storage, self._ctx.policy)
        frame = pl.DataFrame(manifest) if isinstance(manifest, list) else (
            pl.from_arrow(manifest) if isinstance(manifest, pa.Table) else manifest)
        frame = frame.select([pl.col(c).cast(pl.Utf8) for c in frame.columns if c in COLUMNS])
        url = os.path.join(self._scratch, f"manifest-{utc_now():%H%M%S%f}.parquet")
        frame.write_parquet(url)
        try:
            return plan_manifest(url, self._ctx.storage, self._ctx.policy, base_dir=os.getcwd())
        finally:
            os.remove(url)

    def _as_uri(self, document: Any, n: int) -> str:
        if isinstance(document, (str, os.PathLike)):
            return str(document)
        if hasattr(document, "save"):  # a PIL image
            buffer = io.BytesIO()
            document.save(buffer, format="PNG")
            document = buffer.getvalue()
        if isinstance(document, (bytes, bytearray, memoryview)):
            path = os.path.join(self._scratch, "documents", f"document-{n:06d}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(bytes(document))
            return path
        raise RunError(f"annotate: document {n} is a {type(document).__name__}; give a path, a URI, bytes or a PIL image")
