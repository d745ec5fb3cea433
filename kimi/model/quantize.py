"""Quantised execution as module transforms: swap nn.Linear and routed Experts for weight-only block-FP8 / INT4
twins (and back) from outside the model, and read / write the `quantization_config` of the real checkpoints.

Formats and their numerics: ../shared/reference/k2.md §5 (kimi/ops/quant.py implements them). Config fields:
k2.md §1.1 (K2-Instruct: block FP8 on every Linear but lm_head) and §1.2 (K2-Thinking: compressed-tensors
pack-quantized INT4 W4A16, group 32, with an `ignore` list that leaves only the routed experts). Whether a module
is quantised is decided on its checkpoint module name: an nn.Linear by its own name, a routed expert projection
as `...experts.{e}.{gate_proj|up_proj|down_proj}` (Kimi Linear: `w1|w3|w2`), so the real `ignore` lists apply as
written. MLA's absorbed decode reads kv_b_proj's weight as a matrix, so that module is only ever held dense
(DENSE_ONLY): the loader dequantises it into the compute dtype.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kimi.model.moe import Experts
from kimi.ops.quant import (FP8_BLOCK, INT4_GROUP, Fp8BlockLinear, Int4Linear, dequantize_fp8_block,
                            dequantize_int4, fp8_block_linear, int4_cpu_kernel_applies, int4_linear,
                            quantize_fp8_block, quantize_int4, to_checkpoint_layout_, to_cpu_kernel_layout_)

PROJS = ("gate_proj", "up_proj", "down_proj")
KL_PROJS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # Kimi Linear's per-expert checkpoint names
DENSE_ONLY = ("kv_b_proj",)  # read as a matrix by MLA's absorbed decode (model/mla.py attend_absorbed)
FORMATS = ("bf16", "fp32", "fp8-block", "int4-experts")

K2_INSTRUCT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
K2_THINKING_IGNORE = ("lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                      r"re:.*mlp\.(gate|up|gate_up|down)_proj.*")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class QuantScheme:
    """What a quantised checkpoint holds. method: "fp8-block" (square blocks of `size`) or "int4" (groups of
    `size` input columns); ignore: checkpoint module names, or `re:` patterns matched from the name's start."""

    method: str
    size: int
    ignore: tuple[str, ...] = ()

    @classmethod
    def fp8_block(cls, block: int = FP8_BLOCK) -> "QuantScheme":
        return cls("fp8-block", block, ("lm_head",))

    @classmethod
    def int4_experts(cls, group: int = INT4_GROUP) -> "QuantScheme":
        return cls("int4", group, K2_THINKING_IGNORE)

    @classmethod
    def for_format(cls, fmt: str) -> "QuantScheme | None":
        """The scheme a save format writes (None: dense)."""
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r} is not supported, expected one of {', '.join(FORMATS)}")
        return {"fp8-block": cls.fp8_block, "int4-experts": cls.int4_experts}.get(fmt, lambda: None)()

    def targets(self, name: str) -> bool:
        """True if the Linear with this checkpoint module name is quantised."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], name):
                    return False
            elif pattern == name:
                return False
        return True

    def to_config(self) -> dict:
        """The quantization_config of config.json, field for field as in K2-Instruct / K2-Thinking."""
        if self.method == "fp8-block":
            if self.ignore != ("lm_head",):
                raise ValueError("block-FP8 configs cannot express an ignore list other than lm_head")
            return {**K2_INSTRUCT_CONFIG, "weight_block_size": [self.size, self.size]}
        weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": self.size,
                   "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                   "symmetric": True, "type": "int"}
        return {"config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                              "targets": ["Linear"], "weights": weights}},
                "format": "pack-quantized", "ignore": list(self.ignore), "kv_cache_scheme": None,
                "quant_method": "compressed-tensors", "quantization_status": "compressed"}

    @classmethod
    def from_config(cls, qc, where: str) -> "QuantScheme":
        """Parse a config.json quantization_config; anything we cannot execute exactly is a ValueError."""
        if not isinstance(qc, dict):
            raise ValueError(f"{where}: quantization_config must be an object, got {qc!r}")
        method = qc.get("quant_method")
        if method == "fp8":
            return _fp8_from_config(qc, where)
        if method == "compressed-tensors":
            return _int4_from_config(qc, where)
        raise ValueError(f"{where}: quantization_config quant_method {method!r} is not supported, expected 'fp8' "
                         "(block FP8, as Kimi-K2-Instruct) or 'compressed-tensors' (INT4 pack-quantized, as "
                         "Kimi-K2-Thinking)")


def _unsupported(where: str, field: str, value, expected: str) -> ValueError:
    return ValueError(f"{where}: quantization_config {field} = {value!r} is not supported, expected {expected}")


def _fp8_from_config(qc: dict, where: str) -> QuantScheme:
    known = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "modules_to_not_convert", "scale_fmt"}
    extra = sorted(set(qc) - known)
    if extra:
        raise ValueError(f"{where}: fp8 quantization_config has fields we do not support: {extra} "
                         f"(known: {sorted(known)})")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _unsupported(where, "fmt", qc["fmt"], "'e4m3'")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise _unsupported(where, "activation_scheme", qc["activation_scheme"], "'dynamic' (no stored input scales)")
    if qc.get("modules_to_not_convert"):
        raise _unsupported(where, "modules_to_not_convert", qc["modules_to_not_convert"], "null or []")
    if qc.get("scale_fmt") not in (None, "ue8m0"):  # ue8m0 only restricts scale values to powers of two
        raise _unsupported(where, "scale_fmt", qc["scale_fmt"], "null or 'ue8m0'")
    bs = qc.get("weight_block_size")
    if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs) and bs[0] == bs[1]):
        raise _unsupported(where, "weight_block_size", bs, "square blocks [b, b], e.g. [128, 128]")
    return QuantScheme.fp8_block(bs[0])


def _int4_from_config(qc: dict, where: str) -> QuantScheme:
    if qc.get("format") != "pack-quantized":
        raise _unsupported(where, "format", qc.get("format"), "'pack-quantized'")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise _unsupported(where, "quantization_status", qc["quantization_status"], "'compressed'")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if qc.get(field):
            raise _unsupported(where, field, qc[field], "null")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _unsupported(where, "config_groups", groups, "exactly one group")
    (gname, group), = groups.items()
    if not isinstance(group, dict):
        raise _unsupported(where, f"config_groups.{gname}", group, "an object")
    if group.get("targets") != ["Linear"]:
        raise _unsupported(where, f"config_groups.{gname}.targets", group.get("targets"), "['Linear']")
    for field in ("input_activations", "output_activations"):
        if group.get(field) is not None:
            raise _unsupported(where, f"config_groups.{gname}.{field}", group[field], "null (weight-only)")
    if group.get("format", "pack-quantized") != "pack-quantized":
        raise _unsupported(where, f"config_groups.{gname}.format", group["format"], "'pack-quantized'")
    w = group.get("weights")
    if not isinstance(w, dict):
        raise _unsupported(where, f"config_groups.{gname}.weights", w, "an object")
    want = {"num_bits": 4, "type": "int", "strategy": "group", "symmetric": True, "dynamic": False}
    for field, value in want.items():
        if w.get(field) != value:
            raise _unsupported(where, f"config_groups.{gname}.weights.{field}", w.get(field), repr(value))
    for field in ("actorder", "block_structure", "zp_dtype"):
        if w.get(field) is not None:
            raise _unsupported(where, f"config_groups.{gname}.weights.{field}", w[field], "null")
    size = w.get("group_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise _unsupported(where, f"config_groups.{gname}.weights.group_size", size, "a positive integer")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise _unsupported(where, "ignore", ignore, "a list of module names and 're:' patterns")
    for p in ignore:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{where}: quantization_config ignore pattern {p!r} is not a valid regex: {e}") from None
    return QuantScheme("int4", size, tuple(ignore))


# ---- quantised routed experts -----------------------------------------------------------------------------------
class Fp8Experts(Experts):
    """Routed experts in block FP8: `{proj}` float8_e4m3fn [E, out, in] (frozen) and `{proj}_scale_inv` fp32
    [E, ceil(out/b), ceil(in/b)]; the checkpoint's `experts.{e}.{proj}.weight` / `.weight_scale_inv` are slices."""

    quantized = True  # Transformer.cast leaves its tensors' dtypes alone

    def __init__(self, num_experts: int, hidden: int, intermediate: int, block: int = FP8_BLOCK, device=None):
        nn.Module.__init__(self)  # Experts.__init__ would allocate the dense stacks
        self.num_experts, self.hidden, self.intermediate, self.block = num_experts, hidden, intermediate, block
        for proj, (o, i) in _proj_shapes(hidden, intermediate).items():
            w = torch.zeros(num_experts, o, i, dtype=torch.float8_e4m3fn, device=device)
            self.register_parameter(proj, nn.Parameter(w, requires_grad=False))
            s = torch.ones(num_experts, _cdiv(o, block), _cdiv(i, block), dtype=torch.float32, device=device)
            self.register_buffer(proj + "_scale_inv", s)

    def _linear(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return fp8_block_linear(x, getattr(self, proj)[e], getattr(self, proj + "_scale_inv")[e], self.block)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self._linear("gate_proj", e, x)) * self._linear("up_proj", e, x)
        return self._linear("down_proj", e, h)

    def dense(self, proj: str, dtype: torch.dtype, e: int | None = None) -> torch.Tensor:
        """Dequantised [E, out, in] (or one expert's [out, in])."""
        w, s = getattr(self, proj), getattr(self, proj + "_scale_inv")
        return dequantize_fp8_block(w if e is None else w[e], s if e is None else s[e], dtype, self.block)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, intermediate={self.intermediate}, fp8 block={self.block}"


class Int4Experts(Experts):
    """Routed experts in INT4 W4A16 (K2-Thinking): `{proj}_packed` int32 [E, out, ceil(in/8)], `{proj}_scale`
    bf16 [E, out, ceil(in/g)], `{proj}_shape` int32 [E, 2]; the checkpoint's `experts.{e}.{proj}.weight_packed`
    / `.weight_scale` / `.weight_shape` are slices. About 0.56 byte per weight.

    As Int4Linear does, the first CPU forward that torch's int4 kernel can serve rewrites a projection's packed
    bytes in place into the kernel's nibble order (and stores its scales column-major per expert); state_dict()
    and dense() still give the checkpoint order, and a device move restores it first."""

    quantized = True  # Transformer.cast leaves its tensors' dtypes alone

    def __init__(self, num_experts: int, hidden: int, intermediate: int, group: int = INT4_GROUP, device=None):
        nn.Module.__init__(self)
        self.num_experts, self.hidden, self.intermediate, self.group = num_experts, hidden, intermediate, group
        for proj, (o, i) in _proj_shapes(hidden, intermediate).items():
            kw = dict(device=device)
            self.register_buffer(proj + "_packed", torch.zeros(num_experts, o, _cdiv(i, 8), dtype=torch.int32, **kw))
            self.register_buffer(proj + "_scale", torch.ones(num_experts, o, _cdiv(i, group), dtype=torch.bfloat16, **kw))
            self.register_buffer(proj + "_shape", torch.tensor([[o, i]] * num_experts, dtype=torch.int32, **kw))
        self._kernel: dict[str, tuple] = {}  # proj -> (weakref to the packed tensor, its version) in kernel order

    def in_features(self, proj: str) -> int:
        return self.intermediate if proj == "down_proj" else self.hidden

    def kernel_layout(self, proj: str) -> bool:
        t, stamp = getattr(self, proj + "_packed"), self._kernel.get(proj)
        return stamp is not None and stamp[0]() is t and t._version == stamp[1]

    def _set_layout(self, proj: str, kernel: bool) -> None:
        if kernel == self.kernel_layout(proj):
            return
        packed = getattr(self, proj + "_packed")
        (to_cpu_kernel_layout_ if kernel else to_checkpoint_layout_)(packed)
        if kernel:
            self._kernel[proj] = (weakref.ref(packed), packed._version)
            # same values, each expert's [out, G] stored column-major: the kernel reads scales as [G, out]
            s = getattr(self, proj + "_scale")
            setattr(self, proj + "_scale", s.transpose(1, 2).contiguous().transpose(1, 2))
        else:
            self._kernel.pop(proj, None)

    def _linear(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        packed, n_in = getattr(self, proj + "_packed"), self.in_features(proj)
        kernel = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                  and int4_cpu_kernel_applies(packed, n_in, self.group))
        if kernel or self.kernel_layout(proj):
            self._set_layout(proj, kernel)
        return int4_linear(x, getattr(self, proj + "_packed")[e], getattr(self, proj + "_scale")[e], n_in,
                           self.group, kernel_layout=kernel)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self._linear("gate_proj", e, x)) * self._linear("up_proj", e, x)
        return self._linear("down_proj", e, h)

    def packed(self, proj: str, e: int | None = None) -> torch.Tensor:
        """weight_packed in checkpoint order (a copy when the module holds the kernel's order)."""
        t = getattr(self, proj + "_packed")
        t = t if e is None else t[e]
        return to_checkpoint_layout_(t.clone()) if self.kernel_layout(proj) else t

    def dense(self, proj: str, dtype: torch.dtype, e: int | None = None) -> torch.Tensor:
        s = getattr(self, proj + "_scale")
        o, i = _proj_shapes(self.hidden, self.intermediate)[proj]
        return dequantize_int4(self.packed(proj, e), s if e is None else s[e], (o, i), dtype, self.group)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for proj in PROJS:
            destination[prefix + proj + "_scale"] = getattr(self, proj + "_scale").detach().contiguous()
            if self.kernel_layout(proj):
                destination[prefix + proj + "_packed"] = self.packed(proj).detach()

    def _apply(self, fn, recurse=True):
        for proj in PROJS:  # a move copies bytes, not the layout stamp
            self._set_layout(proj, False)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, intermediate={self.intermediate}, int4 group={self.group}"


def _proj_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    return {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}


QUANT_MODULES = (Fp8BlockLinear, Int4Linear, Fp8Experts, Int4Experts)


# ---- names ------------------------------------------------------------------------------------------------------
def expert_module_name(model, experts_name: str, e: int, proj: str) -> str:
    """Checkpoint module name of one routed expert projection (Kimi Linear names when model is a kimi_linear
    Transformer; K2's for anything else)."""
    cfg = getattr(model, "config", None)
    ckpt_proj = KL_PROJS[proj] if getattr(cfg, "model_type", None) == "kimi_linear" else proj
    return f"{experts_name}.{e}.{ckpt_proj}"


def _experts_targeted(model, name: str, experts: Experts, scheme: QuantScheme) -> bool:
    hits = {scheme.targets(expert_module_name(model, name, e, p)) for e in range(experts.num_experts) for p in PROJS}
    if len(hits) > 1:
        raise ValueError(f"quantization_config quantises only some of {name}'s expert projections; kimi stacks "
                         "experts and needs all or none of them quantised")
    return hits.pop()


def experts_dims(experts: Experts) -> tuple[int, int, int]:
    """(E, hidden, intermediate) of any Experts variant."""
    if hasattr(experts, "hidden"):
        return experts.num_experts, experts.hidden, experts.intermediate
    E, inter, hidden = experts.gate_proj.shape
    return E, hidden, inter


def quantized_format(model) -> str | None:
    """"fp8-block" or "int4-experts" if the model holds quantised modules, else None."""
    kinds = {type(m) for m in model.modules()}
    if kinds & {Fp8BlockLinear, Fp8Experts}:
        return "fp8-block"
    if kinds & {Int4Linear, Int4Experts}:
        return "int4-experts"
    return None


# ---- transforms -------------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_model(model, scheme: QuantScheme | str, skip: tuple[str, ...] = DENSE_ONLY):
    """Swap, in place, every nn.Linear and dense Experts the scheme targets for its weight-only twin, quantising
    the current weights (on the meta device: the structure only). Modules whose last name is in `skip` stay
    dense. Returns the model."""
    if isinstance(scheme, str):
        scheme = QuantScheme.for_format(scheme)
        if scheme is None:
            raise ValueError("quantize_model needs a quantised format: 'fp8-block' or 'int4-experts'")
    fp8 = scheme.method == "fp8-block"
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in skip:
            continue
        if type(module) is nn.Linear and module.bias is None and scheme.targets(name):
            w = module.weight
            if w.is_meta:
                cls = Fp8BlockLinear if fp8 else Int4Linear
                new = cls(module.in_features, module.out_features, scheme.size, device="meta")
            else:
                new = (Fp8BlockLinear if fp8 else Int4Linear).from_float(w.detach(), scheme.size)
            model.set_submodule(name, new)
        elif type(module) is Experts and _experts_targeted(model, name, module, scheme):
            E, hidden, inter = experts_dims(module)
            device = module.gate_proj.device
            new = (Fp8Experts if fp8 else Int4Experts)(E, hidden, inter, scheme.size, device=device)
            if not module.gate_proj.is_meta:
                for proj in PROJS:
                    dense = getattr(module, proj)
                    for e in range(E):  # one expert at a time keeps the fp32 temporaries small
                        if fp8:
                            q, s = quantize_fp8_block(dense[e], scheme.size)
                            getattr(new, proj)[e] = q
                            getattr(new, proj + "_scale_inv")[e] = s
                        else:
                            p, s = quantize_int4(dense[e], scheme.size)
                            getattr(new, proj + "_packed")[e] = p
                            getattr(new, proj + "_scale")[e] = s
                    delattr(module, proj)  # free the dense stack before the next projection is quantised
            model.set_submodule(name, new)
    return model


@torch.no_grad()
def dequantize_model(model, dtype: torch.dtype, only=None):
    """Swap, in place, quantised modules back to nn.Linear / Experts holding fl(q * scale) in `dtype` (computed
    in fp32 and rounded once). only: a predicate on the module name (None: all). Returns the model."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, QUANT_MODULES) or (only is not None and not only(name)):
            continue
        if isinstance(module, (Fp8BlockLinear, Int4Linear)):
            with torch.device("meta"):
                new = nn.Linear(module.in_features, module.out_features, bias=False)
            new.weight = nn.Parameter(module.dequantize(dtype))
        else:
            E, hidden, inter = experts_dims(module)
            with torch.device("meta"):
                new = Experts(E, hidden, inter)
            for proj in PROJS:
                setattr(new, proj, nn.Parameter(module.dense(proj, dtype)))
                for suffix in ("", "_scale_inv", "_packed", "_scale", "_shape"):  # free as we go
                    if hasattr(module, proj + suffix):
                        delattr(module, proj + suffix)
        model.set_submodule(name, new)
    return model
