"""The server against slow and hostile clients: stalled bodies cannot take prediction slots,
preparation runs off the event loop, one deadline covers the whole request, an API key guards
it, and no input (lone surrogates, NaN, huge tokens, random JSON) gets a 5xx."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import make_config
from routetune.errors import DataError, RoutetuneError
from routetune.serve.limits import Limits
from routetune.serve.predictor import parse_line
from routetune.serve.server import check_exposure, create_app


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_model_dir):
    from support import write_task_and_general
    from routetune.runs import load_run
    from routetune.workflow import train

    tmp = tmp_path_factory.mktemp("harden")
    files = write_task_and_general(tmp)
    run_dir, _ = train(make_config(tmp, tiny_model_dir, files, **{"train.max_steps": 3}))
    return load_run(run_dir)


def client(loaded, **kw):
    cfg, model, tok = loaded
    limits = {k: v for k, v in kw.items() if k in Limits.__dataclass_fields__}
    options = {k: v for k, v in kw.items() if k not in limits}
    return TestClient(create_app(model, tok, cfg, Limits(**limits), "fp32", **options))


class LiveServer:
    """The app under a real uvicorn on a free loopback port, in a thread (slow sockets need one)."""

    def __init__(self, app, **config):
        import uvicorn

        from routetune.serve.server import uvicorn_config

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # the settings `routetune serve` runs with (connection guard included)
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, app.state.limits,
                                                    **{"log_level": "error", **config}))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def post(self, path: str, body: dict, timeout: float = 10.0):
        import httpx

        return httpx.post(f"http://127.0.0.1:{self.port}{path}", json=body, timeout=timeout)


def _stall(port: int, declared: int = 2000) -> socket.socket:
    """A client that sends its headers and half a body, then nothing."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/ner HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n{\"texts\": [\"aaaa" % declared)
    return s


def test_stalled_bodies_take_no_prediction_slot_and_time_out(loaded):
    cfg, model, tok = loaded
    app = create_app(model, tok, cfg, Limits(max_concurrency=2, body_timeout_s=1.0), "fp32")
    with LiveServer(app) as server:
        stalled = [_stall(server.port) for _ in range(32)]
        time.sleep(0.2)
        codes = [server.post("/v1/ner", {"texts": ["John in Paris"]}).status_code for _ in range(10)]
        assert codes == [200] * 10  # 32 stalled clients hold connections, not the 2 slots
        for s in stalled:
            s.settimeout(5)
            answer = s.recv(4096).decode(errors="replace")
            assert answer.startswith("HTTP/1.1 408"), answer[:80]
            s.close()


def _metric(server, name: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


def test_a_connection_flood_cannot_starve_ordinary_clients(loaded):
    """256 idle connections and 256 that trickle header bytes: ordinary clients are answered all
    along (the longest-waiting connection is evicted to admit each), and the flood is closed by
    the header deadline; every close is counted in /metrics."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, model, tok = loaded
    app = create_app(model, tok, cfg, Limits(max_connections=256, header_timeout_s=2.0), "fp32")
    with LiveServer(app) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(256)]
        trickle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(256)]
        for s in trickle:
            s.sendall(b"POST /v1/ner HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        stop = threading.Event()

        def trickler():  # one more header byte per connection every 0.2 s, never the end of the headers
            while not stop.is_set():
                for s in trickle:
                    try:
                        s.send(b"a")
                    except OSError:
                        pass
                time.sleep(0.2)

        thread = threading.Thread(target=trickler, daemon=True)
        thread.start()
        time.sleep(0.3)
        started = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(lambda i: server.post("/v1/ner", {"texts": [f"John in Paris {i}"]}).status_code,
                                  range(10)))
        assert codes == [200] * 10 and time.monotonic() - started < 10
        time.sleep(3.0)  # past the header deadline: the whole flood is closed
        stop.set()
        thread.join(5)
        still_open = 0
        for s in idle + trickle:
            s.settimeout(2)
            try:
                still_open += s.recv(4096) != b""  # b"": closed by the server
            except TimeoutError:
                still_open += 1
            except OSError:  # reset by the server: closed
                pass
            s.close()
        assert still_open == 0
        closed = _metric(server, "routetune_connections_closed_total")
        evicted = closed.get('routetune_connections_closed_total{reason="evicted"}', 0)
        timed_out = closed.get('routetune_connections_closed_total{reason="header_timeout"}', 0)
        assert evicted >= 256 and evicted + timed_out == 512  # each flood connection closed once, and counted
        assert server.post("/v1/ner", {"texts": ["John in Paris"]}).status_code == 200


def test_a_reconnecting_flood_does_not_evict_ordinary_keep_alive_connections(loaded):
    """A flood that opens new connections all the time keeps the server at its connection cap, so
    every new one evicts another: the flood's own (never served) go first, not the ordinary
    clients' keep-alive connections between their requests."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, model, tok = loaded
    app = create_app(model, tok, cfg, Limits(max_connections=64, header_timeout_s=5.0), "fp32")
    with LiveServer(app) as server:
        stop, flood = threading.Event(), []

        def flooder():  # 20 new idle connections every 50 ms, for as long as the clients run
            while not stop.is_set():
                for _ in range(20):
                    try:
                        flood.append(socket.create_connection(("127.0.0.1", server.port), timeout=1))
                    except OSError:
                        pass
                time.sleep(0.05)

        def ordinary(i):  # one keep-alive connection, several requests with pauses between them; a
            # closed connection is an error here (http.client does not reconnect on its own)
            import http.client

            conn, codes = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10), []
            try:
                for j in range(5):
                    body = json.dumps({"texts": [f"John in Paris {i} {j}"]})
                    try:
                        conn.request("POST", "/v1/ner", body, {"content-type": "application/json"})
                        resp = conn.getresponse()
                        resp.read()
                        codes.append(resp.status)
                    except (OSError, http.client.HTTPException):
                        codes.append(-1)
                        conn.close()
                    time.sleep(0.3)
            finally:
                conn.close()
            return codes

        thread = threading.Thread(target=flooder, daemon=True)
        thread.start()
        time.sleep(0.5)  # the cap is reached
        try:
            with ThreadPoolExecutor(10) as pool:
                codes = [c for cs in pool.map(ordinary, range(10)) for c in cs]
        finally:
            stop.set()
            thread.join(5)
            for s in flood:
                s.close()
        assert codes == [200] * 50
        closed = _metric(server, "routetune_connections_closed_total")
        assert closed.get('routetune_connections_closed_total{reason="evicted"}', 0) > 100  # the cap was under pressure


def test_deeply_nested_json_is_a_422(loaded):
    body = "[" * 5000 + "]" * 5000
    r = client(loaded).post("/v1/ner", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_preparation_runs_off_the_event_loop(loaded):
    threads = []
    with client(loaded) as c:
        svc = c.app.state.service
        original = svc.token_counts

        def spy(*a, **k):
            threads.append(threading.current_thread().name)
            return original(*a, **k)

        svc.token_counts = spy
        assert c.post("/v1/ner", json={"texts": ["John in Paris"]}).status_code == 200
        assert c.post("/v1/ner", json={"tokens": [["John", "in", "Paris"]]}).status_code == 200
        # a fast tokenizer is not safe to share between threads (each call resets its truncation
        # on the Rust object): the preparing threads count with their own copies
        used = {id(t) for t in svc.prep.map(lambda _: svc.thread_tokenizer(), range(8))}
    assert threads and all(t.startswith("routetune-prepare") for t in threads), threads
    assert id(svc.tokenizer) not in used and 1 <= len(used) <= 2


def test_healthz_answers_while_a_maximal_request_is_prepared(loaded):
    """The event loop stays free while a request is tokenised: /healthz answers in a fraction of
    the time the big request takes (the 100 ms figure is measured in bench/serve_load.py)."""
    cfg, model, tok = loaded
    app = create_app(model, tok, cfg, Limits(truncate=True, timeout_s=60), "fp32")
    svc = app.state.service
    original = svc.token_counts

    def slow_counts(*a, **k):  # a slow tokenizer, on the preparing thread
        time.sleep(1.5)
        return original(*a, **k)

    svc.token_counts = slow_counts
    with LiveServer(app) as server:
        import httpx

        big = threading.Thread(target=server.post, args=("/v1/ner", {"texts": ["word " * 4_000] * 48}, 60))
        big.start()
        time.sleep(0.3)
        latencies = []
        for _ in range(5):
            t = time.perf_counter()
            assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
            latencies.append(time.perf_counter() - t)
        big.join()
    assert max(latencies) < 0.75, latencies


def test_the_deadline_covers_preparation(loaded):
    with client(loaded, timeout_s=0.3) as c:
        svc = c.app.state.service
        original = svc.token_counts
        svc.token_counts = lambda *a, **k: (time.sleep(0.8), original(*a, **k))[1]
        r = c.post("/v1/ner", json={"texts": ["John"]})
    assert r.status_code == 504 and "longer than 0.3 s" in r.json()["detail"]


def test_characters_are_capped_before_tokenising(loaded):
    with client(loaded, max_chars=50) as c:
        r = c.post("/v1/ner", json={"texts": ["x" * 51]})
        assert r.status_code == 422 and "more than 50 characters" in r.json()["detail"]
        r = c.post("/v1/classify", json={"texts": ["x" * 900_000]})
        assert r.status_code in (404, 422)  # no classification head here: refused before any tokenising
    with client(loaded, max_chars=50, truncate=True) as c:
        r = c.post("/v1/ner", json={"texts": ["John " * 40], "head": "ner"})
        assert r.status_code == 200 and r.json()["results"][0]["truncated"] is True
        r = c.post("/v1/ner", json={"tokens": [["y" * 900_000, "John"]]})
        assert r.status_code == 200 and r.json()["results"][0]["tokens"] == ["y" * 50]


@pytest.mark.parametrize("body", [
    {"texts": ["\ud800"]}, {"tokens": [["ok", "\udc00x"]]}, {"texts": ["fine"], "head": "\ud83d"},
], ids=["text", "token", "head"])
def test_lone_surrogates_are_422(loaded, body):
    with client(loaded) as c:
        r = c.post("/v1/ner", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "not valid Unicode" in json.dumps(r.json())


def test_nan_in_a_mistyped_field_is_a_422_that_encodes(loaded):
    with client(loaded) as c:
        for raw in (
            '{"texts": NaN}',
            '{"texts": ["a"], "head": Infinity}',
            '{"prompts": ["a"], "max_new_tokens": NaN}',
        ):
            path = "/v1/generate" if "prompts" in raw else "/v1/ner"
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422, (raw, r.status_code, r.text)
            assert r.json()["detail"]


def test_api_key_and_switches(loaded):
    with client(loaded, api_key="s3cret", docs=False, metrics=False) as c:
        assert c.get("/healthz").status_code == 200  # open: for load balancers
        assert c.post("/v1/ner", json={"texts": ["a"]}).status_code == 401
        r = c.post("/v1/ner", json={"texts": ["a"]}, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        ok = {"authorization": "Bearer s3cret"}
        assert c.post("/v1/ner", json={"texts": ["a"]}, headers=ok).status_code == 200
        assert c.get("/docs", headers=ok).status_code == 404
        assert c.get("/metrics", headers=ok).status_code == 404
    with client(loaded, api_key="s3cret") as c:
        assert c.get("/metrics").status_code == 401 and c.get("/docs").status_code == 401
        assert c.get("/metrics", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_a_non_loopback_host_needs_a_key(caplog):
    check_exposure("127.0.0.1", None, False)
    check_exposure("::1", None, False)
    check_exposure("0.0.0.0", "key", False)
    with pytest.raises(RoutetuneError, match=r"--host 0\.0\.0\.0: serving beyond this machine needs an API key"):
        check_exposure("0.0.0.0", None, False)
    with caplog.at_level(logging.WARNING, logger="routetune"):
        check_exposure("0.0.0.0", None, True)
    assert "WITHOUT an API key" in caplog.text


def test_access_log_line(loaded, caplog):
    logging.getLogger("routetune").setLevel(logging.INFO)
    with caplog.at_level(logging.INFO, logger="routetune"), client(loaded) as c:
        c.post("/v1/ner", json={"texts": ["a", "b"]})
        c.post("/v1/ner", json={"texts": []})
    import re

    lines = [r.getMessage() for r in caplog.records if " POST /v1/ner " in r.getMessage()]
    # time, client, method, path, status, items, duration
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d testclient:\d+ "
    assert re.match(stamp + r"POST /v1/ner 200 items=2 [\d.]+ ms$", lines[0]), lines[0]
    assert re.match(stamp + r"POST /v1/ner 422 items=- ", lines[1]), lines[1]


# ------------------------------------------------------------------ fuzzing

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
_bodies = st.one_of(
    _json,
    st.fixed_dictionaries({"texts": st.lists(st.text(max_size=60), max_size=5)}),
    st.fixed_dictionaries({"tokens": st.lists(st.lists(st.text(max_size=20), max_size=4), max_size=4)}),
    st.fixed_dictionaries({"texts": st.lists(st.text(alphabet=st.characters(blacklist_categories=[]), max_size=80),
                                             min_size=1, max_size=3)}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies, path=st.sampled_from(["/v1/ner", "/v1/classify", "/v1/generate"]))
def test_fuzz_http_api_never_5xx(loaded, body, path):
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True)  # surrogates and NaN go over the wire as escapes
    with client(loaded, max_items=4, max_chars=200) as c:
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    r.json()  # every answer is JSON


@settings(max_examples=300, deadline=None)
@given(line=st.text(alphabet=st.characters(blacklist_categories=[]), max_size=120) |
       st.builds(lambda v: json.dumps(v, ensure_ascii=True), _json))
def test_fuzz_predict_lines_give_data_errors_with_file_and_line(line):
    try:
        parse_line(line, "auto", "in.jsonl", 7)
    except DataError as exc:
        assert str(exc).startswith("in.jsonl:7: "), str(exc)
