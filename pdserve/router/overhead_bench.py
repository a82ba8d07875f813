"""What the router costs: TTFT it adds (router vs. straight to the nodes) and sustained requests/s.

Everything runs against loopback nodes (``pdserve.router.loopback``: the real protocol and
registry, no model), each role in its own process, so the numbers are router + wire only:

- direct: this process speaks the node protocol itself (GenerateReq to the decode node,
  PrefillReq to the prefill node, TokenOut back over ZMQ), one request at a time;
- via router: the same requests as OpenAI streaming completions (token-id prompts, so the
  router's tokenizer costs nothing; detokenization still runs), one at a time;
- throughput: non-streaming completions at several concurrencies; requests/s, output tokens/s,
  and the router process's CPU time per request.

``python -m pdserve.router.overhead_bench --num-requests 300 --concurrency 1,16,64``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import httpx
import zmq

from pdserve.protocol import GenerateReq, PrefillReq, TokenOut, decode_router_message, encode
from pdserve.redis_server import RedisServer, die_with_parent, free_port
from pdserve.registry import RegistryView
from pdserve.sampling_params import SamplingParams


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(ms: list[float]) -> dict:
    return {"mean": statistics.fmean(ms), "p50": _pct(ms, 0.5), "p90": _pct(ms, 0.9), "p99": _pct(ms, 0.99)}


def measure_direct(view: RegistryView, prompt: list[int], out_tokens: int, n: int) -> dict:
    nodes = view.nodes()
    prefill = next(x for x in nodes.values() if x.role == "prefill")
    decode = next(x for x in nodes.values() if x.role == "decode")
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    reply_to = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    to_p, to_d = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
    to_p.connect(prefill.addr)
    to_d.connect(decode.addr)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=out_tokens, ignore_eos=True)
    ttft, e2e = [], []
    for _ in range(n):
        rid = uuid.uuid4().hex
        t0 = time.perf_counter()
        to_d.send(encode(GenerateReq(rid=rid, input_ids=prompt, sampling=sampling, reply_to=reply_to,
                                     transfer_id=rid, prefill_bootstrap=prefill.bootstrap)))
        to_p.send(encode(PrefillReq(rid=rid, transfer_id=rid, input_ids=prompt, sampling=sampling, reply_to=reply_to)))
        first = None
        while True:
            msg = decode_router_message(pull.recv())
            if isinstance(msg, TokenOut) and msg.rid == rid:
                first = first or time.perf_counter()
                if msg.finish_reason:
                    break
        ttft.append((first - t0) * 1e3)
        e2e.append((time.perf_counter() - t0) * 1e3)
    for sock in (pull, to_p, to_d):
        sock.close(linger=0)
    ctx.term()
    return {"ttft_ms": _summary(ttft), "e2e_ms": _summary(e2e)}


def measure_router_sequential(url: str, prompt: list[int] | str, out_tokens: int, n: int) -> dict:
    """Streaming requests one at a time: token ids as a completion, text as a chat (template + tokenizer)."""
    is_chat = isinstance(prompt, str)
    body = {"max_tokens": out_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    body.update({"messages": [{"role": "user", "content": prompt}]} if is_chat else {"prompt": prompt})
    path = "/v1/chat/completions" if is_chat else "/v1/completions"
    ttft, e2e = [], []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            first = None
            with client.stream("POST", path, json=body) as resp:
                for line in resp.iter_lines():
                    if first is None and line.startswith("data: {") and _chunk_text(json.loads(line[6:])):
                        first = time.perf_counter()
            ttft.append((first - t0) * 1e3)
            e2e.append((time.perf_counter() - t0) * 1e3)
    return {"ttft_ms": _summary(ttft), "e2e_ms": _summary(e2e)}


def _chunk_text(chunk: dict) -> str:
    choice = chunk["choices"][0]
    return choice["delta"].get("content") if "delta" in choice else choice["text"]


async def _post_loop(host: str, port: int, request: bytes, counter: list[int], results: list[int]) -> None:
    """One keep-alive connection posting ``request`` while ``counter`` has requests left (a minimal
    HTTP/1.1 client: httpx's pool, not the router, limits throughput beyond ~32 connections)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while counter[0] > 0:
            counter[0] -= 1
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            results.append(int(status_line.split()[1]))
    finally:
        writer.close()


async def _throughput(url: str, prompt: list[int], out_tokens: int, n: int, concurrency: int) -> tuple[float, int]:
    body = json.dumps({"prompt": prompt, "max_tokens": out_tokens, "ignore_eos": True, "temperature": 0}).encode()
    host, port = url.split("//", 1)[1].split(":")
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    counter, statuses = [n], []
    t0 = time.perf_counter()
    await asyncio.gather(*(_post_loop(host, int(port), request, counter, statuses) for _ in range(concurrency)))
    return time.perf_counter() - t0, sum(1 for s in statuses if s != 200)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.router.overhead_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer-path", default="smollm2", help="Model path whose tokenizer the router loads.")
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--concurrency", default="1,16,64", help="Throughput runs ('' for none).")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--decode-nodes", type=int, default=1)
    parser.add_argument("--registry-url", default=None, help="Measure an existing deployment (with --router-url) "
                        "instead of starting loopback nodes and a router.")
    parser.add_argument("--router-url", default=None)
    parser.add_argument("--log", default=os.devnull, help="Where the child processes' output goes.")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    from pdserve.model_pull import resolve_model_path
    from pdserve.tokenizer import load_tokenizer

    tok_path = resolve_model_path(args.tokenizer_path)
    tok = load_tokenizer(tok_path)
    if args.registry_url and args.router_url:
        view = RegistryView(args.registry_url).start()
        results = _measure(args, tok, view, args.router_url.rstrip("/"), router_pid=None, decode_pid=None)
        view.stop()
    else:
        results = _with_loopback(args, tok, tok_path)
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _with_loopback(args, tok, tok_path: str) -> dict:
    reply = ",".join(str(t) for t in tok.encode(" the quick brown fox jumps over the lazy dog"))
    with RedisServer() as redis_srv, open(args.log, "ab") as log:
        port = free_port()
        procs = [_spawn(["-m", "pdserve.router.loopback", "--registry-url", redis_srv.url, "--role", "prefill",
                         "--reply-ids", reply], log),
                 _spawn(["-m", "pdserve.router.loopback", "--registry-url", redis_srv.url, "--role", "decode",
                         "--count", str(args.decode_nodes), "--reply-ids", reply], log),
                 _spawn(["-m", "pdserve", "router", "--registry-url", redis_srv.url, "--port", str(port),
                         "--model-path", tok_path, "--log-level", "warning"], log)]
        try:
            view = RegistryView(redis_srv.url).start()
            view.wait_for(lambda n: len(n) == 1 + args.decode_nodes, 30)
            results = _measure(args, tok, view, f"http://127.0.0.1:{port}", procs[2].pid, procs[1].pid)
            view.stop()
            return results
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=10)


def _measure(args, tok, view: RegistryView, url: str, router_pid: int | None, decode_pid: int | None) -> dict:
    _wait_healthy(url, 60)
    prompt = [(1000 + 7 * i) % tok.vocab_size for i in range(args.prompt_tokens)]
    results: dict = {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens, "throughput": []}
    n_seq = min(args.num_requests, 200)
    measure_router_sequential(url, prompt, args.output_tokens, min(20, n_seq))          # warm-up
    results["direct"] = measure_direct(view, prompt, args.output_tokens, n_seq)
    results["router"] = measure_router_sequential(url, prompt, args.output_tokens, n_seq)
    results["router_chat"] = measure_router_sequential(url, tok.decode(prompt), args.output_tokens, n_seq)
    for conc in [int(c) for c in args.concurrency.split(",") if c]:
        pids = [p for p in (router_pid, decode_pid) if p is not None]
        cpu0 = [_cpu_seconds(p) for p in pids]
        wall, failures = asyncio.run(_throughput(url, prompt, args.output_tokens, args.num_requests, conc))
        cpu = [(_cpu_seconds(p) - c0) / wall for p, c0 in zip(pids, cpu0)]
        row = {"concurrency": conc, "requests_per_s": args.num_requests / wall,
               "output_tokens_per_s": args.num_requests * args.output_tokens / wall, "failures": failures}
        if len(cpu) == 2:
            row.update(router_cpu_ms_per_request=cpu[0] * wall / args.num_requests * 1e3, router_cpu_util=cpu[0],
                       decode_nodes_cpu_util=cpu[1])
        results["throughput"].append(row)
    return results


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("router not healthy")


def _print(r: dict) -> None:
    d, v = r["direct"]["ttft_ms"], r["router"]["ttft_ms"]
    print(f"prompt {r['prompt_tokens']} tokens, output {r['output_tokens']} tokens")
    print(f"TTFT direct  ms: p50 {d['p50']:.2f}  p90 {d['p90']:.2f}  p99 {d['p99']:.2f}")
    print(f"TTFT router  ms: p50 {v['p50']:.2f}  p90 {v['p90']:.2f}  p99 {v['p99']:.2f}")
    print(f"router adds  ms: p50 {v['p50'] - d['p50']:.2f}  p90 {v['p90'] - d['p90']:.2f}")
    c = r["router_chat"]["ttft_ms"]
    print(f"TTFT router, chat with a text prompt (template + tokenizer) ms: p50 {c['p50']:.2f}  p90 {c['p90']:.2f}")
    print(f"E2E direct/router p50 ms: {r['direct']['e2e_ms']['p50']:.2f} / {r['router']['e2e_ms']['p50']:.2f}")
    for t in r["throughput"]:
        cpu = (f"router CPU {t['router_cpu_ms_per_request']:.2f} ms/req ({t['router_cpu_util']:.0%} of a core; "
               f"loopback decode {t['decode_nodes_cpu_util']:.0%})  " if "router_cpu_util" in t else "")
        print(f"concurrency {t['concurrency']:>4}: {t['requests_per_s']:8.1f} req/s  {t['output_tokens_per_s']:9.0f} "
              f"tok/s  {cpu}failures {t['failures']}")


if __name__ == "__main__":
    raise SystemExit(main())
