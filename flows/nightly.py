"""The ``medvlm-nightly`` flow: every night, process only what is new under an input prefix.

New means not processed by an earlier successful nightly run: a manifest file whose fingerprint (size and
ETag or mtime) has not been seen, or, when the prefix holds no manifests, document files not seen before
(a manifest is then generated for them: document_id = the file's path under the prefix). What a run
processed is recorded under ``<output>/_state/nightly/`` only when it succeeded, so a failed night is
simply picked up again the next night (pages already done are skipped by their result keys).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.states import Failed

from flows.batch import run_batch
from flows.common import RunOptions, make_run_id
from medvlm_core import results
from medvlm_core import storage as st
from medvlm_core.errors import RunError
from medvlm_core.manifest import FORMATS
from medvlm_core.results import utc_now
from medvlm_core.storage import Storage

DOCUMENT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".pdf", ".bmp", ".gif")


def state_prefix(output: str) -> str:
    """Where nightly runs record what they processed."""
    return st.join(output, "_state", "nightly")


def seen_inputs(storage: Storage, output: str) -> set[str]:
    """``url|fingerprint`` of every input processed by an earlier successful nightly run."""
    seen: set[str] = set()
    for url in storage.list_files(state_prefix(output), ".json"):
        seen.update(json.loads(storage.read_bytes(url))["inputs"])
    return seen


def _relative(url: str, prefix: str) -> str:
    return posixpath.relpath(url.split("://", 1)[-1], prefix.split("://", 1)[-1].rstrip("/"))


@flow(name="medvlm-nightly", log_prints=False)
def medvlm_nightly(
    input_prefix: str,
    output: str,
    model: str,
    mmproj: str | None = None,
    options: dict[str, Any] | None = None,
    fan_out: bool = True,
    fanout_deployment: str = "medvlm-fanout/medvlm-fanout",
    shard_size: int = 256,
) -> Any:
    """Find the manifests (or documents) under ``input_prefix`` that are new since the last good night, run them.

    ``fan_out`` runs each manifest through the ``medvlm-fanout`` deployment (GPU pool); otherwise in this
    process. Returns what was processed and the runs' summaries.
    """
    logger = get_run_logger()
    try:
        opts = RunOptions.from_dict(options)
        storage = opts.storage()
        input_prefix, output = st.normalize(input_prefix), st.normalize(output)
        seen = seen_inputs(storage, output)
        files = storage.list_fingerprints(input_prefix)
        manifests = {u: f for u, f in files.items() if any(u.lower().endswith(ext) for ext in FORMATS)}
        if manifests:
            new = {u: f for u, f in manifests.items() if f"{u}|{f}" not in seen}
            work = [(u, [f"{u}|{f}"]) for u, f in new.items()]
        else:
            new = {u: f for u, f in files.items() if u.lower().endswith(DOCUMENT_EXTENSIONS) and f"{u}|{f}" not in seen}
            work = [(_write_generated_manifest(storage, output, input_prefix, new), [f"{u}|{f}" for u, f in new.items()])] if new else []
        logger.info("nightly: %d new %s under the input prefix", len(new), "manifests" if manifests else "documents")

        summaries, processed, failures = [], [], []
        for manifest, inputs in work:
            summary, error = _run_one(manifest, output, model, mmproj, opts, fan_out, fanout_deployment, shard_size, logger)
            if error is None:
                summaries.append(summary)
                processed.extend(inputs)
            else:
                failures.append(error)
        if processed:
            record = {"inputs": processed, "recorded_at": utc_now().isoformat()}
            name = make_run_id(utc_now()) + ".json"
            storage.write_bytes_atomic(st.join(state_prefix(output), name), json.dumps(record).encode())
        if failures:
            return Failed(message=f"{len(failures)} of {len(work)} nightly run(s) failed: {'; '.join(failures)}")
        return {"new_inputs": len(new), "runs": summaries}
    except RunError as exc:
        logger.error("nightly run failed: %s", exc)
        return Failed(message=str(exc))


def _write_generated_manifest(storage: Storage, output: str, input_prefix: str, documents: dict[str, str]) -> str:
    """A manifest for loose documents: one row per file, its path under the prefix as document_id."""
    rows = [{"document_id": _relative(u, input_prefix), "image_uri": u} for u in documents]
    url = st.join(state_prefix(output), "manifests", make_run_id(utc_now()) + ".parquet")
    table = results.to_table(rows, pa.schema([("document_id", pa.string()), ("image_uri", pa.string())]))
    results.write_parquet(storage, url, table)
    return url


def _run_one(manifest, output, model, mmproj, opts, fan_out, deployment, shard_size, logger) -> tuple[dict | None, str | None]:
    """One manifest, in this process or through the fan-out deployment. (summary, error message)."""
    if not fan_out:
        try:
            return run_batch(logger, manifest, output, model, mmproj, opts), None
        except RunError as exc:
            return None, str(exc)
    child = run_deployment(
        name=deployment, as_subflow=True,
        parameters=dict(manifest=manifest, output=output, model=model, mmproj=mmproj, options=opts.to_dict(), shard_size=shard_size),
    )
    if child.state is not None and child.state.is_completed():
        return {"flow_run_id": str(child.id)}, None
    return None, f"{manifest}: {child.state.message if child.state else 'no state'}"
