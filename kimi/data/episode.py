"""An episode: one conversation in OpenAI chat format (tools + messages) with its gold, and the builder that writes
it by really running the tools on the episode's world.

Gold per user turn (`Turn`): the calls that must be made (canonical tool + canonical arguments), whether any
call is expected at all, and the answer slots (strings the final answer must contain). The final database state
is the world's after the last turn. Tool-call ids are `functions.{shown name}:{idx}` with one counter for the
whole conversation (../shared/reference/k2.md §6.3); arguments and results are canonical compact JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kimi.data.evolution import Binding
from kimi.data.tools import dump, execute
from kimi.data.world import World


@dataclass
class Turn:
    user: str
    required: list = field(default_factory=list)  # [(canonical tool, canonical args JSON)]
    expects_call: bool = False
    slots: list = field(default_factory=list)
    answer: str = ""


@dataclass
class Episode:
    split: str
    index: int
    seed: int  # the world's seed
    big: bool  # world drawn from the unseen value ranges
    family: str
    intent: str
    tools: list  # OpenAI tool declarations, in the order shown
    bindings: dict  # shown tool name -> Binding
    version: str  # the generator version that drew it (data/synth.py VERSIONS)
    messages: list = field(default_factory=list)
    turns: list = field(default_factory=list)
    final_state: dict | None = None

    def world(self) -> World:
        return World(self.seed, self.big)

    def row(self) -> dict:
        """The chat-JSONL line (`kimi data prepare` reads messages + tools; meta is for people and the eval)."""
        return {"messages": self.messages, "tools": self.tools,
                "meta": {"split": self.split, "index": self.index, "family": self.family, "intent": self.intent}}


class Builder:
    """Writes an episode turn by turn; `call` executes the tools on the world as it goes."""

    def __init__(self, episode: Episode, world: World, rng, tool_names: bool):
        self.ep, self.world, self.rng = episode, world, rng
        self.by_tool = {b.tool: b for b in episode.bindings.values()}
        self.tool_names = tool_names  # tool results carry `name` (K2's header shows it) or not (OpenAI clients)
        self.counter = 0

    def system(self, text: str | None) -> None:
        if text:
            self.ep.messages.append({"role": "system", "content": text})

    def user(self, text: str) -> None:
        self.ep.messages.append({"role": "user", "content": text})
        self.ep.turns.append(Turn(text))

    def call(self, *calls, preface: str | None = None, required: bool = True) -> list[dict]:
        """One assistant turn with parallel calls [(canonical tool, canonical args)]; returns their results."""
        turn = self.ep.turns[-1]
        turn.expects_call = True
        tool_calls, results = [], []
        for tool, args in calls:
            b: Binding = self.by_tool[tool]
            shown = {b.shown(k): v for k, v in args.items()}
            call_id = f"functions.{b.name}:{self.counter}"
            self.counter += 1
            tool_calls.append({"id": call_id, "type": "function",
                               "function": {"name": b.name, "arguments": dump(shown)}})
            results.append((call_id, b.name, execute(self.world, tool, args)))
            if required:
                turn.required.append((tool, dump(args)))
        self.ep.messages.append({"role": "assistant", "content": preface, "tool_calls": tool_calls})
        for call_id, name, result in results:
            msg = {"role": "tool", "tool_call_id": call_id, "content": dump(result)}
            if self.tool_names:
                msg["name"] = name
            self.ep.messages.append(msg)
        return [r for _, _, r in results]

    def say(self, text: str, *slots) -> None:
        self.ep.messages.append({"role": "assistant", "content": text})
        turn = self.ep.turns[-1]
        turn.answer, turn.slots = text, [str(s) for s in slots]
