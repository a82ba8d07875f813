"""pdserve: LLM serving with prefill and decode disaggregated."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":
        from pdserve.runtime.engine import Engine
        return Engine
    raise AttributeError(name)
