"""One definition of every run option: ``RunOptions``, composed of the typed configs.

A run's options are grouped by what they shape: the prompt, the scope (pages or whole documents), sampling (``GenerationParams``), page images
(``ImageOptions``), the engine (``EngineOptions``), the model files' expected hashes, storage, the output and
the location policy. Each knob is one field with its default, limits and help text; the ``medvlm`` CLI flags
(``flows.cli``), the four flows' ``options`` parameter (and with it the form Prefect's UI shows for a
deployment run) are derived from these fields, so adding a knob is one edit.

Options are accepted nested (``{"generation": {"max_tokens": 64}}``) or flat (``{"max_tokens": 64}``): every
field name is unique across the groups, so a flat key names its group unambiguously. This is what keeps
``prefect deployment run ... --param options='{"max_tokens": 64}'`` short.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from typing import Any, Dict, Iterator, List, Literal, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from medvlm_core.errors import RunError
from medvlm_core.run.params import STRICT, EngineOptions, GenerationParams, ImageOptions


@dataclass(frozen=True, kw_only=True, config=STRICT)
class PromptOptions:
    """What the model is asked."""

    prompt_id: Optional[str] = Field(None, description="prompt of the library (default clinical_analysis)")
    prompt: Optional[str] = Field(None, description="free prompt text for every row (rows may still set their own)")
    # A JSON file (prompt_id, prompt, schema); see medvlm_core.output.structured.
    extraction: Optional[str] = Field(None, description="your own extraction: JSON file with prompt_id, prompt and a JSON schema")
    system_prompt: Optional[str] = Field(None, description="system prompt sent before every page's question "
                                         "(library prompts may bring their own) [systemPrompt]")
    # For a GGUF without tokenizer.chat_template; its sha256 goes into params_json.
    chat_template_file: Optional[str] = Field(None, description="Jinja chat template file (path or s3://) used instead "
                                              "of the model's own; implies chat format mtmd [chatTemplate]")


@dataclass(frozen=True, kw_only=True, config=STRICT)
class DocumentOptions:
    """Whether a run answers each page, or each whole document from all its pages (docs/documents.md)."""

    scope: Literal["page", "document"] = Field(
        "page", description="page: one answer per page; document: one answer per document from all its pages "
        "(or the pages its manifest rows name), in page order")
    document_method: Literal["auto", "single_prompt", "map_reduce"] = Field(
        "auto", description="at document scope: all pages in one prompt (single_prompt), each page then a "
        "text-only consolidation (map_reduce), or single_prompt when the pages fit n_ctx, else map_reduce (auto)")
    max_document_pages: int = Field(
        50, ge=1, description="at document scope: a document with more pages is an error row naming this limit")


@dataclass(frozen=True, kw_only=True, config=STRICT)
class ModelOptions:
    """Checks on the model files a run loads."""

    model_sha256: Optional[str] = Field(None, description="expected sha256 of the model (refused on mismatch)")
    mmproj_sha256: Optional[str] = Field(None, description="expected sha256 of the mmproj (refused on mismatch)")


@dataclass(frozen=True, kw_only=True, config=STRICT)
class StorageOptions:
    """How the run reaches S3 (credentials come from the environment or a block, never from here)."""

    s3_endpoint: Optional[str] = Field(None, description="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")
    # Not on the CLI: a dict of s3fs options for deployments; put no secrets here (parameters are stored).
    storage_options: Optional[Dict[str, Any]] = Field(None, description="extra s3fs options (no secrets)",
                                                      json_schema_extra={"cli": None})
    credentials_block: Optional[str] = Field(None, description="Prefect block with the S3 credentials: aws-credentials/NAME, s3-bucket/NAME (prefect-aws) or a Secret block's name")
    sse: Optional[Literal["AES256", "aws:kms"]] = Field(None, description="server-side encryption of what the run writes to S3")
    sse_kms_key_id: Optional[str] = Field(None, description="KMS key for sse aws:kms")


@dataclass(frozen=True, kw_only=True, config=STRICT)
class OutputOptions:
    """How results are produced into the output."""

    force: bool = Field(False, description="re-run pages that already have an ok result in the output")
    chunk_size: Optional[int] = Field(None, ge=1, description="manifest rows per inference task (default: MEDVLM_CHUNK_SIZE, at least 8 x n_parallel)")
    # One run at a time holds an output's lease (medvlm_core.output.lease); these say what a second one does.
    on_busy: Literal["wait", "fail"] = Field(
        "wait", description="when another run holds the output's lease: wait for it (up to busy_wait_seconds), "
        "or fail at once naming that run")
    busy_wait_seconds: float = Field(3600.0, ge=0, description="longest wait for another run's lease on the output, "
                                     "in seconds, before the run fails")


@dataclass(frozen=True, kw_only=True, config=STRICT)
class PolicyOptions:
    """Where the run may read and write."""

    allowed_locations: Optional[List[str]] = Field(
        None, description="allowed S3 prefix or local root (repeatable); documents elsewhere are quarantined",
        json_schema_extra={"cli": "--allow"},
    )


class OptionField(NamedTuple):
    """One knob: its group, its name and its pydantic field (default, type, limits, description)."""

    group: str
    name: str
    info: FieldInfo
    annotation: Any


class RunOptions(BaseModel):
    """Every knob of a run besides its locations (manifest, output, model, mmproj)."""

    # extra="forbid" for parse(); the JSON schema allows more keys at the top level because that is where the flat
    # form's keys go: Prefect's server validates a deployment run's parameters against this schema, and
    # parse() checks every flat key afterwards (an unknown one is still refused, by name).
    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra={"additionalProperties": True})

    prompting: PromptOptions = Field(default_factory=PromptOptions)
    documents: DocumentOptions = Field(default_factory=DocumentOptions)
    generation: GenerationParams = Field(default_factory=GenerationParams)
    images: ImageOptions = Field(default_factory=ImageOptions)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    model: ModelOptions = Field(default_factory=ModelOptions)
    storage: StorageOptions = Field(default_factory=StorageOptions)
    output: OutputOptions = Field(default_factory=OutputOptions)
    policy: PolicyOptions = Field(default_factory=PolicyOptions)

    @model_validator(mode="before")
    @classmethod
    def _accept_flat_keys(cls, data: Any) -> Any:
        """Route flat option names into their groups; an unknown name is an error that names it."""
        if not isinstance(data, dict):
            return data
        owner = {f.name: f.group for f in option_fields()}
        nested: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key in GROUPS:
                group = value if not dataclasses.is_dataclass(value) else asdict(value)
                nested[key] = {**nested.get(key, {}), **dict(group or {})}
            elif key in owner:
                nested.setdefault(owner[key], {})[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"unknown run option(s): {', '.join(sorted(map(str, unknown)))}")
        return nested

    @classmethod
    def parse(cls, value: "RunOptions | dict[str, Any] | None") -> "RunOptions":
        """Options from a flow parameter: an instance, a (flat or nested) dict, or None for the defaults.

        Args:
            value: what the caller passed.

        Returns:
            The validated options.

        Raises:
            RunError: naming each bad option and why (never echoing its value: a prompt may be PHI).
        """
        if isinstance(value, RunOptions):
            return value
        try:
            return cls.model_validate(value or {})
        except ValidationError as exc:
            raise RunError("; ".join(_describe(e) for e in exc.errors())) from None

    def flat(self) -> dict[str, Any]:
        """Every option by its (unique) name, e.g. to hand to a shard run as a parameter.

        Returns:
            Field name -> value (JSON-compatible).
        """
        dumped = self.model_dump(mode="json")
        return {name: value for group in GROUPS for name, value in dumped[group].items()}


GROUPS = tuple(RunOptions.model_fields)


def requested_options(value: "RunOptions | dict[str, Any] | None") -> dict[str, Any]:
    """The options a caller set, by their flat names: what defaults from elsewhere (a model zip's saved
    parameters) must not override, and what a fan-out hands its shards.

    Args:
        value: a flow's ``options`` parameter: a flat or grouped dict (its keys are what was set), an instance
            (the values that differ from the defaults are what was set), or None.

    Returns:
        Option name -> value.

    Raises:
        RunError: an unknown option.
    """
    if value is None:
        return {}
    if isinstance(value, RunOptions):
        defaults = RunOptions().flat()
        return {k: v for k, v in value.flat().items() if v != defaults[k]}
    if not isinstance(value, dict):
        raise RunError(f"options must be an object of run options, got {type(value).__name__}")
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if key in GROUPS and isinstance(item, dict):
            flat.update(item)
        elif key in GROUPS and dataclasses.is_dataclass(item):
            flat.update(asdict(item))
        else:
            flat[key] = item
    return flat


def option_fields() -> Iterator[OptionField]:
    """Every knob of ``RunOptions``, group by group, in declaration order.

    Returns:
        An iterator of ``OptionField``.
    """
    for group, field in RunOptions.model_fields.items():
        config_type = field.annotation
        for name, info in config_type.__pydantic_fields__.items():
            yield OptionField(group, name, info, info.annotation)


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as ``name must be >= 1``: the option's name and the rule, not its value."""
    loc = [str(part) for part in error.get("loc", ()) if not isinstance(part, int)]
    name = loc[-1] if loc else "options"
    ctx = error.get("ctx") or {}
    rules = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}", "less_than": "< {lt}"}
    kind = error.get("type", "")
    if kind in rules:
        return f"{name} must be {rules[kind].format(**ctx)}"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown run option(s): {name}"
    if kind == "literal_error":
        return f"{name} must be one of {ctx.get('expected', '')}"
    if kind == "value_error":
        return str(ctx.get("error", error.get("msg", "")))
    return f"{name}: {error.get('msg', 'invalid')}"
