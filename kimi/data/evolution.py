"""Schema evolution: the same tool declared under varied names, parameter names and descriptions, so a model has
to read the declaration instead of memorising names (../shared/reference/synthetic.md §A5, the cheap analogue of
K2's evolved synthetic tools).

Each tool has versions: a name with its own parameter spellings (version i = NAMES[tool][i] with PARAMS[p][i]),
and description paraphrases drawn apart from the version. Training draws every version but the last; the `renamed`
evaluation split uses only the last ones (held out). Versions rather than independent per-parameter draws
(toolverse-1): a 2M-parameter model learned to pick tool names from the declaration but chose between parameter
spellings by prior (schema-valid < 50%), so a declared name now fixes its schema. A `Binding` maps what the model
sees back to the canonical tool, which is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from kimi.data.tools import TOOLS

NAMES = {
    "calculator": ("calculator", "calc", "compute", "evaluate_math"),
    "convert_units": ("convert_units", "unit_convert", "convert", "change_units"),
    "add_days": ("add_days", "date_add", "shift_date", "date_plus_days"),
    "days_between": ("days_between", "date_diff", "count_days", "day_span"),
    "day_of_week": ("day_of_week", "weekday", "get_weekday", "which_day"),
    "db_get": ("db_get", "get_record", "lookup", "fetch_row"),
    "db_find": ("db_find", "find_records", "search_db", "query_rows"),
    "db_set": ("db_set", "update_record", "set_field", "write_row"),
    "reverse_text": ("reverse_text", "reverse", "flip_text", "mirror_string"),
    "upper_text": ("upper_text", "uppercase", "to_upper", "shout_text"),
    "count_letter": ("count_letter", "letter_count", "count_char", "tally_letter"),
    "word_count": ("word_count", "count_words", "words_in", "tally_words"),
    "get_weather": ("get_weather", "weather", "forecast", "weather_lookup"),
}
PARAMS = {  # spelling i goes with NAMES[tool][i]: a tool version declares a whole schema (API versions do)
    "expression": ("expression", "expr", "math", "formula"), "value": ("value", "amount", "number", "quantity"),
    "from_unit": ("from_unit", "source_unit", "unit_from", "unit_in"),
    "to_unit": ("to_unit", "target_unit", "unit_to", "unit_out"), "date": ("date", "day", "when", "on_date"),
    "days": ("days", "n_days", "num_days", "offset"), "start": ("start", "from_date", "first", "begin"),
    "end": ("end", "to_date", "last", "finish"), "table": ("table", "collection", "source", "tbl"),
    "key": ("key", "id", "name", "record"), "field": ("field", "column", "prop", "attr"),
    "text": ("text", "input", "words", "string"), "letter": ("letter", "char", "target", "symbol"),
    "city": ("city", "place", "location", "town"),
}
DESCRIPTIONS = {
    "calculator": ("Evaluate an arithmetic expression", "Do exact arithmetic", "Compute a math expression",
                   "Arithmetic on integers"),
    "convert_units": ("Convert a value between units", "Unit conversion", "Change the unit of a quantity",
                      "Express a measure in another unit"),
    "add_days": ("Add days to a date", "Date plus a number of days", "Shift a date by days", "Move a date"),
    "days_between": ("Days between two dates", "Count days from start to end", "Date difference in days",
                     "Length of a date span"),
    "day_of_week": ("Weekday of a date", "Which day of the week a date is", "Get the weekday",
                    "Name the weekday"),
    "db_get": ("Read one record", "Get a row by key", "Look up a record", "Fetch one entry"),
    "db_find": ("Find keys where field equals value", "Search records by field", "Query rows by a field",
                "List matching keys"),
    "db_set": ("Set a field of a record", "Update one field", "Write a value to a record", "Change a record"),
    "reverse_text": ("Reverse a text", "Write text backwards", "Flip a string", "Mirror the characters"),
    "upper_text": ("Uppercase a text", "Convert text to capitals", "Make text upper case", "Capitalise all letters"),
    "count_letter": ("Count a letter in a text", "How often a letter occurs", "Tally one character",
                     "Occurrences of a letter"),
    "word_count": ("Count words in a text", "Number of words", "Word tally", "How many words a text has"),
    "get_weather": ("Weather for a city on a date", "Forecast lookup", "Get the weather", "Sky and temperature"),
}


@dataclass(frozen=True)
class Binding:
    """A declared tool: its shown name, canonical tool, and shown -> canonical parameter names."""
    name: str
    tool: str
    params: dict  # shown name -> canonical name

    def shown(self, canonical_param: str) -> str:
        return next(k for k, v in self.params.items() if v == canonical_param)


def _version(rng, tool: str, held_out: bool) -> int:
    n = len(NAMES[tool])
    return n - 1 if held_out else rng.randrange(n - 1)


def _untied(rng, canonical: str, held_out: bool) -> str:
    """toolverse-1's spelling: drawn for each parameter on its own from the first two (held out: the last)."""
    return PARAMS[canonical][-1] if held_out else rng.choice(PARAMS[canonical][:2])


def spelling_ok(tool: str, name: str, canonical: str, shown: str, held_out: bool, tied: bool = True) -> bool:
    """Whether `shown` is a valid spelling of parameter `canonical` in declared tool `name` (a variant of `tool`)."""
    if tied:
        return PARAMS[canonical][NAMES[tool].index(name)] == shown
    return shown == PARAMS[canonical][-1] if held_out else shown in PARAMS[canonical][:2]


def declare(tool: str, rng, held_out: bool = False, tied: bool = True) -> tuple[dict, Binding]:
    """One OpenAI tool declaration of canonical `tool` with drawn variants, and its binding. tied=False draws
    parameter spellings as toolverse-1 did (kept only so the built-in model's recipe can be replayed)."""
    version = _version(rng, tool, held_out)
    name = NAMES[tool][version]
    props, params = {}, {}
    for p in TOOLS[tool].params:
        shown = PARAMS[p.name][version] if tied else _untied(rng, p.name, held_out)
        params[shown] = p.name
        kind = p.type.split("|")
        prop = {"type": kind[0] if len(kind) == 1 else kind}
        if p.enum:
            prop["enum"] = list(p.enum)
        props[shown] = prop
    spec = {"type": "function", "function": {
        "name": name, "description": DESCRIPTIONS[tool][-1] if held_out else rng.choice(DESCRIPTIONS[tool][:-1]),
        "parameters": {"type": "object", "properties": props, "required": list(props)}}}
    return spec, Binding(name, tool, params)
