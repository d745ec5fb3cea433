"""The OpenAI-compatible HTTP server behind `kimi serve` (app.py) and its parts: wire models (protocol.py), the
async bridge to the engine (async_engine.py), chat and completions handlers, structured output (structured.py),
Prometheus metrics (metrics.py) and the chat page (static/index.html)."""
