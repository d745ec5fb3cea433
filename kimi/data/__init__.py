"""toolverse: offline, deterministic synthesis of verified tool-use conversations in Kimi's chat format
(../shared/reference/synthetic.md). tools.py (the tools), world.py (per-episode worlds), evolution.py (varied
declarations), user.py (the simulated user), families.py (task families), episode.py (episodes and their gold),
verify.py (the judge), synth.py (splits and `kimi data synth`)."""
