"""The simulated user: paraphrase templates per intent, follow-ups, clarification replies, number and unit
wordings, and the personas that become system prompts (../shared/reference/synthetic.md §A5, the templated
stand-in for K2's LLM user personas). `ask(rng, intent, **slots)` picks one paraphrase and fills it.
"""

from __future__ import annotations

ASK = {
    "calc": ("What is {e}?", "Compute {e}.", "Can you work out {e}?", "Calculate {e} for me.", "{e} = ?",
             "What does {e} come to?", "Please evaluate {e}.", "Quick math: {e}", "what's {e}",
             "I need the value of {e}."),
    "convert": ("How many {to} is {v} {frm}?", "Convert {v} {frm} to {to}.", "What is {v} {frm} in {to}?",
                "Please turn {v} {frm} into {to}.", "{v} {frm} in {to}?", "Express {v} {frm} in {to}.",
                "how much is {v} {frm} in {to}", "I have {v} {frm}. How many {to} is that?"),
    "add_days": ("What date is {n} days after {d}?", "Add {n} days to {d}.", "Which date comes {n} days after {d}?",
                 "If I start on {d}, what is the date {n} days later?", "{d} plus {n} days is what date?",
                 "What's the date {n} days from {d}?", "Move {d} forward by {n} days.",
                 "Give me the date {n} days past {d}."),
    "days_between": ("How many days are there from {a} to {b}?", "Count the days between {a} and {b}.",
                     "How many days separate {a} and {b}?", "Days from {a} until {b}?",
                     "What is the number of days from {a} to {b}?", "how long is it from {a} to {b} in days",
                     "I need the day count from {a} to {b}.", "From {a} to {b}, how many days is that?"),
    "weekday": ("What day of the week is {d}?", "Which weekday is {d}?", "What weekday falls on {d}?",
                "Is {d} a Monday? Which day is it?", "Tell me the weekday of {d}.", "{d} is which day of the week?",
                "what day is {d}", "On what weekday is {d}?"),
    "item_price": ("What is the price of item {k}?", "How much does item {k} cost?", "Price of {k}?",
                   "Look up the price of item {k}.", "what does {k} cost", "Can you check the price of {k}?",
                   "How much is item {k}?", "Tell me what item {k} costs."),
    "item_stock": ("How many of item {k} are in stock?", "What is the stock of item {k}?", "Stock level of {k}?",
                   "How many units of {k} do we have?", "check stock for {k}", "Is item {k} in stock? How many?",
                   "Tell me the stock count of item {k}.", "How many {k} are left?"),
    "item_color": ("What color is item {k}?", "Which color is {k}?", "Tell me the color of item {k}.",
                   "what colour is {k}", "Look up the color of item {k}.", "Item {k}: what color is it?"),
    "person_age": ("How old is {p}?", "What is {p}'s age?", "Tell me how old {p} is.", "Age of {p}?",
                   "how old is {p} now", "Look up {p}'s age.", "Can you find out how old {p} is?"),
    "person_city": ("Where does {p} live?", "Which city does {p} live in?", "What is {p}'s city?",
                    "where is {p} based", "Look up where {p} lives.", "In which city is {p}?"),
    "find_color": ("Which items are {c}?", "List the {c} items.", "Find all items whose color is {c}.",
                   "what items are {c}", "Show me the items that are {c}.", "Are any items {c}? Which ones?"),
    "find_city": ("Who lives in {city}?", "Which people live in {city}?", "List everyone in {city}.",
                  "who is in {city}", "Find the people based in {city}.", "Does anyone live in {city}? Who?"),
    "set_price": ("Set the price of item {k} to {v}.", "Change the price of {k} to {v}.",
                  "Update item {k}: the price is now {v}.", "Please make {k} cost {v}.",
                  "new price for {k}: {v}", "The price of item {k} should be {v}. Please update it."),
    "set_stock": ("Set the stock of item {k} to {v}.", "We now have {v} of item {k}; update the stock.",
                  "Change the stock of {k} to {v}.", "stock of {k} is {v} now, please record it",
                  "Update item {k} so its stock is {v}."),
    "set_city": ("{p} moved to {city}. Please update the record.", "Change {p}'s city to {city}.",
                 "Set the city of {p} to {city}.", "{p} now lives in {city}; update it.",
                 "please record that {p} lives in {city}"),
    "reverse": ("Reverse the text '{t}'.", "Write '{t}' backwards.", "What is '{t}' reversed?",
                "Flip the string '{t}'.", "reverse '{t}'", "Can you reverse '{t}' for me?"),
    "upper": ("Make '{t}' upper case.", "Convert '{t}' to capitals.", "Uppercase this: '{t}'.",
              "shout '{t}'", "What is '{t}' in capital letters?", "Please capitalise '{t}'."),
    "count_letter": ("How many times does the letter '{l}' appear in '{t}'?", "Count the letter '{l}' in '{t}'.",
                     "How often is '{l}' in '{t}'?", "count '{l}' in '{t}'",
                     "In '{t}', how many '{l}' are there?"),
    "word_count": ("How many words are in '{t}'?", "Count the words in '{t}'.", "Word count of '{t}'?",
                   "how many words: '{t}'", "Tell me how many words '{t}' has."),
    "weather": ("What's the weather in {city} on {d}?", "Weather for {city} on {d}?",
                "How is the weather in {city} on {d}?", "Check the forecast for {city} on {d}.",
                "weather {city} {d}", "Will it be sunny in {city} on {d}?", "Tell me the weather in {city} for {d}.",
                "What will the weather be like in {city} on {d}?"),
    "chain_cost": ("How much do {n} units of item {k} cost?", "What would {n} of item {k} cost in total?",
                   "I want to buy {n} of {k}. What's the total?", "Total price for {n} units of {k}?",
                   "how much for {n} {k}", "Price of {n} items of {k} together?"),
    "chain_weekday": ("What weekday is {n} days after {d}?", "Which day of the week is it {n} days after {d}?",
                      "If I start on {d}, what weekday is it {n} days later?", "{n} days after {d} is which weekday?",
                      "what day of the week falls {n} days after {d}"),
    "chain_weather": ("What's the weather where {p} lives on {d}?", "How is the weather in {p}'s city on {d}?",
                      "Check the weather for {p}'s home town on {d}.", "weather where {p} lives on {d}?",
                      "Will {p} have good weather at home on {d}?"),
    "chain_age": ("How old will {p} be in {n} years?", "In {n} years, what age will {p} be?",
                  "What is {p}'s age plus {n} years?", "how old is {p} going to be {n} years from now"),
    "chain_weeks": ("How many weeks are there from {a} to {b}?", "Count the weeks between {a} and {b}.",
                    "From {a} to {b}, how many weeks is that?", "weeks from {a} until {b}?"),
    "chain_two_costs": ("How much do {n} of item {k} and {m} of item {k2} cost together?",
                        "What is the total for {n} units of {k} plus {m} units of {k2}?",
                        "I buy {n} of {k} and {m} of {k2}. What is the total price?"),
    "chain_trip": ("What's the weather where {p} lives, {n} days after {d}?",
                   "How will the weather be in {p}'s city {n} days after {d}?",
                   "{n} days after {d}, what's the weather where {p} lives?"),
}
FOLLOW = {
    "convert": ("And in {to}?", "What about in {to}?", "Now in {to}, please.", "and {to}?", "Same in {to}?"),
    "weather": ("And in {city}?", "What about {city} that day?", "Same date in {city}?", "and {city}?"),
    "item": ("What about item {k}?", "And item {k}?", "Same for {k}?", "and {k}?", "Now check item {k}."),
    "calc": ("Now multiply that by {m}.", "Multiply the result by {m}.", "Times {m}?", "And that times {m}?"),
    "person": ("And {p}?", "What about {p}?", "Same for {p}?", "and {p}?"),
}
CLARIFY = {
    "weather": ("What's the weather in {city}?", "How is the weather in {city}?", "Check the weather in {city}.",
                "weather in {city}?"),
    "convert": ("Please convert {v} {frm}.", "Convert {v} {frm} for me.", "I have {v} {frm}, convert it.",
                "convert {v} {frm}"),
    "set_price": ("Please change the price of item {k}.", "Update the price of {k}.", "The price of {k} is wrong."),
    "weekday": ("What day of the week is my birthday?", "Which weekday is my appointment?",
                "What weekday is the meeting?"),
}
REPLY = {
    "date": ("{d}", "On {d}.", "{d}, please.", "It is {d}.", "The date is {d}."),
    "unit": ("{to}", "To {to}.", "In {to}, please.", "{to} please"),
    "value": ("{v}", "Make it {v}.", "It should be {v}.", "{v}, please."),
}
GREETING = ("Hi!", "Hello.", "Hello there!", "Hey", "Good morning!", "Hi, how are you?", "Good evening.", "hey there")
THANKS = ("Thanks!", "Thank you.", "thanks a lot", "Great, thank you!", "Cheers.", "Perfect, thanks.")
WHO = ("Who are you?", "What are you?", "Are you a person?", "who am I talking to?", "Introduce yourself.")
ABILITIES = ("What can you do?", "Which tools do you have?", "What tools can you use?", "what are your tools?",
             "List your tools.")
REMEMBER = {
    "name": ("My name is {x}. What is my name?", "I'm {x}. Do you remember my name?", "Call me {x}. What's my name?"),
    "color": ("My favourite color is {x}. What is my favourite color?",
              "I like {x} best. Which color do I like best?"),
    "code": ("Remember the code {x}. What was the code?", "The code is {x}. Repeat the code, please.",
             "Note this code: {x}. What is it?"),
}
PREFACE = ("Let me check.", "One moment.", "Sure, let me look that up.", "I'll use a tool for that.")
UNIT_WORDS = {"mm": ("mm", "millimetres", "millimeters"), "cm": ("cm", "centimetres", "centimeters"),
              "m": ("m", "metres", "meters"), "km": ("km", "kilometres", "kilometers"), "g": ("g", "grams"),
              "kg": ("kg", "kilograms", "kilos"), "s": ("s", "seconds"), "min": ("min", "minutes"),
              "h": ("h", "hours")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
ROLES = ("a helpful assistant", "a shop assistant", "a travel helper", "an office assistant", "a friendly helper",
         "a precise data clerk")
STYLES = ("Be brief.", "Answer clearly.", "Use the tools when needed.", "Be polite and concise.",
          "Keep answers short.")
PERSONAS = tuple(f"You are {r}. {s}" for r in ROLES for s in STYLES)


def ask(rng, table: dict | tuple, key: str | None = None, **slots) -> str:
    options = table[key] if key is not None else table
    return rng.choice(options).format(**slots)


def say_number(rng, n: int) -> str:
    """Numbers up to 20 are sometimes spelled out ("three"); the arguments always hold the integer."""
    if 0 <= n <= 20 and rng.random() < 0.25:
        return NUMBER_WORDS[n]
    return str(n)


def say_unit(rng, unit: str) -> str:
    return rng.choice(UNIT_WORDS[unit])
