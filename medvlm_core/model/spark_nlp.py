"""The parameters a vendor saved with a Spark NLP llama.cpp model zip, as medvlm run options.

A John Snow Labs model zip (``AutoGGUFVisionModel`` / ``MedicalVisionLLM``) is a Spark ML model folder: the text
GGUF, the mmproj GGUF, and ``metadata/part-00000``, one JSON line in Spark ML's ``DefaultParamsWriter`` format:
``class``, ``uid``, ``paramMap`` (the parameters the vendor set) and ``defaultParamMap`` (Spark NLP's generic
defaults). medvlm uses the ``paramMap`` as the run's defaults wherever the user did not set an option; Spark NLP's
generic defaults are not the vendor's choice and are left alone.
"""

from __future__ import annotations

import json
import zipfile
from typing import Any, Callable

from medvlm_core.errors import RunError

METADATA = "metadata/part-00000"


def _identity(value: Any) -> Any:
    return value


def _split_mode(value: Any) -> str:
    return str(value).lower()


def _mirostat(value: Any) -> int:
    text = str(value).upper()
    return {"DISABLED": 0, "V1": 1, "V2": 2, "MIROSTAT": 1, "MIROSTAT_V2": 2}.get(text, 0) if not text.isdigit() else int(text)


def _token_bias(value: Any) -> dict:
    return {str(int(k)): float(v) for k, v in dict(value).items()}


# Spark NLP parameter -> (medvlm run option, conversion). The parameter table in docs/models.md says the same.
SPARK_TO_OPTION: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "nCtx": ("n_ctx", int),
    "nBatch": ("n_batch", int),
    "nUbatch": ("n_ubatch", int),
    "nThreads": ("n_threads", int),
    "nThreadsBatch": ("n_threads_batch", int),
    "nGpuLayers": ("n_gpu_layers", int),
    "mainGpu": ("main_gpu", int),
    "gpuSplitMode": ("split_mode", _split_mode),
    "flashAttention": ("flash_attn", bool),
    "useMmap": ("use_mmap", bool),
    "useMlock": ("use_mlock", bool),
    "systemPrompt": ("system_prompt", str),
    "nPredict": ("max_tokens", int),
    "temperature": ("temperature", float),
    "topK": ("top_k", int),
    "topP": ("top_p", float),
    "minP": ("min_p", float),
    "typicalP": ("typical_p", float),
    "repeatPenalty": ("repeat_penalty", float),
    "repeatLastN": ("repeat_last_n", int),
    "frequencyPenalty": ("frequency_penalty", float),
    "presencePenalty": ("presence_penalty", float),
    "mirostat": ("mirostat", _mirostat),
    "mirostatTau": ("mirostat_tau", float),
    "mirostatEta": ("mirostat_eta", float),
    "dynamicTemperatureRange": ("dynatemp_range", float),
    "dynamicTemperatureExponent": ("dynatemp_exponent", float),
    "minKeep": ("min_keep", int),
    "seed": ("seed", int),
    "nProbs": ("logprobs", int),
    "stopStrings": ("stop", list),
    "tokenIdBias": ("logit_bias", _token_bias),
    "disableTokenIds": ("banned_tokens", list),
}
# Saved, but not run options: the chat template is text (medvlm's option names a file), the thinking tag sets
# two markers, and the rest has no llama.cpp counterpart medvlm exposes (see the table in docs/models.md).
NOT_MAPPED = ("useChatTemplate", "nKeep", "grammar", "tfsZ", "penalizeNl", "ignoreEos", "tokenBias", "samplers",
              "noKvOffload", "inputPrefix", "inputSuffix", "batchSize", "nDraft", "logVerbosity", "disableLog")


def read_saved_params(zip_path: str) -> dict[str, Any]:
    """The ``paramMap`` of a Spark NLP model zip (empty when the zip has no Spark ML metadata).

    Args:
        zip_path: the local model zip.

    Returns:
        Spark parameter name -> the value the vendor saved.

    Raises:
        RunError: the metadata exists but is not Spark ML's JSON.
    """
    with zipfile.ZipFile(zip_path) as bundle:
        names = [n for n in bundle.namelist() if n == METADATA or n.endswith("/" + METADATA)]
        if not names:
            return {}
        text = bundle.read(min(names, key=len)).decode("utf-8", errors="replace")
    try:
        record = json.loads(text.strip().splitlines()[0])
        params = record.get("paramMap") or {}
        if not isinstance(params, dict):
            raise ValueError("paramMap is not an object")
    except (ValueError, IndexError, AttributeError) as exc:
        raise RunError(f"{zip_path}: {METADATA} is not Spark ML metadata ({type(exc).__name__})") from None
    return params


def saved_options(params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Run options (flat names) and a chat template from a model zip's saved Spark NLP parameters.

    Args:
        params: ``read_saved_params``'s result.

    Returns:
        ``(options, chat template text or None)``; a value that does not convert is left out (the run's own
        default then holds), and so are the parameters of ``NOT_MAPPED``.
    """
    options: dict[str, Any] = {}
    for name, value in params.items():
        if name not in SPARK_TO_OPTION or value is None:
            continue
        option, convert = SPARK_TO_OPTION[name]
        try:
            options[option] = convert(value)
        except (TypeError, ValueError):
            continue
    tag = params.get("removeThinkingTag")
    if isinstance(tag, str) and tag.strip():
        tag = tag.strip().strip("<>/")
        options.update(reasoning="separate", think_open=f"<{tag}>", think_close=f"</{tag}>")
    template = params.get("chatTemplate")
    return options, template if isinstance(template, str) and template.strip() else None
