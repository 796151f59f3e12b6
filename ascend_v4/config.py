"""Model configuration for DeepSeek V4 (spec: deepseek_v4.md §2 hyper-parameters, §3 layer schedule).

One dataclass, :class:`ModelConfig`, describes every V4 variant.  It is read from

* our own YAML presets shipped in ``ascend_v4/presets`` (keys are the dataclass field names), or
* the official ``config.json`` published with the V4 checkpoints (Hugging Face style keys such as
  ``hidden_size``, ``num_hidden_layers``, ``rope_scaling``, ``quantization_config``).

Both go through :meth:`ModelConfig.from_dict`, which rejects unknown keys and inconsistent values
with a :class:`ConfigError` naming the key and what is allowed.  Code defaults are never trusted
for the values the spec's trap 20 lists: every preset states them explicitly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "load_config", "preset_names"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent.  The message names the key."""


# Layer kinds by compression ratio (spec §3).
SWA, CSA, HCA = 0, 4, 128
ALLOWED_RATIOS = (SWA, CSA, HCA)
LAYER_KIND_NAMES = {SWA: "swa", CSA: "csa", HCA: "hca"}
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
WEIGHT_FORMATS = ("bf16", "fp8")
EXPERT_FORMATS = ("bf16", "fp8", "fp4")
SCALE_FORMATS = ("ue8m0", "fp32")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of a DeepSeek V4 model.

    Field names follow the official checkpoint ``config.json`` where one exists, so that a reader
    can hold the spec (deepseek_v4.md §2.1) beside this class.

    Attributes:
        name: Free-form label of the variant (``v4-flash``, ``tiny``, ...); not used in computation.
        vocab_size: Vocabulary size V (129280 for the released models).
        hidden_size: Model width d (4096 Flash, 7168 Pro).
        num_hidden_layers: Number of main transformer blocks L (43 Flash, 61 Pro).
        num_attention_heads: Query heads n_h.  There is a single shared K=V head in every layer.
        head_dim: Per-head dimension c of q and of the shared K=V vector (512).
        qk_rope_head_dim: RoPE dims r; RoPE acts on the **last** r dims of a head (trap 1).
        q_lora_rank: Rank d_c of the query latent (``wq_a`` output), reused by the indexer.
        o_groups: Number g of groups in the grouped output projection; must divide the heads.
        o_lora_rank: Per-group rank d_g of ``wo_a``.
        sliding_window: Window n_win in tokens, current token included (128).
        compress_ratios: Per-layer compression ratio: 0 = sliding window only (SWA), 4 = CSA
            (compressed + indexer top-k), 128 = HCA (dense over compressed entries).  It has
            ``num_hidden_layers + num_nextn_predict_layers`` entries; the trailing ones belong to
            the MTP blocks and must be 0.
        index_n_heads: Lightning-indexer heads n_I (64).
        index_head_dim: Lightning-indexer head dim c_I (128); a power of two (Hadamard).
        index_topk: Indexer top-k k_I (512 Flash, 1024 Pro; trap 12).
        n_routed_experts: Routed experts E.
        n_shared_experts: Shared experts (1); they see every token.
        num_experts_per_tok: Experts per token k.
        moe_intermediate_size: Intermediate size I of routed and shared experts.
        num_hash_layers: The first ``num_hash_layers`` layers route by ``tid2eid[token_id]``
            (trap 16: 3 means layers 0, 1, 2).
        scoring_func: Gate score function: ``sqrtsoftplus`` (V4), ``sigmoid`` or ``softmax``.
        norm_topk_prob: Renormalise the k selected weights to sum to 1 (no eps) before scaling.
        routed_scaling_factor: Multiplier of the routing weights (1.5 Flash, 2.5 Pro).
        swiglu_limit: SwiGLU clamp: up to [-limit, limit], gate to at most limit (10.0); 0 disables.
        hc_mult: Number of mHC residual streams n_hc (4).
        hc_sinkhorn_iters: Sinkhorn-Knopp iterations (20).
        hc_eps: mHC eps, added after the pre sigmoid and inside Sinkhorn (1e-6).
        rms_norm_eps: Eps of every RMSNorm, including the mHC input norm (1e-6).
        rope_theta: RoPE base of SWA-only layers and the MTP block (10000), without YaRN.
        compress_rope_theta: RoPE base of CSA/HCA layers (160000), with YaRN (trap 2).
        rope_factor: YaRN scale factor s (16); 1 disables YaRN.
        rope_original_max_position: YaRN ``original_max_position_embeddings`` (65536); 0 disables.
        rope_beta_fast: YaRN beta_fast (32).
        rope_beta_slow: YaRN beta_slow (1).
        max_position_embeddings: Longest context the model supports (1048576); a cache cannot be
            made longer.
        num_nextn_predict_layers: MTP depth (1); 0 means no MTP block.
        weight_format: Storage of the dense linears in the checkpoint: ``fp8`` (e4m3, 128x128
            block scales) or ``bf16``.
        expert_format: Storage of routed experts: ``fp4`` (e2m1 packed, e8m0 scale per 32),
            ``fp8`` (-Base checkpoints) or ``bf16``.
        scale_format: Format of the FP8 block scales: ``ue8m0`` (instruct) or ``fp32`` (-Base).
        bos_token_id: Beginning-of-sequence token id.
        eos_token_id: End-of-sequence token id.
        tie_word_embeddings: Must be False for V4 (embedding and head are separate tensors).
    """

    name: str = "custom"
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: tuple[int, ...] = field(default_factory=lambda: tuple([0, 0] + [4, 128] * 20 + [4] + [0]))
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    rope_original_max_position: int = 65536
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    weight_format: str = "fp8"
    expert_format: str = "fp4"
    scale_format: str = "ue8m0"
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False

    # ------------------------------------------------------------------ derived quantities
    @property
    def nope_head_dim(self) -> int:
        """Head dims that carry no RoPE (c - r = 448)."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def layer_ratios(self) -> tuple[int, ...]:
        """Compression ratio of each main layer (the MTP entries dropped)."""
        return tuple(self.compress_ratios[: self.num_hidden_layers])

    @property
    def mtp_ratios(self) -> tuple[int, ...]:
        """Compression ratio of each MTP block."""
        return tuple(self.compress_ratios[self.num_hidden_layers :])

    def layer_kind(self, layer_id: int) -> str:
        """``swa``, ``csa`` or ``hca`` for a main layer; layers >= L are MTP blocks."""
        return LAYER_KIND_NAMES[self.compress_ratios[layer_id]]

    def is_hash_layer(self, layer_id: int) -> bool:
        """True for layers routed by ``tid2eid`` (layer ids below ``num_hash_layers``; never MTP)."""
        return layer_id < min(self.num_hash_layers, self.num_hidden_layers)

    @property
    def yarn_enabled(self) -> bool:
        """YaRN applies to compressed layers only when a factor > 1 and an original length are set."""
        return self.rope_factor > 1 and self.rope_original_max_position > 0

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        ratios = self.compress_ratios
        if not isinstance(ratios, (list, tuple)) or any(
                isinstance(r, bool) or not isinstance(r, numbers.Integral) for r in ratios):
            raise ConfigError(f"config key 'compress_ratios': expected a list of integers "
                              f"(allowed values {ALLOWED_RATIOS}), got {ratios!r}")
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in ratios))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            # an int given for a float field (``rope_theta: 10000``) is the same config: store it as a
            # float so that to_dict() and config_hash() do not depend on how the number was written.
            if f.type == "float" and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent key."""

        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config key {key!r}: {msg}")

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int",) and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"config key {f.name!r}: expected an integer, got {v!r}")
            if f.type in ("float",) and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"config key {f.name!r}: expected a number, got {v!r}")
            if f.type in ("bool",) and not isinstance(v, bool):
                raise ConfigError(f"config key {f.name!r}: expected true/false, got {v!r}")
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
                    "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok",
                    "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings")
        for key in positive:
            need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for key in ("num_hash_layers", "n_shared_experts", "num_nextn_predict_layers", "rope_original_max_position"):
            need(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta", "rope_factor",
                    "rope_beta_fast", "rope_beta_slow"):
            need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        need(self.swiglu_limit >= 0, "swiglu_limit", f"must be >= 0 (0 disables), got {self.swiglu_limit}")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even (interleaved pairs), got {self.qk_rope_head_dim}")
        need(self.qk_rope_head_dim <= self.head_dim, "qk_rope_head_dim",
             f"{self.qk_rope_head_dim} is larger than head_dim {self.head_dim}")
        need(self.qk_rope_head_dim <= self.index_head_dim, "qk_rope_head_dim",
             f"{self.qk_rope_head_dim} is larger than index_head_dim {self.index_head_dim} (the indexer ropes its last r dims)")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"num_attention_heads {self.num_attention_heads} is not divisible by o_groups {self.o_groups}")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0, "index_head_dim",
             f"must be a power of two (Hadamard transform), got {self.index_head_dim}")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"{self.num_experts_per_tok} experts per token but only {self.n_routed_experts} routed experts")
        need(self.scoring_func in SCORE_FUNCS, "scoring_func", f"{self.scoring_func!r} not in {SCORE_FUNCS}")
        need(self.weight_format in WEIGHT_FORMATS, "weight_format", f"{self.weight_format!r} not in {WEIGHT_FORMATS}")
        need(self.expert_format in EXPERT_FORMATS, "expert_format", f"{self.expert_format!r} not in {EXPERT_FORMATS}")
        need(self.scale_format in SCALE_FORMATS, "scale_format", f"{self.scale_format!r} not in {SCALE_FORMATS}")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "V4 has separate embed and head tensors; must be false")
        need(self.n_shared_experts <= 1, "n_shared_experts", f"V4 has at most one shared expert, got {self.n_shared_experts}")
        expected = self.num_hidden_layers + self.num_nextn_predict_layers
        need(len(self.compress_ratios) in (expected, self.num_hidden_layers), "compress_ratios",
             f"has {len(self.compress_ratios)} entries; expected {expected} (num_hidden_layers "
             f"{self.num_hidden_layers} + num_nextn_predict_layers {self.num_nextn_predict_layers})")
        if len(self.compress_ratios) == self.num_hidden_layers and self.num_nextn_predict_layers:
            # the official files carry the MTP entry; a YAML may leave it out: MTP blocks are SWA.
            object.__setattr__(self, "compress_ratios", self.compress_ratios + (0,) * self.num_nextn_predict_layers)
        for i, r in enumerate(self.compress_ratios):
            need(r in ALLOWED_RATIOS, "compress_ratios", f"entry {i} is {r}; allowed values are {ALLOWED_RATIOS}")
        for i, r in enumerate(self.mtp_ratios):
            need(r == 0, "compress_ratios", f"MTP entry {self.num_hidden_layers + i} is {r}; MTP blocks are SWA-only (0)")
        if CSA in self.compress_ratios:
            need(self.q_lora_rank > 0, "q_lora_rank", "CSA layers need the q latent for the indexer")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    def config_hash(self) -> str:
        """Stable hash of every field but ``name`` (used to refuse comparing unrelated runs)."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config key(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> "ModelConfig":
        """Build from our YAML keys or from an official ``config.json`` (detected by its keys)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        if _looks_official(data):
            data = _from_official(data, source)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown config key(s) {unknown}; allowed keys are {sorted(names)}")
        try:
            return cls(**dict(data))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read a YAML preset or an official ``config.json`` (a directory means its config.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot parse: {e}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """One of the YAML presets shipped with the package (see :func:`preset_names`)."""
        if name not in preset_names():
            raise ConfigError(f"unknown preset {name!r}; available presets: {preset_names()}")
        text = resources.files("ascend_v4.presets").joinpath(f"{name}.yaml").read_text()
        return cls.from_dict(yaml.safe_load(text), source=f"preset {name}")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("ascend_v4.presets").iterdir() if p.name.endswith(".yaml"))


PRESETS = ("tiny", "small", "v4-flash", "v4-pro")


def load_config(path_or_preset: str | Path) -> ModelConfig:
    """A preset name, a YAML file, an official ``config.json`` or a checkpoint directory."""
    s = str(path_or_preset)
    if s in preset_names():
        return ModelConfig.preset(s)
    return ModelConfig.from_file(path_or_preset)


# ---------------------------------------------------------------------- official config.json
# Keys of the official file that carry no computation for us; accepted and ignored.
_OFFICIAL_IGNORED = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "auto_map", "pad_token_id", "_name_or_path",
}
# Keys whose only supported value is fixed by the V4 architecture.
_OFFICIAL_FIXED = {
    "num_key_value_heads": (1,),
    "attention_bias": (False,),
    "hidden_act": ("silu",),
    "topk_method": ("noaux_tc",),
    "first_k_dense_replace": (0,),
}


def _looks_official(data: Mapping[str, Any]) -> bool:
    return any(k in data for k in ("rope_scaling", "quantization_config", "num_key_value_heads",
                                   "architectures", "model_type", "expert_dtype"))


def _from_official(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Translate official HF-style keys into ModelConfig fields (spec §2.1 table)."""
    out: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in data.items():
        if key in _OFFICIAL_IGNORED:
            continue
        if key in _OFFICIAL_FIXED:
            if value not in _OFFICIAL_FIXED[key]:
                raise ConfigError(f"{source}: config key {key!r} is {value!r}; V4 supports only {_OFFICIAL_FIXED[key]}")
            continue
        if key == "rope_scaling":
            out.update(_rope_scaling(value, source))
        elif key == "quantization_config":
            out.update(_quantization(value, source))
        elif key == "expert_dtype":
            if value not in EXPERT_FORMATS:
                raise ConfigError(f"{source}: config key 'expert_dtype' is {value!r}; allowed values are {EXPERT_FORMATS}")
            out["expert_format"] = value
        elif key in names:
            out[key] = value  # compress_ratios: a list, checked and made a tuple by ModelConfig
        else:
            raise ConfigError(f"{source}: unknown config key {key!r} (not a V4 config.json key this project knows)")
    if data.get("quantization_config") is None:
        # no (or a null) quantization_config: a bf16 checkpoint, experts included.
        out.setdefault("weight_format", "bf16")
        out.setdefault("expert_format", "bf16")
    elif "expert_dtype" not in data:
        # Before the root `expert_dtype` was added, instruct checkpoints shipped FP4 experts and
        # -Base ones FP8 experts with fp32 scales (spec §4.1).
        out.setdefault("expert_format", "fp8" if out.get("scale_format") == "fp32" else "fp4")
    return out


def _rope_scaling(value: Any, source: str) -> dict[str, Any]:
    if value is None:
        return {"rope_factor": 1.0, "rope_original_max_position": 0}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: config key 'rope_scaling' must be a mapping or null, got {value!r}")
    kind = value.get("type", value.get("rope_type", "yarn"))
    if kind != "yarn":
        raise ConfigError(f"{source}: config key 'rope_scaling.type' is {kind!r}; V4 supports only 'yarn'")
    allowed = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
               "mscale", "mscale_all_dim"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} in 'rope_scaling'; allowed {sorted(allowed)}")
    for k in ("mscale", "mscale_all_dim"):
        # V4 applies no mscale anywhere (trap 2); only values that keep it a no-op are accepted.
        if k in value and value[k] not in (0, 1, 1.0, 0.0):
            raise ConfigError(f"{source}: 'rope_scaling.{k}' is {value[k]!r}; V4 uses no mscale (allowed: 0 or 1)")
    out = {}
    for src, dst in (("factor", "rope_factor"), ("original_max_position_embeddings", "rope_original_max_position"),
                     ("beta_fast", "rope_beta_fast"), ("beta_slow", "rope_beta_slow")):
        if src not in value:
            raise ConfigError(f"{source}: 'rope_scaling' lacks {src!r}")
        out[dst] = value[src]
    return out


def _quantization(value: Any, source: str) -> dict[str, Any]:
    if value is None:
        return {"weight_format": "bf16"}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: config key 'quantization_config' must be a mapping, got {value!r}")
    method = value.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"{source}: 'quantization_config.quant_method' is {method!r}; supported: 'fp8'")
    fmt = value.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: 'quantization_config.fmt' is {fmt!r}; supported: 'e4m3'")
    block = value.get("weight_block_size", [128, 128])
    if list(block) != [128, 128]:
        raise ConfigError(f"{source}: 'quantization_config.weight_block_size' is {block!r}; supported: [128, 128]")
    act = value.get("activation_scheme", "dynamic")
    if act != "dynamic":
        raise ConfigError(f"{source}: 'quantization_config.activation_scheme' is {act!r}; supported: 'dynamic'")
    scale_fmt = value.get("scale_fmt", "fp32")
    if scale_fmt is None:
        scale_fmt = "fp32"
    if scale_fmt not in SCALE_FORMATS:
        raise ConfigError(f"{source}: 'quantization_config.scale_fmt' is {scale_fmt!r}; allowed {SCALE_FORMATS}")
    allowed = {"quant_method", "fmt", "weight_block_size", "activation_scheme", "scale_fmt"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} in 'quantization_config'; allowed {sorted(allowed)}")
    return {"weight_format": "fp8", "scale_format": scale_fmt}


def official_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The official-format ``config.json`` content for ``cfg`` (used by the checkpoint writer)."""
    d = cfg.to_dict()
    out: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "num_key_value_heads": 1,
        "attention_bias": False,
        "hidden_act": "silu",
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
    }
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "compress_ratios",
                "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts", "n_shared_experts",
                "num_experts_per_tok", "moe_intermediate_size", "num_hash_layers", "scoring_func", "norm_topk_prob",
                "routed_scaling_factor", "swiglu_limit", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps",
                "rope_theta", "compress_rope_theta", "max_position_embeddings", "num_nextn_predict_layers",
                "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        out[key] = d[key]
    out["rope_scaling"] = {"type": "yarn", "factor": cfg.rope_factor,
                           "original_max_position_embeddings": cfg.rope_original_max_position,
                           "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow}
    if cfg.weight_format == "fp8":
        out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128], "scale_fmt": cfg.scale_format}
    out["expert_dtype"] = cfg.expert_format
    return out

