"""Training: the MuonClip optimizer (optim.py) and per-head QK-Clip (qk_clip.py).

The algorithm and its sources are in shared/reference/muon.md.
"""
