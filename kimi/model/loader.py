"""Read and write Hugging Face model directories (config.json + safetensors) as kimi Transformers, in every Kimi
weight format: bf16/fp32, block FP8 (Kimi-K2-Instruct) and INT4 routed experts (Kimi-K2-Thinking).

Checkpoint names are model parameter names, with one packing rule: routed experts are stored per expert in the
checkpoint (K2 `experts.{e}.{gate,up,down}_proj.*`, Kimi Linear `experts.{e}.{w1,w3,w2}.*`) and stacked
[E, out, in] in the model (quantised experts: `{proj}_scale_inv`, `{proj}_packed`, ... beside them, see
model/quantize.py). Kimi Linear's dense layer 0 is accepted under `mlp.` or `block_sparse_moe.`; per-layer
`rotary_emb.inv_freq` tensors are ignored. Formats: ../shared/reference/k2.md §5, kda.md §5.

Loading is lazy and lean. Every shard header is parsed and every name, shape and dtype checked before any data
is read, so a bad checkpoint fails fast with the file and tensor named. Parameters are created on the meta
device, then each tensor is copied from its memory-mapped shard straight into its final dtype and device, and
its mapped pages are dropped at once (madvise), so resident memory peaks at about the loaded model's size.
Pickle checkpoints are never loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from kimi.config import ModelConfig
from kimi.model.model import FP32_NAMES, Transformer
from kimi.model.moe import Experts
from kimi.model.quantize import (DENSE_ONLY, PROJS, QUANT_MODULES, Fp8Experts, Int4Experts, QuantScheme,
                                 dequantize_model, expert_module_name, quantize_model, quantized_format)
from kimi.ops.quant import Fp8BlockLinear, Int4Linear, quantize_fp8_block, quantize_int4

log = logging.getLogger("kimi")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
EXPERT = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+)\.(weight\w*)$")
KL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Kimi Linear's per-expert names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("keep", "dequantize")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
             "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DENSE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# files copied beside the weights when the source directory has them (tokenizer, chat template, remote code)
SIDE_FILES = ("generation_config.json", "tiktoken.model", "tokenizer_config.json", "tokenizer.json",
              "special_tokens_map.json", "chat_template.jinja")
MAX_HEADER_BYTES = 100 * 2**20


# ---- reading safetensors ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: where its bytes are (absolute file offsets) and what they are."""

    file: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class Shard:
    """One safetensors file: header parsed and checked against the file size on open; data memory-mapped on the
    first read. Layout: 8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}},
    then the data, offsets relative to its start."""

    def __init__(self, path: Path):
        self.path, self.mm = path, None
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                    raise ValueError(f"{path}: not a safetensors file, or truncated: header length {n}, file "
                                     f"size {size} bytes")
                header = json.loads(f.read(n))
        except OSError as e:
            raise ValueError(f"{path}: cannot read: {e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header (not JSON): {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (expected a JSON object)")
        base = 8 + n
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (a, b) = ST_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
                if not all(isinstance(d, int) and d >= 0 for d in (*shape, a, b)) or a > b:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: tensor {name!r} has a corrupt header entry {info!r} (expected a known "
                                 f"dtype of {sorted(ST_DTYPES)}, a shape and data_offsets)") from None
            if b - a != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name!r} is corrupt: {b - a} bytes for {info['dtype']} "
                                 f"{list(shape)}, expected {math.prod(shape) * dtype.itemsize}")
            if base + b > size:
                raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte {base + b}, the file has {size}")
            self.entries[name] = Entry(path.name, name, dtype, shape, base + a, base + b)

    def read(self, e: Entry) -> torch.Tensor:
        """A tensor viewing the mapped bytes (no copy): copy it, then release(e)."""
        if e.end == e.start:
            return torch.empty(e.shape, dtype=e.dtype)
        if self.mm is None:
            with open(self.path, "rb") as f:  # a private mapping: writable views, never written back
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = (e.end - e.start) // e.dtype.itemsize
        return torch.frombuffer(self.mm, dtype=e.dtype, count=count, offset=e.start).view(e.shape)

    def release(self, e: Entry) -> None:
        """Drop the mapped pages of e from this process's resident set (the OS page cache keeps them)."""
        if self.mm is not None and e.end > e.start and hasattr(self.mm, "madvise"):
            start = e.start - e.start % mmap.PAGESIZE
            self.mm.madvise(mmap.MADV_DONTNEED, start, e.end - start)

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view is still alive somewhere: the mapping goes when it does
                pass
            self.mm = None


def open_checkpoint(path: Path) -> dict[str, Shard]:
    """{file name: Shard} of a model directory (index.json or *.safetensors); errors name what is wrong."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a model directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            listed: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                listed.setdefault(file, []).append(name)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (expected a 'weight_map' object): {e}") from None
        for file in listed:
            if Path(file).suffix in PICKLE_SUFFIXES:
                raise ValueError(f"{index} lists shard {file!r}, a pickle file; kimi never loads pickles (they can "
                                 "run arbitrary code). Convert it to safetensors first.")
            if not (path / file).is_file():
                raise ValueError(f"{index} lists shard {file!r}, which is missing from {path}")
        shards = {file: Shard(path / file) for file in listed}
        for file, names in listed.items():
            absent = [n for n in names if n not in shards[file].entries]
            if absent:
                raise ValueError(f"{index} lists tensor {absent[0]!r} in {file}, which does not hold it")
            unlisted = sorted(set(shards[file].entries) - set(names))
            if unlisted:
                raise ValueError(f"{path / file}: tensor {unlisted[0]!r} is not listed in {index.name}")
        return shards
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        shards = {f: Shard(path / f) for f in files}
        seen: dict[str, str] = {}
        for file, shard in shards.items():
            for name in shard.entries:
                if name in seen:
                    raise ValueError(f"{path}: tensor {name!r} is in both {seen[name]} and {file}")
                seen[name] = file
        return shards
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{path} holds only pickle checkpoints ({', '.join(pickles)}); kimi never loads pickles "
                         "(they can run arbitrary code). Convert them to safetensors first.")
    raise ValueError(f"{path} has no model.safetensors, model.safetensors.index.json or *.safetensors file")


def param_name(name: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """Checkpoint tensor name -> (model tensor name, expert index or None); None for tensors to skip.
    Expert tensors `...experts.{e}.{proj}.weight{suffix}` map to `...experts.{proj}{suffix}`."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    m = EXPERT.match(name)
    if m:
        proj = KL_EXPERT_NAMES.get(m.group(3), m.group(3))
        return f"{m.group(1)}.{proj}{m.group(4).removeprefix('weight')}", int(m.group(2))
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m:
        i = int(m.group(1))
        if i >= cfg.num_hidden_layers:  # multi-token-prediction layers (DeepSeek-V3 style) are not part of kimi
            n_mtp = int(cfg.source.get("num_nextn_predict_layers") or 0)
            return None if i < cfg.num_hidden_layers + n_mtp else (name, None)
        if cfg.mlp_types[i] == "dense" and ".block_sparse_moe." in name:
            return name.replace(".block_sparse_moe.", ".mlp."), None
    return name, None


# ---- loading ----------------------------------------------------------------------------------------------------
def resolve_dtype(dtype, cfg: ModelConfig) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported, expected one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported, expected one of {', '.join(DTYPES)}")
    return dtype or DTYPES.get(cfg.torch_dtype, torch.bfloat16)


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               quantized: str = "keep"):
    """Load an HF-layout directory of safetensors as a Transformer in eval mode.

    dtype: the compute dtype (default: the config's torch_dtype); A_log, dt_bias and the router's correction bias
    stay fp32. quantized: for FP8 / INT4 checkpoints, "keep" holds the quantised weights in memory and runs
    weight-only FP8 / INT4 linears (MLA's kv_b_proj excepted: it is dequantised, see model/quantize.py);
    "dequantize" turns every quantised weight into a dense one in `dtype`. Every problem (missing shard, corrupt
    file, wrong shape or dtype, unknown or missing tensor, unsupported quantization_config, pickles) raises
    ValueError naming the file and tensor before any model is returned.
    """
    if quantized not in MODES:
        raise ValueError(f"quantized={quantized!r} is not supported, expected one of {', '.join(MODES)}")
    return _load(Path(path), dtype, device, dense_only=DENSE_ONLY if quantized == "keep" else None)


@torch.no_grad()
def _load(path: Path, dtype, device, dense_only: tuple[str, ...] | None):
    """dense_only: names of quantised modules to dequantise after loading (None: all, () none: convert keeps
    every byte as stored)."""
    cfg = ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, cfg)
    device = torch.device(device)
    qc = cfg.source.get("quantization_config")
    scheme = QuantScheme.from_config(qc, f"{path / 'config.json'}") if qc is not None else None
    shards = open_checkpoint(path)
    with torch.device("meta"), _skip_init():
        model = Transformer(cfg)
    if scheme is not None:
        quantize_model(model, scheme, skip=())
    plan, shapes = _plan(model, shards, dtype)
    targets: dict[str, torch.Tensor] = {}
    for file, shard in shards.items():
        try:
            for e, pname, expert, want in plan[file]:
                if pname not in targets:
                    targets[pname] = torch.empty(shapes[pname], dtype=want, device=device)
                    _set(model, pname, targets[pname])
                src = shard.read(e)
                (targets[pname] if expert is None else targets[pname][expert]).copy_(src)
                del src
                shard.release(e)
        finally:
            shard.close()
    _check_int4_shapes(model, path)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if scheme is not None and dense_only != ():
        dequantize_model(model, dtype, None if dense_only is None else lambda n: n.rsplit(".", 1)[-1] in dense_only)
    model.checkpoint_dir = path  # save_model copies the tokenizer files from here
    return model.eval()


@contextlib.contextmanager
def _skip_init():
    """Random init is wasted on meta tensors, and nn.Embedding's normal_ on meta even imports torch's Python
    decompositions (seconds and ~100 MB the first time); every tensor is overwritten by the checkpoint anyway."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *args, **kwargs: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _plan(model: Transformer, shards: dict[str, Shard], dtype: torch.dtype):
    """Match every checkpoint tensor to a model tensor and check names, shapes, dtypes and completeness from the
    headers alone, so nothing is read from a checkpoint that cannot load. Returns ({file: [(entry, model tensor
    name, expert index or None, target dtype)] in file order}, {model tensor name: full shape})."""
    cfg = model.config
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    quant = {f"{n}.{t}" for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)
             for t, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}
    plan: dict[str, list] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    seen: dict[tuple, str] = {}
    for file, shard in shards.items():
        rows = []
        for e in sorted(shard.entries.values(), key=lambda e: e.start):
            target = param_name(e.name, cfg)
            if target is None or (cfg.tie_word_embeddings and e.name == "lm_head.weight"):
                continue
            pname, expert = target
            where = f"{shard.path}: tensor {e.name!r}"
            if pname not in expected:
                raise ValueError(f"{where} is not a parameter of this {cfg.model_type} model"
                                 f"{_unknown_hint(model, pname)}")
            ref = expected[pname]
            if expert is not None and not 0 <= expert < ref.shape[0]:
                raise ValueError(f"{where}: expert {expert} out of range (the model has {ref.shape[0]} experts)")
            shape = tuple(ref.shape[1:] if expert is not None else ref.shape)
            if e.shape != shape:
                raise ValueError(f"{where} has shape {e.shape}, expected {shape}")
            if pname in quant:
                ok = e.dtype == ref.dtype or (pname.endswith("shape") and e.dtype == torch.int64)
                want = ref.dtype
                expect = f"{ref.dtype} as the quantization_config implies"
            else:
                ok = e.dtype in DENSE_DTYPES
                want = torch.float32 if pname.rsplit(".", 1)[-1] in FP32_NAMES else dtype
                expect = "a dense float type (bf16/fp16/fp32); quantised weights need a quantization_config"
            if not ok:
                raise ValueError(f"{where} has dtype {e.dtype}, expected {expect}")
            key = (pname, expert)
            if key in seen:
                raise ValueError(f"{where} duplicates {seen[key]} (both load into {pname})")
            seen[key] = f"{file}: {e.name!r}"
            shapes[pname] = tuple(ref.shape)
            rows.append((e, pname, expert, want))
        plan[file] = rows
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ValueError(f"{model_dir(shards)}: the checkpoint lacks {len(missing)} tensor(s) the model needs, "
                         f"e.g. {missing[:3]}{_ckpt_hint(model, missing[0])}")
    experts_seen: dict[str, set[int]] = {}
    for (pname, expert) in seen:
        if expert is not None:
            experts_seen.setdefault(pname, set()).add(expert)
    for pname, got in experts_seen.items():
        n = expected[pname].shape[0]
        if len(got) != n:
            missing = sorted(set(range(n)) - got)
            raise ValueError(f"{model_dir(shards)}: the checkpoint lacks tensor {_ckpt_name(model, pname, missing[0])!r}"
                             f" (experts {missing[:8]} of {pname})")
    return plan, shapes


def model_dir(shards: dict[str, Shard]) -> Path:
    return next(iter(shards.values())).path.parent


def _ckpt_name(model, pname: str, expert: int) -> str:
    """Checkpoint name of expert `expert`'s slice of the stacked model tensor pname."""
    m = re.match(r"^(.*\.experts)\.(gate_proj|up_proj|down_proj)(\w*)$", pname)
    return f"{expert_module_name(model, m.group(1), expert, m.group(2))}.weight{m.group(3)}" if m else pname


def _ckpt_hint(model, pname: str) -> str:
    name = _ckpt_name(model, pname, 0)
    return f" (checkpoint name {name}, ...)" if name != pname else ""


def _unknown_hint(model, pname: str) -> str:
    """Why a checkpoint tensor has no model tensor: usually a quantised / dense mismatch with config.json."""
    module_name, _, attr = pname.rpartition(".")
    routed = re.match(r"^(.*\.experts)\.(gate_proj|up_proj|down_proj)", pname)
    if routed:
        module_name = routed.group(1)
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return ""
    if isinstance(module, QUANT_MODULES):
        held = sorted(n for n, _ in [*module.named_parameters(), *module.named_buffers()])
        return (f" as config.json's quantization_config has it: {module_name} is quantised and takes {held}, "
                f"but the checkpoint holds it dense")
    if attr.startswith("weight_") or re.search(r"_(scale_inv|packed|scale|shape)$", attr):
        return " (a quantised tensor, but config.json's quantization_config does not quantise this module)"
    return ""


def _check_int4_shapes(model: Transformer, path: Path) -> None:
    """weight_shape must say what the module is: [out, in] for every (expert) weight."""
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            got, want = m.weight_shape.tolist(), [m.out_features, m.in_features]
            if got != want:
                raise ValueError(f"{path}: tensor {name + '.weight_shape'!r} is {got}, expected {want}")
        elif isinstance(m, Int4Experts):
            for proj in PROJS:
                shapes = getattr(m, proj + "_shape")
                o, i = (m.intermediate, m.hidden) if proj != "down_proj" else (m.hidden, m.intermediate)
                bad = ((shapes[:, 0] != o) | (shapes[:, 1] != i)).nonzero()
                if len(bad):
                    e = int(bad[0])
                    cname = expert_module_name(model, name, e, proj) + ".weight_shape"
                    raise ValueError(f"{path}: tensor {cname!r} is {shapes[e].tolist()}, expected {[o, i]}")


def _set(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        grad = module._parameters[attr].requires_grad and tensor.dtype in DENSE_DTYPES
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=grad)


# ---- writing ----------------------------------------------------------------------------------------------------
def checkpoint_tensors(model: Transformer, fmt: str | None = None) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(checkpoint name, producer) for every tensor of the model written in format fmt (None: the model's own:
    its quantised format if it holds quantised modules, else dense in its dtype). Producers make one tensor at
    a time, so writing never holds a second copy of the model."""
    cfg = model.config
    scheme, dense_dtype = _resolve_format(model, fmt)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Fp8BlockLinear, Int4Linear)):
            if cfg.tie_word_embeddings and name == "lm_head":
                continue
            yield from _linear_tensors(name, module, None, None, scheme, dense_dtype)
        elif isinstance(module, Experts):
            E = module.num_experts
            for proj in PROJS:
                for e in range(E):
                    unit = expert_module_name(model, name, e, proj)
                    yield from _linear_tensors(unit, module, proj, e, scheme, dense_dtype)
        else:
            for attr, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                d = torch.float32 if attr in FP32_NAMES else dense_dtype
                yield f"{name}.{attr}", lambda t=t, d=d: t.detach().to(d).contiguous()


def _resolve_format(model: Transformer, fmt: str | None) -> tuple[QuantScheme | None, torch.dtype]:
    """(quantisation scheme or None, dtype of the dense tensors) that format fmt writes. None: the model's own
    quantised format, or dense in the model's dtype."""
    if fmt is None:
        fmt = quantized_format(model)
        if fmt is None:
            return None, model.dtype
    scheme = QuantScheme.for_format(fmt)
    return scheme, torch.float32 if fmt == "fp32" else torch.bfloat16


def _linear_tensors(unit: str, module, proj: str | None, e: int | None, scheme: QuantScheme | None,
                    dense_dtype: torch.dtype):
    """The checkpoint tensors of one linear: an nn.Linear-like module (proj None), or expert e's projection."""
    method = scheme.method if scheme is not None and scheme.targets(unit) else "dense"

    def dense(dtype):
        if proj is None:
            if isinstance(module, (Fp8BlockLinear, Int4Linear)):
                return module.dequantize(dtype)
            return module.weight.detach().to(dtype)
        if isinstance(module, (Fp8Experts, Int4Experts)):
            return module.dense(proj, dtype, e)
        return getattr(module, proj)[e].detach().to(dtype, copy=True)  # a slice: a copy of its own to write

    if method == "dense":
        yield f"{unit}.weight", lambda: dense(dense_dtype).contiguous()
        return
    if method == "fp8-block" and isinstance(module, (Fp8BlockLinear, Fp8Experts)) and module.block == scheme.size:
        if proj is None:  # the stored bytes, as they are
            parts = lambda: {"weight": module.weight.detach().clone(), "weight_scale_inv": module.weight_scale_inv.clone()}
        else:
            parts = lambda: {"weight": getattr(module, proj)[e].clone(),
                             "weight_scale_inv": getattr(module, proj + "_scale_inv")[e].clone()}
    elif method == "fp8-block":
        parts = lambda: dict(zip(("weight", "weight_scale_inv"), quantize_fp8_block(dense(torch.float32), scheme.size)))
    elif isinstance(module, Int4Linear) and module.group_size == scheme.size:
        parts = lambda: {k: v.clone() for k, v in module.state_dict().items()}
    elif isinstance(module, Int4Experts) and module.group == scheme.size:
        parts = lambda: {"weight_packed": module.packed(proj, e).clone(),
                         "weight_scale": getattr(module, proj + "_scale")[e].contiguous().clone(),
                         "weight_shape": getattr(module, proj + "_shape")[e].clone()}
    else:
        def parts():
            w = dense(torch.float32)
            packed, scale = quantize_int4(w, scheme.size)
            return {"weight_packed": packed, "weight_scale": scale,
                    "weight_shape": torch.tensor(list(w.shape), dtype=torch.int32)}
    names = ("weight", "weight_scale_inv") if method == "fp8-block" else ("weight_packed", "weight_scale", "weight_shape")
    box: dict[str, torch.Tensor] = {}

    def take(k):  # the unit's tensors are made together on the first request and handed out one by one
        if not box:
            box.update(parts())
        return box.pop(k)
    for k in names:
        yield f"{unit}.{k}", lambda k=k: take(k)


class ShardWriter:
    """Collects tensors into safetensors shards of at most max_shard_bytes (a bigger tensor gets its own), then
    names them model-0000i-of-0000n.safetensors with an index, or model.safetensors when one is enough."""

    def __init__(self, path: Path, max_shard_bytes: int):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.path, self.max = path, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.total, self.files, self.weight_map = 0, 0, [], {}
        for old in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
            if old.exists():  # a stale shard from an earlier save would be read as part of this model
                old.unlink()

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.max:
            self.flush()
        self.pending[name] = t
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        file = f"model-part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, self.path / file, metadata={"format": "pt"})
        self.weight_map.update({name: file for name in self.pending})
        self.files.append(file)
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self.flush()
        if len(self.files) == 1:
            os.replace(self.path / self.files[0], self.path / "model.safetensors")
            return
        n = len(self.files)
        names = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
        for old, new in names.items():
            os.replace(self.path / old, self.path / new)
        weight_map = {k: names[v] for k, v in self.weight_map.items()}
        (self.path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2) + "\n")


def save_model(model: Transformer, path: str | Path, format: str | None = None, max_shard_bytes: int = 5 * 2**30,
               source: str | Path | None = None, progress: Callable[[int, int], None] | None = None) -> None:
    """Write an HF-layout directory that kimi.load_model (and, for bf16/fp32, transformers) loads.

    format: "bf16", "fp32", "fp8-block" (K2-Instruct's block FP8, every Linear but lm_head), "int4-experts"
    (K2-Thinking's INT4 routed experts), or None for the model's own format. Weights already in the target
    format are written byte for byte; others are quantised from their fp32 (dequantised) values. Writes
    config.json (with the format's quantization_config), generation_config.json, and the tokenizer / chat
    template / remote-code files of `source` (default: the directory the model was loaded from) when it has them.
    progress(done, total) is called after each tensor.
    """
    from kimi.ops.packed_linear import is_packed

    if is_packed(model):
        raise ValueError("this model's weights are packed for CPU inference (kimi.ops.packed_linear) and are not in "
                         "its state dict: save it before handing it to the engine")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    scheme, dense_dtype = _resolve_format(model, format)
    tensors = list(checkpoint_tensors(model, format))
    writer = ShardWriter(path, max_shard_bytes)
    for i, (name, make) in enumerate(tensors):
        writer.add(name, make())
        if progress is not None:
            progress(i + 1, len(tensors))
    writer.close()
    hf = cfg.to_hf_dict()
    hf.pop("quantization_config", None)
    hf.pop("dtype", None)
    if scheme is not None:
        hf["quantization_config"] = scheme.to_config()
    hf["torch_dtype"] = str(dense_dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    source = Path(source) if source is not None else getattr(model, "checkpoint_dir", None)
    copied = []
    if source is not None and Path(source).resolve() != path.resolve():
        for f in [*SIDE_FILES, *(p.name for p in Path(source).glob("*.py"))]:
            if (Path(source) / f).is_file():
                shutil.copyfile(Path(source) / f, path / f)
                copied.append(f)
    if "generation_config.json" not in copied:
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
        if isinstance(gen["eos_token_id"], tuple):
            gen["eos_token_id"] = list(gen["eos_token_id"])
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
