"""Chat load on the OpenAI endpoints: `routetune serve RUN` against `transformers serve` on the same
weights, CPU and settings, driven by the official `openai` client (the chat workload of the serving
benchmarks; `bench/serve_load.py` has the NER load).

    .venv/bin/python bench/serve_chat.py --run runs/shakespeare-lora --clients 4 --requests 3 \
        --max-tokens 48 --rounds 3 --out docs/records/serve_chat.json

The run's adapter is merged into plain weights first (`routetune export --merge`), and `transformers
serve` loads that folder, so both sides run the same model. Each of `--clients` concurrent clients
(asyncio, `AsyncOpenAI`, streaming) sends `--requests` chat requests one after another (greedy,
`max_tokens`, a fixed list of prompts). Per request: time to first token (the first chunk with
text), the gaps between chunks with text (inter-token latency), and its completion tokens (the
usage chunk where the server sends one, else the chunks with text). Per server: p50 / p99 of both,
completion tokens per second over the load's wall time, and the server's peak RSS. The servers run
one after the other, alternating, `--rounds` times (medians printed); `transformers serve` runs in
each of its modes (`--continuous-batching` and without) and its fastest is the reference. The
clients share the two cores with the server, so absolute numbers include their cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import free_port, rss_mb  # noqa: E402

PROMPTS = ["Write two lines in the style of Shakespeare about the sea.", "Who was Romeo?",
           "Say something a king would say to his army.", "Describe London in one sentence.",
           "What is a sonnet?", "Give advice to a young prince."]


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def one_client(client, model: str, requests: int, max_tokens: int, offset: int, out: list) -> None:
    for i in range(requests):
        prompt = PROMPTS[(offset + i) % len(PROMPTS)]
        t0 = time.perf_counter()
        first, last, gaps, chunks, usage = None, None, [], 0, None
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last, chunks = now, chunks + 1
        out.append({"ttft": first, "gaps": gaps, "tokens": usage if usage is not None else chunks})


def load(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    async def main():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0,
                                    timeout=600)
        out: list = []
        t0 = time.perf_counter()
        async with client:
            await asyncio.gather(*(one_client(client, model, requests, max_tokens, c, out) for c in range(clients)))
        return out, time.perf_counter() - t0

    out, wall = asyncio.run(main())
    ttft = [r["ttft"] for r in out if r["ttft"] is not None]
    gaps = [g for r in out for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in out)
    return {"requests": len(out), "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(1000 * quantile(ttft, 0.5), 1), "ttft_p99_ms": round(1000 * quantile(ttft, 0.99), 1),
            "itl_p50_ms": round(1000 * quantile(gaps, 0.5), 1), "itl_p99_ms": round(1000 * quantile(gaps, 0.99), 1)}


def wait_ready(port: int, proc: subprocess.Popen, seconds: float = 600) -> None:
    """Until the server lists its models (both servers answer GET /v1/models)."""
    import httpx

    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.log.read()[-800:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become ready")


def measure(cmd: list[str], port: int, model: str, args, env: dict) -> dict:
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall a chatty server
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    peak, done = [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(proc.pid))
            time.sleep(0.2)

    try:
        wait_ready(port, proc)
        load(port, model, 1, 1, 4)  # warm-up: first-call costs (lazy loading, allocator) out of the figures
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result = load(port, model, args.clients, args.requests, args.max_tokens)
        done.set()
        watcher.join()
        return {**result, "peak_rss_mb": round(peak[0])}
    finally:
        done.set()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write every round's figures here (JSON)")
    args = ap.parse_args()
    py = str(Path(sys.executable))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    merged = Path(tempfile.mkdtemp(prefix="serve-chat-")) / "merged"
    subprocess.run([py, "-m", "routetune.cli", "--quiet", "export", args.run, "--out", str(merged), "--merge"],
                   check=True, env=env)
    run_name = Path(args.run).name
    hf_cli = str(Path(sys.executable).parent / "transformers")
    sides = {
        "routetune": lambda port: [py, "-m", "routetune.cli", "serve", args.run, "--port", str(port),
                                   "--max-new-tokens", str(args.max_tokens), "--max-concurrency", "64",
                                   "--timeout", "600", "--precision", "fp32"],
        "transformers serve": lambda port: [hf_cli, "serve", str(merged / "lm"),
                                            "--port", str(port), "--host", "127.0.0.1"],
        "transformers serve --continuous-batching": lambda port: [
            hf_cli, "serve", str(merged / "lm"), "--port", str(port),
            "--host", "127.0.0.1", "--continuous-batching"],
    }
    models = {"routetune": run_name}
    rounds: dict[str, list] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, cmd in (sides.items() if r % 2 == 0 else reversed(list(sides.items()))):
            port = free_port()
            try:
                result = measure(cmd(port), port, models.get(name, str(merged / "lm")), args, env)
            except Exception as exc:  # a side that cannot run here is reported, not hidden
                result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            rounds[name].append(result)
            print(f"round {r + 1} {name}: {json.dumps(result)}", flush=True)
    summary = {}
    for name, results in rounds.items():
        ok = [x for x in results if "error" not in x]
        if ok:
            summary[name] = {k: statistics.median(x[k] for x in ok) for k in ok[0]}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rounds, "medians": summary}, indent=2)
                                  + "\n")


if __name__ == "__main__":
    main()
