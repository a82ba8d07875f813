"""``pdserve up``: Redis, prefill and decode (or colocated) nodes and the router on one machine.

Every part is a child process (``python -m pdserve prefill|decode|serve|router ...``) in its own
process group, told to die with this launcher (PR_SET_PDEATHSIG), with its log in ``--log-dir``.
The node and router flags are generated back from the parsed config tree, so every engine,
cache, scheduler, kernel, transfer and router flag ``pdserve up`` accepts reaches the process that
uses it without being listed here. ``up`` waits for the router's ``/health`` (a usable pair is
registered), prints the URL, optionally asks the ``--demo`` question through the official openai
client, and serves until Ctrl-C / SIGTERM, which stops the router, then the nodes, then Redis.
A Redis of its own that dies is started again on the same port (nodes re-register by themselves,
routers reconnect), and the event is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pdserve.config import (CLUSTER_SECRET_ENV, EngineConfig, ModelConfig, NodeConfig, ParallelConfig, RouterConfig,
                            TransferConfig, add_config_args, config_from_args, flag_name, opt)
from pdserve.redis_server import RedisServer, die_with_parent
from pdserve.router.server import ROUTER_MODEL_FIELDS
from pdserve.security import derive_keys, redact_url

# NodeConfig fields `up` sets per node itself (the router's --host/--port/--registry-url are not the nodes';
# --metrics-port P > 0 gives node i the port P + i).
PER_NODE_FIELDS = {"host", "port", "registry_url", "node_id", "metrics_port"}


@dataclass(frozen=True)
class LaunchConfig:
    prefill: int = opt(1, "Prefill nodes to start.")
    decode: int = opt(1, "Decode nodes to start.")
    colocated: int = opt(0, "Colocated nodes to start instead of prefill/decode nodes.")
    log_dir: str | None = opt(None, "Folder for the logs of every process (default: a new temp folder).")
    demo: str | None = opt(None, "Ask this question once the server is up (openai client), print the answer.")
    demo_max_tokens: int = opt(64, "Most tokens of the --demo answer.")
    startup_timeout_s: float = opt(600.0, "Give up if the router is not healthy after this long.")
    prefill_tp: int | None = opt(None, "--tp of the prefill nodes (default: --tp).")
    decode_tp: int | None = opt(None, "--tp of the decode nodes (default: --tp); may differ from the prefill "
                                      "nodes': the KV transfer maps heads between the two layouts.")
    decode_dp: int | None = opt(None, "DP attention groups on the decode nodes (--dp with --enable-dp-attention "
                                      "there; must divide their --tp).")

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "colocated"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}: must be >= 0")
        if self.colocated == 0 and (self.prefill == 0 or self.decode == 0):
            raise ValueError("--prefill/--decode: need at least one of each (or --colocated K)")
        if self.startup_timeout_s <= 0:
            raise ValueError("--startup-timeout-s: must be positive")
        for name in ("prefill_tp", "decode_tp", "decode_dp"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")

    def parallel_for(self, role: str, base: ParallelConfig) -> ParallelConfig:
        """The ParallelConfig of a node of ``role`` (errors name this launcher's flags)."""
        tp = {"prefill": self.prefill_tp, "decode": self.decode_tp}.get(role) or base.tp
        dp, dp_attn = base.dp, base.enable_dp_attention
        if role == "decode" and self.decode_dp is not None:
            dp, dp_attn = self.decode_dp, self.decode_dp > 1
        elif role == "prefill":
            dp, dp_attn = 1, False   # DP attention is a decode-side layout
        try:
            return dataclasses.replace(base, tp=tp, dp=dp, enable_dp_attention=dp_attn)
        except ValueError as exc:
            raise ValueError(f"--{role}-tp/--{role}-dp: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve up", description="Run Redis, nodes and the router on this machine.")
    add_config_args(parser, LaunchConfig)
    add_config_args(parser, RouterConfig)
    add_config_args(parser, EngineConfig)
    add_config_args(parser, TransferConfig)
    add_config_args(parser, NodeConfig, skip=PER_NODE_FIELDS)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def config_argv(obj, *, only: set[str] | None = None, skip: set[str] = frozenset()) -> list[str]:
    """Flags that rebuild ``obj`` (a config dataclass) in a child process: the non-default leaves."""
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            argv += config_argv(value, only=only, skip=skip)
            continue
        if not f.metadata.get("cli", True) or f.name in skip or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value == default or value is None:
            continue
        if isinstance(value, bool):
            if not value:
                raise ValueError(f"{flag_name(f)}: cannot pass False to a child process")
            argv.append(flag_name(f))
        else:
            argv += [flag_name(f), str(value)]
    return argv


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def tail(self, num_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])


class Launcher:
    def __init__(self, launch: LaunchConfig, router: RouterConfig, engine: EngineConfig, transfer: TransferConfig,
                 node: NodeConfig, log_level: str) -> None:
        self.launch, self.router_cfg, self.engine, self.transfer, self.node_cfg = launch, router, engine, transfer, node
        self.log_level = log_level
        self.log_dir = Path(launch.log_dir or tempfile.mkdtemp(prefix="pdserve-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis: RedisServer | None = None
        self.registry_url = router.registry_url
        self.children: list[Child] = []
        self.node_host = "127.0.0.1" if router.host in ("0.0.0.0", "::", "") else router.host
        self.url = f"http://{'127.0.0.1' if router.host in ('0.0.0.0', '::', '') else router.host}:{router.port}"

    # -- starting ------------------------------------------------------------------------------
    def start(self) -> None:
        if self.registry_url is None:   # with a cluster secret, a password derived from it guards Redis
            secret = self.router_cfg.security.cluster_secret
            self.redis = RedisServer(log_path=str(self.log_dir / "redis.log"),
                                     password=derive_keys(secret).redis_password if secret else None)
            self.registry_url = self.redis.start()
            say(f"redis at {redact_url(self.registry_url)}")
        model_path = self._resolve_model()
        devices = gpu_devices()
        roles = ([("colocated", "serve")] * self.launch.colocated if self.launch.colocated else
                 [("prefill", "prefill")] * self.launch.prefill + [("decode", "decode")] * self.launch.decode)
        parallel = {role: self.launch.parallel_for(role, self.engine.parallel) for role, _ in roles}
        if not devices and self.engine.model.cpu_threads is None:
            # CPU nodes sharing one machine: each rank gets its share of the cores. Two torch processes
            # of 2 threads each on 2 cores spin against each other (OpenMP busy-waits) and a step
            # can take many times longer than with one thread each.
            share = max(1, (os.cpu_count() or 1) // sum(parallel[role].tp for role, _ in roles))
            self.engine = dataclasses.replace(self.engine,
                                              model=dataclasses.replace(self.engine.model, cpu_threads=share))
        counts: dict[str, int] = {}
        first_device = 0
        for role, command in roles:
            index = counts[role] = counts.get(role, -1) + 1
            env = dict(os.environ)
            ranks = parallel[role].tp   # one device per rank
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[(first_device + k) % len(devices)] for k in range(ranks))
                first_device += ranks
            engine = dataclasses.replace(self.engine, parallel=parallel[role])
            metrics_port = self.node_cfg.metrics_port
            metrics_port += len(self.children) if metrics_port > 0 else 0
            self._spawn(f"{role}-{index}", [command, *self.node_argv(model_path, engine),
                                            "--node-id", f"{role}-{index}", "--metrics-port", str(metrics_port)], env)
        self._spawn("router", ["router", *self.router_argv(model_path)], dict(os.environ))
        self._write_process_table()
        say(f"started {len(roles)} node(s) and the router; logs in {self.log_dir}")

    def _resolve_model(self) -> str:
        """Resolve (pull) the model once here, so N nodes do not race to download it."""
        from pdserve.model_pull import resolve_model_path
        m = self.engine.model
        return resolve_model_path(m.model_path, m.download_dir, m.revision)

    def node_argv(self, model_path: str, engine: EngineConfig | None = None) -> list[str]:
        engine = engine or self.engine
        engine = dataclasses.replace(engine, model=dataclasses.replace(engine.model, model_path=model_path))
        return [*config_argv(engine), *config_argv(self.transfer), *config_argv(self.node_cfg, skip=PER_NODE_FIELDS),
                "--registry-url", self.registry_url, "--host", self.node_host, "--log-level", self.log_level]

    def router_argv(self, model_path: str) -> list[str]:
        from pdserve.router.server import default_served_name
        router = dataclasses.replace(self.router_cfg, registry_url=self.registry_url,
                                     served_model_name=self.router_cfg.served_model_name
                                     or default_served_name(self.engine.model.model_path))
        model = dataclasses.replace(self.engine.model, model_path=model_path)
        return [*config_argv(router, skip={"host", "port", "cluster_secret"}),   # the secret goes by env
                "--host", router.host, "--port", str(router.port),
                *config_argv(model, only=ROUTER_MODEL_FIELDS), "--log-level", self.log_level]

    def _spawn(self, name: str, args: list[str], env: dict) -> None:
        log_path = self.log_dir / f"{name}.log"
        secret = self.router_cfg.security.cluster_secret
        if secret:   # through the environment: a process's argv is readable by every local user
            env = {**env, CLUSTER_SECRET_ENV: secret}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "pdserve", *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent)
        self.children.append(Child(name, proc, log_path))

    def _write_process_table(self) -> None:
        table = {c.name: c.proc.pid for c in self.children}
        if self.redis is not None and self.redis.proc is not None:
            table["redis"] = self.redis.proc.pid
        (self.log_dir / "processes.json").write_text(json.dumps(table, indent=1))

    # -- waiting -------------------------------------------------------------------------------
    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.launch.startup_timeout_s
        while time.monotonic() < deadline:
            dead = self.dead_children()
            if dead:
                raise LaunchError(f"{dead[0].name} exited with code {dead[0].proc.returncode} during startup",
                                  dead)
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise LaunchError(f"not healthy after {self.launch.startup_timeout_s:g} s", self._unregistered())

    def _unregistered(self) -> list[Child]:
        headers = {"Authorization": f"Bearer {self.router_cfg.api_key}"} if self.router_cfg.api_key else {}
        try:
            listed = {n["node_id"] for n in httpx.get(self.url + "/nodes", headers=headers, timeout=2.0).json()["nodes"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return [c for c in self.children if c.name == "router"] or self.children
        return [c for c in self.children if c.name != "router" and c.name not in listed]

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]

    def keep_redis_up(self) -> None:
        """Start our Redis again (same port, same password) if it died."""
        if self.redis is None or self.redis.is_running:
            return
        code = self.redis.proc.returncode if self.redis.proc is not None else "?"
        say(f"warning: redis exited with code {code}; starting it again on port {self.redis.port} "
            f"(nodes re-register)")
        try:
            self.redis.start()
        except RuntimeError as exc:   # e.g. the port was taken meanwhile; tried again on the next turn
            say(f"error: {exc}")
            return
        self._write_process_table()

    # -- stopping ------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the router, then the nodes (each its own process group); SIGKILL stragglers."""
        ordered = [c for c in self.children if c.name == "router"] + [c for c in self.children if c.name != "router"]
        for child in ordered:
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in ordered:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait(timeout=5)
        for child in ordered:   # anything a child left in its group (it had its own session)
            _signal_group(child.proc, signal.SIGKILL)
        if self.redis is not None:
            self.redis.stop()


class LaunchError(RuntimeError):
    def __init__(self, message: str, culprits: list[Child]) -> None:
        super().__init__(message)
        self.culprits = culprits


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def gpu_devices() -> list[str]:
    """GPU ids to spread nodes over: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def say(message: str) -> None:
    print(f"pdserve up: {message}", flush=True)


def run_demo(url: str, model: str, api_key: str | None, question: str, max_tokens: int) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0)
    try:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=max_tokens)
    except openai.APIError as exc:   # the demo failing is worth seeing, not worth stopping the server for
        say(f"demo request failed: {exc}")
        return
    print(f"Q: {question}\nA: {reply.choices[0].message.content}", flush=True)


def launcher_from_args(args: argparse.Namespace) -> "Launcher":
    """Build every config from the parsed flags (ValueError naming the flag when one is invalid)."""
    values = {k: v for k, v in vars(args).items() if k != "log_level"}
    launch = config_from_args(LaunchConfig, values)
    if launch.colocated and ("prefill" in values or "decode" in values):
        raise ValueError("--colocated: start either colocated nodes or prefill/decode nodes, not both")
    engine = config_from_args(EngineConfig, values)
    if engine.model.is_embedding and not launch.colocated:
        raise ValueError("--is-embedding: prefill nodes do not embed; start embedding nodes with --colocated K")
    for role in ("colocated",) if launch.colocated else ("prefill", "decode"):
        launch.parallel_for(role, engine.parallel)   # each role's layout is valid before anything starts
    return Launcher(launch, config_from_args(RouterConfig, values), engine,
                    config_from_args(TransferConfig, values), config_from_args(NodeConfig, values), args.log_level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        launcher = launcher_from_args(args)
    except ValueError as exc:
        parser.exit(2, f"pdserve up: error: {exc}\n")
    router = launcher.router_cfg
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _serve(launcher, router)
    except KeyboardInterrupt:
        say("stopping")
        return 0
    except (ValueError, LaunchError) as exc:
        say(f"error: {exc}")
        for child in getattr(exc, "culprits", []):
            print(f"--- last lines of {child.log_path} ---\n{child.tail()}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not interrupt the cleanup
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        launcher.stop()


def _serve(launcher: Launcher, router: RouterConfig) -> int:
    t0 = time.monotonic()
    launcher.start()
    launcher.wait_healthy()
    model = router.served_model_name or _served_name(launcher)
    say(f"ready in {time.monotonic() - t0:.1f} s: {launcher.url}/v1 (model '{model}'); Ctrl-C stops everything")
    if launcher.launch.demo:
        run_demo(launcher.url, model, router.api_key, launcher.launch.demo, launcher.launch.demo_max_tokens)
    reported: set[str] = set()
    while True:
        launcher.keep_redis_up()
        for child in launcher.dead_children():
            if child.name == "router":
                raise LaunchError(f"the router exited with code {child.proc.returncode}", [child])
            if child.name not in reported:
                reported.add(child.name)
                say(f"warning: {child.name} exited with code {child.proc.returncode}; the others keep serving")
        time.sleep(0.5)


def _served_name(launcher: Launcher) -> str:
    from pdserve.router.server import default_served_name
    return default_served_name(launcher.engine.model.model_path)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
