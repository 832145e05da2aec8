"""Load test of `routetune serve` on loopback, side by side with a naive server that calls a
transformers `pipeline` per request on the same model.

    .venv/bin/python bench/serve_load.py --run runs/wnut17-fast --cap 16 --clients 32 --duration 60

Each of `--clients` concurrent clients (asyncio + httpx, one connection each) sends one WNUT-17
test sentence per POST /v1/ner, back to back, for `--duration` seconds. Printed per server:
answered requests per second, p50 / p99 latency of 200 answers, counts per status code, and the
server's RSS after a 10 s warm-up at the same load and at the end. For routetune, every 200 answer is compared with
offline prediction (`Predictor`, the code path of `routetune predict`) of its input, computed in
this process before the load starts: entities, tags and tokens must be equal. The naive server
(FastAPI, one `pipeline(...)` call per request in the default thread pool, no limits) gets the same
load; its answers are in the pipeline's own format and are not compared.

The clients run on the same two cores as the server, so absolute numbers include their cost.

With `--slow-clients N` (routetune only), N more connections send their headers and half a body
and then nothing, through the whole load (re-opened when the server closes them): they must not
take prediction slots (the server reads a body before a request takes a slot, and drops a body
that has not arrived within `--body-timeout`). Also printed: `/healthz` latency, polled every
100 ms during the load, and once while one maximal request (48 items of 20,000 characters, with
`--truncate`) is being prepared.

With `--idle-clients N --trickle-clients M` (routetune only), a connection flood runs through the
whole load: N connections that send nothing and M that trickle header bytes without ever ending
them, each re-opened whenever the server closes it. The ordinary clients' status codes and
latencies say whether the flood starved them; the flood's own counts say how often the server
closed its connections (header deadline `--header-timeout`, eviction past `--max-connections`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
DATA = Path(os.environ.get("ROUTETUNE_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("ROUTETUNE_DATA", str(DATA))  # the examples read their data from there

NAIVE = textwrap.dedent('''
    import sys
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import pipeline

    pipe = pipeline("token-classification", model=sys.argv[1], aggregation_strategy="first", device=-1)
    app = FastAPI()

    class Req(BaseModel):
        texts: list[str]

    @app.post("/v1/ner")
    def ner(req: Req):
        out = pipe(req.texts)
        return {"results": [[{k: (float(v) if k == "score" else v) for k, v in e.items()} for e in r] for r in out]}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, seconds: float = 180) -> None:
    import httpx

    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not become ready")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def stall(port: int, end: float, stats: dict) -> None:
    """One slow client: headers and half a declared body, then silence, until `end`."""
    while time.perf_counter() < end:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/ner HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 2000\r\n\r\n{\"texts\": [\"aaaa")
            await writer.drain()
            stats["opened"] = stats.get("opened", 0) + 1
            line = await asyncio.wait_for(reader.readline(), max(0.1, end - time.perf_counter()))
            code = line.split()[1].decode() if len(line.split()) > 1 else "closed"
            stats[code] = stats.get(code, 0) + 1
            writer.close()
        except (asyncio.TimeoutError, OSError):
            pass


async def flood(port: int, end: float, stats: dict, trickle: bool) -> None:
    """One connection of a flood, re-opened whenever the server closes it, until `end`: idle (sends
    nothing) or trickling (a header byte every 0.2 s, never the end of the headers)."""
    while time.perf_counter() < end:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            stats["opened"] = stats.get("opened", 0) + 1
            if trickle:
                writer.write(b"POST /v1/ner HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            while time.perf_counter() < end:
                if trickle:
                    writer.write(b"a")
                    await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                        stats["closed by the server"] = stats.get("closed by the server", 0) + 1
                        break
                except asyncio.TimeoutError:
                    continue
            writer.close()
        except OSError:
            stats["refused"] = stats.get("refused", 0) + 1
            await asyncio.sleep(0.05)


async def poll_health(port: int, end: float, out: list) -> None:
    import httpx

    async with httpx.AsyncClient() as http:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                await http.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
                out.append(time.perf_counter() - t0)
            except httpx.HTTPError:
                out.append(float("inf"))
            await asyncio.sleep(0.1)


async def health_during_big_request(port: int) -> dict:
    import httpx

    body = {"texts": ["word " * 4_000] * 48}  # 48 x 20,000 characters: about the largest body the default 1 MB admits
    async with httpx.AsyncClient() as http:
        big = asyncio.create_task(http.post(f"http://127.0.0.1:{port}/v1/ner", json=body, timeout=120))
        await asyncio.sleep(0.05)
        lat = []
        while not big.done():
            t0 = time.perf_counter()
            await http.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
        r = await big
    return {"big_status": r.status_code, "big_healthz_max_ms": 1000 * max(lat) if lat else float("nan"),
            "big_healthz_polls": len(lat)}


async def load(port: int, texts: list[str], clients: int, duration: float, expected: dict | None, seed: int = 0,
               slow_clients: int = 0, idle_clients: int = 0, trickle_clients: int = 0):
    import httpx

    codes: dict[int, int] = {}
    latencies: list[float] = []
    mismatches: list[str] = []
    end = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(k: int, http: httpx.AsyncClient):
        rng = random.Random(seed * 1000 + k)
        while time.perf_counter() < end:
            text = texts[rng.randrange(len(texts))]
            t0 = time.perf_counter()
            try:
                r = await http.post(f"http://127.0.0.1:{port}/v1/ner", json={"texts": [text]}, timeout=60)
                code = r.status_code
            except httpx.HTTPError:
                code = -1  # connection error
            dt = time.perf_counter() - t0
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                latencies.append(dt)
                if expected is not None:
                    got = r.json()["results"][0]
                    want = expected[text]
                    if (got["entities"], got["tags"], got["tokens"]) != (
                        want["entities"],
                        want["tags"],
                        want["tokens"],
                    ):
                        mismatches.append(text)
            elif code == 503:
                await asyncio.sleep(0.1)  # a client backs off on 503 (100 ms; the server suggests Retry-After: 1)

    stalls: dict = {}
    floods: dict = {}
    health: list[float] = []
    async with httpx.AsyncClient(limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)),
                             *(stall(port, end, stalls) for _ in range(slow_clients)),
                             *(flood(port, end, floods, trickle=False) for _ in range(idle_clients)),
                             *(flood(port, end, floods, trickle=True) for _ in range(trickle_clients)),
                             poll_health(port, end, health))
        elapsed = time.perf_counter() - started
    health.sort()
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "elapsed": elapsed,
        "codes": dict(sorted(codes.items())),
        "ok_per_s": codes.get(200, 0) / elapsed,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:3],
        "slow_clients": stalls,
        "flood": floods,
        "healthz_p50_ms": 1000 * health[len(health) // 2] if health else float("nan"),
        "healthz_max_ms": 1000 * health[-1] if health else float("nan"),
    }


def run_server(cmd: list[str], port: int, texts: list[str], clients: int, duration: float, expected, label: str,
               slow_clients: int = 0, idle_clients: int = 0, trickle_clients: int = 0):
    # the server's log (one access line per request) goes to a file: a pipe nobody reads fills up
    # and blocks the server's event loop on its own logging
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{label}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ})
    try:
        wait_ready(port, proc)
        asyncio.run(load(port, texts, clients, 10.0, None, seed=99))  # warm-up at full load, not timed
        before = rss_mb(proc.pid)
        result = asyncio.run(load(port, texts, clients, duration, expected, slow_clients=slow_clients,
                                  idle_clients=idle_clients, trickle_clients=trickle_clients))
        after = rss_mb(proc.pid)
        if expected is not None:
            result.update(asyncio.run(health_during_big_request(port)))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result.update(rss_before_mb=before, rss_after_mb=after, rss_growth=after / before - 1)
    five = sum(n for c, n in result["codes"].items() if c >= 500 and c != 503)
    print(
        f"{label:10s} {result['ok_per_s']:7.1f} answers/s  p50 {result['p50_ms']:7.1f} ms  "
        f"p99 {result['p99_ms']:7.1f} ms  "
        f"codes {result['codes']}  5xx other than 503: {five}  RSS {before:.0f} -> {after:.0f} MB "
        f"({100 * result['rss_growth']:+.1f}%)"
        + (f"  answers != offline: {result['mismatches']}" if expected is not None else ""),
        flush=True,
    )
    print(
        f"{'':10s} /healthz during the load: p50 {result['healthz_p50_ms']:.1f} ms, "
        f"max {result['healthz_max_ms']:.1f} ms"
        + (f"; slow clients {result['slow_clients']}" if slow_clients else "")
        + (
            f"; flood ({idle_clients} idle + {trickle_clients} trickling) {result['flood']}"
            if idle_clients or trickle_clients
            else ""
        )
        + (
            f"; during one maximal request ({result['big_status']}): max {result['big_healthz_max_ms']:.1f} ms over "
            f"{result['big_healthz_polls']} polls"
            if "big_status" in result
            else ""
        ),
        flush=True,
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/wnut17-fast")
    ap.add_argument("--cap", type=int, default=16, help="routetune --max-concurrency")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default: 2 x cap)")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--slow-clients", type=int, default=0, help="stalled connections during routetune's load")
    ap.add_argument("--idle-clients", type=int, default=0, help="connections that send nothing (routetune's load)")
    ap.add_argument("--trickle-clients", type=int, default=0,
                    help="connections that trickle header bytes, never finishing them (routetune's load)")
    ap.add_argument("--header-timeout", type=float, default=5.0, help="routetune --header-timeout")
    args = ap.parse_args()
    clients = args.clients or 2 * args.cap

    from routetune.data.readers import read_conll
    from routetune.serve.predictor import Predictor, item_from_text
    from routetune.runs import load_run

    texts = sorted({" ".join(s.tokens) for s in read_conll(DATA / "wnut17" / "emerging.test.annotated")})
    cfg, model, tokenizer = load_run(Path(args.run), "best")
    offline = Predictor(model, tokenizer, cfg.train.primary, cfg.model.max_length, 64, args.precision)
    expected = dict(zip(texts, offline.predict([item_from_text(t) for t in texts])))
    del model
    print(f"{len(texts)} distinct WNUT-17 test sentences, {clients} clients, {args.duration:.0f} s per server, "
          f"routetune cap {args.cap}, precision {args.precision}", flush=True)
    port = free_port()
    cmd = [sys.executable, "-m", "routetune.cli", "serve", args.run, "--port", str(port), "--max-concurrency",
           str(args.cap), "--precision", args.precision, "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--timeout", "30", "--truncate"]
    cmd += ["--header-timeout", str(args.header_timeout)]
    run_server(cmd, port, texts, clients, args.duration, expected, "routetune", args.slow_clients, args.idle_clients,
               args.trickle_clients)
    if args.skip_naive:
        return
    from routetune.export import export

    with tempfile.TemporaryDirectory() as tmp:
        export(Path(args.run), Path(tmp) / "hf", "best")
        script = Path(tmp) / "naive.py"
        script.write_text(NAIVE)
        port = free_port()
        run_server([sys.executable, str(script), str(Path(tmp) / "hf" / "heads" / cfg.train.primary), str(port)],
                   port, texts, clients, args.duration, None, "pipeline")


if __name__ == "__main__":
    main()
