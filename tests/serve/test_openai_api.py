"""The OpenAI API of a decoder run, driven by the official `openai` client against a real server
(uvicorn on a free port of the loopback) over two tiny LoRA runs on one random Llama with a chat
template: chat and completions, streamed and not, n, seeds, stop strings, usage, logprobs, errors
as the client's own exceptions, adapters by name, a disconnect that frees its slot, and the answer
of `routetune generate`."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import httpx
import pytest
import yaml

openai = pytest.importorskip("openai")

from support import GENERAL  # noqa: E402
from routetune.serve.adapters import Served  # noqa: E402
from routetune.serve.server import Limits, create_app, uvicorn_config  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    """Two LoRA runs (different data and seeds) on one tiny Llama whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    from routetune.workflow import train

    root = tmp_path_factory.mktemp("openai")
    base = root / "base"
    shutil.copytree(tiny_llama_dir, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    out = []
    for name, text, seed in (("alpha", "the store of john opened in paris . " * 40, 1),
                             ("beta", GENERAL, 2)):
        (root / f"{name}.txt").write_text(text)
        cfg = {"model": {"name": str(base), "max_length": 48},
               "sources": {"lm": {"objective": "causal-lm", "train": str(root / f"{name}.txt"),
                                  "text": {"stream": False}}},
               "peft": {"method": "lora", "r": 4, "alpha": 32, "target_modules": ["q_proj", "v_proj", "o_proj"]},
               "train": {"max_steps": 8, "batch_size": 4, "lr": 5e-2, "seed": seed, "precision": "fp32",
                         "device": "cpu", "progress": False},
               "run": {"name": name, "output_dir": str(root / "runs")}}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run_dir, _ = train(path)
        out.append(run_dir)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app, limits):
        import uvicorn

        self.port = _free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, limits, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url, api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


@pytest.fixture(scope="module")
def server(runs):
    from routetune.device import inference_hardware
    from routetune.model.inference import for_inference
    from routetune.runs import load_run

    cfg, model, tok = load_run(runs[0])
    served = Served.load(model, cfg, runs)
    for_inference(model, "fp32", inference_hardware("cpu", "fp32").device)
    limits = Limits(max_new_tokens=24, max_batch=8, timeout_s=30)
    app = create_app(model, tok, cfg, limits, "fp32", served=served, api_key="sesame")
    with _Server(app, limits) as srv:
        yield srv


def test_models_list_each_run_with_the_base_as_parent(server):
    models = {m.id: m for m in server.client(api_key="sesame").models.list()}
    assert set(models) == {"alpha", "beta", "base"}
    assert models["alpha"].parent == models["beta"].parent == "base" and models["base"].parent is None
    assert server.client(api_key="sesame").models.retrieve("beta").id == "beta"


def test_a_wrong_key_and_an_unknown_model_raise_the_clients_own_errors(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as info:
        server.client(api_key="sesame").chat.completions.create(model="gamma", messages=[{"role": "user",
                                                                                           "content": "hi"}])
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


@pytest.mark.parametrize("field, value", [("frequency_penalty", 0.5), ("logit_bias", {"5": 1.0}),
                                          ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("max_tokens", 10_000), ("n", 99), ("temperature", 3)])
def test_an_unsupported_field_or_a_value_over_a_limit_is_a_400_naming_it(server, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        server.client(api_key="sesame").chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}], **{field: value})
    assert info.value.status_code == 400 and info.value.body["param"] == field, info.value.body


def test_the_joined_stream_is_the_answer_for_the_same_seed(server):
    c = server.client(api_key="sesame")
    ask = {"model": "alpha", "messages": [{"role": "user", "content": "the store of john"}], "seed": 7,
           "temperature": 1.0, "max_tokens": 16}
    whole = c.chat.completions.create(**ask)
    again = c.chat.completions.create(**ask)
    assert whole.choices[0].message.content == again.choices[0].message.content  # same seed, same answer
    chunks = list(c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert len({ch.id for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    other = c.chat.completions.create(**{**ask, "seed": 8, "max_tokens": 16})
    assert other.choices[0].message.content != whole.choices[0].message.content or whole.usage.completion_tokens < 3


def test_n_choices_are_indexed_and_usage_matches_the_tokenizer(server, runs):
    from routetune.data.chat import render_chat
    from routetune.model.load import load_tokenizer

    c = server.client(api_key="sesame")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "paris and london"}]
    r = c.chat.completions.create(model="beta", messages=messages, n=3, seed=1, max_tokens=12)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    from routetune.training.checkpoint import run_checkpoint

    tok = load_tokenizer(str(run_checkpoint(runs[1], "best")))
    assert r.usage.prompt_tokens == len(tok(render_chat(tok, messages))["input_ids"])
    assert r.usage.completion_tokens <= 3 * 12 and r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens
    done = c.completions.create(model="beta", prompt="the store", max_tokens=12, temperature=0)
    if done.choices[0].finish_reason == "length":
        assert done.usage.completion_tokens == 12


def test_stop_strings_cut_exactly_where_they_start(server):
    c = server.client(api_key="sesame")
    plain = c.completions.create(model="alpha", prompt="the store of", max_tokens=20, temperature=0)
    text = plain.choices[0].text
    assert len(text) > 6, text
    stop = text[3:6]  # a stop string that starts inside the answer, across whatever tokens make it
    cut = c.completions.create(model="alpha", prompt="the store of", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="alpha", prompt="the store of", max_tokens=20, temperature=0, stop=[stop], stream=True) if ch.choices)
    assert streamed == cut.choices[0].text


def test_logprobs_are_the_models_and_the_greedy_token_is_the_top_one(server):
    c = server.client(api_key="sesame")
    r = c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "paris"}], temperature=0,
                                  max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy: the argmax


def test_adapter_choice_changes_the_greedy_answer_and_matches_routetune_generate(server, runs):
    from routetune.model.inference import generate
    from routetune.runs import load_run

    c = server.client(api_key="sesame")
    answers = {}
    for name in ("alpha", "beta", "base"):
        r = c.completions.create(model=name, prompt="the store of john", max_tokens=10, temperature=0)
        answers[name] = r.choices[0].text
    assert len(set(answers.values())) == 3, answers
    for run in runs:
        cfg, model, tok = load_run(run)
        offline = generate(model, tok, ["the store of john"], 10, cfg.model.max_length)[0]
        assert answers[run.name].strip() == offline


def test_concurrent_requests_share_decoding_steps(server, monkeypatch):
    c = server.client(api_key="sesame")
    engine = server.app.state.service.engine
    decode, widths = engine._decode, []

    def slow_decode(adapter, group):  # steps as slow as a real model's, so the requests overlap
        widths.append(len(group))
        time.sleep(0.02)
        decode(adapter, group)

    monkeypatch.setattr(engine, "_decode", slow_decode)
    before, results = engine.steps, []

    def ask(i):
        r = c.completions.create(model="alpha" if i % 2 else "beta", prompt="paris", max_tokens=20, temperature=1.0,
                                 seed=i, stop=["zzzz"])
        results.append(r.usage.completion_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    # one request at a time would take a step per token of each (about 6 x 20); joined, the steps are shared
    assert engine.steps - before < sum(results) / 2, (engine.steps - before, results)
    assert max(widths) >= 2  # the sequences of one adapter ran as one batch


def test_a_client_that_goes_away_mid_stream_frees_its_slot(server, monkeypatch):
    svc = server.app.state.service
    engine, submitted = svc.engine, []
    submit, decode = engine.submit, engine._decode

    def slow_decode(adapter, group):  # a step as slow as a real model's, so the stream is still going
        time.sleep(0.03)
        decode(adapter, group)

    monkeypatch.setattr(engine, "submit", lambda seqs: (submitted.extend(seqs), submit(seqs)))
    monkeypatch.setattr(engine, "_decode", slow_decode)
    body = {"model": "alpha", "prompt": "the store", "max_tokens": 24, "stream": True, "temperature": 1.0,
            "stop": ["zzzz"]}
    with httpx.Client(timeout=10) as h:
        with h.stream("POST", f"{server.url}/completions", json=body,
                      headers={"authorization": "Bearer sesame"}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    deadline = time.monotonic() + 5
    while (svc.state["inflight"] or engine.running) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert svc.state["inflight"] == 0 and engine.running == 0
    (seq,) = submitted
    assert seq.cancelled and len(seq.ids) < 12  # dropped at the next step, not run to its 24 tokens


def _lone_run(tmp_path, model_dir, name: str, peft: dict, steps: int, lr: float):
    """A run of `model_dir` on general text with `peft`, served on its own by the tests below."""
    from routetune.workflow import train

    (tmp_path / "t.txt").write_text(GENERAL)
    cfg = {"model": {"name": str(model_dir), "max_length": 48},
           "sources": {"lm": {"objective": "causal-lm", "train": str(tmp_path / "t.txt"), "text": {"stream": False}}},
           "peft": peft, "train": {"max_steps": steps, "batch_size": 4, "lr": lr, "precision": "fp32", "device": "cpu",
                                   "progress": False},
           "run": {"name": name, "output_dir": str(tmp_path / "runs")}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return train(tmp_path / f"{name}.yaml")[0]


def test_a_prompt_tuned_run_answers_as_routetune_generate(tmp_path, tiny_llama_dir):
    """Prompt tuning prefills from the virtual tokens' embeddings, then decodes from its cache."""
    from fastapi.testclient import TestClient

    from routetune.model.inference import generate
    from routetune.runs import load_run

    cfg, model, tok = load_run(_lone_run(tmp_path, tiny_llama_dir, "prompted",
                                         {"method": "prompt_tuning", "num_virtual_tokens": 4}, 4, 5e-2))
    offline = generate(model, tok, ["the store of john", "paris"], 8, cfg.model.max_length)
    with TestClient(create_app(model, tok, cfg, Limits(max_new_tokens=8), "fp32")) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["prompted"]
        r = c.post("/v1/completions", json={"model": "prompted", "prompt": ["the store of john", "paris"],
                                            "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert [ch["text"].strip() for ch in r.json()["choices"]] == offline


def test_a_fully_fine_tuned_decoder_is_served_alone_and_generate_still_answers(tmp_path, tiny_llama_dir):
    """Full fine-tuning: no adapters, so no base to offer beside the run; /v1/generate (the worker
    thread) and the OpenAI endpoints (the engine) take turns on the model."""
    from fastapi.testclient import TestClient

    from routetune.runs import load_run

    cfg, model, tok = load_run(_lone_run(tmp_path, tiny_llama_dir, "whole", {"method": "full"}, 2, 1e-3))
    with TestClient(create_app(model, tok, cfg, Limits(max_new_tokens=6), "fp32")) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["whole"]
        done = c.post("/v1/completions", json={"model": "whole", "prompt": "paris", "max_tokens": 6,
                                               "temperature": 0}).json()
        legacy = c.post("/v1/generate", json={"prompts": ["paris"], "max_new_tokens": 6}).json()
        assert done["choices"][0]["text"].strip() == legacy["results"][0]["completion"]


def test_the_servers_own_limits_answer_in_openai_shape(server):
    """The middleware's refusals (here the body size, before any handler) on an OpenAI path: the
    client raises its own status error, the body is OpenAI's error object."""
    c = server.client(api_key="sesame")
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x" * 1_100_000}])
    assert info.value.status_code == 413
    assert info.value.body["type"] == "invalid_request_error" and "too large" in info.value.body["message"]
