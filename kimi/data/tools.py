"""The toolverse tools: pure, deterministic Python functions over one episode's world, with their canonical
JSON-Schema parameters (../shared/reference/synthetic.md §A5).

Every tool takes the world and its canonical keyword arguments and returns a small dict that is serialised as
compact canonical JSON (`dump`). Bad arguments are not exceptions: they are the tool's own error results
(`{"error": ...}`), exactly what a model sees when it calls a tool wrongly. Names and parameter names here are
canonical; the names a model sees come from schema evolution (evolution.py).
"""

from __future__ import annotations

import ast
import datetime as dt
import json
from dataclasses import dataclass
from fractions import Fraction

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# unit -> (dimension, size in the dimension's base unit), exact rationals
UNITS = {"mm": ("length", Fraction(1, 1000)), "cm": ("length", Fraction(1, 100)), "m": ("length", Fraction(1)),
         "km": ("length", Fraction(1000)), "g": ("mass", Fraction(1, 1000)), "kg": ("mass", Fraction(1)),
         "s": ("time", Fraction(1)), "min": ("time", Fraction(60)), "h": ("time", Fraction(3600))}
TABLES = {"items": ("price", "stock", "color"), "people": ("age", "city")}
INT_FIELDS = ("price", "stock", "age")
MAX_OPS = 3


def dump(obj) -> str:
    """Canonical compact JSON: the one serialisation of tool arguments and results."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def number(x: Fraction):
    """An exact rational as JSON: an int when whole, else rounded to 2 decimals."""
    if x.denominator == 1:
        return int(x)
    return round(float(x), 2)


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # JSON-Schema type: string | integer | number
    enum: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Tool:
    name: str
    params: tuple[Param, ...]
    fn: object  # (world, **canonical args) -> dict


def _expression(node, ops: list) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_expression(node.operand, ops)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        ops.append(node.op)
        a, b = _expression(node.left, ops), _expression(node.right, ops)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise ZeroDivisionError
        return a / b
    raise SyntaxError


def calculator(world, expression):
    """Integers, + - * / and parentheses, at most MAX_OPS operators; parsed by `ast`, never evaluated."""
    try:
        ops = []
        value = _expression(ast.parse(expression, mode="eval").body, ops)
        if len(ops) > MAX_OPS:
            return {"error": "too many operations"}
    except ZeroDivisionError:
        return {"error": "division by zero"}
    except (SyntaxError, ValueError, RecursionError):
        return {"error": "invalid expression"}
    return {"result": number(value)}


def convert_units(world, value, from_unit, to_unit):
    a, b = UNITS.get(from_unit), UNITS.get(to_unit)
    if a is None or b is None:
        return {"error": "unknown unit"}
    if a[0] != b[0]:
        return {"error": "incompatible units"}
    return {"value": number(Fraction(value) * a[1] / b[1]), "unit": to_unit}


def parse_date(text):
    try:
        return dt.date.fromisoformat(text) if len(text) == 10 else None
    except ValueError:
        return None


def add_days(world, date, days):
    d = parse_date(date)
    if d is None:
        return {"error": "invalid date"}
    return {"date": (d + dt.timedelta(days=days)).isoformat()}


def days_between(world, start, end):
    a, b = parse_date(start), parse_date(end)
    if a is None or b is None:
        return {"error": "invalid date"}
    return {"days": (b - a).days}


def day_of_week(world, date):
    d = parse_date(date)
    if d is None:
        return {"error": "invalid date"}
    return {"weekday": WEEKDAYS[d.weekday()]}


def _near(key, keys):
    """The one key that differs from `key` only in case or by one edit, if any."""
    low = key.lower()
    for k in keys:
        if k.lower() == low:
            return k
    for k in keys:
        if len(k) == len(key) and sum(x != y for x, y in zip(k, key)) == 1:
            return k
        if abs(len(k) - len(key)) == 1:
            short, long_ = sorted((k, key), key=len)
            if any(long_[:i] + long_[i + 1:] == short for i in range(len(long_))):
                return k
    return None


def _missing(world, table, key):
    hint = _near(key, world.tables[table])
    return {"error": "not_found", "did_you_mean": hint} if hint else {"error": "not_found"}


def db_get(world, table, key):
    rows = world.tables[table]
    if key not in rows:
        return _missing(world, table, key)
    return {"key": key, **rows[key]}


def db_find(world, table, field, value):
    if field not in TABLES[table]:
        return {"error": "unknown field"}
    keys = sorted(k for k, row in world.tables[table].items() if row[field] == value)
    return {"keys": keys[:5]}


def db_set(world, table, key, field, value):
    rows = world.tables[table]
    if key not in rows:
        return _missing(world, table, key)
    if field not in TABLES[table]:
        return {"error": "unknown field"}
    if (field in INT_FIELDS) != (type(value) is int):
        return {"error": "wrong value type"}
    rows[key][field] = value
    return {"ok": True}


def reverse_text(world, text):
    return {"result": text[::-1]}


def upper_text(world, text):
    return {"result": text.upper()}


def count_letter(world, text, letter):
    if len(letter) != 1:
        return {"error": "letter must be one character"}
    return {"count": text.lower().count(letter.lower())}


def word_count(world, text):
    return {"count": len(text.split())}


def get_weather(world, city, date):
    if parse_date(date) is None:
        return {"error": "invalid date"}
    if city not in world.cities:
        return {"error": "unknown city"}
    return world.weather(city, date)


_S, _I, _N = "string", "integer", "number"
_TABLE = Param("table", _S, tuple(TABLES))
_FIELDS = tuple(f for fields in TABLES.values() for f in fields)
_UNIT = tuple(UNITS)
TOOLS = {t.name: t for t in (
    Tool("calculator", (Param("expression", _S),), calculator),
    Tool("convert_units", (Param("value", _N), Param("from_unit", _S, _UNIT), Param("to_unit", _S, _UNIT)),
         convert_units),
    Tool("add_days", (Param("date", _S), Param("days", _I)), add_days),
    Tool("days_between", (Param("start", _S), Param("end", _S)), days_between),
    Tool("day_of_week", (Param("date", _S),), day_of_week),
    Tool("db_get", (_TABLE, Param("key", _S)), db_get),
    Tool("db_find", (_TABLE, Param("field", _S, _FIELDS), Param("value", _S)), db_find),
    Tool("db_set", (_TABLE, Param("key", _S), Param("field", _S, _FIELDS), Param("value", _S + "|" + _I)), db_set),
    Tool("reverse_text", (Param("text", _S),), reverse_text),
    Tool("upper_text", (Param("text", _S),), upper_text),
    Tool("count_letter", (Param("text", _S), Param("letter", _S)), count_letter),
    Tool("word_count", (Param("text", _S),), word_count),
    Tool("get_weather", (Param("city", _S), Param("date", _S)), get_weather),
)}


def execute(world, tool: str, args: dict) -> dict:
    """Run canonical `tool` with canonical `args` (already schema-checked) on `world` (which it may change)."""
    return TOOLS[tool].fn(world, **args)
