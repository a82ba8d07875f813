"""The seed's flags (SGLang's server arguments) that pdserve does not take, and why.

Every SGLang server flag either works here (a field of the config tree, ``pdserve/config.py``, or
an alias of one) or is refused at parse time with one line that says why:
``pdserve: error: --deepep-mode: pdserve serves dense models only``. ``add_config_args`` registers
the refusals on every command's parser (once per parser), so ``pdserve COMMAND --help`` lists
them too. ``SEED_FLAGS`` is the whole seed list; docs/flags.md gives each one's status, and
tests/flags/ checks that every seed flag is accounted for. (Structured output's and speculative
decoding's flags are fields of their own configs, which validate them.)

The seed list: SGLang's docs/backend/server_arguments.md (the revision with the Double Sparsity
section), plus the seed flags issue 15 names that the page lacks (--gpu-id-step,
--skip-server-warmup, --num-continuous-decode-steps, --enable-lora, --dist-timeout, --quantization).
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

# Every seed flag, in the reference's section order (CLI spelling).
SEED_FLAGS: tuple[str, ...] = (
    # model and tokenizer
    "--model-path", "--tokenizer-path", "--tokenizer-mode", "--load-format", "--trust-remote-code", "--dtype",
    "--kv-cache-dtype", "--context-length", "--device", "--chat-template", "--is-embedding", "--revision",
    "--skip-tokenizer-init", "--json-model-override-args", "--delete-ckpt-after-loading", "--quantization",
    # HTTP and API
    "--host", "--port", "--api-key", "--file-storage-path", "--enable-cache-report",
    # parallelism
    "--tp-size", "--dp-size", "--load-balance-method", "--enable-ep-moe", "--ep-size", "--enable-deepep-moe",
    "--deepep-mode",
    # memory and scheduling
    "--mem-fraction-static", "--max-running-requests", "--max-total-tokens", "--chunked-prefill-size",
    "--max-prefill-tokens", "--schedule-policy", "--schedule-conservativeness", "--cpu-offload-gb",
    # other runtime options
    "--stream-interval", "--random-seed", "--watchdog-timeout", "--download-dir", "--base-gpu-id",
    "--gpu-id-step", "--allow-auto-truncate", "--skip-server-warmup",
    # logging
    "--log-level", "--log-level-http", "--log-requests", "--log-requests-level", "--show-time-cost",
    "--enable-metrics", "--decode-log-interval",
    # multi-node
    "--dist-init-addr", "--nnodes", "--node-rank", "--dist-timeout",
    # LoRA
    "--enable-lora", "--lora-paths", "--max-loras-per-batch", "--lora-backend",
    # kernel backends
    "--attention-backend", "--sampling-backend",
    # constrained decoding
    "--grammar-backend", "--constrained-json-whitespace-pattern",
    # speculative decoding
    "--speculative-draft-model-path", "--speculative-algorithm", "--speculative-num-steps",
    "--speculative-num-draft-tokens", "--speculative-eagle-topk", "--speculative-token-map",
    # double sparsity
    "--enable-double-sparsity", "--ds-channel-config-path", "--ds-heavy-channel-num", "--ds-heavy-token-num",
    "--ds-heavy-channel-type", "--ds-sparse-decode-threshold",
    # debug
    "--disable-radix-cache", "--disable-cuda-graph", "--disable-cuda-graph-padding",
    "--disable-outlines-disk-cache", "--disable-custom-all-reduce", "--disable-mla", "--disable-overlap-schedule",
    "--enable-nan-detection", "--enable-p2p-check", "--triton-attention-reduce-in-fp32",
    # optimization
    "--enable-mixed-chunk", "--enable-dp-attention", "--enable-torch-compile", "--torch-compile-max-bs",
    "--cuda-graph-max-bs", "--cuda-graph-bs", "--torchao-config", "--triton-attention-num-kv-splits",
    "--enable-flashinfer-mla", "--flashinfer-mla-disable-ragged", "--num-continuous-decode-steps",
)

# Seed spellings that name a pdserve flag: registered as extra option strings of that flag.
ALIASES: dict[str, str] = {"--tp-size": "--tp", "--dp-size": "--dp"}

# The seed flags pdserve accepts but handles outside the config tree (every command's own parser).
PARSER_FLAGS: frozenset[str] = frozenset({"--log-level"})


class Refusal(NamedTuple):
    reason: str
    takes_value: bool


_DENSE = "pdserve serves dense models only (no MoE experts to place)"
_NO_MLA = "pdserve serves Llama-architecture models (no MLA attention)"
_DOUBLE_SPARSITY = "double-sparsity attention is not built (it approximates attention; pdserve's attention is exact)"
_LORA = ("LoRA is not built: adapters per request would need per-adapter prefix caches and the same adapters "
         "loaded on every prefill and decode node; serve a merged model instead")

REFUSED: dict[str, Refusal] = {
    "--trust-remote-code": Refusal("pdserve never runs model code from a hub (it has none: models load with its "
                                   "own Llama implementation)", False),
    "--skip-tokenizer-init": Refusal("nodes are already token-in/token-out; the router needs its tokenizer", False),
    "--json-model-override-args": Refusal("edit the model folder's config.json instead", True),
    "--delete-ckpt-after-loading": Refusal("pdserve never deletes model files", False),
    "--file-storage-path": Refusal("there is no files API (/v1/files)", True),
    "--enable-cache-report": Refusal("always on: usage.prompt_tokens_details.cached_tokens is in every response",
                                     False),
    "--load-balance-method": Refusal("the router picks nodes: use the router's --policy", True),
    "--enable-ep-moe": Refusal(_DENSE, False),
    "--ep-size": Refusal(_DENSE, True),
    "--enable-deepep-moe": Refusal(_DENSE, False),
    "--deepep-mode": Refusal(_DENSE, True),
    "--cpu-offload-gb": Refusal("weights stay on the device (offloading would put PCIe in every decode step)", True),
    "--log-level-http": Refusal("the router's HTTP log follows --log-level", True),
    "--log-requests": Refusal("prompts and outputs are not logged; /metrics and /nodes show traffic", False),
    "--log-requests-level": Refusal("prompts and outputs are not logged (see --log-requests)", True),
    "--show-time-cost": Refusal("use pdserve bench (TTFT/ITL/TPOT) or /metrics", False),
    "--enable-metrics": Refusal("always on: the router serves Prometheus metrics at /metrics", False),
    "--decode-log-interval": Refusal("nodes publish load to the registry instead (--load-report-interval-s)", True),
    "--enable-lora": Refusal(_LORA, False),
    "--lora-paths": Refusal(_LORA, True),
    "--max-loras-per-batch": Refusal(_LORA, True),
    "--lora-backend": Refusal(_LORA, True),
    "--sampling-backend": Refusal("one sampler (torch ops on the device); nothing to choose", True),
    "--enable-double-sparsity": Refusal(_DOUBLE_SPARSITY, False),
    "--ds-channel-config-path": Refusal(_DOUBLE_SPARSITY, True),
    "--ds-heavy-channel-num": Refusal(_DOUBLE_SPARSITY, True),
    "--ds-heavy-token-num": Refusal(_DOUBLE_SPARSITY, True),
    "--ds-heavy-channel-type": Refusal(_DOUBLE_SPARSITY, True),
    "--ds-sparse-decode-threshold": Refusal(_DOUBLE_SPARSITY, True),
    "--disable-cuda-graph-padding": Refusal("decode batches always pad to the next captured size; "
                                            "--disable-cuda-graph runs eagerly", False),
    "--disable-outlines-disk-cache": Refusal("pdserve keeps no on-disk grammar cache", False),
    "--disable-custom-all-reduce": Refusal("tensor parallelism all-reduces through torch.distributed (NCCL/gloo); "
                                           "there is no custom all-reduce to disable", False),
    "--disable-mla": Refusal(_NO_MLA, False),
    "--enable-p2p-check": Refusal("KV moves over NIXL/UCX, which picks the path itself (NVLink, RDMA, TCP)", False),
    "--cuda-graph-bs": Refusal("the captured batch sizes follow --cuda-graph-max-bs", True),
    "--torchao-config": Refusal("use --quantization w8a8_int8 (int8 weights and activations)", True),
    "--enable-flashinfer-mla": Refusal(_NO_MLA, False),
    "--flashinfer-mla-disable-ragged": Refusal(_NO_MLA, False),
}


class _Refuse(argparse.Action):
    """Exits with ``pdserve: error: --flag: reason`` as soon as the flag is parsed."""

    def __init__(self, option_strings, dest, reason: str = "", **kwargs) -> None:
        self.reason = reason
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.exit(2, f"pdserve: error: {option_string}: {self.reason}\n")


def aliases_of(flag: str) -> list[str]:
    """Seed spellings that ``flag`` also answers to (``--tp`` -> ``["--tp-size"]``)."""
    return [alias for alias, target in ALIASES.items() if target == flag]


def add_refusals(parser: argparse.ArgumentParser, accepted: set[str]) -> None:
    """Register every refused seed flag on ``parser`` (once), skipping ``accepted`` (flags some
    config field already defines: those work and must not be refused)."""
    if getattr(parser, "_pdserve_refusals", False):
        return
    parser._pdserve_refusals = True  # type: ignore[attr-defined]
    group = parser.add_argument_group("SGLang flags pdserve does not take (each exits with its reason)")
    for flag, refusal in REFUSED.items():
        if flag in accepted:
            continue
        group.add_argument(flag, action=_Refuse, reason=refusal.reason, dest=argparse.SUPPRESS,
                           default=argparse.SUPPRESS, nargs="*" if refusal.takes_value else 0,
                           metavar="VALUE" if refusal.takes_value else None, help=refusal.reason)
