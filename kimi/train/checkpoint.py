"""Training checkpoints: an HF-layout model directory plus everything needed to continue bit for bit.

OUT/step-NNNNNN/                   loadable by kimi.load_model and transformers (config.json, *.safetensors,
                                   tokenizer files when the data's tokenizer directory has them)
OUT/step-NNNNNN/trainer/state.json step, data position, run settings, non-tensor optimizer state and groups
OUT/step-NNNNNN/trainer/optimizer.safetensors   optimizer tensors (momentum, Adam moments), fp32
OUT/step-NNNNNN/trainer/rng.safetensors         torch CPU (and CUDA) generator states
Nothing is pickled. A checkpoint is written into a hidden temporary directory and renamed into place in one
step, so a kill at any moment leaves every earlier checkpoint intact and never a half-written step-* directory;
`latest` picks the highest complete step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "trainer/state.json"


def _optimizer_split(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, state: dict, source: str | Path | None = None,
                    keep: int = 2) -> Path:
    """Write OUT/step-{step} atomically; keep the newest `keep` checkpoints (0 = all). `state` is JSON-able
    trainer state (data position, settings); `source` a directory whose tokenizer files go beside the model."""
    from kimi.model.loader import save_model

    out_dir = Path(out_dir)
    final = out_dir / f"step-{step:06d}"
    tmp = out_dir / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, source=source)
    (tmp / "trainer").mkdir()
    tensors, meta = _optimizer_split(optimizer.state_dict())
    save_file(tensors, str(tmp / "trainer" / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "trainer" / "rng.safetensors"))
    (tmp / STATE).write_text(json.dumps({"step": step, **state, "optimizer": meta}, indent=1) + "\n")
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old copy aside, then replace it
        old = out_dir / f".old-step-{step:06d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep > 0:
        for stale in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in OUT, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.glob("step-*") if p.is_dir() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def read_state(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / STATE).read_text())


def load_training_state(ckpt: str | Path, optimizer) -> dict:
    """Restore optimizer tensors and RNG from `ckpt`; returns the trainer state (step, data position, settings)."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    tensors = load_file(str(ckpt / "trainer" / "optimizer.safetensors"))
    optimizer.load_state_dict(_optimizer_join(tensors, state.pop("optimizer")))
    rng = load_file(str(ckpt / "trainer" / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state
