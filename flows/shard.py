"""The ``medvlm-shard`` flow: the unit of GPU work, one slice of a fan-out run on one GPU worker.

A shard reads the run's manifest, keeps its own rows, loads the model once for all of them, stages their
result rows under the parent run's staging folder and writes a small JSON record (counts, model identity,
which worker ran it) there too. The parent run reads those records from storage, not Prefect results, so
nothing depends on result persistence, and it publishes all shards' rows at once.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import RunOptions, make_spec, merge_summaries, prepare_model, run_chunks
from medvlm_core import results
from medvlm_core import storage as st
from medvlm_core.config import Settings
from medvlm_core.errors import RunError
from medvlm_core.manifest import read_manifest
from medvlm_core.results import utc_now
from medvlm_core.storage import Storage


def shard_record_url(output: str, run_id: str, shard_index: int) -> str:
    """Where a finished shard leaves its record for the parent run."""
    return st.join(results.staging_root(output, run_id), "shards", f"shard-{shard_index:05d}.json")


def read_shard_record(storage: Storage, output: str, run_id: str, shard_index: int) -> dict | None:
    """A shard's record, or None if it did not finish."""
    url = shard_record_url(output, run_id, shard_index)
    if not storage.exists(url):
        return None
    return json.loads(storage.read_bytes(url))


@flow(name="medvlm-shard", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False)
def medvlm_shard(
    manifest: str,
    output: str,
    model: str,
    run_id: str,
    shard_index: int,
    row_numbers: list[int],
    mmproj: str | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Process the manifest rows ``row_numbers`` of run ``run_id`` and stage their results.

    ``options`` holds the run's options (see flows.common.RunOptions). Returns the shard's record.
    """
    logger = get_run_logger()
    try:
        opts = RunOptions.from_dict(options)
        settings = Settings.from_env()
        storage = opts.storage()
        manifest, output = st.normalize(manifest), st.normalize(output)
        started = utc_now()
        policy = opts.check_locations(output, model, mmproj)
        opts.register_extraction(storage)
        wanted = set(row_numbers)
        rows = [r for r in read_manifest(manifest, storage, policy).rows if r.row_number in wanted]
        if len(rows) != len(wanted):
            raise RunError(f"shard {shard_index}: the manifest changed since the run was planned ({len(wanted) - len(rows)} rows gone)")
        engine, identity = prepare_model(model, mmproj, opts, storage, settings)
        spec = make_spec(run_id, output, engine, identity, opts)
        logger.info("shard %d of run %s: %d manifest rows", shard_index, run_id, len(rows))
        summaries = run_chunks(logger, spec, rows, storage, opts.chunk_size or settings.chunk_rows(opts.n_parallel), shard_index)
        total = merge_summaries(summaries)
        total.storage_retries += storage.retries  # this worker's object-store retries, for the run row
        record = {
            "shard_index": shard_index,
            "summary": total.to_json(),
            "identity": asdict(identity),
            "params_json": spec.params_json,
            "worker": {
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "flow_run_id": str(flow_run.id) if flow_run.id else None,
            },
            "started_at": started.isoformat(),
            "finished_at": utc_now().isoformat(),
        }
        storage.write_bytes_atomic(shard_record_url(output, run_id, shard_index), json.dumps(record).encode())
        return record
    except RunError as exc:
        logger.error("shard %d failed: %s", shard_index, exc)
        return Failed(message=str(exc))
