"""A vLLM logits processor for the serving tests: a request that names token ids in `vllm_xargs.forced_token_ids`
generates exactly those, whatever the model, so the tests check what the server makes of given tokens (decoding,
the tool parser, stop strings, the context limit) on every machine alike. Requests without it are left alone.

Loaded by the test server with `--logits-processors forced_tokens:ForcedTokens` (tests/ on PYTHONPATH)."""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

ARGUMENT = "forced_token_ids"


class ForcedTokens(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is greedy

    def new_req_logits_processor(self, params):  # noqa: ANN001, ANN201 - vLLM's SamplingParams and per-request callable
        forced = (params.extra_args or {}).get(ARGUMENT)
        if not forced:
            return None
        forced = [int(token) for token in forced]

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            if len(output_ids) >= len(forced):
                return logits
            out = torch.full_like(logits, float("-inf"))
            out[forced[len(output_ids)]] = 0.0
            return out

        return force
