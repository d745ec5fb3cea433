"""Helpers for the server tests (no tests here): a live `kimi serve` on loopback, the demo model (random weights)
behind uvicorn in a thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn

from kimi.demo import ensure_demo_model
from kimi.engine.engine import LLMEngine
from kimi.server.app import ServerState, build_app


def demo_engine(tmp_dir, **kw) -> LLMEngine:
    model_dir = ensure_demo_model(tmp_dir / "demo")
    kw = {"max_num_seqs": 8, "max_model_len": 512, "cache_memory": 64 << 20, **kw}
    return LLMEngine(model_dir, dtype="float32", **kw)


@contextmanager
def live_server(engine, model_name="demo", max_body_bytes=1 << 20, cors_origins=None, **state_kw):
    """Yield (base_url, state) for a server on a free loopback port; shut it down afterwards."""
    state = ServerState(model_name, **state_kw)
    state.set_engine(engine)
    app = build_app(state, cors_origins, max_body_bytes)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(10)
