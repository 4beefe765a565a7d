"""The batched engine's prompt text: the chat-formatted prompt exactly as llama-cpp-python's single-sequence chat
handler renders it, with one libmtmd media marker per page image, where the template puts them.

The message is built as ``VisionEngine.generate`` builds it: one ``image_url`` part per image, in page order, then
the text (no image part for a text-only prompt). Each image is passed to the template as a sentinel URL that no
prompt contains: legacy (``CHAT_FORMAT``) handlers print it as is and every occurrence is replaced by the marker
afterwards; Jinja (``MTMDChatHandler``) handlers turn each image part into the marker themselves
(``_get_template_messages``). The template alone decides where the markers go (LLaVA-1.5's puts all images before
the text, Qwen's in the parts' order), so the text matches the single-sequence handler's for any number of
images. Compiling a template costs ~ms, so ``PromptRenderer`` keeps the rendered text per prompt.
"""

from __future__ import annotations

from typing import Any

_SENTINEL = "\x00medvlm-image\x00"


def render_chat(llm: Any, handler: Any, marker: str, prompt: str, system: str | None, images: int = 1) -> str:
    """The chat-formatted prompt text for a prompt with ``images`` page images.

    Args:
        llm: the loaded ``llama_cpp.Llama`` (its BOS and EOS tokens, its chat template).
        handler: its multimodal chat handler.
        marker: libmtmd's media marker (``mtmd_default_marker``).
        prompt: the user's question.
        system: the system prompt (None: the chat format's default, if it has one).
        images: how many image parts the user message holds (0: a text-only prompt).

    Returns:
        The text libmtmd tokenizes (``images`` markers in it).
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llama_cpp import llama_chat_format as lcf

    parts: list[dict] = [{"type": "image_url", "image_url": {"url": _SENTINEL}} for _ in range(images)]
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]
    if system:
        messages = [{"role": "system", "content": system}] + messages
    if isinstance(handler, lcf.MTMDChatHandler):
        import jinja2.ext

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True,
            extensions=[lcf.Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = lcf.Jinja2ChatFormatter.tojson

        def raise_exception(message: str):
            raise ValueError(message)

        return env.from_string(handler._get_chat_template(llm)).render(
            messages=handler._get_template_messages(messages, marker), add_generation_prompt=True,
            eos_token=handler._decode_token_piece(llm.detokenize([llm.token_eos()])),
            bos_token=handler._decode_token_piece(llm.detokenize([llm.token_bos()])),
            raise_exception=raise_exception, functions=None, function_call=None, tools=None, tool_choice=None,
            strftime_now=lcf.Jinja2ChatFormatter.strftime_now,
        )
    if handler.DEFAULT_SYSTEM_MESSAGE is not None and not system:
        messages = [{"role": "system", "content": handler.DEFAULT_SYSTEM_MESSAGE}] + messages
    text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(handler.CHAT_FORMAT).render(
        messages=messages, add_generation_prompt=True,
        eos_token=llm.detokenize([llm.token_eos()]), bos_token=llm.detokenize([llm.token_bos()]),
    )
    return text.replace(_SENTINEL, marker)


class PromptRenderer:
    """``render_chat`` with the rendered text kept per ``(prompt, system, images)`` (row-level prompts can be many:
    at most a few hundred are kept).

    Args:
        llm: the loaded ``llama_cpp.Llama``.
        handler: its multimodal chat handler (with its libmtmd context initialised).
    """

    # Past this many prompts the cache starts over.
    LIMIT = 256

    def __init__(self, llm: Any, handler: Any):
        self._llm = llm
        self._handler = handler
        self._rendered: dict[tuple[str, str | None, int], str] = {}

    def render(self, prompt: str, system: str | None = None, images: int = 1) -> str:
        """The chat-formatted prompt text with libmtmd's media marker where each image goes (cached per prompt).

        Args:
            prompt: the user's question.
            system: the system prompt (None: the chat format's default, if it has one).
            images: the request's page images (0: a text-only prompt).

        Returns:
            The text libmtmd tokenizes.
        """
        key = (prompt, system, images)
        text = self._rendered.get(key)
        if text is None:
            if len(self._rendered) > self.LIMIT:
                self._rendered.clear()
            marker = self._handler._mtmd_cpp.mtmd_default_marker().decode("utf-8")
            text = self._rendered[key] = render_chat(self._llm, self._handler, marker, prompt, system, images)
        return text
