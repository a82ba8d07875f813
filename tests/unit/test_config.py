import argparse
import subprocess
import sys

import pytest

from pdserve.config import (CacheConfig, EngineConfig, SchedulerConfig, ServerConfig, add_config_args,
                            config_from_args, engine_config)


def parse(argv, cls=EngineConfig):
    p = argparse.ArgumentParser()
    add_config_args(p, cls)
    return config_from_args(cls, p.parse_args(argv))


def test_cli_flags_come_from_the_tree_with_sglang_names():
    cfg = parse(["--model-path", "/m", "--page-size", "32", "--chunked-prefill-size", "256",
                 "--schedule-policy", "lpm", "--tp", "2", "--mem-fraction-static", "0.5",
                 "--disable-radix-cache", "--dtype", "bfloat16"])
    assert cfg.model.model_path == "/m" and cfg.model.dtype == "bfloat16"
    assert cfg.cache.page_size == 32 and cfg.cache.mem_fraction_static == 0.5 and cfg.cache.disable_radix_cache
    assert cfg.scheduler.chunked_prefill_size == 256 and cfg.scheduler.schedule_policy == "lpm"
    assert cfg.parallel.tp == 2
    assert parse([]) == EngineConfig()


@pytest.mark.parametrize("kwargs,flag", [
    ({"page_size": 12}, "--page-size"),
    ({"mem_fraction_static": 1.5}, "--mem-fraction-static"),
    ({"chunked_prefill_size": 0}, "--chunked-prefill-size"),
    ({"schedule_policy": "random"}, "--schedule-policy"),
    ({"tp": 0}, "--tp"),
    ({"dtype": "int3"}, "--dtype"),
])
def test_bad_values_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError) as e:
        engine_config(**kwargs)
    assert str(e.value).startswith(flag)


def test_unknown_python_option_is_rejected():
    with pytest.raises(ValueError, match="page_sise"):
        engine_config(page_sise=4)


def test_configs_are_frozen_and_compose():
    cfg = ServerConfig()
    with pytest.raises(Exception):
        cfg.role = "decode"
    assert isinstance(cfg.engine.cache, CacheConfig) and isinstance(cfg.engine.scheduler, SchedulerConfig)


def test_cli_error_is_one_line_naming_the_flag():
    out = subprocess.run([sys.executable, "-m", "pdserve", "serve", "--page-size", "3"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = [l for l in out.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "--page-size" in lines[0], out.stderr
