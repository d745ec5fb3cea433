"""ModelConfig: one frozen dataclass read from a Hugging Face `config.json`.

Reads the configs of Kimi-K2 (`kimi_k2` / `deepseek_v3`), Kimi-K2.5 (`kimi_k25` wrapping a `text_config`) and
Kimi Linear (`kimi_linear`, both the 1-indexed `linear_attn_config` form and the `layer_types` form written by
transformers >= 5). Everything the model needs is derived and checked here, once: the per-layer attention kind
(mla | kda) and mlp kind (dense | moe), head dims, RoPE/YaRN parameters and routing parameters.
Field meanings and real values: ../shared/reference/k2.md §1 and kda.md §0, §5.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

K2_TYPES = ("kimi_k2", "deepseek_v3")
SUPPORTED_TYPES = (*K2_TYPES, "kimi_k25", "kimi_linear")


@dataclass(frozen=True)
class YaRN:
    """YaRN RoPE scaling (k2.md §3). `mscale`/`mscale_all_dim` as in the HF config (0 = absent)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "deepseek_v3" (the K2 family) or "kimi_linear"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int  # dense SwiGLU width (first_k_dense_replace layers)
    rms_norm_eps: float
    # MLA
    num_attention_heads: int
    q_lora_rank: int | None  # None: a plain q_proj (Kimi Linear)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    use_rope: bool  # False: NoPE MLA (Kimi Linear); the rope slice of q/k is still there, just not rotated
    rope_theta: float
    rope_scaling: YaRN | None
    # MoE
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # KDA (Kimi Linear only; zero elsewhere)
    kda_num_heads: int
    kda_head_dim: int
    short_conv_kernel_size: int
    # per layer, 0-indexed
    layer_types: tuple[str, ...]  # "mla" | "kda"
    mlp_types: tuple[str, ...]  # "dense" | "moe"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    # the config.json this came from, kept verbatim so saving a model round-trips every field
    source: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    # ---- derived --------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN (k2.md §2.2, §3 step 7)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def is_hybrid(self) -> bool:
        return "kda" in self.layer_types

    @property
    def num_mla_layers(self) -> int:
        return self.layer_types.count("mla")

    @property
    def num_kda_layers(self) -> int:
        return self.layer_types.count("kda")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def moe_module_name(self) -> str:
        """Checkpoint name of the FFN module on MoE layers: K2 `mlp`, Kimi Linear `block_sparse_moe`."""
        return "block_sparse_moe" if self.model_type == "kimi_linear" else "mlp"

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read a model directory's config.json, or a bare config.json path."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no config.json at {path}: expected a model directory or a config.json file")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type == "kimi_k25":
            text = d.get("text_config")
            if not isinstance(text, dict):
                raise ValueError("kimi_k25 config: field 'text_config' must be an object holding the K2 text model")
            return cls.from_dict({"model_type": "deepseek_v3", **{k: v for k, v in text.items() if k != "model_type"}})
        if model_type in K2_TYPES:
            return _from_k2(d)
        if model_type == "kimi_linear":
            return _from_kimi_linear(d)
        raise ValueError(f"config field 'model_type' is {model_type!r}: expected one of {', '.join(SUPPORTED_TYPES)}")

    def replace(self, **changes) -> "ModelConfig":
        """A changed copy; it no longer mirrors its source config.json, so the source is dropped."""
        return _validated(dataclasses.replace(self, source={}, **changes))

    def to_hf_dict(self) -> dict:
        """The config.json to write beside a saved model: the source dict when we have one, else a fresh one."""
        if self.source:
            return dict(self.source)
        return _to_hf(self)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---- readers ------------------------------------------------------------------------------------------
class _Reader:
    """Field access with errors that name the field and what was expected."""

    def __init__(self, d: dict, kind: str):
        self.d, self.kind = d, kind

    def req(self, name: str, typ=int, *aliases: str):
        for key in (name, *aliases):
            if self.d.get(key) is not None:
                return self._check(key, self.d[key], typ)
        raise ValueError(f"{self.kind} config: required field {name!r} is missing (expected {typ.__name__})")

    def opt(self, name: str, default, typ=None, *aliases: str):
        for key in (name, *aliases):
            if self.d.get(key) is not None:
                return self._check(key, self.d[key], typ or type(default))
        return default

    def _check(self, key, value, typ):
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typ is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"{self.kind} config: field {key!r} = {value!r}, expected {typ.__name__}")
        return value


def _rope(r: _Reader, d: dict) -> tuple[float, YaRN | None]:
    """rope_theta and YaRN from either `rope_scaling` (HF v4) or `rope_parameters` (HF v5)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{r.kind} config: 'rope_scaling' must be an object or null, got {params!r}")
    theta = float(params.get("rope_theta", r.opt("rope_theta", 10000.0, float)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise ValueError(f"{r.kind} config: rope type {kind!r} is not supported, expected 'yarn' or none")
    try:
        yarn = YaRN(
            factor=float(params["factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            mscale=float(params.get("mscale") or 0),
            mscale_all_dim=float(params.get("mscale_all_dim") or 0),
        )
    except KeyError as e:
        raise ValueError(f"{r.kind} config: yarn rope scaling needs field {e.args[0]!r}") from None
    if params.get("truncate", True) is not True or params.get("attention_factor") is not None:
        raise ValueError(f"{r.kind} config: yarn 'truncate'/'attention_factor' overrides are not supported")
    if yarn.factor < 1:
        raise ValueError(f"{r.kind} config: yarn factor {yarn.factor} must be >= 1")
    return theta, yarn


def _eos(r: _Reader):
    eos = r.d.get("eos_token_id")
    if isinstance(eos, list):
        return tuple(int(x) for x in eos)
    return r.opt("eos_token_id", None, int)


def _common(r: _Reader, d: dict) -> dict:
    """The fields both families read the same way: sizes, MLA shapes, special ids, init, dtype, the source."""
    return dict(
        vocab_size=r.req("vocab_size"),
        hidden_size=r.req("hidden_size"),
        intermediate_size=r.req("intermediate_size"),
        num_attention_heads=r.req("num_attention_heads"),
        q_lora_rank=r.opt("q_lora_rank", None, int),
        kv_lora_rank=r.req("kv_lora_rank"),
        qk_nope_head_dim=r.req("qk_nope_head_dim"),
        qk_rope_head_dim=r.req("qk_rope_head_dim"),
        v_head_dim=r.req("v_head_dim"),
        bos_token_id=r.opt("bos_token_id", None, int),
        eos_token_id=_eos(r),
        pad_token_id=r.opt("pad_token_id", None, int),
        initializer_range=r.opt("initializer_range", 0.02, float),
        torch_dtype=r.opt("torch_dtype", r.opt("dtype", "bfloat16", str), str),
        source=d,
    )


def _from_k2(d: dict) -> ModelConfig:
    r = _Reader(d, d["model_type"])
    if r.opt("hidden_act", "silu", str) != "silu":
        raise ValueError(f"{r.kind} config: hidden_act {d['hidden_act']!r} is not supported, expected 'silu'")
    if r.opt("scoring_func", "sigmoid", str) != "sigmoid":
        raise ValueError(f"{r.kind} config: scoring_func {d['scoring_func']!r} is not supported, expected 'sigmoid'")
    if r.opt("topk_method", "noaux_tc", str) != "noaux_tc":
        raise ValueError(f"{r.kind} config: topk_method {d['topk_method']!r} is not supported, expected 'noaux_tc'")
    if r.opt("attention_bias", False, bool):
        raise ValueError(f"{r.kind} config: attention_bias=true is not supported (K2 has no projection biases)")
    if not r.opt("rope_interleave", True, bool):
        raise ValueError(f"{r.kind} config: rope_interleave=false is not supported (K2 uses interleaved pairs)")
    n_layers = r.req("num_hidden_layers")
    first_dense = r.opt("first_k_dense_replace", 3, int)
    freq = r.opt("moe_layer_freq", 1, int)
    n_experts = r.opt("n_routed_experts", 256, int, "num_local_experts")
    theta, yarn = _rope(r, d)
    mlp_types = tuple(
        "moe" if n_experts and i >= first_dense and i % freq == 0 else "dense" for i in range(n_layers)
    )
    return _validated(
        ModelConfig(
            model_type="deepseek_v3",
            **_common(r, d),
            num_hidden_layers=n_layers,
            rms_norm_eps=r.opt("rms_norm_eps", 1e-6, float),
            use_rope=True,
            rope_theta=theta,
            rope_scaling=yarn,
            n_routed_experts=n_experts,
            num_experts_per_tok=r.opt("num_experts_per_tok", 8, int),
            n_shared_experts=r.opt("n_shared_experts", 1, int),
            moe_intermediate_size=r.opt("moe_intermediate_size", 2048, int),
            n_group=r.opt("n_group", 8, int),
            topk_group=r.opt("topk_group", 4, int),
            norm_topk_prob=r.opt("norm_topk_prob", True, bool),
            routed_scaling_factor=r.opt("routed_scaling_factor", 2.5, float),
            kda_num_heads=0,
            kda_head_dim=0,
            short_conv_kernel_size=0,
            layer_types=("mla",) * n_layers,
            mlp_types=mlp_types,
            tie_word_embeddings=r.opt("tie_word_embeddings", False, bool),
            max_position_embeddings=r.opt("max_position_embeddings", 4096, int),
        )
    )


def _kimi_linear_layers(r: _Reader, n_layers: int) -> tuple[str, ...]:
    """Per-layer attention kind from `layer_types` (0-indexed, HF v5) or `linear_attn_config` (1-indexed lists)."""
    names = {"linear_attention": "kda", "full_attention": "mla", "kda": "kda", "mla": "mla"}
    lt = r.d.get("layer_types")
    if lt is not None:
        if not isinstance(lt, list) or len(lt) != n_layers or any(t not in names for t in lt):
            raise ValueError(
                f"kimi_linear config: 'layer_types' must list {n_layers} entries of "
                f"'linear_attention'/'full_attention', got {lt!r}"
            )
        return tuple(names[t] for t in lt)
    lac = r.d.get("linear_attn_config") or {}
    kda, full = lac.get("kda_layers"), lac.get("full_attn_layers")
    if kda is None or full is None:
        raise ValueError("kimi_linear config: need 'layer_types' or 'linear_attn_config' with 'kda_layers' and "
                         "'full_attn_layers' (1-indexed layer numbers)")
    types: list[str | None] = [None] * n_layers
    for kind, layers in (("kda", kda), ("mla", full)):
        for n in layers:
            if not isinstance(n, int) or not 1 <= n <= n_layers:
                raise ValueError(f"kimi_linear config: linear_attn_config layer {n!r} is out of range: the lists "
                                 f"are 1-indexed, expected 1..{n_layers}")
            if types[n - 1] is not None:
                raise ValueError(f"kimi_linear config: layer {n} (1-indexed) is listed as both kda and full attention")
            types[n - 1] = kind
    missing = [i + 1 for i, t in enumerate(types) if t is None]
    if missing:
        raise ValueError(f"kimi_linear config: layers {missing} (1-indexed) are in neither kda_layers nor full_attn_layers")
    return tuple(types)


def _from_kimi_linear(d: dict) -> ModelConfig:
    r = _Reader(d, "kimi_linear")
    if r.opt("hidden_act", "silu", str) != "silu":
        raise ValueError(f"kimi_linear config: hidden_act {d['hidden_act']!r} is not supported, expected 'silu'")
    act = r.opt("moe_router_activation_func", "sigmoid", str)
    if act != "sigmoid":
        raise ValueError(f"kimi_linear config: moe_router_activation_func {act!r} is not supported, expected 'sigmoid'")
    if not r.opt("mla_use_nope", True, bool):
        raise ValueError("kimi_linear config: mla_use_nope=false is not supported (Kimi Linear MLA layers are NoPE)")
    if r.d.get("gate_lower_bound") is not None:
        raise ValueError("kimi_linear config: 'gate_lower_bound' (safe KDA gate) is not supported")
    n_layers = r.req("num_hidden_layers")
    lac = r.d.get("linear_attn_config") or {}
    lac_r = _Reader(lac, "kimi_linear linear_attn_config")
    first_dense = r.opt("first_k_dense_replace", 1, int)
    freq = r.opt("moe_layer_freq", 1, int)
    mlt = r.d.get("mlp_layer_types")
    if mlt is not None:
        if not isinstance(mlt, list) or len(mlt) != n_layers or any(t not in ("dense", "sparse") for t in mlt):
            raise ValueError(f"kimi_linear config: 'mlp_layer_types' must list {n_layers} of 'dense'/'sparse'")
        mlp_types = tuple("moe" if t == "sparse" else "dense" for t in mlt)
    else:
        mlp_types = tuple("moe" if i >= first_dense and i % freq == 0 else "dense" for i in range(n_layers))
    layer_types = _kimi_linear_layers(r, n_layers)
    return _validated(
        ModelConfig(
            model_type="kimi_linear",
            **_common(r, d),
            num_hidden_layers=n_layers,
            rms_norm_eps=r.opt("rms_norm_eps", 1e-5, float),
            use_rope=False,
            rope_theta=r.opt("rope_theta", 10000.0, float),
            rope_scaling=None,
            n_routed_experts=r.opt("num_experts", 256, int, "num_local_experts", "n_routed_experts"),
            num_experts_per_tok=r.opt("num_experts_per_token", 8, int, "num_experts_per_tok"),
            n_shared_experts=r.opt("num_shared_experts", 1, int, "n_shared_experts"),
            moe_intermediate_size=r.req("moe_intermediate_size"),
            n_group=r.opt("num_expert_group", 1, int, "n_group"),
            topk_group=r.opt("topk_group", 1, int),
            norm_topk_prob=r.opt("moe_renormalize", True, bool, "norm_topk_prob"),
            routed_scaling_factor=r.opt("routed_scaling_factor", 2.446, float),  # transformers' default
            kda_num_heads=lac_r.opt("num_heads", r.opt("linear_num_heads", 32, int), int),
            kda_head_dim=lac_r.opt("head_dim", r.opt("linear_head_dim", 128, int), int),
            short_conv_kernel_size=lac_r.opt("short_conv_kernel_size", r.opt("linear_conv_kernel_dim", 4, int), int),
            layer_types=layer_types,
            mlp_types=mlp_types,
            tie_word_embeddings=r.opt("tie_word_embeddings", False, bool),
            max_position_embeddings=r.opt("model_max_length", 1048576, int, "max_position_embeddings"),
        )
    )


def _validated(c: ModelConfig) -> ModelConfig:
    kind = c.model_type

    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(f"{kind} config: {msg}")

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                 "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        need(getattr(c, name) > 0, f"{name} = {getattr(c, name)}, expected a positive integer")
    need(c.qk_rope_head_dim >= 0 and c.qk_rope_head_dim % 2 == 0,
         f"qk_rope_head_dim = {c.qk_rope_head_dim}, expected an even integer >= 0 (RoPE rotates pairs)")
    need(c.q_lora_rank is None or c.q_lora_rank > 0, f"q_lora_rank = {c.q_lora_rank}, expected null or > 0")
    need(c.rms_norm_eps > 0, f"rms_norm_eps = {c.rms_norm_eps}, expected > 0")
    if "moe" in c.mlp_types:
        need(c.n_routed_experts > 0, f"n_routed_experts = {c.n_routed_experts}, expected > 0 for MoE layers")
        need(0 < c.num_experts_per_tok <= c.n_routed_experts,
             f"num_experts_per_tok = {c.num_experts_per_tok}, expected 1..n_routed_experts ({c.n_routed_experts})")
        need(c.moe_intermediate_size > 0, f"moe_intermediate_size = {c.moe_intermediate_size}, expected > 0")
        need(c.n_group > 0 and c.n_routed_experts % c.n_group == 0,
             f"n_group = {c.n_group} must divide n_routed_experts = {c.n_routed_experts}")
        need(0 < c.topk_group <= c.n_group, f"topk_group = {c.topk_group}, expected 1..n_group ({c.n_group})")
        per_group = c.n_routed_experts // c.n_group
        need(c.n_group == 1 or per_group >= 2,
             f"grouped routing scores each group by its top-2 experts: n_routed_experts/n_group = {per_group} < 2")
        need(c.num_experts_per_tok <= c.topk_group * per_group,
             f"num_experts_per_tok = {c.num_experts_per_tok} exceeds the experts in topk_group groups "
             f"({c.topk_group} x {per_group})")
        need(c.n_shared_experts >= 0, f"n_shared_experts = {c.n_shared_experts}, expected >= 0")
    if c.is_hybrid:
        need(c.kda_num_heads > 0 and c.kda_head_dim > 0,
             f"KDA heads x head_dim = {c.kda_num_heads} x {c.kda_head_dim}, expected positive")
        need(c.short_conv_kernel_size >= 1, f"short_conv_kernel_size = {c.short_conv_kernel_size}, expected >= 1")
    need(len(c.layer_types) == c.num_hidden_layers and len(c.mlp_types) == c.num_hidden_layers,
         "layer lists must have num_hidden_layers entries")
    if c.rope_scaling is not None:
        need(c.rope_scaling.original_max_position_embeddings > 0, "yarn original_max_position_embeddings must be > 0")
    return c


def _to_hf(c: ModelConfig) -> dict:
    """A config.json in the model family's real layout, for configs built in code (tests, kimi's own models)."""
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
        q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, hidden_act="silu",
        rms_norm_eps=c.rms_norm_eps, routed_scaling_factor=c.routed_scaling_factor, topk_group=c.topk_group,
        first_k_dense_replace=c.mlp_types.index("moe") if "moe" in c.mlp_types else c.num_hidden_layers,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        pad_token_id=c.pad_token_id, initializer_range=c.initializer_range, torch_dtype=c.torch_dtype,
        attention_bias=False, use_cache=True,
    )
    if c.model_type == "kimi_linear":
        return dict(
            architectures=["KimiLinearForCausalLM"], model_type="kimi_linear", **common,
            num_experts=c.n_routed_experts, num_experts_per_token=c.num_experts_per_tok,
            num_shared_experts=c.n_shared_experts, num_expert_group=c.n_group, moe_renormalize=c.norm_topk_prob,
            moe_router_activation_func="sigmoid", use_grouped_topk=True, moe_layer_freq=1, mla_use_nope=True,
            model_max_length=c.max_position_embeddings, rope_theta=c.rope_theta, rope_scaling=None,
            num_nextn_predict_layers=0,
            linear_attn_config=dict(
                kda_layers=[i + 1 for i, t in enumerate(c.layer_types) if t == "kda"],
                full_attn_layers=[i + 1 for i, t in enumerate(c.layer_types) if t == "mla"],
                head_dim=c.kda_head_dim, num_heads=c.kda_num_heads, short_conv_kernel_size=c.short_conv_kernel_size,
            ),
            mlp_layer_types=["sparse" if t == "moe" else "dense" for t in c.mlp_types],
        )
    rope = None
    if c.rope_scaling is not None:
        rope = {"type": "yarn", **asdict(c.rope_scaling)}
    return dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2", **common,
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
        n_shared_experts=c.n_shared_experts, n_group=c.n_group, norm_topk_prob=c.norm_topk_prob,
        scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1, num_nextn_predict_layers=0,
        max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta, rope_scaling=rope,
    )
