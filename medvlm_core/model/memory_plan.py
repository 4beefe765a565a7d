"""Memory planning at load: will ``n_parallel`` pages of ``n_ctx`` tokens fit on this device?

From the text GGUF's metadata (layers, KV heads, key and value head sizes) and the KV cache type, the KV cache of
the batched context is ``cells x layers x kv_heads x (key + value head size) x bytes per element``, with
``n_parallel x n_ctx`` cells (each sequence rounded up to 256 as llama.cpp does), exactly what llama.cpp allocates
(a test compares it with llama.cpp's own report). To it come the weights (both files' sizes, the projector once per
encoder context), the isolated child's small single-sequence context, and an estimate of llama.cpp's compute buffers (the logits of a batch plus a fixed
headroom). When the total exceeds the budget (the GPU's free memory when layers are offloaded to one, else the
host's available memory; ``MEDVLM_MEMORY_BUDGET_MB`` overrides), ``n_parallel`` is lowered to what fits, or the run
stops with the numbers when even one page does not.

Document scope (several pages in one prompt) changes nothing on the device for a given ``n_ctx``: a sequence holds
``n_ctx`` cells whatever fills them, and llama.cpp sizes its compute buffers by ``n_ubatch``, not by the prompt.
What grows is (1) the context a document needs (``document_n_ctx``: the run level raises ``n_ctx`` to it, or
answers page by page, and plans with that ``n_ctx`` as ever) and (2) host memory: the encoded embeddings of the
requests waiting for a slot, and with ``isolate`` their pixels in shared memory, both per page of a request
(``document_host_mb``). ``plan_document_memory`` is ``plan_memory`` with (2) counted for requests of several pages
where the budget is the host's; for one page per request it is ``plan_memory`` itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass

from medvlm_core.errors import RunError
from medvlm_core.model.files import read_gguf_metadata
from medvlm_core.run.params import EngineConfig

MIB = 1024 * 1024
# Bytes per KV element: f16 2, f32 4, q8_0 34 bytes per block of 32.
KV_BYTES = {"f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}
# llama.cpp's compute buffers and the vision encoder's activations, beyond the logits: measured at 2-300 MiB
# for 7B models; generous on purpose (an estimate that is too low fails at load).
COMPUTE_HEADROOM = 512 * MIB


@dataclass(frozen=True)
class MemoryPlan:
    """What a run's engine needs, what the device has, and the parallelism chosen."""

    requested_parallel: int
    n_parallel: int
    weights_mb: float
    kv_mb_per_page: float
    compute_mb: float
    needed_mb: float  # at the chosen n_parallel
    budget_mb: float
    budget_source: str  # "setting", "gpu" or "host"

    def as_dict(self) -> dict:
        """The plan for the run's records.

        Returns:
            Field name -> value.
        """
        return asdict(self)


def _text_shape(path: str) -> dict[str, int]:
    meta = read_gguf_metadata(path)
    arch = str(meta.get("general.architecture", "llama"))

    def get(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise RunError(f"{path}: GGUF metadata lacks {arch}.{key} (needed to plan memory)")
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    heads = get("attention.head_count")
    head_dim = get("embedding_length") // heads
    return {
        "layers": get("block_count"),
        "kv_heads": get("attention.head_count_kv", heads),
        "key": get("attention.key_length", head_dim),
        "value": get("attention.value_length", head_dim),
        "embd": get("embedding_length"),
        "vocab": int(meta.get(f"{arch}.vocab_size") or 0) or 150_000,
    }


def kv_cache_bytes(model_path: str, cells: int, cache_type_k: str = "f16", cache_type_v: str = "f16") -> float:
    """The KV cache llama.cpp allocates for ``cells`` tokens of this model.

    Args:
        model_path: the text GGUF.
        cells: KV cells (all sequences together).
        cache_type_k: the key cache type.
        cache_type_v: the value cache type.

    Returns:
        Bytes.
    """
    shape = _text_shape(model_path)
    per_cell_layer = shape["kv_heads"] * (shape["key"] * KV_BYTES[cache_type_k] + shape["value"] * KV_BYTES[cache_type_v])
    return cells * shape["layers"] * per_cell_layer


def _cells_per_page(n_ctx: int) -> int:
    return -(-n_ctx // 256) * 256


def plan_memory(config: EngineConfig, budget_mb: float | None = None, gpu: str | None = None) -> MemoryPlan:
    """How many pages of this config fit in the budget.

    Args:
        config: the engine config (its ``n_parallel`` is the wish).
        budget_mb: the memory available (None: detected, see the module's docstring).
        gpu: the worker's ``CUDA_VISIBLE_DEVICES`` (the GPU whose free memory counts).

    Returns:
        The plan; ``n_parallel`` is at most the config's.

    Raises:
        RunError: not even one page fits, with the numbers.
    """
    source = "setting"
    if budget_mb is None:
        budget_mb, source = detect_budget_mb(config.n_gpu_layers != 0, gpu)
    shape = _text_shape(config.model_path)
    # every encoder context beyond the first holds another copy of the projector
    weights = os.path.getsize(config.model_path) + encode_workers_for(config) * os.path.getsize(config.mmproj_path)
    per_page = kv_cache_bytes(config.model_path, _cells_per_page(config.n_ctx), config.cache_type_k, config.cache_type_v)
    # the isolated child's own small context (n_batch cells) and a batch's logits
    single = kv_cache_bytes(config.model_path, _cells_per_page(max(256, config.n_batch)), config.cache_type_k, config.cache_type_v)
    compute = single + (config.n_ubatch or config.n_batch) * (shape["vocab"] + 4 * shape["embd"]) * 4 + COMPUTE_HEADROOM

    def needed(n: int) -> float:
        return (weights + compute + n * per_page) / MIB

    chosen = config.n_parallel
    while chosen > 1 and needed(chosen) > budget_mb:
        chosen -= 1
    if needed(chosen) > budget_mb:
        raise RunError(
            f"the model does not fit: one page of n_ctx {config.n_ctx} needs about {needed(1):,.0f} MiB "
            f"(weights {weights / MIB:,.0f}, KV cache {per_page / MIB:,.0f}, compute {compute / MIB:,.0f}) and "
            f"{source} memory offers {budget_mb:,.0f} MiB; lower --n-ctx or --cache-type-k/v q8_0, or use a smaller model"
        )
    return MemoryPlan(config.n_parallel, chosen, weights / MIB, per_page / MIB, compute / MIB, needed(chosen),
                      float(budget_mb), source)


def document_n_ctx(pages: int, image_tokens_per_page: int, text_tokens: int, max_tokens: int) -> int:
    """The ``n_ctx`` (KV cells per sequence) that answers ``pages`` pages in one prompt, as llama.cpp rounds it.

    Args:
        pages: the pages in the prompt.
        image_tokens_per_page: image tokens (KV cells, not M-RoPE positions) each page takes; the model's and
            the image token budget's (``--image-max-tokens``) doing.
        text_tokens: the rendered prompt's text tokens (chat template, question).
        max_tokens: the answer's budget.

    Returns:
        Cells, a multiple of 256: what ``EngineConfig.n_ctx`` must be for the document to fit.
    """
    return _cells_per_page(pages * image_tokens_per_page + text_tokens + max_tokens + 1)


def _n_embd_inp(model_path: str) -> int:
    """The width of an image embedding row (``llama_model_n_embd_inp``): the embedding, times one plus the
    deepstack layers where the model has them (Qwen3-VL)."""
    meta = read_gguf_metadata(model_path)
    arch = str(meta.get("general.architecture", "llama"))
    deepstack = int(meta.get(f"{arch}.n_deepstack_layers") or 0)
    return _text_shape(model_path)["embd"] * (1 + deepstack)


def document_host_mb(config: EngineConfig, pages_per_request: int, image_tokens_per_page: int,
                     page_pixels: int = 0, n_parallel: int | None = None) -> float:
    """Host memory that the pages of requests beyond their first take while waiting: what a request of
    ``pages_per_request`` pages holds more than a one-page request (which ``COMPUTE_HEADROOM`` covers).

    The batched engine keeps up to ``n_parallel`` encoded requests waiting for a slot (its ``encode_ahead``), one
    more per encoder being encoded and one being prefilled, each with a float32 copy of its images' embeddings;
    with ``isolate`` the parent keeps every unanswered request's pixels in shared memory (its ``window``).

    Args:
        config: the engine config.
        pages_per_request: pages in one prompt (the most of any document answered in one prompt).
        image_tokens_per_page: image tokens per page.
        page_pixels: pixels per page (width x height, at most ``ImageOptions.max_pixels``); 0 leaves the
            isolated engine's shared memory out.
        n_parallel: sequences (default: the config's).

    Returns:
        MiB; 0 for one page per request.
    """
    extra_pages = max(0, pages_per_request - 1)
    n = n_parallel or config.n_parallel
    workers = encode_workers_for(config)
    held = n + (workers if config.overlap_encode else 0) + 1
    embeddings = held * extra_pages * image_tokens_per_page * _n_embd_inp(config.model_path) * 4
    window = n + (n + (config.encode_workers or 2) if config.overlap_encode else 0) + 1  # IsolatedEngine.window
    pixels = window * extra_pages * page_pixels * 3 if config.isolate else 0
    return (embeddings + pixels) / MIB


def plan_document_memory(config: EngineConfig, pages_per_request: int, image_tokens_per_page: int,
                         page_pixels: int = 0, budget_mb: float | None = None, gpu: str | None = None) -> MemoryPlan:
    """``plan_memory`` for requests of ``pages_per_request`` pages (document scope, in one prompt).

    ``config.n_ctx`` must already hold a document (``document_n_ctx``): the KV cache is planned from it as for
    pages. Where the budget is the host's (no GPU offload), the documents' extra host memory
    (``document_host_mb``) is counted too and ``n_parallel`` lowered until it fits; on a GPU it lives in host
    memory, outside the GPU budget. With one page per request the plan is ``plan_memory``'s.

    Args:
        config: the engine config (its ``n_parallel`` is the wish, its ``n_ctx`` a document's).
        pages_per_request: pages in one prompt.
        image_tokens_per_page: image tokens per page.
        page_pixels: pixels per page (for the isolated engine's shared memory; 0: not counted).
        budget_mb: the memory available (None: detected).
        gpu: the worker's ``CUDA_VISIBLE_DEVICES``.

    Returns:
        The plan (``needed_mb`` and ``compute_mb`` include the documents' extra host memory when counted).

    Raises:
        RunError: not even one sequence fits, with the numbers.
    """
    plan = plan_memory(config, budget_mb, gpu)
    if pages_per_request <= 1 or plan.budget_source == "gpu":
        return plan
    chosen = plan.n_parallel

    def needed(n: int) -> float:
        return plan.weights_mb + plan.compute_mb + n * plan.kv_mb_per_page + document_host_mb(
            config, pages_per_request, image_tokens_per_page, page_pixels, n)

    while chosen > 1 and needed(chosen) > plan.budget_mb:
        chosen -= 1
    if needed(chosen) > plan.budget_mb:
        raise RunError(
            f"the model does not fit: one sequence of a {pages_per_request}-page document (n_ctx {config.n_ctx}) needs "
            f"about {needed(1):,.0f} MiB and {plan.budget_source} memory offers {plan.budget_mb:,.0f} MiB; answer "
            "documents page by page (map-reduce), lower --n-ctx or the pixel budget, or use a smaller model"
        )
    extra = document_host_mb(config, pages_per_request, image_tokens_per_page, page_pixels, chosen)
    return MemoryPlan(plan.requested_parallel, chosen, plan.weights_mb, plan.kv_mb_per_page,
                      plan.compute_mb + extra, needed(chosen), plan.budget_mb, plan.budget_source)


def detect_budget_mb(offloading: bool, gpu: str | None = None) -> tuple[float, str]:
    """The memory the engine may use: the first visible GPU's free memory when layers are offloaded to a GPU
    build, else the host's available memory.

    Args:
        offloading: the run offloads layers (``n_gpu_layers != 0``).
        gpu: ``CUDA_VISIBLE_DEVICES`` (its first entry is the GPU asked about; None: the first GPU).

    Returns:
        ``(MiB, "gpu" or "host")``.
    """
    if offloading and _gpu_build():
        free = _nvidia_free_mb((gpu or "").split(",")[0].strip() or None)
        if free is not None:
            return free, "gpu"
    return _host_available_mb(), "host"


def encode_workers_for(config: EngineConfig) -> int:
    """The vision-encoder contexts an engine of ``config`` opens: ``encode_workers`` when set, else 1 on a CPU
    build or with no layer offloaded (the cores are already shared by decode and one encoder) and 2 on a GPU
    (two encodes side by side keep it busier).

    Args:
        config: the engine config.

    Returns:
        The number of encoder contexts (each holds a copy of the projector weights).
    """
    if config.encode_workers is not None:
        return config.encode_workers
    return 2 if config.n_gpu_layers != 0 and _gpu_build() else 1


def _gpu_build() -> bool:
    try:
        from medvlm_core.settings import load_llama_cpp

        return bool(load_llama_cpp().llama_supports_gpu_offload())  # maybe the process's first import of it
    except (ImportError, AttributeError):
        return False


def _nvidia_free_mb(gpu: str | None) -> float | None:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        # nvidia-smi ignores CUDA_VISIBLE_DEVICES: ask for the worker's GPU by its index (or UUID)
        command = [tool, "--query-gpu=memory.free", "--format=csv,noheader,nounits"] + (["-i", gpu] if gpu else [])
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _host_available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) / MIB
