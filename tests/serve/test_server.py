"""The HTTP API: every limit and error code, and served == offline predictions."""

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

from support import forkserver
import pytest
from fastapi.testclient import TestClient

from support import make_config
from routetune.serve.predictor import Predictor, item_from_text, item_from_tokens
from routetune.serve.server import Limits, create_app


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, tiny_model_dir):
    from support import write_task_and_general
    from routetune.workflow import train

    tmp = tmp_path_factory.mktemp("serve")
    files = write_task_and_general(tmp)
    run_dir, _ = train(make_config(tmp, tiny_model_dir, files))
    return run_dir


@pytest.fixture(scope="module")
def loaded(ner_run):
    from routetune.runs import load_run

    return load_run(ner_run)


def client(loaded, **limits):
    cfg, model, tok = loaded
    return TestClient(create_app(model, tok, cfg, Limits(**limits)))


TEXTS = ["John opened a store in Paris .", "Apple opened in London", "the store of John Smith", "paris"]


def test_served_equals_offline_predict(loaded):
    cfg, model, tok = loaded
    offline = Predictor(model, tok, "ner", cfg.model.max_length, 64, cfg.train.precision)
    with client(loaded) as c:
        r = c.post("/v1/ner", json={"texts": TEXTS})
        assert r.status_code == 200
        served = r.json()["results"]
        assert [{k: v for k, v in s.items() if k != "truncated"} for s in served] == \
            offline.predict([item_from_text(t) for t in TEXTS])
        r = c.post("/v1/ner", json={"tokens": [t.split() for t in TEXTS]})
        assert [{k: v for k, v in s.items() if k != "truncated"} for s in r.json()["results"]] == \
            offline.predict([item_from_tokens(t.split()) for t in TEXTS])
        assert not any(s["truncated"] for s in served)


def test_concurrent_requests_are_micro_batched_and_answered_individually(loaded):
    cfg, model, tok = loaded
    offline = Predictor(model, tok, "ner", cfg.model.max_length, 64, cfg.train.precision)
    expected = {t: offline.predict([item_from_text(t)])[0] for t in TEXTS}
    results, errors = [], []
    with client(loaded, max_wait_ms=50, max_batch=64) as c:
        def call(text):
            r = c.post("/v1/ner", json={"texts": [text]})
            (results if r.status_code == 200 else errors).append((text, r))

        threads = [threading.Thread(target=call, args=(TEXTS[i % 4],)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = c.get("/metrics").text
    assert not errors
    for text, r in results:
        got = r.json()["results"][0]
        got.pop("truncated")
        assert got == expected[text]
    # some model call held more than one request's item
    counts = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("routetune_batch_items_")}
    assert counts["routetune_batch_items_count"] < 12


def test_limits_and_error_codes(loaded):
    with client(loaded, max_body_bytes=300, max_items=3, max_tokens=12) as c:
        assert c.post("/v1/ner", json={"texts": ["a " * 200]}).status_code == 413  # body too large
        # streamed body without Content-Length is cut off too
        def chunks():
            yield b'{"texts": ["'
            for _ in range(100):
                yield b"aaaaaaaaaa"
            yield b'"]}'
        assert c.post("/v1/ner", content=chunks(), headers={"content-type": "application/json"}).status_code == 413
        assert c.post("/v1/ner", json={"texts": TEXTS}).status_code == 422  # 4 items > 3
        r = c.post("/v1/ner", json={"texts": ["john " * 20]})
        assert r.status_code == 422 and "tokens" in r.json()["detail"]  # too many tokens
        assert c.post("/v1/ner", json={"texts": ["x"], "model": "/etc/passwd"}).status_code == 422  # unknown field
        assert c.post("/v1/ner", json={"texts": ["x"], "tokens": [["x"]]}).status_code == 422
        assert c.post("/v1/ner", json={"texts": []}).status_code == 422
        assert c.post("/v1/ner", json={"texts": ["x"], "head": "nope"}).status_code == 422
        assert c.post("/v1/ner", content=b"not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/v1/classify", json={"texts": ["x"]}).status_code == 404  # no such head in this run
        assert c.post("/v1/generate", json={"prompts": ["x"]}).status_code == 404  # encoder
        assert c.get("/healthz").json()["status"] == "ok"
        metrics = c.get("/metrics").text
        assert 'routetune_requests_total{code="413",endpoint="/v1/ner"} 2.0' in metrics
        assert 'routetune_requests_total{code="422",endpoint="/v1/ner"}' in metrics
        assert c.get("/openapi.json").json()["paths"]["/v1/ner"]
        # the docs pages load their scripts and styles from this server, not a CDN (they work offline)
        for page in ("/docs", "/redoc"):
            html = c.get(page).text
            assert "cdn." not in html and "googleapis" not in html
            assets = re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', html)
            assert assets and all(c.get(a).status_code == 200 and len(c.get(a).content) > 100_000 for a in assets)
        assert "openapi" in c.get([a for a in re.findall(r'src="([^"]+)"', c.get("/docs").text)][0]).text
    with client(loaded, max_tokens=12, truncate=True) as c:
        r = c.post("/v1/ner", json={"texts": ["john " * 20]})
        assert r.status_code == 200 and r.json()["results"][0]["truncated"] is True
        cfg, model, tok = loaded  # cut at 12 tokens: words past the cut get 'O', as offline with max_length 12
        cut = Predictor(model, tok, "ner", 12, 64, cfg.train.precision).predict([item_from_text("john " * 20)])[0]
        assert r.json()["results"][0]["tags"] == cut["tags"] and cut["tags"][-1] == "O"


def test_concurrency_cap_and_timeout(loaded):
    cfg, model, tok = loaded
    slow = threading.Event()
    app = create_app(model, tok, cfg, Limits(max_concurrency=1, timeout_s=0.3, max_wait_ms=0))
    original = model.heads["ner"].forward

    def sleepy(*a, **k):
        if slow.is_set():
            time.sleep(0.6)
        return original(*a, **k)

    model.heads["ner"].forward = sleepy
    try:
        with TestClient(app) as c:
            slow.set()
            codes = []
            threads = [
                threading.Thread(target=lambda: codes.append(c.post("/v1/ner", json={"texts": ["x"]}).status_code))
                for _ in range(3)
            ]
            for t in threads:
                t.start()
                time.sleep(0.05)
            for t in threads:
                t.join()
            assert 504 in codes and 503 in codes  # the first times out, the others find the cap reached
            slow.clear()
            time.sleep(0.7)
            assert c.post("/v1/ner", json={"texts": ["x"]}).status_code == 200
    finally:
        del model.heads["ner"].forward


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests(ner_run):
    import httpx

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = forkserver.popen("routetune.cli", ["serve", str(ner_run), "--port", str(port), "--max-wait-ms", "800"], env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        results = []
        t = threading.Thread(target=lambda: results.append(
            httpx.post(f"http://127.0.0.1:{port}/v1/ner", json={"texts": TEXTS}, timeout=30)))
        t.start()
        time.sleep(0.3)  # the request waits in the micro-batch window (800 ms)
        proc.send_signal(signal.SIGTERM)
        t.join()
        assert results and results[0].status_code == 200 and len(results[0].json()["results"]) == 4
        # uvicorn finishes the graceful shutdown, then re-raises SIGTERM: routetune's handler ends it
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read().decode()
    assert "127.0.0.1" in out  # bound to loopback by default
    assert "Finished server process" in out and out.strip().endswith("terminated")


def test_predict_cli_json_lines_match_served(ner_run, loaded, tmp_path):
    from typer.testing import CliRunner

    from routetune.cli import app

    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(app, ["predict", str(ner_run), str(inp), "-o", str(out)])
    assert r.exit_code == 0, r.output
    offline = [json.loads(line) for line in out.read_text().splitlines()]
    with client(loaded) as c:
        served = c.post("/v1/ner", json={"texts": TEXTS}).json()["results"]
    assert [{k: v for k, v in s.items() if k != "truncated"} for s in served] == offline
