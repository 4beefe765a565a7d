"""One definition of every run option: the CLI flags, the flows' ``options`` parameter and their validation all
come from ``RunOptions``. No model and no Prefect server: these are fast."""

from __future__ import annotations

import inspect

import pytest

from medvlm.flows.batch import medvlm_batch
from medvlm.flows.cli import build_parser, flow_options
from medvlm.flows.fanout import medvlm_fanout
from medvlm.flows.nightly import medvlm_nightly
from medvlm.flows.shard import medvlm_shard
from medvlm_core.errors import RunError
from medvlm_core.run.options import GROUPS, RunOptions, option_fields

LOCATIONS = ["--manifest", "m.csv", "--output", "out", "--model", "m.gguf", "--mmproj", "p.gguf"]


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here runs a flow."""
    yield


def run_args(*flags: str):
    return build_parser().parse_args(["run", *LOCATIONS, *flags])


def test_option_names_are_unique_and_never_a_group_name():
    names = [f.name for f in option_fields()]
    assert len(names) == len(set(names)) and not set(names) & set(GROUPS)  # a flat key names one option


def test_every_option_is_a_flag_with_its_help_and_default():
    run = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]
    by_dest = {a.dest: a for a in run._actions}
    for field in option_fields():
        if (field.info.json_schema_extra or {}).get("cli", "") is None:
            assert field.name not in by_dest  # deployment-only option (s3fs options)
            continue
        action = by_dest[field.name]
        assert field.info.description and field.info.description.split(" (")[0] in (action.help or ""), field.name
    # no flags: exactly the model's defaults
    assert RunOptions.parse(flow_options(run_args())) == RunOptions()


def test_flags_map_onto_the_same_options_as_a_flow_parameter():
    args = run_args("--max-tokens", "7", "--temperature", "0.5", "--stop", "A", "--stop", "B", "--no-isolate",
                    "--n-parallel", "3", "--force", "--allow", "/data", "--sse", "AES256", "--image-max-tokens", "64",
                    "--mode", "structured")
    from_cli = RunOptions.parse(flow_options(args))
    flat = RunOptions.parse({"max_tokens": 7, "temperature": 0.5, "stop": ["A", "B"], "isolate": False, "n_parallel": 3,
                             "force": True, "allowed_locations": ["/data"], "sse": "AES256", "image_max_tokens": 64,
                             "prompt_id": "clinical_extraction"})
    nested = RunOptions.parse({"generation": {"max_tokens": 7, "temperature": 0.5, "stop": ["A", "B"]},
                               "engine": {"isolate": False, "n_parallel": 3, "image_max_tokens": 64},
                               "output": {"force": True}, "policy": {"allowed_locations": ["/data"]},
                               "storage": {"sse": "AES256"}, "prompting": {"prompt_id": "clinical_extraction"}})
    assert from_cli == flat == nested
    assert (from_cli.generation.stop, from_cli.engine.isolate, from_cli.policy.allowed_locations) == (("A", "B"), False, ["/data"])
    # what a fan-out hands its shards round-trips
    assert RunOptions.parse(from_cli.flat()) == from_cli


@pytest.mark.parametrize("values, message", [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"top_p": 1.5}, "top_p must be <= 1"),
    ({"n_ctx": 100}, "n_ctx must be >= 256"),
    ({"sse": "rot13"}, "sse must be one of"),
    ({"max_tokenz": 5}, "unknown run option(s): max_tokenz"),
    ({"generation": {"max_tokenz": 5}}, "unknown run option(s): max_tokenz"),
    ({"n_parallel": "Patient John Doe, DOB 1950-01-01"}, "n_parallel: Input should be a valid integer"),
])
def test_a_bad_option_is_one_line_naming_it_without_its_value(values, message):
    with pytest.raises(RunError) as caught:
        RunOptions.parse(values)
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert "John Doe" not in text  # a value can be PHI (a prompt): never echoed


def test_abbreviated_flags_are_not_taken_for_others():
    parser = build_parser()
    assert parser.parse_args(["demo", "--mode", "structured"]).mode == "structured"  # not --model
    with pytest.raises(SystemExit):
        parser.parse_args(["run", *LOCATIONS, "--max-tok", "5"])


def test_the_four_flows_take_options_the_same_way():
    for flow in (medvlm_batch, medvlm_shard, medvlm_fanout, medvlm_nightly):
        parameter = inspect.signature(flow.fn).parameters["options"]
        assert parameter.annotation in ("RunOptions | None", RunOptions | None), flow.name
    # the deployment form Prefect shows: one section per group, with the knobs' limits and help
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(medvlm_batch).model_dump_for_openapi()
    definitions = schema["definitions"]
    run_options = definitions["RunOptions"]
    assert list(run_options["properties"]) == list(GROUPS)
    max_tokens = definitions["GenerationParams"]["properties"]["max_tokens"]
    assert (max_tokens["default"], max_tokens["minimum"]) == (512, -1) and max_tokens["description"]  # -1: to the end
    # what Prefect's server checks a deployment run's parameters against: flat and grouped both pass
    import jsonschema

    for options in ({"max_tokens": 5, "n_ctx": 4096}, {"generation": {"max_tokens": 5}}):
        jsonschema.validate({"manifest": "m", "output": "o", "model": "m.gguf", "options": options}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"manifest": "m", "output": "o", "model": "m", "options": {"generation": {"bogus": 1}}}, schema)


def test_the_cli_lists_every_built_in_query():
    from medvlm.flows.cli import EXAMPLES
    from medvlm_core.analytics import EXAMPLE_QUERIES

    assert set(EXAMPLES) == set(EXAMPLE_QUERIES)  # named without importing DuckDB at start-up; kept equal here
