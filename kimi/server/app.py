"""`kimi serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over one LLMEngine.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (503 while the model loads),
GET /metrics (Prometheus), POST /tokenize, POST /detokenize, GET / (the chat page, static/index.html), and the
OpenAPI schema at /openapi.json. Wire formats are in protocol.py, the chat logic in serving_chat.py, and the
reference for the API surface is ../shared/reference/serving.md §2.

Errors always have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for anything wrong with the
request, 401 without the API key, 404 for an unknown model or route, 413 for a body over --max-body-bytes, 503
while loading or when the bounded queue is full; 500 is left for real server faults. A streaming client that goes
away aborts its request in the engine at once (its blocks and state slot are freed at the next step).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimi.server import protocol as P
from kimi.server.async_engine import AsyncEngine, Overloaded
from kimi.server.metrics import Metrics
from kimi.server.serving_chat import ChoiceState, plan_chat, usage
from kimi.server.serving_completion import completion_full, completion_stream, plan_completion
from kimi.server.stream import SSE_DONE, chat_logprobs, error_body, log_request, sse, wait_all
from kimi.server.structured import GuideFactory

log = logging.getLogger("kimi.server")
STATIC = Path(__file__).parent / "static"
_ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 413, 503)}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class ServerState:
    """What the routes share. `engine` is None until the model has loaded (health answers 503 until then)."""

    def __init__(self, model_name: str, api_key: str | None = None, max_waiting: int = 256,
                 defaults: dict | None = None):
        self.model_name = model_name
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.defaults = defaults or {}
        self.engine: AsyncEngine | None = None
        self.guides: GuideFactory | None = None
        self.metrics = Metrics()
        self.load_error: str | None = None
        self.created = int(time.time())

    def set_engine(self, engine) -> None:
        if engine.tokenizer is None:
            raise ValueError("kimi serve needs a model directory with a tokenizer (tiktoken.model)")
        self.guides = GuideFactory(engine.tokenizer, engine.config.vocab_size)
        self.engine = AsyncEngine(engine, self.max_waiting)

    def ready(self) -> AsyncEngine:
        if self.engine is None:
            raise APIError(503, self.load_error or "the model is still loading; retry when GET /health answers 200")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model")


class _BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes (by Content-Length or as it streams in)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = error_response(413, f"request body exceeds {self.limit} bytes")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body exceeds {self.limit} bytes")
            return message

        try:
            await self.app(scope, limited, send)
        except APIError as e:
            await error_response(e.status, e.message)(scope, receive, send)


class _Auth:
    """ASGI middleware: with an API key set, 401 for any request but /health and / (the chat page: static, no secrets,
    and a browser cannot send a bearer header when it navigates; the page sends the key on its API calls) without
    'Authorization: Bearer <key>' (constant-time comparison). Plain ASGI rather than @app.middleware("http"), which
    would pipe every streamed chunk through an extra task and memory stream."""

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        key = self.state.api_key
        if scope["type"] == "http" and key and scope["path"] not in ("/health", "/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                response = error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')}{more}", where


def build_app(state: ServerState, cors_origins: list[str] | None = None, max_body_bytes: int = 8 << 20) -> FastAPI:
    app = FastAPI(title="kimi", version="0.1.0", description="OpenAI-compatible API for Kimi models")
    app.state.kimi = state

    app.add_middleware(_Auth, state=state)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ValueError)
    async def _bad(request, exc: ValueError):
        return error_response(400, str(exc))

    @app.exception_handler(Overloaded)
    async def _busy(request, exc: Overloaded):
        return error_response(503, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _fault(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}")

    @app.get("/health", response_model=P.Health, responses={503: {"model": P.ErrorResponse}})
    async def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/v1/models", response_model=P.ModelList, responses=_ERRORS)
    async def models():
        eng = state.engine
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "kimi", "max_model_len": eng.max_model_len if eng else None}]}

    @app.get("/metrics", response_class=PlainTextResponse, responses=_ERRORS)
    async def metrics():
        eng = state.engine
        return PlainTextResponse(state.metrics.render(eng.stats() if eng else None),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=_ERRORS)
    async def tokenize(req: P.TokenizeRequest):
        eng = state.ready()
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of 'prompt' (text) or 'messages' (a conversation)")
        if req.prompt is not None:
            ids = eng.tokenizer.encode(req.prompt, allow_special=True)
        else:
            from kimi.tokenizer.chat import render_ids

            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            ids, _ = render_ids(messages, eng.tokenizer, add_generation_prompt=req.add_generation_prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": eng.max_model_len}

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=_ERRORS)
    async def detokenize(req: P.DetokenizeRequest):
        eng = state.ready()
        state.check_model(req.model)
        return {"prompt": eng.tokenizer.decode(req.tokens)}

    @app.post("/v1/chat/completions", response_model=P.ChatCompletion, responses={
        **_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "a chat.completion, or with "
                         "stream: true a text/event-stream of chat.completion.chunk events"}})
    async def chat(req: P.ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        eng = state.ready()
        state.check_model(req.model)
        plan = plan_chat(req, eng.tokenizer, eng.max_model_len, state.guides, state.defaults)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        sub = eng.submit(plan.prompt_ids, plan.params, rid)
        name = req.model or state.model_name
        if req.stream:
            return StreamingResponse(_chat_stream(state, plan, sub, rid, name, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await _chat_full(state, plan, sub, rid, name, t0, request))

    @app.post("/v1/completions", response_model=P.Completion, responses={
        **_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "a text_completion, or with "
                         "stream: true a text/event-stream of text_completion chunks"}})
    async def completions(req: P.CompletionRequest, request: Request):
        t0 = time.perf_counter()
        eng = state.ready()
        state.check_model(req.model)
        plan = plan_completion(req, eng.tokenizer, eng.max_model_len, state.defaults)
        rid = f"cmpl-{uuid.uuid4().hex}"
        sub = eng.submit(plan.prompt_ids, [plan.params], rid)
        name = req.model or state.model_name
        if req.stream:
            return StreamingResponse(completion_stream(state, plan, sub, rid, name, t0),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await completion_full(state, plan, sub, rid, name, t0, request))

    return app


async def _chat_full(state, plan, sub, rid, model, t0, request) -> dict:
    tok = state.engine.tokenizer
    choices = [ChoiceState(i, plan, tok) for i in range(plan.n)]
    info = {"cached": 0, "ttft": None}

    def on_update(offset, out):
        if offset == 0:
            info["cached"] = out.num_cached_tokens
        for o in out.outputs:
            if o.token_ids and info["ttft"] is None:
                info["ttft"] = time.perf_counter() - t0
            choices[offset + o.index].update(o)

    await wait_all(sub, request, on_update)
    n_out = sum(c.num_tokens for c in choices)
    state.metrics.invalid_tool_calls += sum(len(c.invalid) for c in choices)
    finish = ",".join(sorted({c.finish_reason or "abort" for c in choices}))
    log_request(state, "chat", rid, len(plan.prompt_ids), n_out, info["cached"], info["ttft"],
                time.perf_counter() - t0, finish)
    out_choices = []
    for c in choices:
        choice = {"index": c.index, "message": c.message(), "logprobs": None, "finish_reason": c.finish_reason}
        if plan.logprobs:
            choice["logprobs"] = {"content": chat_logprobs(tok, c.logprobs)}
        out_choices.append(choice)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": out_choices, "usage": usage(len(plan.prompt_ids), n_out, info["cached"])}


def _chunk(rid, created, model, index, delta, finish=None, logprobs=None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


async def _chat_stream(state, plan, sub, rid, model, t0):
    tok = state.engine.tokenizer
    created = int(time.time())
    choices = [ChoiceState(i, plan, tok) for i in range(plan.n)]
    cached, ttft, last, gaps = 0, None, None, []
    try:
        for i in range(plan.n):
            yield sse(_chunk(rid, created, model, i, {"role": "assistant", "content": ""}))
        async for offset, out in sub:
            if offset == 0:
                cached = out.num_cached_tokens
            for o in out.outputs:
                c = choices[offset + o.index]
                if len(o.token_ids) == c.seen and (o.finish_reason is None or c.finish_reason is not None):
                    continue
                if o.token_ids and len(o.token_ids) > c.seen:
                    t = time.perf_counter()
                    if ttft is None:
                        ttft = t - t0
                    elif last is not None:
                        gaps.append(t - last)
                    last = t
                deltas, lps = c.update(o)
                lp = {"content": lps} if plan.logprobs else None
                finish = c.finish_reason if o.finish_reason is not None else None
                if not deltas and (lp or finish):
                    deltas = [{}]
                for j, d in enumerate(deltas):
                    end = j == len(deltas) - 1
                    yield sse(_chunk(rid, created, model, c.index, d, finish if end else None,
                                     lp if j == 0 else None))
        if plan.include_usage:
            n_out = sum(c.num_tokens for c in choices)
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage(len(plan.prompt_ids), n_out, cached)})
        yield SSE_DONE
    except asyncio.CancelledError:
        raise
    except Exception as e:  # after the 200 header an error can only travel as an event
        log.exception("stream %s failed", rid)
        yield sse(error_body(500, f"internal server error: {type(e).__name__}"))
        yield SSE_DONE
    finally:
        sub.abort()
        state.metrics.token_gaps(gaps)
        state.metrics.invalid_tool_calls += sum(len(c.invalid) for c in choices)
        finish = ",".join(sorted({c.finish_reason or "abort" for c in choices}))
        log_request(state, "chat", rid, len(plan.prompt_ids), sum(c.num_tokens for c in choices), cached, ttft,
                    time.perf_counter() - t0, finish)


def generation_defaults(model_dir: Path) -> dict:
    """Sampling defaults from the model's generation_config.json (temperature, top_p, top_k), as vLLM does."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except ValueError:
        return {}
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in cfg}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: build or reuse the tiny demo model)")
    p.add_argument("--demo-dir", default="runs/demo", help="where the demo model is built when --model is absent")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health and / "
                        "(default: $KIMI_API_KEY; unset = no auth)")
    p.add_argument("--cors-origins", nargs="*", default=None, help="origins allowed by CORS (default: CORS off)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="sequences that may wait beyond --max-num-seqs before requests get 503")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body accepted (413 beyond)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences the engine computes at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step; it bounds the prefill a step carries beside the decodes, so smaller "
                        "keeps inter-token latency steadier under load and delays first tokens (default: 256 on "
                        "CPU, where a step's cost grows with its tokens, 2048 on GPU; see bench/serve.py)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the engine on CPU (default: torch's, one per core; on a busy "
                        "small machine leave a core to the HTTP side)")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--cache-memory", type=float, default=None, help="GiB for the paged latent cache")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 where the device computes it natively, else float32)")
    p.add_argument("--quantized", default="keep", choices=["keep", "dequantize"],
                   help="FP8 / INT4 checkpoints: keep the weights quantised (less memory) or dequantise at load")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if present)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"], help="server log level")


def load_engine(args):
    import torch

    from kimi.engine.engine import LLMEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = args.max_num_batched_tokens or (256 if str(device).startswith("cpu") else 2048)
    return LLMEngine(args.model, dtype=args.dtype, device=device, quantized=args.quantized,
                     max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget, max_model_len=args.max_model_len,
                     cache_memory=int(args.cache_memory * (1 << 30)) if args.cache_memory else None,
                     enable_prefix_caching=not args.no_prefix_caching)


def serve_main(args) -> None:
    """Start the server at once (health 503) and load the model in a background thread (health 200 when done)."""
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(args.log_level.upper())
    if args.model is None:
        from kimi.demo import default_model_dir

        args.model = str(default_model_dir(args.demo_dir))
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {args.model}: expected a model directory with config.json")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: expected a positive number of threads")
        import torch

        torch.set_num_threads(args.threads)
    state = ServerState(args.served_model_name or model_dir.resolve().name,
                        api_key=args.api_key or os.environ.get("KIMI_API_KEY") or None, max_waiting=args.max_waiting,
                        defaults=generation_defaults(model_dir))
    app = build_app(state, args.cors_origins, args.max_body_bytes)

    def load():
        try:
            state.set_engine(load_engine(args))
            model = state.engine.engine.model
            log.info("model %s ready (max_model_len %d, %s on %s)", state.model_name, state.engine.max_model_len,
                     str(model.dtype).removeprefix("torch."), model.device)
        except Exception as e:
            state.load_error = f"the model failed to load: {e}"
            log.exception("loading %s failed", args.model)

    threading.Thread(target=load, name="kimi-load", daemon=True).start()
    log.info("kimi serve on http://%s:%d (model %s)", args.host, args.port, state.model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    if state.engine is not None:
        state.engine.shutdown()
