"""A run's set-up, free of orchestration: one ``RunContext`` serves a batch run, a fan-out parent and a shard.

``open_run`` normalises the locations, applies the location policy and loads a user extraction before the
manifest is read; ``check_output_writable``, ``acquire_output`` (the output's lease, one run at a time) and
``recover_output`` guard the output before any inference, ``release_output`` gives the lease back;
``prepare_model`` fetches (if remote), checks and identifies the model files; ``make_spec`` is the plain-data
description of the run that every chunk receives. A problem found here is a ``RunError``: one clear message,
before any document is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from medvlm_core.errors import DocumentError, RunError
from medvlm_core.inputs.prompts import Prompt, get_prompt, register_extraction
from medvlm_core.model.cache import resolve_model_files
from medvlm_core.model.files import ModelIdentity, identify_model
from medvlm_core.model.image_tokens import image_tokens_of
from medvlm_core.model.memory_plan import MemoryPlan, plan_document_memory, plan_memory
from medvlm_core.model.spark_nlp import read_saved_params, saved_options
from medvlm_core.output import done_index
from medvlm_core.output.lease import OutputLease
from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.publish import recover_interrupted_publishes
from medvlm_core.output.structured import load_extraction
from medvlm_core.run.options import RunOptions, StorageOptions, requested_options
from medvlm_core.run.params import EngineConfig, params_json
from medvlm_core.run.spec import RunSpec
from medvlm_core.settings import Settings
from medvlm_core.storage import Storage, s3_options
from medvlm_core.storage.locations import LocationPolicy

# Resolves a run's S3 credentials from its storage options (a Prefect block, an Airflow connection): a dict of
# aws_access_key_id, aws_secret_access_key, aws_session_token, profile_name, region_name, endpoint_url (those set).
CredentialsSource = Callable[[StorageOptions], dict[str, Any]]


def build_storage(options: StorageOptions, settings: Settings, credentials: CredentialsSource | None = None) -> Storage:
    """The run's Storage: explicit options, then the orchestrator's credentials, then the AWS environment.

    Args:
        options: the run's storage options (``sse`` asks S3 to encrypt every object the run writes).
        settings: the process settings (the endpoint when the run names none, the retry policy).
        credentials: resolves the credentials for ``options`` (None: the AWS environment only).

    Returns:
        The storage.

    Raises:
        RunError: the credentials cannot be resolved (the message names their source, never a value).
    """
    creds = credentials(options) if credentials is not None else {}
    extra = dict(options.storage_options or {})
    if creds.get("region_name"):
        extra["client_kwargs"] = dict(extra.get("client_kwargs") or {}, region_name=creds["region_name"])
    if options.sse:
        sse = dict(extra.get("s3_additional_kwargs") or {}, ServerSideEncryption=options.sse)
        if options.sse_kms_key_id:
            sse["SSEKMSKeyId"] = options.sse_kms_key_id
        extra["s3_additional_kwargs"] = sse
    s3 = s3_options(
        endpoint_url=options.s3_endpoint or creds.get("endpoint_url") or settings.s3_endpoint,
        key=creds.get("aws_access_key_id"),
        secret=creds.get("aws_secret_access_key"),
        token=creds.get("aws_session_token"),
        profile=creds.get("profile_name"),
        extra=extra,
    )
    return Storage({"s3": s3}, retry=settings.retry_policy())


def make_run_id(started: datetime, source_id: str | None = None) -> str:
    """A sortable, unique run id.

    Args:
        started: the run's start (UTC).
        source_id: the orchestrator's id of this run (e.g. the Prefect flow run id), so tables and the
            orchestrator join (another form, such as Airflow's ``airflow:dag/run/task``, by its sha256); a random
            id when None.

    Returns:
        ``YYYYMMDDTHHMMSSZ-xxxxxxxx``.
    """
    source = (source_id or uuid.uuid4().hex).replace("-", "")
    if not re.fullmatch(r"[0-9a-f]{8,}", source):  # not a UUID (Airflow's dag/run/task): its digest names the run
        source = hashlib.sha256(source.encode()).hexdigest()
    return f"{started:%Y%m%dT%H%M%SZ}-{source[:8]}"


@dataclass
class RunContext:
    """Everything a run knows before it reads the manifest: where, how, with which settings."""

    run_id: str
    started: datetime
    output: OutputLayout
    model: str
    mmproj: str | None
    options: RunOptions
    settings: Settings
    storage: Storage
    policy: LocationPolicy = field(default_factory=LocationPolicy)
    # The options the caller set (flat names): a model zip's saved parameters fill in only the others, and a
    # fan-out hands exactly these to its shards (which then resolve the same defaults).
    requested: dict[str, Any] = field(default_factory=dict)
    # The options a model zip's saved parameters set (``prepare_model``), for the log and the audit.
    saved_defaults: dict[str, Any] = field(default_factory=dict)
    # The memory plan of the engine (``prepare_model``): the parallelism that fits.
    memory: MemoryPlan | None = None
    # The output's lease while this run holds it (``acquire_output``); shards work under their parent's.
    lease: OutputLease | None = None

    def next_run(self, started: datetime, source_id: str | None = None) -> "RunContext":
        """Another run with the same locations, options and settings (the nightly flow's runs).

        Args:
            started: the new run's start.
            source_id: the orchestrator's id for it (see ``make_run_id``).

        Returns:
            The new run's context, with its own storage (its own retry count).
        """
        return dataclasses.replace(self, run_id=make_run_id(started, source_id), started=started, storage=self.storage.fresh(),
                                   lease=None)

    @property
    def default_prompt(self) -> Prompt:
        """The prompt for rows that do not bring their own."""
        prompting = self.options.prompting
        return get_prompt(prompting.prompt_id, prompting.prompt, prompting.system_prompt)


def open_run(
    run_id: str,
    started: datetime,
    output: str,
    model: str,
    mmproj: str | None,
    options: RunOptions | dict[str, Any] | None,
    settings: Settings,
    storage: Storage,
) -> RunContext:
    """Check a run's locations against its policy and load its extraction definition.

    Args:
        run_id: the run's id (``make_run_id``).
        started: its start (UTC).
        output: the output URI.
        model: the model URI (a GGUF, or a .zip bundle).
        mmproj: the mmproj URI (None with a bundle).
        options: the run's options (a flow's ``options`` parameter).
        settings: the process settings.
        storage: the run's storage.

    Returns:
        The run's context (with the extraction's prompt id as the default prompt when none was chosen).

    Raises:
        RunError: a location outside the allowed ones, or an unreadable extraction definition.
    """
    requested = requested_options(options)
    options = RunOptions.parse(requested)
    layout = OutputLayout.of(output)
    policy = LocationPolicy(options.policy.allowed_locations)
    policy.require(layout.root, "output")
    policy.require(model, "model")
    if mmproj:
        policy.require(mmproj, "mmproj")
    if options.prompting.chat_template_file:
        policy.require(options.prompting.chat_template_file, "chat template")
    extraction = options.prompting.extraction
    if extraction:
        policy.require(extraction, "extraction definition")
        prompt_id = _register_extraction(storage, extraction)
        if options.prompting.prompt_id is None and options.prompting.prompt is None:
            requested = dict(requested, prompt_id=prompt_id)  # the default prompt when the run names none
            options = RunOptions.parse(requested)
    return RunContext(run_id, started, layout, model, mmproj, options, settings, storage, policy, requested)


def _register_extraction(storage: Storage, url: str) -> str:
    """Register the user extraction in the prompt library (before the manifest is validated, whose prompt
    ids it checks); its prompt id."""
    try:
        text = storage.read_bytes(url, max_bytes=1024 * 1024).decode("utf-8")
        prompt_id, prompt_text, schema = load_extraction(text, url)
    except DocumentError as exc:
        raise RunError(f"extraction definition cannot be read: {exc.message}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(str(exc)) from None
    register_extraction(prompt_id, prompt_text, schema)
    return prompt_id


def check_output_writable(ctx: RunContext) -> None:
    """Fail before any inference if the output refuses writes (a full run lost at publish is worse).

    Args:
        ctx: the run.

    Raises:
        RunError: access denied, or the location cannot be written.
    """
    probe = ctx.output.write_probe(ctx.run_id)
    try:
        ctx.storage.write_bytes_atomic(probe, b"ok")
        ctx.storage.remove_tree(probe)
    except PermissionError:
        raise RunError(f"output {ctx.output.root}: access denied (check the credentials and the bucket policy)") from None
    except OSError as exc:
        raise RunError(f"output {ctx.output.root}: cannot be written ({exc.strerror or type(exc).__name__})") from None


def acquire_output(ctx: RunContext, logger: Any = None) -> OutputLease:
    """Take the output's lease for this run (before it finishes interrupted publishes and loads the done keys)
    and keep it renewed until ``release_output``.

    A second run on the same output waits for the holder to give it back (``on_busy="wait"``, at most
    ``busy_wait_seconds``, logging which run holds it) or fails at once (``on_busy="fail"``); a lease whose
    holder died is taken over (see ``medvlm_core.output.lease``).

    Args:
        ctx: the run.
        logger: where waiting and take-overs are logged.

    Returns:
        The lease (also ``ctx.lease``).

    Raises:
        RunError: another run holds the lease (naming it) and this run may not wait, or waited in vain.
    """
    if ctx.lease is not None and ctx.lease.held is not None:
        return ctx.lease
    output = ctx.options.output
    lease = OutputLease(ctx.storage, ctx.output, ctx.run_id, ctx.settings.lease_ttl_s, ctx.settings.lease_poll_s, logger)
    try:
        lease.acquire(output.on_busy, output.busy_wait_seconds)
    except PermissionError:
        raise RunError(f"output {ctx.output.root}: access denied (check the credentials and the bucket policy)") from None
    except OSError as exc:
        raise RunError(f"output {ctx.output.root}: its lease cannot be written ({exc.strerror or type(exc).__name__})") from None
    ctx.lease = lease
    lease.start_renewing()
    return lease


def ensure_output_held(ctx: RunContext) -> None:
    """Right before publishing: check that this run still holds the output's lease (no-op for a run without one).

    Args:
        ctx: the run.

    Raises:
        RunError: another run took the lease over (this run was stalled past the lease's life): nothing may be
            published, the other run does these pages.
    """
    if ctx.lease is not None:
        ctx.lease.ensure_held()


def release_output(ctx: RunContext) -> bool:
    """Give the output's lease back (after publishing, and on every failure path); safe to call twice.

    Args:
        ctx: the run.

    Returns:
        True if this call gave it back.
    """
    lease, ctx.lease = ctx.lease, None
    return lease.release() if lease is not None else False


def hand_over_output(ctx: RunContext, ttl_s: float) -> str:
    """Keep the output's lease for this run after this process ends (``OutputLease.hand_over``): the planning
    step of a fan-out whose steps run in separate processes.

    Args:
        ctx: the run, holding the lease.
        ttl_s: how long the lease stays held until a later step takes it back.

    Returns:
        The token ``take_back_output`` needs.

    Raises:
        RunError: the run does not hold the lease.
    """
    lease, ctx.lease = ctx.lease, None
    if lease is None:
        raise RunError(f"output {ctx.output.root}: run {ctx.run_id} does not hold its lease")
    return lease.hand_over(ttl_s)


def take_back_output(ctx: RunContext, token: str) -> OutputLease:
    """Hold again, in this process, the lease an earlier step of this run handed over; renewed until
    ``release_output``.

    Args:
        ctx: the run.
        token: what ``hand_over_output`` returned.

    Returns:
        The lease (also ``ctx.lease``).

    Raises:
        RunError: the lease was lost meanwhile (nothing may be published).
    """
    lease = OutputLease(ctx.storage, ctx.output, ctx.run_id, ctx.settings.lease_ttl_s, ctx.settings.lease_poll_s)
    lease.take_back(token)
    lease.renew()
    ctx.lease = lease
    lease.start_renewing()
    return lease


def recover_output(ctx: RunContext) -> list[str]:
    """Finish publishing the runs on this output that were killed half-way through it, then fold any published
    run the done index lacks into it (``medvlm_core.output.done_index.catch_up``), so shards read only the index.

    Args:
        ctx: the run, holding the output's lease (before it decides which pages are done).

    Returns:
        The run ids whose publish was finished.
    """
    recovered = recover_interrupted_publishes(ctx.storage, ctx.output)
    done_index.catch_up(ctx.storage, ctx.output)
    return recovered


def prepare_model(ctx: RunContext) -> tuple[EngineConfig, ModelIdentity]:
    """Local model files (downloaded once if remote, checked against the expected hashes), their identity
    and the engine config.

    Args:
        ctx: the run.

    Returns:
        ``(engine config, model identity)``.

    Raises:
        RunError: a missing, mismatched or unusable model file, or a model that does not fit in memory even at
            one page.
    """
    model_path, mmproj_path, bundle = resolve_model_files(
        ctx.model, ctx.mmproj, ctx.storage, ctx.settings.cache_dir,
        ctx.options.model.model_sha256, ctx.options.model.mmproj_sha256,
    )
    saved_template = _apply_saved_parameters(ctx, bundle) if bundle else None
    template = _read_chat_template(ctx) or saved_template
    engine = EngineConfig.of(model_path, mmproj_path, ctx.options.engine, template)
    # A template of one's own is rendered by the generic handler, unless a chat format is forced.
    requested = engine.chat_format or ("mtmd" if template else None)
    identity = identify_model(engine.model_path, engine.mmproj_path, requested, ctx.settings.cache_dir)
    ctx.memory = _plan_memory(ctx, engine)
    if ctx.memory.n_parallel < engine.n_parallel:  # the answers do not depend on it (tested)
        engine = engine.replace(n_parallel=ctx.memory.n_parallel)
    return engine, identity


def _plan_memory(ctx: RunContext, engine: EngineConfig) -> MemoryPlan:
    """The engine's memory plan; at document scope, for prompts of as many pages as fit one sequence (the pages
    of requests waiting for a slot take host memory a page's request does not)."""
    budget, gpu = ctx.settings.memory_budget_mb, ctx.settings.cuda_visible_devices
    if ctx.options.documents.scope != "document":
        return plan_memory(engine, budget, gpu)
    side = int(ctx.options.images.max_pixels ** 0.5)
    per_page = image_tokens_of(engine.mmproj_path).estimate(side, side)
    if not per_page:  # no estimate for this projector: planned as pages (the engine still refuses overflows)
        return plan_memory(engine, budget, gpu)
    pages = max(1, min(ctx.options.documents.max_document_pages, engine.n_ctx // per_page))
    return plan_document_memory(engine, pages, per_page, ctx.options.images.max_pixels, budget, gpu)


def _apply_saved_parameters(ctx: RunContext, bundle: str) -> str | None:
    """A model zip's saved parameters become the run's options wherever the caller set none; its chat template."""
    saved, template = saved_options(read_saved_params(bundle))
    applied = {k: v for k, v in saved.items() if k not in ctx.requested}
    if applied:
        try:
            ctx.options = RunOptions.parse({**applied, **ctx.requested})
        except RunError as exc:
            raise RunError(f"{ctx.model}: the parameters saved in the model zip are not usable: {exc}") from None
        ctx.saved_defaults = applied
    return template


def _read_chat_template(ctx: RunContext) -> str | None:
    url = ctx.options.prompting.chat_template_file
    if not url:
        return None
    try:
        return ctx.storage.read_bytes(url, max_bytes=1024 * 1024).decode("utf-8")
    except DocumentError as exc:
        raise RunError(f"chat template cannot be read: {exc.message}") from None
    except UnicodeDecodeError:
        raise RunError(f"{url}: the chat template is not UTF-8 text") from None


def make_spec(ctx: RunContext, engine: EngineConfig, identity: ModelIdentity) -> RunSpec:
    """The plain-data description of the run that every chunk receives.

    Args:
        ctx: the run.
        engine: its engine config.
        identity: its model's identity.

    Returns:
        The run spec.
    """
    generation, images = ctx.options.generation, ctx.options.images
    return RunSpec(
        run_id=ctx.run_id, layout=ctx.output, engine=engine, model=identity, generation=generation, images=images,
        default_prompt=ctx.default_prompt,
        params_json=params_json(generation, images, identity.chat_format, engine, engine.chat_template),
        fetch_workers=ctx.settings.fetch_workers, force=ctx.options.output.force, documents=ctx.options.documents,
    )


def chunk_rows(ctx: RunContext) -> int:
    """Manifest rows per inference task for this run.

    Args:
        ctx: the run.

    Returns:
        The run's ``chunk_size`` option, else the settings' (at least 8 batches' worth).
    """
    return ctx.options.output.chunk_size or ctx.settings.chunk_rows(ctx.options.engine.n_parallel)
