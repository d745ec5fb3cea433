"""Read and write Hugging Face model directories (config.json + safetensors) as kimi Transformers.

Checkpoint names are model parameter names, with one packing rule: routed experts are stored per expert in the
checkpoint (K2 `experts.{e}.{gate,up,down}_proj.weight`, Kimi Linear `experts.{e}.{w1,w3,w2}.weight`) and stacked
[E, out, in] in the model. Kimi Linear's dense layer 0 is accepted under `mlp.` or `block_sparse_moe.`; per-layer
`rotary_emb.inv_freq` tensors are ignored. Parameters are created on the meta device and each tensor is read from
the memory-mapped shard straight into its final dtype and device. Pickle checkpoints are never loaded.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kimi.config import ModelConfig
from kimi.model.model import FP32_NAMES, Transformer

log = logging.getLogger("kimi")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
EXPERT = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+)\.weight$")
KL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Kimi Linear's per-expert names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_files(path: Path) -> dict[str, list[str] | None]:
    """{shard file: tensor names listed for it (None: read the file's own list)}; errors name what is wrong."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a model directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (expected a 'weight_map' object): {e}") from None
        shards: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(file, []).append(name)
        for file in shards:
            if not (path / file).is_file():
                raise ValueError(f"{index} lists shard {file!r}, which is missing from {path}")
        return shards
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        return {f: None for f in files}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{path} holds only pickle checkpoints ({', '.join(pickles)}); kimi never loads pickles "
                         "(they can run arbitrary code). Convert them to safetensors first.")
    raise ValueError(f"{path} has no model.safetensors, model.safetensors.index.json or *.safetensors file")


def param_name(name: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """Checkpoint tensor name -> (model tensor name, expert index or None); None for tensors to skip."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    m = EXPERT.match(name)
    if m:
        proj = KL_EXPERT_NAMES.get(m.group(3), m.group(3))
        return f"{m.group(1)}.{proj}", int(m.group(2))
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m:
        i = int(m.group(1))
        if i >= cfg.num_hidden_layers:  # multi-token-prediction layers (DeepSeek-V3 style) are not part of kimi
            n_mtp = int(cfg.source.get("num_nextn_predict_layers") or 0)
            return None if i < cfg.num_hidden_layers + n_mtp else (name, None)
        if cfg.mlp_types[i] == "dense" and ".block_sparse_moe." in name:
            return name.replace(".block_sparse_moe.", ".mlp."), None
    return name, None


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
    """Load an HF-layout directory of safetensors as a Transformer in eval mode.

    dtype: the compute dtype (default: the config's torch_dtype); A_log, dt_bias and the router's correction bias
    stay fp32. Every problem (missing shard, wrong shape, unknown or missing tensor) raises ValueError naming the
    file and tensor before any model is returned.
    """
    path = Path(path)
    cfg = ModelConfig.from_pretrained(path)
    if cfg.source.get("quantization_config") is not None:
        raise ValueError(f"{path}/config.json has a quantization_config ({cfg.source['quantization_config'].get('quant_method')!r}); "
                         "quantised checkpoints are not supported by this loader yet")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported, expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    stacked: dict[str, torch.Tensor] = {}  # expert params allocated so far, filled one expert at a time
    experts_seen: dict[str, set[int]] = {}
    loaded: set[str] = set()
    for file, names in checkpoint_files(path).items():
        try:
            with safe_open(path / file, framework="pt", device="cpu") as f:
                for name in names or f.keys():
                    target = param_name(name, cfg)
                    if target is None:
                        continue
                    pname, expert = target
                    if pname not in expected:
                        raise ValueError(f"{file}: tensor {name!r} is not a parameter of this {cfg.model_type} model")
                    ref = expected[pname]
                    shape = tuple(ref.shape[1:] if expert is not None else ref.shape)
                    sl = f.get_slice(name)
                    if tuple(sl.get_shape()) != shape:
                        raise ValueError(f"{file}: tensor {name!r} has shape {tuple(sl.get_shape())}, expected {shape}")
                    want = torch.float32 if pname.rsplit(".", 1)[-1] in FP32_NAMES else dtype
                    tensor = f.get_tensor(name)
                    if not tensor.is_floating_point():
                        raise ValueError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected a float type")
                    tensor = tensor.to(device=device, dtype=want)
                    if expert is None:
                        _set(model, pname, tensor)
                        loaded.add(pname)
                    else:
                        if expert >= ref.shape[0]:
                            raise ValueError(f"{file}: tensor {name!r}: expert {expert} out of range "
                                             f"(the model has {ref.shape[0]} experts)")
                        if pname not in stacked:
                            stacked[pname] = torch.empty(ref.shape, dtype=want, device=device)
                            _set(model, pname, stacked[pname])
                            experts_seen[pname] = set()
                        stacked[pname][expert] = tensor
                        experts_seen[pname].add(expert)
        except ValueError:
            raise
        except Exception as e:  # a truncated or corrupt file surfaces as a safetensors/OS error
            raise ValueError(f"{path / file}: cannot read safetensors file: {e}") from None
    for pname, seen in experts_seen.items():
        if len(seen) != expected[pname].shape[0]:
            missing = sorted(set(range(expected[pname].shape[0])) - seen)
            raise ValueError(f"{path}: {pname}: experts {missing[:8]} are missing from the checkpoint")
        loaded.add(pname)
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in loaded:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = [n for n in expected if n not in loaded]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}")
    return model.eval()


def _set(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


def checkpoint_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names (experts unstacked, the family's naming scheme)."""
    cfg = model.config
    names = {v: k for k, v in KL_EXPERT_NAMES.items()} if cfg.model_type == "kimi_linear" else {}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = re.match(r"^(.*\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{names.get(m.group(2), m.group(2))}.weight"] = t[e].clone()
        else:
            out[name] = t.contiguous()
    return out


def save_model(model: Transformer, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write an HF-layout directory (config.json, generation_config.json, safetensors + index when sharded) that
    transformers and kimi.load_model both load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = checkpoint_state(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = cfg.to_hf_dict()
    hf.pop("quantization_config", None)
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    hf.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    if isinstance(gen["eos_token_id"], tuple):
        gen["eos_token_id"] = list(gen["eos_token_id"])
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
