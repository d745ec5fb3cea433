"""Tokenizer (tokenizer.py), chat rendering (chat.py, template.py), completion parsing (parser.py) and
BPE training (bpe.py) for Kimi's exact token and wire format."""

from kimi.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
