"""The batched engine's token sampling, exactly as llama-cpp-python samples a completion, and the scoring of
each sampled token (its log-probability under the model, for the answer's confidences).

Each sequence has its own sampler chain (penalties and grammar keep per-sequence state); all of them sample
from the logits of the one batched llama.cpp context.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np

from medvlm_core.run.params import GenerationParams


class Sampling:
    """Sampler chains, sampling, token pieces and scores over one llama.cpp context.

    Args:
        llama_cpp: the ``llama_cpp`` module (loaded by the caller).
        ctx: the llama.cpp context whose logits are sampled.
        vocab: the model's vocabulary (``llama_model_get_vocab``).
        ctx_per_seq: KV cells per sequence (the penalties' window when ``repeat_last_n`` is -1).
        grammar_text: a JSON schema -> its GBNF grammar (``VisionEngine.grammar_text``).
    """

    def __init__(self, llama_cpp: Any, ctx: Any, vocab: Any, ctx_per_seq: int, grammar_text: Callable[[dict], str]):
        self._lc = llama_cpp
        self._ctx = ctx
        self._vocab = vocab
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._ctx_per_seq = ctx_per_seq
        self._grammar_text = grammar_text
        self._piece = ctypes.create_string_buffer(256)

    def chain(self, params: GenerationParams, schema: dict | None) -> Any:
        """The sampler chain for ``params``, as llama-cpp-python builds it for a completion: logit bias, penalties,
        grammar (``schema``), then greedy at temperature 0, else mirostat or top-k/typical/top-p/min-p, then
        (dynamic) temperature and a seeded draw.

        Args:
            params: the page's sampling parameters.
            schema: a JSON schema the answer must follow (its grammar joins the chain), or None.

        Returns:
            A ``llama_sampler`` chain, the caller's to ``free``.
        """
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda sampler: lc.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        bias = dict(params.logit_bias)
        bias.update({token: float("-inf") for token in params.banned_tokens})
        if bias:
            entries = (lc.llama_logit_bias * len(bias))(*[lc.llama_logit_bias(t, b) for t, b in sorted(bias.items())])
            add(lc.llama_sampler_init_logit_bias(self._n_vocab, len(bias), entries))
        last_n = self._ctx_per_seq if params.repeat_last_n == -1 else params.repeat_last_n
        add(lc.llama_sampler_init_penalties(self._n_vocab, last_n, params.repeat_penalty, params.frequency_penalty,
                                            params.presence_penalty))
        if schema is not None:
            gbnf = self._grammar_text(schema).encode("utf-8")
            add(lc.llama_sampler_init_grammar(self._vocab, gbnf, b"root"))
        if params.temperature == 0.0:
            add(lc.llama_sampler_init_greedy())
            return chain
        if params.mirostat:
            add(lc.llama_sampler_init_temp(params.temperature))
            if params.mirostat == 1:
                add(lc.llama_sampler_init_mirostat(self._n_vocab, params.seed, params.mirostat_tau, params.mirostat_eta, 100))
            else:
                add(lc.llama_sampler_init_mirostat_v2(params.seed, params.mirostat_tau, params.mirostat_eta))
            return chain
        add(lc.llama_sampler_init_top_k(params.top_k))
        add(lc.llama_sampler_init_typical(params.typical_p, params.min_keep))
        add(lc.llama_sampler_init_top_p(params.top_p, params.min_keep))
        add(lc.llama_sampler_init_min_p(params.min_p, params.min_keep))
        if params.dynatemp_range > 0:
            add(lc.llama_sampler_init_temp_ext(params.temperature, params.dynatemp_range, params.dynatemp_exponent))
        else:
            add(lc.llama_sampler_init_temp(params.temperature))
        add(lc.llama_sampler_init_dist(params.seed))
        return chain

    def free(self, chain: Any) -> None:
        """Free a chain ``chain()`` made.

        Args:
            chain: the sampler chain.
        """
        self._lc.llama_sampler_free(chain)

    def sample(self, chain: Any, index: int) -> int:
        """Sample a token from the logits at batch position ``index`` (-1: the last decoded) with ``chain``.

        Args:
            chain: the sequence's sampler chain.
            index: where in the last batch the sequence's logits are.

        Returns:
            The token.
        """
        # llama_sampler_sample also accepts the token into the chain (grammar state, penalty history).
        return self._lc.llama_sampler_sample(chain, self._ctx, index)

    def is_end(self, token: int) -> bool:
        """True for an end-of-generation token (EOS, EOT and the like)."""
        return self._lc.llama_vocab_is_eog(self._vocab, token)

    def score(self, index: int, token: int, top_n: int) -> tuple[float, tuple]:
        """The sampled token's log-probability under the model's own distribution (the logits before any sampler:
        penalties, grammar and temperature shape the choice, not the model's confidence), and the top-N.

        Args:
            index: where in the last batch the sequence's logits are.
            token: the sampled token.
            top_n: how many of the likeliest alternatives to return (0: none).

        Returns:
            ``(logprob, ((piece, logprob), ...))``, the alternatives likeliest first.
        """
        logits = np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
        peak = float(logits.max())
        log_z = peak + float(np.log(np.exp(logits - peak).sum()))
        top: tuple = ()
        if top_n:
            best = np.argpartition(-logits, top_n - 1)[:top_n]
            best = best[np.argsort(-logits[best], kind="stable")]
            top = tuple((self.piece(int(t)).decode("utf-8", errors="replace"), float(logits[t]) - log_z) for t in best)
        return float(logits[token]) - log_z, top

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens are not rendered).

        Args:
            token: the token.

        Returns:
            Its text's bytes (possibly part of a UTF-8 character).
        """
        n = self._lc.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[: max(n, 0)]
