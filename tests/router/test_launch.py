"""`pdserve up` hands every flag to the process that uses it (generated both ways from the config tree)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from pdserve import launch
from pdserve.config import ModelConfig, RouterConfig, ServerConfig, add_config_args, config_from_args
from pdserve.router import server as router_server

MODEL = "/models/m.gguf"


def _launcher(tmp_path, *flags: str) -> launch.Launcher:
    args = launch.build_parser().parse_args(["--log-dir", str(tmp_path), "--registry-url", "redis://h:1/0", *flags])
    return launch.launcher_from_args(args)


def _parse_node(argv: list[str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_config_args(parser, ServerConfig)
    parser.add_argument("--log-level")
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if k != "log_level"}
    return config_from_args(ServerConfig, values, role="prefill")


def test_engine_transfer_and_node_flags_reach_the_nodes(tmp_path):
    lch = _launcher(tmp_path, "--page-size", "32", "--chunked-prefill-size", "256", "--disable-radix-cache",
                    "--schedule-policy", "lpm", "--peer-timeout-s", "5", "--registry-ttl-s", "2", "--dtype",
                    "bfloat16", "--port", "9001", "--host", "0.0.0.0", "--max-total-tokens", "4096")
    node = _parse_node(lch.node_argv(MODEL) + ["--node-id", "prefill-0"])
    expected_engine = dataclasses.replace(lch.engine, model=dataclasses.replace(lch.engine.model, model_path=MODEL))
    assert node.engine == expected_engine
    assert node.engine.cache.page_size == 32 and node.engine.cache.disable_radix_cache
    assert node.transfer == lch.transfer and node.transfer.peer_timeout_s == 5
    assert (node.node.registry_url, node.node.registry_ttl_s, node.node.node_id) == ("redis://h:1/0", 2, "prefill-0")
    assert node.node.host == "127.0.0.1" and node.node.port == 0     # not the router's 0.0.0.0:9001


def test_router_flags_and_model_flags_reach_the_router(tmp_path):
    lch = _launcher(tmp_path, "--policy", "cache_aware", "--api-key", "k", "--port", "9001", "--allow-auto-truncate",
                    "--max-prefill-retries", "1", "--context-length", "512", "--page-size", "32")
    args = router_server.build_parser().parse_args(lch.router_argv(MODEL))
    values = {k: v for k, v in vars(args).items() if k != "log_level"}
    router, model = config_from_args(RouterConfig, values), config_from_args(ModelConfig, values)
    assert router == dataclasses.replace(lch.router_cfg, served_model_name="smollm2")
    assert router.registry_url == "redis://h:1/0" and router.policy == "cache_aware" and router.allow_auto_truncate
    assert (model.model_path, model.context_length) == (MODEL, 512)


@pytest.mark.parametrize("flags, flag", [
    (["--prefill", "0"], "--prefill/--decode"),
    (["--colocated", "2", "--decode", "1"], "--colocated"),
    (["--decode", "-1"], "--decode"),
    (["--page-size", "3"], "--page-size"),
])
def test_invalid_launch_flags_name_the_flag(tmp_path, flags, flag):
    with pytest.raises(ValueError, match=flag):
        _launcher(tmp_path, *flags)


def test_colocated_alone_is_fine(tmp_path):
    lch = _launcher(tmp_path, "--colocated", "2")
    assert lch.launch.colocated == 2
