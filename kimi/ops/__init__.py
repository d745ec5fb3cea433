"""Numerics: each fast op sits beside a plain reference twin it is tested against."""
