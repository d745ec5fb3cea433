"""One episode's world: fresh item keys, prices, people and cities drawn from the episode seed, plus a hashed
weather lookup (../shared/reference/synthetic.md §A5). Answers therefore cannot be memorised: the tool call is
the only way to know them. No global RNG, no clock: the same seed gives the same world.
"""

from __future__ import annotations

import hashlib
import random
import string

COLORS = ("red", "blue", "green", "black", "white", "yellow", "gray", "orange")
SKIES = ("sunny", "cloudy", "rainy", "snowy")
NAMES = ("Ada", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Milo", "Nina",
         "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Vik", "Wren", "Xena", "Yuri", "Zoe", "Anton",
         "Bea", "Chen", "Dara", "Emil", "Flor", "Gita", "Hugo", "Iris", "Jon", "Kai", "Lior", "Maya", "Noor",
         "Otto", "Priya", "Raul", "Sven", "Tomas", "Vera", "Yara", "Zain")
CITIES = ("Oslo", "Lima", "Cairo", "Tokyo", "Paris", "Quito", "Dakar", "Hanoi", "Perth", "Seoul", "Rome", "Accra",
          "Bern", "Dublin", "Kyiv", "Lagos", "Madrid", "Nairobi", "Osaka", "Prague", "Riga", "Sofia", "Tunis",
          "Vienna", "Warsaw", "Zagreb", "Austin", "Boston", "Denver", "Miami", "Toronto", "Porto")
WORDS = ("lantern", "river", "copper", "garden", "silver", "window", "harbor", "meadow", "candle", "rocket",
         "pepper", "violet", "marble", "thunder", "pillow", "orbit", "basket", "falcon", "tunnel", "cactus",
         "ribbon", "puzzle", "anchor", "glacier", "velvet", "compass", "bridge", "mirror", "saddle", "walnut")


def seed_of(*parts) -> int:
    """A 64-bit seed from any parts (split, version, index...): stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


class World:
    """Tables `items` (key -> price, stock, color) and `people` (name -> age, city), the episode's cities, and
    weather. `big` draws prices and ages from the unseen 100-999 range (the ood_values split)."""

    def __init__(self, seed: int, big: bool = False):
        self.seed = seed
        rng = random.Random(seed)
        rand = rng.random  # ints as lo + int(rand() * span): several times faster than randint, same determinism
        lo, span = (100, 900) if big else (1, 99)
        letters = rng.sample(string.ascii_uppercase, 4)
        n_items, keys = 8 + int(rand() * 7), set()
        while len(keys) < n_items:
            keys.add(f"{letters[int(rand() * 4)]}{1 + int(rand() * 99)}")
        self.cities = rng.sample(CITIES, 6)
        items = {k: {"price": lo + int(rand() * span), "stock": int(rand() * 51), "color": COLORS[int(rand() * 8)]}
                 for k in sorted(keys)}
        age_lo, age_span = (100, 31) if big else (18, 73)
        people = {n: {"age": age_lo + int(rand() * age_span), "city": self.cities[int(rand() * 6)]}
                  for n in sorted(rng.sample(NAMES, 6 + int(rand() * 5)))}
        self.tables = {"items": items, "people": people}

    def weather(self, city: str, date: str) -> dict:
        h = hashlib.sha256(f"{self.seed}:{city}:{date}".encode()).digest()
        return {"temp_c": h[0] % 46 - 10, "sky": SKIES[h[1] % 4]}

    def snapshot(self) -> dict:
        return {t: {k: dict(row) for k, row in rows.items()} for t, rows in self.tables.items()}
