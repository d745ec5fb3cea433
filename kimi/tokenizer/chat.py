"""Kimi's chat format: messages (+ tools) -> prompt text, or (ids, loss_mask) for training.

The native renderer writes the K2 layout (../shared/reference/k2.md §6.3) and produces exactly the
string of the official K2-Thinking template (chat_templates/kimi-k2-thinking.jinja) rendered the way
transformers renders templates; `thinking=False` drops the `<think>` handling (K2-Instruct layout).
A model directory's own Jinja template, when the tokenizer carries one, is rendered instead (template.py).

Every path first validates the conversation (ValueError naming the message and the problem) and rewrites
tool-call ids that are not `functions.{name}:{idx}` with one conversation-wide counter, in the assistant
call and in its tool result alike (non-canonical ids in history make K2 emit malformed calls, §9.3).

Deliberate difference from the template: a `reasoning_content: null` renders as empty, where the Jinja
template would print the string "None".
"""

import json
import re
import secrets

from kimi.tokenizer.template import REASONING_KEYS, render_template

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."


class Special(str):
    """A piece of the prompt that is a control token (the rest is text, even if it looks like one)."""


IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_MIDDLE, IM_END = map(Special, [
    "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>"])
THINK, END_THINK = Special("<think>"), Special("</think>")
SECTION_BEGIN, SECTION_END = Special("<|tool_calls_section_begin|>"), Special("<|tool_calls_section_end|>")
CALL_BEGIN, ARG_BEGIN, CALL_END = map(Special, [
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"])
# user and assistant turns have their own markers; every other role (system, tool, tool_declare) is system.
_TURN_MARKER = {"user": IM_USER, "assistant": IM_ASSISTANT, "system": IM_SYSTEM, "tool": IM_SYSTEM}
_IMAGE = (Special("<|media_start|>"), "image", Special("<|media_content|>"), Special("<|media_pad|>"),
          Special("<|media_end|>"), "\n")
_SYSTEM_TURN = (IM_SYSTEM, "system", IM_MIDDLE, DEFAULT_SYSTEM, IM_END)
_GENERATION_PROMPT = (IM_ASSISTANT, "assistant", IM_MIDDLE)


def _is_image(part: dict) -> bool:
    return part.get("type") == "image" or "image" in part or "image_url" in part


def _reasoning(message: dict):
    for key in REASONING_KEYS:
        if message.get(key) is not None:
            return message[key]
    return None


def _where(i, role):
    return f"message {i} ({role})"


def _check_content(content, i, role):
    if content is None or type(content) is str:
        return
    if not isinstance(content, list):
        raise ValueError(f"{_where(i, role)}: content must be a string, a list of content parts or null, "
                         f"got {type(content).__name__}")
    for j, part in enumerate(content):
        if isinstance(part, dict) and (_is_image(part) or (part.get("type", "text") == "text"
                                                             and isinstance(part.get("text"), str))):
            continue
        raise ValueError(f"{_where(i, role)}: content[{j}] must be {{'type': 'text', 'text': str}} or an image "
                         f"part ({{'type': 'image_url', ...}}), got {str(part)[:80]}")


def _canonical_index(call_id, name):
    """`functions.{name}:{idx}` -> idx; anything else -> None."""
    prefix = f"functions.{name}:"
    if isinstance(call_id, str) and call_id.startswith(prefix):
        idx = call_id[len(prefix):]
        if idx.isascii() and idx.isdigit():
            return int(idx)
    return None


def _check_call(call, i, j):
    """Validate one assistant tool call; returns the function name."""
    fn = call.get("function") if isinstance(call, dict) else None
    where = f"message {i} (assistant) tool_calls[{j}]"
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}: expected {{'id': str, 'type': 'function', 'function': "
                         f"{{'name': str, 'arguments': JSON}}}}, got {str(call)[:80]}")
    name, args = fn["name"], fn.get("arguments")
    if type(args) is str:
        try:
            json.loads(args)
        except ValueError as e:
            raise ValueError(f"{where} ({name}): arguments are not valid JSON ({e}): {args[:80]!r}") from None
    elif args is None:
        raise ValueError(f"{where} ({name}): missing 'arguments'; expected a JSON string or object")
    else:
        try:
            json.dumps(args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} ({name}): arguments are not JSON-serialisable: {e}") from None
    call_id = call.get("id")
    if call_id is not None and type(call_id) is not str:
        raise ValueError(f"{where} ({name}): id must be a string, got {call_id!r}")
    return name


def prepare_messages(messages) -> list[dict]:
    """Validate a conversation and canonicalise tool-call ids; returns a new list (messages that change
    are copied; the caller's dicts are never modified).

    Ids already of the form `functions.{name}:{idx}` are kept, and the counter moves past their idx;
    any other id (`call_abc123`, a UUID, missing) becomes `functions.{name}:{counter}`. A tool result
    refers to the most recent earlier call with its `tool_call_id`.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out, id_map, counter = [], {}, 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in _TURN_MARKER:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        _check_content(message.get("content"), i, role)
        name = message.get("name")
        if name is not None and type(name) is not str:
            raise ValueError(f"{_where(i, role)}: name must be a string, got {name!r}")
        if role == "assistant":
            reasoning = _reasoning(message)
            if reasoning is not None and type(reasoning) is not str:
                raise ValueError(f"{_where(i, role)}: reasoning_content must be a string, "
                                 f"got {type(reasoning).__name__}")
            calls = message.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise ValueError(f"{_where(i, role)}: tool_calls must be a list, got {type(calls).__name__}")
                renamed = []
                for j, call in enumerate(calls):
                    name = _check_call(call, i, j)
                    old_id = call.get("id")
                    idx = _canonical_index(old_id, name)
                    if idx is None:
                        new_id, counter = f"functions.{name}:{counter}", counter + 1
                    else:
                        new_id, counter = old_id, max(counter, idx + 1)
                    if old_id is not None:
                        id_map[old_id] = new_id
                    renamed.append(call if new_id == old_id else {**call, "id": new_id})
                message = {**message, "tool_calls": renamed}
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if type(call_id) is not str or not call_id:
                raise ValueError(f"{_where(i, role)}: missing 'tool_call_id'; expected the id of an earlier "
                                 f"assistant tool call")
            new_id = id_map.get(call_id)
            if new_id is None:
                raise ValueError(f"{_where(i, role)}: tool_call_id {call_id!r} does not match any earlier "
                                 f"assistant tool call")
            if new_id != call_id:
                message = {**message, "tool_call_id": new_id}
        out.append(message)
    return out


def _check_tools(tools):
    if tools is None:
        return
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of OpenAI tool dicts "
                         "({'type': 'function', 'function': {'name', 'description', 'parameters'}})")


def _pieces(messages, tools, add_generation_prompt, thinking) -> list[str]:
    """The prompt as a list of strings in the official template's order; control tokens are `Special`."""
    out = []
    add, extend = out.append, out.extend

    def content(message):
        c = message.get("content")
        if type(c) is str:
            add(c)
        elif c is not None:
            for part in c:
                if _is_image(part):
                    extend(_IMAGE)
                else:
                    add(part["text"])

    if tools:
        extend((IM_SYSTEM, "tool_declare", IM_MIDDLE, json.dumps(tools, ensure_ascii=False), IM_END))
    if not messages or messages[0]["role"] != "system":
        extend(_SYSTEM_TURN)
    # K2-Thinking keeps reasoning only after the last assistant turn without tool calls (the agentic
    # loop in progress); earlier assistant turns get an empty <think></think>.
    last_final = -1
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant" and not messages[i].get("tool_calls"):
            last_final = i
            break
    for i, message in enumerate(messages):
        role = message["role"]
        extend((_TURN_MARKER[role], message.get("name") or role, IM_MIDDLE))
        if role == "assistant":
            if thinking:
                if i > last_final:
                    extend((THINK, _reasoning(message) or "", END_THINK))
                else:
                    extend((THINK, END_THINK))
            content(message)
            calls = message.get("tool_calls")
            if calls:
                add(SECTION_BEGIN)
                for call in calls:
                    args = call["function"]["arguments"]
                    if type(args) is not str:
                        args = json.dumps(args, ensure_ascii=False)
                    extend((CALL_BEGIN, call["id"], ARG_BEGIN, args, CALL_END))
                add(SECTION_END)
        elif role == "tool":
            add(f"## Return of {message['tool_call_id']}\n")
            content(message)
        else:
            content(message)
        add(IM_END)
    if add_generation_prompt:
        extend(_GENERATION_PROMPT)
    return out


def render(messages, tools=None, add_generation_prompt=True, thinking=True, template=None) -> str:
    """Messages (+ OpenAI tools) -> prompt text. `template`: Jinja source to use instead of the native
    K2 layout (e.g. `tokenizer.chat_template`)."""
    _check_tools(tools)
    messages = prepare_messages(messages)
    if template is not None:
        return render_template(template, messages, tools, add_generation_prompt, thinking=thinking)
    return "".join(_pieces(messages, tools, add_generation_prompt, thinking))


def assistant_mask(ids, tokenizer) -> list[int]:
    """1 on what the assistant writes: everything after `<|im_assistant|>NAME<|im_middle|>` up to and
    including its `<|im_end|>` (reasoning, content, tool-call section); 0 elsewhere."""
    st = tokenizer.special_tokens
    start, middle, end = st.get("<|im_assistant|>"), st.get("<|im_middle|>"), st.get("<|im_end|>")
    mask, state = [], 0  # 0 outside, 1 in an assistant header, 2 in an assistant body
    for t in ids:
        if state == 2:
            mask.append(1)
            if t == end:
                state = 0
            continue
        mask.append(0)
        if t == start:
            state = 1
        elif t == middle and state == 1:
            state = 2
        elif tokenizer.is_special(t):
            state = 0
    return mask


def _encode_pieces(pieces, tokenizer) -> list[int]:
    """Template text and user text are encoded as plain text (a literal `<|im_end|>` in a message stays
    text); only `Special` pieces become control ids. Text between two specials is encoded in one go,
    exactly as encoding the whole prompt with specials allowed would."""
    ids, text = [], []
    specials = tokenizer.special_tokens
    for piece in pieces:
        token_id = specials.get(piece) if type(piece) is Special else None
        if token_id is None:
            text.append(piece)
            continue
        if text:
            ids += tokenizer.encode("".join(text))
            text = []
        ids.append(token_id)
    if text:
        ids += tokenizer.encode("".join(text))
    return ids


def _protect(obj, pattern, originals, tag):
    """Replace special-token names inside user strings (values and keys, e.g. argument names) by
    placeholders `{tag}{k}\\ue001`."""
    if isinstance(obj, str):
        def hide(m):
            originals.append(m.group())
            return f"{tag}{len(originals) - 1}\ue001"
        return pattern.sub(hide, obj)
    if isinstance(obj, dict):
        return {_protect(k, pattern, originals, tag): _protect(v, pattern, originals, tag) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_protect(v, pattern, originals, tag) for v in obj]
    return obj


def _encode_template(messages, tools, add_generation_prompt, thinking, tokenizer) -> list[int]:
    """Render the tokenizer's Jinja template to ids without letting user text become control tokens:
    special names in user strings are swapped for placeholders, the rendered prompt is split at the
    template's own specials, and the placeholders are put back inside the plain-text segments."""
    pattern = tokenizer.special_regex
    originals = []
    tag = "\ue000" + secrets.token_hex(8) + ":"
    while tag in json.dumps([messages, tools], ensure_ascii=False, default=str):
        tag = "\ue000" + secrets.token_hex(8) + ":"
    messages = _protect(messages, pattern, originals, tag)
    tools = _protect(tools, pattern, originals, tag)
    prompt = render_template(tokenizer.chat_template, messages, tools, add_generation_prompt, thinking=thinking)
    if not originals:
        return tokenizer.encode(prompt, allow_special=True)
    restore = re.compile(re.escape(tag) + r"(\d+)\ue001")
    ids, pos = [], 0
    for m in pattern.finditer(prompt):
        ids += tokenizer.encode(restore.sub(lambda r: originals[int(r.group(1))], prompt[pos:m.start()]))
        ids.append(tokenizer.special_tokens[m.group()])
        pos = m.end()
    ids += tokenizer.encode(restore.sub(lambda r: originals[int(r.group(1))], prompt[pos:]))
    return ids


def render_ids(messages, tokenizer, tools=None, add_generation_prompt=False, thinking=True,
               use_template=True, allow_special_in_text=False) -> tuple[list[int], list[int]]:
    """Messages -> (ids, loss_mask) for training or serving. Uses the tokenizer's own chat template when
    it has one and `use_template`, else the native K2 layout. Special-token names inside message text
    stay text unless `allow_special_in_text` (then the rendered prompt is encoded with every special
    name as a control token, as Kimi's own tokenizer does by default)."""
    _check_tools(tools)
    messages = prepare_messages(messages)
    if use_template and tokenizer.chat_template is not None:
        if allow_special_in_text:
            prompt = render_template(tokenizer.chat_template, messages, tools, add_generation_prompt,
                                     thinking=thinking)
            ids = tokenizer.encode(prompt, allow_special=True)
        else:
            ids = _encode_template(messages, tools, add_generation_prompt, thinking, tokenizer)
    else:
        pieces = _pieces(messages, tools, add_generation_prompt, thinking)
        if allow_special_in_text:
            ids = tokenizer.encode("".join(pieces), allow_special=True)
        else:
            ids = _encode_pieces(pieces, tokenizer)
    return ids, assistant_mask(ids, tokenizer)
