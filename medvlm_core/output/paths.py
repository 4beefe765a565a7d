"""Where everything lives under an output: one object names each place once.

    <output>/
      completions/run_date=YYYY-MM-DD/part-<run_id>.parquet   one row per document page (ok or error)
      quarantine/run_date=YYYY-MM-DD/part-<run_id>.parquet    manifest rows refused before processing
      runs/run_date=YYYY-MM-DD/run-<run_id>.parquet           one row per run: counts and parameters
      <structured table>/run_date=.../part-<run_id>.parquet   diagnoses, medications, ... (structured mode)
      evals/run_date=.../part-<eval_id>.parquet               every score of an evaluation (``medvlm_core.evals``)
      review/run_date=.../part-<eval_id>.parquet              the items an evaluation routes to a person
      reports/eval/eval-<eval_id>.html                        an evaluation's self-contained HTML report
      _staging/<run_id>/<table>/[shard-NNNNN-]chunk-NNNNNN.parquet   a run's rows while it is in flight
      _staging/<run_id>/shards/shard-NNNNN.json                      a finished shard's record (fan-out)
      _staging/<run_id>/plans/part-NNNNN.parquet                     validated rows of 64 shards, a row group each
      _staging/<run_id>/_publish.json                                the run is being published (roll forward)
      _commits/<run_id>.json                                  written once, create-if-absent, when published
      _index/done/bucket-XXXX.arrow                           answered pages by document (``medvlm_core.output.done_index``)
      _lease/lease-NNNNNNNNNNNN.json                          who holds the output's lease (``medvlm_core.output.lease``)
      _state/nightly/...                                      what the nightly flow has processed

Readers (pyarrow.dataset, DuckDB globs) skip ``_``-prefixed folders. Every name is deterministic, so a
retried chunk, shard or publish rewrites its own file instead of adding one.
"""

from __future__ import annotations

from dataclasses import dataclass

from medvlm_core import storage as st

PUBLISH_MARKER = "_publish.json"
SHARD_RECORDS = "shards"  # the staging folder of shard records (not a table)
SHARD_PLANS = "plans"  # the staging folder of shard plans (not a table)
NOT_TABLES = (SHARD_RECORDS, SHARD_PLANS)  # staging folders that publishing leaves out


def chunk_file_name(chunk_index: int, shard_index: int | None = None) -> str:
    """Staged file name of a chunk: a retried chunk or shard overwrites its own file.

    Args:
        chunk_index: the chunk's number within its run (or shard).
        shard_index: the shard's number in a fan-out run, None otherwise.

    Returns:
        ``[shard-NNNNN-]chunk-NNNNNN.parquet``.
    """
    return f"{shard_prefix(shard_index)}chunk-{chunk_index:06d}.parquet"


def shard_prefix(shard_index: int | None) -> str:
    """The file-name prefix of everything a shard stages.

    Args:
        shard_index: the shard's number, or None outside a fan-out.

    Returns:
        ``shard-NNNNN-``, or the empty string.
    """
    return "" if shard_index is None else f"shard-{shard_index:05d}-"


@dataclass(frozen=True)
class OutputLayout:
    """The places under one output URI (local path or ``s3://`` prefix), normalised."""

    root: str

    @classmethod
    def of(cls, output: str) -> "OutputLayout":
        """The layout of ``output``.

        Args:
            output: the output URI as the user gave it.

        Returns:
            Its layout (the URI normalised: absolute local path or ``s3://bucket/prefix``).
        """
        return cls(st.normalize(output).rstrip("/") or "/")

    # -- published ---------------------------------------------------------------------------------
    def table(self, table: str) -> str:
        """The folder of a published table.

        Args:
            table: the table's name.

        Returns:
            Its URL.
        """
        return st.join(self.root, table)

    def table_part(self, table: str, run_date: str, run_id: str) -> str:
        """The published file of one run in one table.

        Args:
            table: the table's name.
            run_date: the run's ``run_date`` partition (UTC date of its start).
            run_id: the run.

        Returns:
            Its URL.
        """
        prefix = "run" if table == "runs" else "part"
        return st.join(self.root, table, f"run_date={run_date}", f"{prefix}-{run_id}.parquet")

    def eval_report(self, eval_id: str) -> str:
        """The HTML report of one evaluation (``medvlm eval``).

        Args:
            eval_id: the evaluation's id.

        Returns:
            Its URL.
        """
        return st.join(self.root, "reports", "eval", f"eval-{eval_id}.html")

    def commits(self) -> str:
        """The folder of commit records.

        Returns:
            Its URL.
        """
        return st.join(self.root, "_commits")

    def commit(self, run_id: str) -> str:
        """The run's commit record, written once when its tables are published.

        Args:
            run_id: the run.

        Returns:
            Its URL.
        """
        return st.join(self.commits(), f"{run_id}.json")

    # -- in flight ---------------------------------------------------------------------------------
    def staging(self) -> str:
        """The folder that holds every in-flight run's staging.

        Returns:
            Its URL.
        """
        return st.join(self.root, "_staging")

    def run_staging(self, run_id: str) -> str:
        """The staging folder of one in-flight run.

        Args:
            run_id: the run.

        Returns:
            Its URL.
        """
        return st.join(self.staging(), run_id)

    def staged(self, run_id: str, table: str, name: str) -> str:
        """A staged file of an in-flight run.

        Args:
            run_id: the run.
            table: the table it belongs to.
            name: the file name.

        Returns:
            Its URL.
        """
        return st.join(self.run_staging(run_id), table, name)

    def staged_chunk(self, run_id: str, table: str, chunk_index: int, shard_index: int | None = None) -> str:
        """A chunk's staged rows of one table.

        Args:
            run_id: the run.
            table: the table.
            chunk_index: the chunk.
            shard_index: its shard in a fan-out run.

        Returns:
            Its URL.
        """
        return self.staged(run_id, table, chunk_file_name(chunk_index, shard_index))

    def table_of_staged(self, url: str) -> str:
        """The table a staged file belongs to (its folder's name).

        Args:
            url: a staged file's URL.

        Returns:
            The table name.
        """
        return st.dirname(url).rstrip("/").rsplit("/", 1)[-1]

    def shard_record(self, run_id: str, shard_index: int) -> str:
        """Where a finished shard leaves its record for the parent run.

        Args:
            run_id: the parent run.
            shard_index: the shard.

        Returns:
            Its URL.
        """
        return st.join(self.run_staging(run_id), SHARD_RECORDS, f"shard-{shard_index:05d}.json")

    def shard_plan(self, run_id: str, part: int) -> str:
        """Where a fan-out leaves some shards' validated rows for them to read (``medvlm_core.run.shards``).

        Args:
            run_id: the parent run.
            part: the plan file's number (it holds consecutive shards, a row group each).

        Returns:
            Its URL.
        """
        return st.join(self.run_staging(run_id), SHARD_PLANS, f"part-{part:05d}.parquet")

    def fanout_plan(self, run_id: str) -> str:
        """Where a fan-out whose steps run in separate processes leaves its plan's counts and quarantined rows for
        its publishing step (``medvlm_core.run.fanout.FanoutPlanRecord``).

        Args:
            run_id: the fan-out run.

        Returns:
            Its URL.
        """
        return st.join(self.run_staging(run_id), SHARD_PLANS, "plan.json")

    def publish_marker(self, run_id: str) -> str:
        """The marker that says a run's publish has begun (see ``medvlm_core.output.publish``).

        Args:
            run_id: the run.

        Returns:
            Its URL.
        """
        return st.join(self.run_staging(run_id), PUBLISH_MARKER)

    def run_id_of_marker(self, url: str) -> str:
        """The run a publish marker belongs to.

        Args:
            url: a publish marker's URL.

        Returns:
            The run id.
        """
        return st.dirname(url).rstrip("/").rsplit("/", 1)[-1]

    def write_probe(self, run_id: str) -> str:
        """A scratch object that checks the output is writable before any inference.

        Args:
            run_id: the run.

        Returns:
            Its URL.
        """
        return st.join(self.run_staging(run_id), ".write-probe")

    # -- the done index ----------------------------------------------------------------------------
    def done_index(self) -> str:
        """The folder of the done index (``medvlm_core.output.done_index``).

        Returns:
            Its URL.
        """
        return st.join(self.root, "_index", "done")

    # -- the lease -----------------------------------------------------------------------------------
    def lease(self) -> str:
        """The folder of the output's lease records (one per holder, see ``medvlm_core.output.lease``).

        Returns:
            Its URL.
        """
        return st.join(self.root, "_lease")

    def lease_epoch(self, epoch: int) -> str:
        """One holder's lease record; the newest epoch is the lease.

        Args:
            epoch: the record's number (each new holder takes the next one).

        Returns:
            Its URL.
        """
        return st.join(self.lease(), f"lease-{epoch:012d}.json")

    # -- state of the nightly flow -----------------------------------------------------------------
    def nightly_state(self) -> str:
        """Where nightly runs record what they processed.

        Returns:
            Its URL.
        """
        return st.join(self.root, "_state", "nightly")
