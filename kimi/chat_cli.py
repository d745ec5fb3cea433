"""`kimi chat`: an interactive terminal chat that streams, keeps the conversation, and shows reasoning dimmed.

Two back ends with one loop: `--url` talks to any OpenAI-compatible server (kimi serve, vLLM, Moonshot's API) over
HTTP with the standard library; `--model DIR` (or neither: the demo model) runs the engine in this process behind the
server's own chat path, so both back ends give the same replies. In a pipe (stdin not a terminal) every input line
is one user turn, replies go to stdout without colour or prompts, so `echo hi | kimi chat` works in scripts.
Commands at the prompt: /reset forgets the conversation, /exit (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

DIM, RESET = "\033[2m", "\033[0m"


def http_deltas(url: str, api_key: str | None, body: dict) -> Iterator[dict]:
    """POST a streaming chat request; yield each choice-0 delta (plus {"finish_reason"} / {"error"})."""
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        resp = urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = str(e)
        yield {"error": f"HTTP {e.code}: {message}"}
        return
    except urllib.error.URLError as e:
        yield {"error": f"cannot reach {url}: {e.reason}"}
        return
    with resp:
        for raw in resp:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                yield {"error": event["error"].get("message", str(event["error"]))}
            for choice in event.get("choices", []):
                if choice.get("index", 0) == 0:
                    yield choice.get("delta") or {}
                    if choice.get("finish_reason"):
                        yield {"finish_reason": choice["finish_reason"]}


class LocalChat:
    """The engine in this process, behind the server's own chat path (plan_chat -> engine -> ChoiceState), so a
    reply, its context-window check and its tool-call rules are exactly what `kimi serve` would send."""

    def __init__(self, model_dir: str, max_model_len: int | None):
        from kimi.engine.engine import LLMEngine
        from kimi.server.app import generation_defaults

        self.engine = LLMEngine(model_dir, max_model_len=max_model_len, max_num_seqs=4)
        self.defaults = generation_defaults(Path(model_dir))

    def deltas(self, body: dict) -> Iterator[dict]:
        from kimi.server.protocol import ChatCompletionRequest
        from kimi.server.serving_chat import ChoiceState, plan_chat

        try:  # guides None: the CLI never asks for a JSON or tool-call-constrained reply
            plan = plan_chat(ChatCompletionRequest.model_validate(body), self.engine.tokenizer,
                             self.engine.max_model_len, None, self.defaults)
        except ValueError as e:
            yield {"error": str(e)}
            return
        choice = ChoiceState(0, plan, self.engine.tokenizer)
        for out in self.engine.stream(plan.prompt_ids, plan.params[0]):
            yield from choice.update(out.outputs[0])[0]
        yield {"finish_reason": choice.finish_reason}

    def close(self):
        self.engine.shutdown()


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    src.add_argument("--model", default=None, help="model directory to run in this process (default: the demo model)")
    p.add_argument("--demo-dir", default="runs/demo", help="where the demo model is built when neither is given")
    p.add_argument("--served-model", default=None, help="model id to send with --url (default: the server's first)")
    p.add_argument("--api-key", default=None, help="bearer key for --url (default: $KIMI_API_KEY)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    p.add_argument("--no-thinking", action="store_true", help="ask for no reasoning (chat_template_kwargs)")
    p.add_argument("--max-model-len", type=int, default=4096, help="context window for --model")


def _first_model(url: str, api_key: str | None) -> str | None:
    req = urllib.request.Request(url.rstrip("/") + "/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["data"][0]["id"]
    except (urllib.error.URLError, ValueError, KeyError, IndexError):
        return None


def chat_main(args, stdin=None, stdout=None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    api_key = args.api_key or os.environ.get("KIMI_API_KEY")
    local = None
    if args.url is None:
        model_dir = args.model
        if model_dir is None:
            from kimi.demo import default_model_dir

            model_dir = str(default_model_dir(args.demo_dir))
        local = LocalChat(model_dir, args.max_model_len)
        stream = local.deltas
        model = None
    else:
        model = args.served_model or _first_model(args.url, api_key)

        def stream(body):
            return http_deltas(args.url, api_key, body)

    history = [{"role": "system", "content": args.system}] if args.system else []

    def write(text, dim=False):
        stdout.write(f"{DIM}{text}{RESET}" if dim and interactive else text)
        stdout.flush()

    try:
        while True:
            if interactive:
                try:
                    line = input("> ")
                except EOFError:
                    break
            else:
                line = stdin.readline()
                if not line:
                    break
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            body = {"model": model, "messages": history, "stream": True, "temperature": args.temperature,
                    "max_tokens": args.max_tokens, "chat_template_kwargs": {"thinking": not args.no_thinking}}
            reply = {"role": "assistant", "content": ""}
            calls, in_reasoning = {}, False
            for delta in stream(body):
                if "error" in delta:
                    write(f"[error] {delta['error']}\n")
                    history.pop()
                    break
                if delta.get("reasoning_content"):
                    in_reasoning = True
                    write(delta["reasoning_content"], dim=True)
                if delta.get("content"):
                    if in_reasoning:
                        write("\n")
                        in_reasoning = False
                    reply["content"] += delta["content"]
                    write(delta["content"])
                for tc in delta.get("tool_calls") or ():
                    c = calls.setdefault(tc["index"], {"id": tc.get("id"), "type": "function",
                                                       "function": {"name": tc["function"].get("name"),
                                                                    "arguments": ""}})
                    c["function"]["arguments"] += tc["function"].get("arguments") or ""
            else:
                for c in calls.values():
                    write(f"\n[tool call {c['id']}] {c['function']['name']}({c['function']['arguments']})", dim=True)
                if calls:
                    reply["tool_calls"] = list(calls.values())
                history.append(reply)
                write("\n")
    except KeyboardInterrupt:
        write("\n")
    finally:
        if local is not None:
            local.close()
