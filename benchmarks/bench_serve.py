"""Load benchmark of ``ssmkit serve``: concurrent streaming clients against one server process.

For each model shape (random weights; "small": d_model 256, 4 layers; "130m": d_model 768, 24 layers,
vocab 50280 — the shape of state-spaces/mamba-130m) a model folder is written to a temporary directory
and served by ``python -m ssmkit serve`` (float32, --max-batch = the most clients). Then:

* throughput: for each number of concurrent clients C (default 1, 4, 16, 64), C clients (asyncio +
  httpx) each stream one completion of ``--max-tokens`` tokens after a short prompt, all sent at once;
  reported: aggregate completion tokens/s (all tokens / wall time from the first request to the last
  [DONE]), p50/p99 time to first token over the clients, p50/p99 inter-token latency over every gap
  between two streamed chunks;
* memory: ``--rss-streams`` streams each with a prompt of K tokens of context (default 1024 and 32768);
  once all of them are prefilled and decoding, the server's RSS (VmRSS in /proc/PID/status) is read,
  next to the state bytes ``/health`` reports, and the clients disconnect; the peak RSS of that run
  (VmHWM, reset before it) is reported too. A Mamba stream holds a fixed-size state and prompts are
  prefilled in bounded chunks, so RSS should not grow with K.

The model's tokenizer.json has 95 printable characters and a newline, so each sampled token is one
character and one streamed chunk (the LM head still computes all vocab_size logits; the server samples
only ids its tokenizer decodes). Greedy decoding, no end-of-sequence token: every stream runs to
max_tokens.

    python benchmarks/bench_serve.py                                # both shapes, all client counts
    python benchmarks/bench_serve.py --shapes small --clients 1,4 --contexts 1024   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "small": {"d_model": 256, "n_layer": 4, "vocab_size": 50280},
    "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50280},
}


def write_model(folder: Path, shape: dict) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models

    from ssmkit import MambaConfig, MambaLM

    folder.mkdir(parents=True)
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    MambaLM(MambaConfig(**shape)).save_pretrained(folder)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class ServerProcess:
    def __init__(self, folder: Path, max_batch: int, threads: int | None):
        cmd = [sys.executable, "-m", "ssmkit", "serve", str(folder), "--port", "0"]
        cmd += ["--max-batch", str(max_batch), "--max-streams", str(2 * max_batch), "--model-name", "m"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


async def one_stream(client, url: str, prompt: list[int], max_tokens: int, t0: float) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return {"ttft": times[0] - t0, "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": tokens}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def load_run(url: str, clients: int, prompt_len: int, max_tokens: int) -> dict:
    import httpx

    rng = random.Random(clients)
    prompts = [[rng.randrange(96) for _ in range(prompt_len)] for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, p, max_tokens, t0) for p in prompts))
        wall = time.perf_counter() - t0
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * pct([r["ttft"] for r in results], 0.5),
        "ttft_p99_ms": 1e3 * pct([r["ttft"] for r in results], 0.99),
        "itl_p50_ms": 1e3 * pct(gaps, 0.5),
        "itl_p99_ms": 1e3 * pct(gaps, 0.99),
    }


def memory_run(server: ServerProcess, streams: int, context: int) -> dict:
    """Server RSS once ``streams`` streams, each prefilled with ``context`` tokens, are all decoding (the
    clients then disconnect); also the peak RSS over the run (VmHWM, reset first via clear_refs)."""
    import httpx

    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS

    async def hold_open():
        rng = random.Random(context)
        body = {"model": "m", "max_tokens": 10**9, "temperature": 0, "stream": True}
        async with httpx.AsyncClient(
            timeout=3600, limits=httpx.Limits(max_connections=streams + 8)
        ) as client:

            async def stream(prompt):
                async with client.stream(
                    "POST", server.url + "/v1/completions", json={**body, "prompt": prompt}
                ) as r:
                    async for _ in r.aiter_lines():
                        pass

            t0 = time.perf_counter()
            tasks = [
                asyncio.create_task(stream([rng.randrange(96) for _ in range(context)]))
                for _ in range(streams)
            ]
            while True:
                health = (await client.get(server.url + "/health")).json()
                if health["active"] == streams:
                    break
                await asyncio.sleep(0.05)
            result = {"rss": rss_bytes(server.proc.pid), "state_bytes": health["state_bytes"]}
            result["prefill_s"] = time.perf_counter() - t0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return result

    seen = asyncio.run(hold_open())
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
    return {
        "streams": streams,
        "context": context,
        "rss_mib": seen["rss"] / 2**20,
        "peak_rss_mib": hwm / 2**20,
        "state_mib": seen["state_bytes"] / 2**20,
        "prefill_s": seen["prefill_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="small,130m", help="comma-separated subset of small,130m")
    ap.add_argument("--clients", default="1,4,16,64", help="concurrent client counts")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens streamed per client (default 32)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of the load runs")
    ap.add_argument("--contexts", default="1024,32768", help="context tokens per stream of the RSS runs")
    ap.add_argument("--rss-streams", default="small=16,130m=4", help="streams of the RSS runs, per shape")
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    rss_streams = {k: int(v) for k, v in (kv.split("=") for kv in args.rss_streams.split(","))}

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    print(f"CPU: {cpu}; {os.cpu_count()} CPUs; 1-min load average {os.getloadavg()[0]:.1f} at the start")
    results: dict = {"cpu": cpu, "load_start": os.getloadavg()[0], "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            folder = Path(tmp) / name
            write_model(folder, SHAPES[name])
            server = ServerProcess(folder, max(clients + [rss_streams.get(name, 1)]), args.threads)
            try:
                idle = rss_bytes(server.proc.pid) / 2**20
                print(f"\n## {name} {SHAPES[name]}  (server RSS idle: {idle:.0f} MiB)")
                print("| clients | tokens/s | × 1 client | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |")
                print("|---|---|---|---|---|---|---|")
                loads = []
                for c in clients:
                    r = asyncio.run(load_run(server.url, c, args.prompt_tokens, args.max_tokens))
                    loads.append(r)
                    base = loads[0]["tokens_per_s"]
                    print(
                        f"| {c} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.1f}× "
                        f"| {r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms "
                        f"| {r['itl_p50_ms']:.0f} ms | {r['itl_p99_ms']:.0f} ms |",
                        flush=True,
                    )
                memory = []
                if contexts:
                    head = (
                        "| streams | context per stream | server RSS | peak RSS | state (/health) | prefill |"
                    )
                    print("\n" + head)
                    print("|---|---|---|---|---|---|")
                for k in contexts:
                    m = memory_run(server, rss_streams.get(name, 4), k)
                    memory.append(m)
                    print(
                        f"| {m['streams']} | {k} | {m['rss_mib']:.1f} MiB | {m['peak_rss_mib']:.1f} MiB "
                        f"| {m['state_mib']:.2f} MiB | {m['prefill_s']:.1f} s |",
                        flush=True,
                    )
                results["shapes"][name] = {"shape": SHAPES[name], "idle_rss_mib": idle, "load": loads}
                results["shapes"][name]["memory"] = memory
            finally:
                server.stop()
    results["load_end"] = os.getloadavg()[0]
    print(f"\n1-min load average {results['load_end']:.1f} at the end")
    if args.out:
        from ssmkit.utils import atomic_write_text

        atomic_write_text(args.out, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
