"""serve.py on tiny models: a real HTTP server (LitServe) driven by the official openai client.

Routed answers come back with their route and per-route scores, 16 concurrent requests are answered in batches,
and bad requests get a 4xx with a clear message (never a 500)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gag_lightning.serving.protocol import RequestError, parse_chat_request
from tests.conftest import ROOT
from tests.test_three_routes import three_routes

ROUTES = ["general", "demo", "demo_bio"]


# ------------------------------------------------------------------------------------------- protocol, no server
def _parse(body, limit=None):
    return parse_chat_request(body, "gag-router", ROUTES, lambda q: len(q.split()),
                              limit or (lambda q, n, m: None))


def test_protocol_accepts_a_chat_request() -> None:
    q = _parse({"model": "gag-router", "messages": [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": [{"type": "text", "text": "Hi?"}]}],
                "max_tokens": 7, "temperature": 0})
    assert (q.question, q.route, q.max_new_tokens, q.prompt_tokens) == ("Hi?", None, 7, 1)
    assert _parse({"model": "demo_bio", "messages": [{"role": "user", "content": "x"}]}).route == "demo_bio"
    assert _parse({"model": "auto", "messages": [{"role": "user", "content": "x"}]}).route is None


@pytest.mark.parametrize(("body", "status", "match"), [
    ([1, 2], 400, "JSON object"),
    ({"model": "gag-router", "messages": []}, 400, "non-empty list"),
    ({"model": "gag-router"}, 400, "non-empty list"),
    ({"model": "gag-router", "messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
    ({"model": "gag-router", "messages": [{"role": "system", "content": "x"}]}, 400, "no user message"),
    ({"model": "gag-router", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role must be one of"),
    ({"model": "gag-router", "messages": [{"role": "user", "content": "x", "mood": 1}]}, 400, "unknown field"),
    ({"model": "gag-router", "messages": [{"role": "user", "content": "x"}], "foo": 1}, 400, r"unknown field.*foo"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "'model' is required"),
    ({"model": "gag-router", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "'n' must be 1"),
    ({"model": "gag-router", "messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
    ({"model": "gag-router", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "positive"),
    ({"model": "gag-router", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, 400, "temperature"),
])
def test_protocol_refuses_bad_requests(body, status, match) -> None:
    with pytest.raises(RequestError, match=match) as info:
        _parse(body)
    assert info.value.status == status
    assert info.value.body()["error"]["message"]


def test_protocol_refuses_an_over_long_input() -> None:
    with pytest.raises(RequestError, match="context window") as info:
        _parse({"model": "gag-router", "messages": [{"role": "user", "content": "a b c"}]},
               limit=lambda q, n, m: "the prompt exceeds the base model's context window")
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"


# ------------------------------------------------------------------------------------------- the real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _post_raw(url: str, data: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def questions(tiny_two_domains, tmp_path_factory) -> dict[str, list[str]]:
    """Test questions the tiny router routes to their gold route, per route (route.py mode=eval in-process)."""
    from gag_lightning.routing.run import run
    from tests.conftest import compose

    out = tmp_path_factory.mktemp("serve_routes")
    run(compose([*three_routes(tiny_two_domains), "print_config=false", f"paths.cache_dir={ROOT / '.cache'}",
                 f"paths.output_dir={out}"], "route"))
    rows = [json.loads(x) for x in (out / "routes.jsonl").read_text().splitlines()]
    picked = {r: [x["question"] for x in rows if x["gold"] == r == x["pred"]] for r in ROUTES}
    assert all(picked.values()), {r: len(v) for r, v in picked.items()}
    return picked


@pytest.fixture(scope="module")
def server(tiny_two_domains, questions, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    log_path = tmp / "server.log"
    cmd = [sys.executable, str(ROOT / "serve.py"), *three_routes(tiny_two_domains), "print_config=false",
           f"paths.cache_dir={ROOT / '.cache'}", f"hydra.run.dir={tmp / 'run'}", f"serve.port={port}",
           "serve.max_batch_size=16", "serve.batch_timeout=0.5", "serve.timeout=120"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve.py exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if _get(f"{url}/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"serve.py not healthy after 240s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield {"url": url, "log": log_path, "questions": questions}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the LitServe workers it started
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_health_and_models(server) -> None:
    status, _ = _get(f"{server['url']}/health")
    assert status == 200
    status, body = _get(f"{server['url']}/v1/models")
    assert status == 200
    ids = [m["id"] for m in json.loads(body)["data"]]
    assert ids == ["gag-router", *ROUTES]


def test_openai_client_gets_routed_answers(client, server) -> None:
    for route in ROUTES:
        q = server["questions"][route][0]
        resp = client.chat.completions.create(model="gag-router", messages=[{"role": "user", "content": q}])
        extra = resp.model_extra
        assert extra["route"] == route, (q, extra)
        assert set(extra["route_scores"]) == set(ROUTES)
        assert max(extra["route_scores"], key=extra["route_scores"].get) == route
        assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
        assert isinstance(resp.choices[0].message.content, str)
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert resp.usage.prompt_tokens > 0 and resp.usage.total_tokens >= resp.usage.prompt_tokens
    # a route's name as `model` forces that route (the scores still say where the router would send it)
    q = server["questions"]["general"][0]
    resp = client.chat.completions.create(model="demo_bio", messages=[{"role": "user", "content": q}])
    assert resp.model_extra["route"] == "demo_bio" and resp.model_extra["routing"]["forced"] is True
    models = client.models.list()
    assert [m.id for m in models.data] == ["gag-router", *ROUTES]


def test_sixteen_concurrent_requests_are_batched(client, server) -> None:
    by_route = server["questions"]
    routes = [ROUTES[i % 3] for i in range(16)]  # the routes interleaved
    asked = [by_route[r][(i // 3) % len(by_route[r])] for i, r in enumerate(routes)]

    def ask(q):
        return client.chat.completions.create(model="gag-router", messages=[{"role": "user", "content": q}],
                                              max_tokens=8)

    with ThreadPoolExecutor(16) as ex:
        replies = list(ex.map(ask, asked))
    assert len(replies) == 16 and all(r.choices[0].message.content is not None for r in replies)
    sizes = [r.model_extra["batch_size"] for r in replies]
    assert max(sizes) > 1, sizes
    assert [r.model_extra["route"] for r in replies] == routes
    assert all(r.usage.completion_tokens <= 8 for r in replies)
    assert "batch of" in Path(server["log"]).read_text()


def test_bad_requests_get_4xx(client, server) -> None:
    import openai

    def refused(status, **kwargs):
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**kwargs)
        assert info.value.status_code == status, info.value
        return str(info.value)

    assert "non-empty list" in refused(400, model="gag-router", messages=[])
    assert "foo" in refused(400, model="gag-router", messages=[{"role": "user", "content": "hi"}],
                            extra_body={"foo": 1})
    long = "the " * 5000
    assert "context window" in refused(400, model="gag-router", messages=[{"role": "user", "content": long}])
    assert "does not exist" in refused(404, model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "empty" in refused(400, model="gag-router", messages=[{"role": "user", "content": ""}])
    # not JSON at all: a 4xx, not a 500
    status, body = _post_raw(f"{server['url']}/v1/chat/completions", b"{not json")
    assert 400 <= status < 500, (status, body)
    # the server is still fine afterwards
    resp = client.chat.completions.create(model="gag-router",
                                          messages=[{"role": "user", "content": server["questions"]["demo"][0]}])
    assert resp.model_extra["route"] == "demo"
