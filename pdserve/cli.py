"""``pdserve`` console script: dispatches a subcommand to the module that owns it.

Each owning module exposes ``main(argv: list[str]) -> int`` and builds its own parser from the
config tree (``pdserve.config.add_config_args``), so flags are never mirrored here.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "up": ("pdserve.launch", "Run Redis, prefill and decode nodes and the router on this machine."),
    "prefill": ("pdserve.prefill.node", "Run a prefill node."),
    "decode": ("pdserve.decode.node", "Run a decode node."),
    "serve": ("pdserve.colocated_node", "Run a colocated node (prefill and decode in one engine)."),
    "router": ("pdserve.router.server", "Run the OpenAI-compatible router."),
    "plan": ("pdserve.planner", "How many prefill and decode nodes the load needs to meet an SLO."),
    "bench": ("pdserve.bench.cli", "Measure TTFT, ITL, TPOT and goodput against a server."),
    "model": ("pdserve.model_pull", "Manage models: `pdserve model pull smollm2`."),
}


def usage() -> str:
    lines = ["usage: pdserve COMMAND [flags]   (pdserve COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"pdserve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
