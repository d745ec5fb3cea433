"""Task families (../shared/reference/synthetic.md §A5): what the user asks and what a correct assistant does,
written through the Builder so every result is the real tool's.

  no_call      answer directly: greetings, thanks, facts stated in the conversation (no tool section)
  single       one call, arguments copied or normalised from the user ("three kilometres" -> 3, "km")
  parallel     2-3 independent calls in one section, then a combined answer
  chain        call 2 uses call 1's result (DB -> calculator, date -> weekday, person -> weather)
  follow_up    a later user turn refers to an earlier result ("And in Lima?"); ids keep counting
  error        a tool error: retry with the `did_you_mean` hint, or report the failure honestly
  clarify      an under-specified request: ask, the user answers, then call

An "ask" is one single-call question: (intent, tools needed, build) where build(world, rng, big) returns the user
text, the canonical call, and a function from the result to the answer text and its slots.
"""

from __future__ import annotations

import datetime as dt
import string

from kimi.data import user as U
from kimi.data.tools import UNITS
from kimi.data.world import COLORS, WORDS


def _date(rng, big: bool) -> str:
    lo, hi = (dt.date(2031, 1, 1), dt.date(2040, 12, 31)) if big else (dt.date(2000, 1, 1), dt.date(2030, 12, 31))
    return (lo + dt.timedelta(days=rng.randrange((hi - lo).days))).isoformat()


def _int(rng, big: bool, lo=1, hi=50) -> int:
    return rng.randint(100, 999) if big else rng.randint(lo, hi)


def _expression(rng, big: bool, div: bool = True) -> str:
    """1-2 operators over integers; at most one division, first, so results stay short."""
    parts = [str(_int(rng, big))]
    for _ in range(rng.randint(1, 2)):
        parts += [rng.choice("+-*+-*/" if div and len(parts) == 1 else "+-*"), str(_int(rng, big))]
    return " ".join(parts)


def _text(rng) -> str:
    return " ".join(rng.sample(WORDS, rng.randint(1, 4)))


def _result(r: dict):
    return next(iter(r.values()))


# ---- single-call asks: build(world, rng, big) -> (user text, (tool, args), answer(result) -> (text, *slots))
def ask_calc(w, rng, big, div=True):
    e = _expression(rng, big, div)
    return U.ask(rng, U.ASK, "calc", e=e), ("calculator", {"expression": e}), \
        lambda r: (f"{e} = {r['result']}.", r["result"])


def ask_convert(w, rng, big, dim=None):
    dim = dim or rng.choice(("length", "mass", "time"))
    frm, to = rng.sample([u for u, (d, _) in UNITS.items() if d == dim], 2)
    v = _int(rng, big, 1, 20)
    text = U.ask(rng, U.ASK, "convert", v=U.say_number(rng, v), frm=U.say_unit(rng, frm), to=U.say_unit(rng, to))
    return text, ("convert_units", {"value": v, "from_unit": frm, "to_unit": to}), \
        lambda r: (f"{v} {frm} is {r['value']} {r['unit']}.", r["value"])


def ask_add_days(w, rng, big):
    d, n = _date(rng, big), _int(rng, big, 1, 400)
    return U.ask(rng, U.ASK, "add_days", d=d, n=U.say_number(rng, n)), ("add_days", {"date": d, "days": n}), \
        lambda r: (f"{n} days after {d} is {r['date']}.", r["date"])


def ask_days_between(w, rng, big):
    a, b = sorted((_date(rng, big), _date(rng, big)))
    return U.ask(rng, U.ASK, "days_between", a=a, b=b), ("days_between", {"start": a, "end": b}), \
        lambda r: (f"There are {r['days']} days from {a} to {b}.", r["days"])


def ask_weekday(w, rng, big):
    d = _date(rng, big)
    return U.ask(rng, U.ASK, "weekday", d=d), ("day_of_week", {"date": d}), \
        lambda r: (f"{d} is a {r['weekday']}.", r["weekday"])


def ask_item(w, rng, big, key=None, field=None):
    k = key or rng.choice(sorted(w.tables["items"]))
    field = field or rng.choice(("price", "stock", "color"))
    return U.ask(rng, U.ASK, f"item_{field}", k=k), ("db_get", {"table": "items", "key": k}), \
        lambda r: (f"The {field} of item {k} is {r[field]}.", r[field])


def ask_person(w, rng, big, name=None, field=None):
    p = name or rng.choice(sorted(w.tables["people"]))
    field = field or rng.choice(("age", "city"))
    answer = (lambda r: (f"{p} is {r['age']} years old.", r["age"])) if field == "age" else \
        (lambda r: (f"{p} lives in {r['city']}.", r["city"]))
    return U.ask(rng, U.ASK, f"person_{field}", p=p), ("db_get", {"table": "people", "key": p}), answer


def ask_find(w, rng, big):
    if rng.random() < 0.5:
        c = rng.choice(COLORS)
        text, args = U.ask(rng, U.ASK, "find_color", c=c), {"table": "items", "field": "color", "value": c}
        what = f"{c} items"
    else:
        c = rng.choice(w.cities)
        text, args = U.ask(rng, U.ASK, "find_city", city=c), {"table": "people", "field": "city", "value": c}
        what = f"people in {c}"

    def answer(r):
        if not r["keys"]:
            return f"There are no {what}.", "no"
        return f"The {what}: {', '.join(r['keys'])}.", *r["keys"]
    return text, ("db_find", args), answer


def ask_set(w, rng, big, clarify=False):
    kind = rng.choice(("price", "stock", "city"))
    if kind == "city":
        p = rng.choice(sorted(w.tables["people"]))
        city = rng.choice([c for c in w.cities if c != w.tables["people"][p]["city"]])
        return U.ask(rng, U.ASK, "set_city", p=p, city=city), \
            ("db_set", {"table": "people", "key": p, "field": "city", "value": city}), \
            lambda r: (f"Done: {p} now lives in {city}.", city)
    k = rng.choice(sorted(w.tables["items"]))
    v = _int(rng, big, 1, 99)
    return U.ask(rng, U.ASK, f"set_{kind}", k=k, v=v), \
        ("db_set", {"table": "items", "key": k, "field": kind, "value": v}), \
        lambda r: (f"Done: the {kind} of item {k} is now {v}.", v)


def ask_text(w, rng, big):
    kind, t = rng.choice(("reverse", "upper", "count_letter", "word_count")), _text(rng)
    if kind == "count_letter":
        letter = rng.choice(t.replace(" ", "") if rng.random() < 0.8 else string.ascii_lowercase)
        return U.ask(rng, U.ASK, kind, t=t, l=letter), ("count_letter", {"text": t, "letter": letter}), \
            lambda r: (f"The letter '{letter}' appears {r['count']} times in '{t}'.", r["count"])
    if kind == "word_count":
        return U.ask(rng, U.ASK, kind, t=t), ("word_count", {"text": t}), \
            lambda r: (f"'{t}' has {r['count']} words.", r["count"])
    tool = "reverse_text" if kind == "reverse" else "upper_text"
    return U.ask(rng, U.ASK, kind, t=t), (tool, {"text": t}), lambda r: (f"Result: {r['result']}", r["result"])


def ask_weather(w, rng, big, city=None, d=None):
    city, d = city or rng.choice(w.cities), d or _date(rng, big)
    return U.ask(rng, U.ASK, "weather", city=city, d=d), ("get_weather", {"city": city, "date": d}), \
        lambda r: (f"In {city} on {d}: {r['temp_c']} C and {r['sky']}.", r["temp_c"], r["sky"])


# (name, canonical tools it needs, build, allowed in a parallel turn)
ASKS = (
    ("calc", ("calculator",), ask_calc, True), ("convert", ("convert_units",), ask_convert, True),
    ("add_days", ("add_days",), ask_add_days, True), ("days_between", ("days_between",), ask_days_between, True),
    ("weekday", ("day_of_week",), ask_weekday, True), ("item", ("db_get",), ask_item, True),
    ("person", ("db_get",), ask_person, True), ("find", ("db_find",), ask_find, True),
    ("set", ("db_set",), ask_set, False), ("text", ("reverse_text", "upper_text", "count_letter", "word_count"),
                                          ask_text, True),
    ("weather", ("get_weather",), ask_weather, True),
)


def _preface(b):
    return U.ask(b.rng, U.PREFACE) if b.rng.random() < 0.2 else None


def run_ask(b, built):
    """Ask one question, make its call, answer from the result."""
    text, call, answer = built
    b.user(text)
    (r,) = b.call(call, preface=_preface(b))
    b.say(*answer(r))


# ---- families: each is (needed tools, run(builder, big)); `plan(rng, ...)` picks the variant first
def plan_single(rng, world, big):
    name, _, build, _ = rng.choice(ASKS)
    built = build(world, rng, big)
    return name, {built[1][0]}, lambda b: run_ask(b, built)


def plan_parallel(rng, world, big):
    asks = [a for a in ASKS if a[3]]
    chosen = [rng.choice(asks) for _ in range(rng.choice((2, 2, 3)))]
    built = [a[2](world, rng, big) for a in chosen]
    if len({dumps_call(x[1]) for x in built}) < len(built):  # two identical calls are one call
        built = built[:1]

    def run(b):
        b.user(" ".join(x[0] for x in built))
        results = b.call(*[x[1] for x in built], preface=_preface(b))
        answers = [x[2](r) for x, r in zip(built, results)]
        b.say(" ".join(a[0] for a in answers), *[s for a in answers for s in a[1:]])
    return "+".join(a[0] for a in chosen[:len(built)]), {x[1][0] for x in built}, run


def dumps_call(call):
    return call[0] + repr(sorted(call[1].items()))


def _chain_cost(w, rng, big):
    k, n = rng.choice(sorted(w.tables["items"])), _int(rng, False, 2, 12)
    text = U.ask(rng, U.ASK, "chain_cost", k=k, n=U.say_number(rng, n))

    def run(b):
        b.user(text)
        (r,) = b.call(("db_get", {"table": "items", "key": k}), preface=_preface(b))
        (c,) = b.call(("calculator", {"expression": f"{r['price']} * {n}"}))
        b.say(f"{n} units of item {k} cost {c['result']}.", c["result"])
    return {"db_get", "calculator"}, run


def _chain_weekday(w, rng, big):
    d, n = _date(rng, big), _int(rng, big, 1, 400)
    text = U.ask(rng, U.ASK, "chain_weekday", d=d, n=U.say_number(rng, n))

    def run(b):
        b.user(text)
        (r,) = b.call(("add_days", {"date": d, "days": n}), preface=_preface(b))
        (c,) = b.call(("day_of_week", {"date": r["date"]}))
        b.say(f"{n} days after {d} is {r['date']}, a {c['weekday']}.", r["date"], c["weekday"])
    return {"add_days", "day_of_week"}, run


def _chain_weather(w, rng, big):
    p, d = rng.choice(sorted(w.tables["people"])), _date(rng, big)
    text = U.ask(rng, U.ASK, "chain_weather", p=p, d=d)

    def run(b):
        b.user(text)
        (r,) = b.call(("db_get", {"table": "people", "key": p}), preface=_preface(b))
        (c,) = b.call(("get_weather", {"city": r["city"], "date": d}))
        b.say(f"{p} lives in {r['city']}. On {d}: {c['temp_c']} C and {c['sky']}.", c["temp_c"], c["sky"])
    return {"db_get", "get_weather"}, run


def _chain_age(w, rng, big):
    p, n = rng.choice(sorted(w.tables["people"])), _int(rng, False, 1, 30)
    text = U.ask(rng, U.ASK, "chain_age", p=p, n=U.say_number(rng, n))

    def run(b):
        b.user(text)
        (r,) = b.call(("db_get", {"table": "people", "key": p}), preface=_preface(b))
        (c,) = b.call(("calculator", {"expression": f"{r['age']} + {n}"}))
        b.say(f"{p} will be {c['result']} in {n} years.", c["result"])
    return {"db_get", "calculator"}, run


def _chain_weeks(w, rng, big):
    a, b_ = sorted((_date(rng, big), _date(rng, big)))
    text = U.ask(rng, U.ASK, "chain_weeks", a=a, b=b_)

    def run(b):
        b.user(text)
        (r,) = b.call(("days_between", {"start": a, "end": b_}), preface=_preface(b))
        (c,) = b.call(("calculator", {"expression": f"{r['days']} / 7"}))
        b.say(f"There are {c['result']} weeks from {a} to {b_}.", c["result"])
    return {"days_between", "calculator"}, run


def _chain_two_costs(w, rng, big):
    k, k2 = rng.sample(sorted(w.tables["items"]), 2)
    n, m = _int(rng, False, 2, 9), _int(rng, False, 2, 9)
    text = U.ask(rng, U.ASK, "chain_two_costs", k=k, k2=k2, n=n, m=m)

    def run(b):
        b.user(text)
        r1, r2 = b.call(("db_get", {"table": "items", "key": k}), ("db_get", {"table": "items", "key": k2}),
                        preface=_preface(b))
        (c,) = b.call(("calculator", {"expression": f"{r1['price']} * {n} + {r2['price']} * {m}"}))
        b.say(f"{n} of {k} and {m} of {k2} cost {c['result']} together.", c["result"])
    return {"db_get", "calculator"}, run


def _chain_trip(w, rng, big):
    p, d, n = rng.choice(sorted(w.tables["people"])), _date(rng, big), _int(rng, big, 1, 60)
    text = U.ask(rng, U.ASK, "chain_trip", p=p, d=d, n=n)

    def run(b):
        b.user(text)
        r, s = b.call(("db_get", {"table": "people", "key": p}), ("add_days", {"date": d, "days": n}),
                      preface=_preface(b))
        (c,) = b.call(("get_weather", {"city": r["city"], "date": s["date"]}))
        b.say(f"On {s['date']} in {r['city']}: {c['temp_c']} C and {c['sky']}.", c["temp_c"], c["sky"])
    return {"db_get", "add_days", "get_weather"}, run


CHAINS = {"cost": _chain_cost, "weekday": _chain_weekday, "weather": _chain_weather}
HELD_OUT_CHAINS = {"age": _chain_age, "weeks": _chain_weeks}  # tool pairs never chained in training
LONG_CHAINS = {"two_costs": _chain_two_costs, "trip": _chain_trip}  # 3 calls; training has at most 2


def plan_chain(rng, world, big, chains=CHAINS):
    name = rng.choice(sorted(chains))
    tools, run = chains[name](world, rng, big)
    return name, tools, run


def plan_follow_up(rng, world, big, turns=2):
    kind = rng.choice(("convert", "weather", "item", "calc", "person"))

    def follow(b, n_follow):
        if kind == "convert":
            text, call, answer = ask_convert(world, rng, big, dim="length")  # the one dimension with 4 units
            run_ask(b, (text, call, answer))
            args = call[1]
            rest = [u for u, (d, _) in UNITS.items() if d == "length" and u not in (args["from_unit"], args["to_unit"])]
            for to in rng.sample(rest, n_follow):
                b.user(U.ask(rng, U.FOLLOW, "convert", to=U.say_unit(rng, to)))
                (r,) = b.call(("convert_units", {**args, "to_unit": to}))
                b.say(*answer(r))
        elif kind == "weather":
            cities = rng.sample(world.cities, n_follow + 1)
            text, call, answer = ask_weather(world, rng, big, city=cities[0])
            run_ask(b, (text, call, answer))
            for city in cities[1:]:
                b.user(U.ask(rng, U.FOLLOW, "weather", city=city))
                (r,) = b.call(("get_weather", {"city": city, "date": call[1]["date"]}))
                b.say(f"In {city} on {call[1]['date']}: {r['temp_c']} C and {r['sky']}.", r["temp_c"], r["sky"])
        elif kind in ("item", "person"):
            table, asker = ("items", ask_item) if kind == "item" else ("people", ask_person)
            field = rng.choice(("price", "stock", "color") if kind == "item" else ("age", "city"))
            keys = rng.sample(sorted(world.tables[table]), n_follow + 1)
            run_ask(b, asker(world, rng, big, keys[0], field))
            for k in keys[1:]:
                text, call, answer = asker(world, rng, big, k, field)
                b.user(U.ask(rng, U.FOLLOW, kind, k=k, p=k))
                (r,) = b.call(call)
                b.say(*answer(r))
        else:
            run_ask(b, ask_calc(world, rng, big, div=False))
            value = b.ep.turns[-1].slots[0]
            for _ in range(n_follow):
                m = rng.randint(2, 9)
                b.user(U.ask(rng, U.FOLLOW, "calc", m=m))
                e = f"{value} * {m}"
                (r,) = b.call(("calculator", {"expression": e}))
                b.say(f"{e} = {r['result']}.", r["result"])
                value = r["result"]
    tools = {"convert": {"convert_units"}, "weather": {"get_weather"}, "item": {"db_get"}, "calc": {"calculator"},
             "person": {"db_get"}}[kind]
    return kind, tools, lambda b: follow(b, turns - 1)


def plan_error(rng, world, big):
    kind = rng.choice(("typo_item", "typo_person", "missing_item", "div_zero", "bad_date", "unknown_city"))

    def run(b):
        if kind in ("typo_item", "typo_person"):
            table = "items" if kind == "typo_item" else "people"
            key = rng.choice(sorted(world.tables[table]))
            typo = key.lower() if key.lower() != key else key.upper()
            asker = ask_item if table == "items" else ask_person
            text, call, answer = asker(world, rng, big, key)
            b.user(text.replace(key, typo))
            (r,) = b.call(("db_get", {"table": table, "key": typo}), preface=_preface(b), required=False)
            (r,) = b.call(("db_get", {"table": table, "key": r["did_you_mean"]}))
            b.say(*answer(r))
        elif kind == "missing_item":
            used = {k[0] for k in world.tables["items"]}
            key = f"{rng.choice([c for c in string.ascii_uppercase if c not in used])}{rng.randint(1, 99)}"
            text, call, _ = ask_item(world, rng, big, key)
            b.user(text)
            b.call(call, preface=_preface(b))
            b.say(f"Sorry, I could not find item {key}.", "could not find")
        elif kind == "div_zero":
            e = f"{_int(rng, big)} / {rng.choice(('0', '(3 - 3)', '(5 - 5)', '0 * 4'))}"
            b.user(U.ask(rng, U.ASK, "calc", e=e))
            b.call(("calculator", {"expression": e}), preface=_preface(b))
            b.say(f"I cannot compute {e}: division by zero.", "division by zero")
        elif kind == "bad_date":
            y = rng.randint(2031, 2040) if big else rng.randint(2000, 2030)
            d = rng.choice((f"{y}-02-30", f"{y}-04-31", f"{y}-13-05", f"{y}-06-31", f"{y}-11-31"))
            b.user(U.ask(rng, U.ASK, "weekday", d=d))
            b.call(("day_of_week", {"date": d}), preface=_preface(b))
            b.say(f"{d} is not a valid date.", "not a valid date")
        else:
            from kimi.data.world import CITIES
            city = rng.choice([c for c in CITIES if c not in world.cities])
            text, call, _ = ask_weather(world, rng, big, city=city)
            b.user(text)
            b.call(call, preface=_preface(b))
            b.say(f"Sorry, I have no weather data for {city}.", "no weather data")
    tools = {"typo_item": {"db_get"}, "typo_person": {"db_get"}, "missing_item": {"db_get"},
             "div_zero": {"calculator"}, "bad_date": {"day_of_week"}, "unknown_city": {"get_weather"}}[kind]
    return kind, tools, run


def plan_clarify(rng, world, big):
    kind = rng.choice(("weather", "convert", "set_price", "weekday"))

    def run(b):
        if kind == "weather":
            city, d = rng.choice(world.cities), _date(rng, big)
            b.user(U.ask(rng, U.CLARIFY, kind, city=city))
            b.say("Which date should I check?", "date")
            b.user(U.ask(rng, U.REPLY, "date", d=d))
            (r,) = b.call(("get_weather", {"city": city, "date": d}))
            b.say(f"In {city} on {d}: {r['temp_c']} C and {r['sky']}.", r["temp_c"], r["sky"])
        elif kind == "convert":
            text, call, answer = ask_convert(world, rng, big)
            args = call[1]
            v, frm, to = args["value"], args["from_unit"], args["to_unit"]
            b.user(U.ask(rng, U.CLARIFY, kind, v=U.say_number(rng, v), frm=U.say_unit(rng, frm)))
            b.say("Which unit should I convert to?", "unit")
            b.user(U.ask(rng, U.REPLY, "unit", to=U.say_unit(rng, to)))
            (r,) = b.call(call)
            b.say(*answer(r))
        elif kind == "set_price":
            k, v = rng.choice(sorted(world.tables["items"])), _int(rng, big, 1, 99)
            b.user(U.ask(rng, U.CLARIFY, kind, k=k))
            b.say("What should the new price be?", "price")
            b.user(U.ask(rng, U.REPLY, "value", v=v))
            b.call(("db_set", {"table": "items", "key": k, "field": "price", "value": v}))
            b.say(f"Done: the price of item {k} is now {v}.", v)
        else:
            d = _date(rng, big)
            b.user(U.ask(rng, U.CLARIFY, kind))
            b.say("Which date is it?", "date")
            b.user(U.ask(rng, U.REPLY, "date", d=d))
            (r,) = b.call(("day_of_week", {"date": d}))
            b.say(f"{d} is a {r['weekday']}.", r["weekday"])
    tools = {"weather": {"get_weather"}, "convert": {"convert_units"}, "set_price": {"db_set"},
             "weekday": {"day_of_week"}}[kind]
    return kind, tools, run


def plan_no_call(rng, world, big):
    kind = rng.choice(("greeting", "thanks", "who", "abilities", "remember"))

    def run(b):
        if kind == "greeting":
            b.user(U.ask(rng, U.GREETING))
            b.say("Hello! How can I help you today?", "Hello")
        elif kind == "thanks":
            b.user(U.ask(rng, U.THANKS))
            b.say("You're welcome!", "welcome")
        elif kind == "who":
            b.user(U.ask(rng, U.WHO))
            b.say("I am Kimi, an AI assistant. I can answer questions and use tools.", "Kimi")
        elif kind == "abilities":
            b.user(U.ask(rng, U.ABILITIES))
            names = [t["function"]["name"] for t in b.ep.tools]
            b.say(f"I can use these tools: {', '.join(names)}.", *names)
        else:
            what = rng.choice(sorted(U.REMEMBER))
            x = {"name": lambda: rng.choice(("Ada", "Ben", "Cara", "Dev", "Mira", "Theo", "Lu", "Sol")),
                 "color": lambda: rng.choice(COLORS),
                 "code": lambda: f"{rng.choice(WORDS)}{rng.randint(10, 99)}"}[what]()
            b.user(U.ask(rng, U.REMEMBER, what, x=x))
            label = {"name": "Your name is", "color": "Your favourite color is", "code": "The code is"}[what]
            b.say(f"{label} {x}.", x)
    return kind, set(), run


FAMILIES = {"no_call": plan_no_call, "single": plan_single, "parallel": plan_parallel, "chain": plan_chain,
            "follow_up": plan_follow_up, "error": plan_error, "clarify": plan_clarify}
