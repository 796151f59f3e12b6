"""ModelConfig: presets against the spec, official config.json translation, validation, hashing, RoPE bases.

Every expected number below is copied from deepseek_v4.md §1 (notation), §2.1 (hyper-parameters) and
§3 (layer schedule), never read back from the code under test.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import yaml

import ascend_v4
from ascend_v4 import ConfigError, ModelConfig, load_config
from ascend_v4.config import official_config_dict

# ----------------------------------------------------------------------------------------------- spec numbers
# §3: Flash [0, 0] + [4, 128] * 20 + [4] + [0] (44 entries), Pro [128, 128] + [4, 128] * 29 + [4] + [0] (62).
FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4] + [0]
PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4] + [0]

# §1 and §2.1, the "Flash" column.
FLASH = {
    "vocab_size": 129280,
    "hidden_size": 4096,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "sliding_window": 128,
    "compress_ratios": FLASH_RATIOS,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 2048,
    "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_factor": 16.0,
    "rope_original_max_position": 65536,
    "rope_beta_fast": 32.0,
    "rope_beta_slow": 1.0,
    "max_position_embeddings": 1048576,
    "num_nextn_predict_layers": 1,
    "weight_format": "fp8",
    "expert_format": "fp4",
    "scale_format": "ue8m0",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}

# §1 and §2.1, the "Pro" column: only the values that differ from Flash.
PRO = dict(FLASH)
PRO.update({
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "o_groups": 16,
    "compress_ratios": PRO_RATIOS,
    "index_topk": 1024,
    "n_routed_experts": 384,
    "moe_intermediate_size": 3072,
    "routed_scaling_factor": 2.5,
})

# §3 table: (SWA, CSA, HCA) counts over the main layers.
LAYER_COUNTS = {"v4-flash": (2, 21, 20), "v4-pro": (0, 30, 31)}
SPEC = {"v4-flash": FLASH, "v4-pro": PRO}


def _no_name(cfg: ModelConfig) -> dict:
    d = cfg.to_dict()
    d.pop("name")
    return d


def official_flash_json() -> dict:
    """An official-style (Hugging Face keys) config.json of V4-Flash, written from spec §2.1."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "vocab_size": 129280,
        "hidden_size": 4096,
        "num_hidden_layers": 43,
        "num_attention_heads": 64,
        "num_key_value_heads": 1,
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 1024,
        "o_groups": 8,
        "o_lora_rank": 1024,
        "sliding_window": 128,
        "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0],
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": 512,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 2048,
        "num_hash_layers": 3,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-06,
        "rms_norm_eps": 1e-06,
        # integers, as a JSON writer may well emit them for float-valued keys
        "rope_theta": 10000,
        "compress_rope_theta": 160000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        "max_position_embeddings": 1048576,
        "num_nextn_predict_layers": 1,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "scale_fmt": "ue8m0",
        },
        "expert_dtype": "fp4",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
    }


def official_pro_json() -> dict:
    d = official_flash_json()
    d.update({
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "o_groups": 16,
        "compress_ratios": [128, 128] + [4, 128] * 29 + [4] + [0],
        "index_topk": 1024,
        "n_routed_experts": 384,
        "moe_intermediate_size": 3072,
        "routed_scaling_factor": 2.5,
    })
    return d


def _write_json(path, data) -> str:
    path.write_text(json.dumps(data, indent=2))
    return str(path)


def _write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ----------------------------------------------------------------------------------------------- 1. spec presets
@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_preset_matches_spec_tables(name):
    cfg = ModelConfig.preset(name)
    expected = SPEC[name]
    got = _no_name(cfg)
    assert set(got) == set(expected), "a ModelConfig field has no spec value in this test (or vice versa)"
    for key, value in expected.items():
        assert got[key] == value, f"{name}.{key}: {got[key]!r} != spec {value!r}"
        if isinstance(value, float):
            assert isinstance(got[key], float), f"{name}.{key} should be a float, got {got[key]!r}"
    assert cfg.name == name


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_preset_layer_schedule(name):
    cfg = ModelConfig.preset(name)
    L = SPEC[name]["num_hidden_layers"]
    # §2.1: compress_ratios has L + 1 entries; §3: the last one (the MTP block) is 0.
    assert len(cfg.compress_ratios) == L + 1 == {"v4-flash": 44, "v4-pro": 62}[name]
    assert len(cfg.layer_ratios) == L
    assert tuple(cfg.mtp_ratios) == (0,)
    assert cfg.layer_kind(L) == "swa"
    swa, csa, hca = LAYER_COUNTS[name]
    ratios = list(cfg.layer_ratios)
    assert (ratios.count(0), ratios.count(4), ratios.count(128)) == (swa, csa, hca)
    kinds = [cfg.layer_kind(i) for i in range(L)]
    assert (kinds.count("swa"), kinds.count("csa"), kinds.count("hca")) == (swa, csa, hca)
    # §3 table: which layers have which kind.
    assert [i for i in range(L) if kinds[i] == "csa"] == list(range(2, L, 2))
    if name == "v4-flash":
        assert [i for i in range(L) if kinds[i] == "swa"] == [0, 1]
        assert [i for i in range(L) if kinds[i] == "hca"] == list(range(3, 42, 2))
    else:
        assert [i for i in range(L) if kinds[i] == "swa"] == []
        assert [i for i in range(L) if kinds[i] == "hca"] == [0, 1] + list(range(3, 60, 2))


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_preset_hash_layers_and_derived(name):
    cfg = ModelConfig.preset(name)
    L = SPEC[name]["num_hidden_layers"]
    # §3: hash routing in layers 0, 1, 2 only; never in the MTP block (layer id L).
    assert [i for i in range(L + 1) if cfg.is_hash_layer(i)] == [0, 1, 2]
    assert cfg.nope_head_dim == 448  # §1: c - r
    assert cfg.yarn_enabled
    # §2.1: max context = 65536 * 16
    assert cfg.max_position_embeddings == 65536 * 16


def test_load_config_resolves_presets():
    assert load_config("v4-flash") == ModelConfig.preset("v4-flash")
    assert set(ascend_v4.preset_names()) >= {"tiny", "small", "v4-flash", "v4-pro"}


# ----------------------------------------------------------------------------------------------- 2. test presets
def test_tiny_preset_covers_every_layer_kind():
    cfg = ModelConfig.preset("tiny")
    assert {0, 4, 128} <= set(cfg.layer_ratios)
    hash_flags = [cfg.is_hash_layer(i) for i in range(cfg.num_hidden_layers)]
    assert any(hash_flags) and not all(hash_flags)
    assert cfg.num_nextn_predict_layers >= 1
    assert all(r == 0 for r in cfg.mtp_ratios) and len(cfg.mtp_ratios) == cfg.num_nextn_predict_layers
    assert cfg.o_groups == 2
    assert cfg.num_attention_heads % cfg.o_groups == 0
    assert cfg.hidden_size == 64


def test_small_preset_schedule():
    cfg = ModelConfig.preset("small")
    assert cfg.hidden_size == 512
    assert cfg.num_hidden_layers == 6
    assert [cfg.layer_kind(i) for i in range(6)] == ["swa", "swa", "csa", "hca", "csa", "hca"]
    assert cfg.sliding_window == 128
    assert tuple(cfg.mtp_ratios) == (0,)


# ----------------------------------------------------------------------------------------------- 3. official config.json
@pytest.mark.parametrize("name,make", [("v4-flash", official_flash_json), ("v4-pro", official_pro_json)])
def test_official_config_json_matches_preset(tmp_path, name, make):
    path = _write_json(tmp_path / "config.json", make())
    cfg = ModelConfig.from_file(path)
    preset = ModelConfig.preset(name)
    assert _no_name(cfg) == _no_name(preset)
    assert _no_name(cfg) == SPEC[name]
    # integers in the json ("rope_theta": 10000) must not change the hash of an equal config
    assert cfg.config_hash() == preset.config_hash()


def test_official_base_checkpoint_has_fp8_experts(tmp_path):
    data = official_flash_json()
    del data["expert_dtype"]
    data["quantization_config"]["scale_fmt"] = "fp32"
    cfg = ModelConfig.from_file(_write_json(tmp_path / "config.json", data))
    assert cfg.expert_format == "fp8"
    assert cfg.weight_format == "fp8"
    assert cfg.scale_format == "fp32"


def test_official_without_expert_dtype_instruct_is_fp4(tmp_path):
    data = official_flash_json()
    del data["expert_dtype"]
    cfg = ModelConfig.from_file(_write_json(tmp_path / "config.json", data))
    assert (cfg.weight_format, cfg.expert_format, cfg.scale_format) == ("fp8", "fp4", "ue8m0")


@pytest.mark.parametrize("quant", ["absent", "null"])
def test_official_without_quantization_is_bf16(tmp_path, quant):
    data = official_flash_json()
    del data["expert_dtype"]
    if quant == "absent":
        del data["quantization_config"]
    else:
        data["quantization_config"] = None
    cfg = ModelConfig.from_file(_write_json(tmp_path / "config.json", data))
    assert cfg.weight_format == "bf16"
    assert cfg.expert_format == "bf16"


def test_official_rope_scaling_null_disables_yarn(tmp_path):
    data = official_flash_json()
    data["rope_scaling"] = None
    cfg = ModelConfig.from_file(_write_json(tmp_path / "config.json", data))
    assert not cfg.yarn_enabled


def test_from_file_directory_reads_config_json(tmp_path):
    _write_json(tmp_path / "config.json", official_flash_json())
    cfg = ModelConfig.from_file(tmp_path)
    assert _no_name(cfg) == FLASH
    assert load_config(str(tmp_path)) == cfg


@pytest.mark.parametrize("name", ["tiny", "small", "v4-flash", "v4-pro"])
def test_yaml_round_trip(tmp_path, name):
    cfg = ModelConfig.preset(name)
    path = _write_yaml(tmp_path / f"{name}.yaml", cfg.to_dict())
    back = ModelConfig.from_file(path)
    assert back == cfg
    assert back.name == name
    assert back.config_hash() == cfg.config_hash()


@pytest.mark.parametrize("name", ["tiny", "small", "v4-flash", "v4-pro"])
def test_official_config_dict_round_trip(tmp_path, name):
    cfg = ModelConfig.preset(name)
    official = official_config_dict(cfg)
    assert official["num_key_value_heads"] == 1
    assert "name" not in official
    path = _write_json(tmp_path / "config.json", official)
    back = ModelConfig.from_file(path)
    assert _no_name(back) == _no_name(cfg)
    assert back.replace(name=cfg.name) == cfg
    assert back.config_hash() == cfg.config_hash()


def test_official_config_dict_of_flash_has_spec_keys():
    official = official_config_dict(ModelConfig.preset("v4-flash"))
    assert official["rope_scaling"] == {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                       "beta_fast": 32, "beta_slow": 1}
    assert official["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                               "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    assert official["expert_dtype"] == "fp4"
    assert official["compress_ratios"] == FLASH_RATIOS
    assert official["tie_word_embeddings"] is False


def test_yaml_may_omit_mtp_entry(tmp_path):
    d = ModelConfig.preset("tiny").to_dict()
    d["compress_ratios"] = d["compress_ratios"][:-1]  # main layers only
    cfg = ModelConfig.from_file(_write_yaml(tmp_path / "t.yaml", d))
    assert cfg == ModelConfig.preset("tiny")


# ----------------------------------------------------------------------------------------------- 4. validation
def _flash_yaml():
    return ModelConfig.preset("v4-flash").to_dict()


def _set(key, value):
    def mutate(d):
        d[key] = value
    return mutate


def _ratio(index, value):
    def mutate(d):
        d["compress_ratios"][index] = value
    return mutate


YAML_ERRORS = [
    # (id, mutation of the Flash YAML dict, regex the message must match)
    ("unknown-key", _set("hiden_size", 4096), "hiden_size"),
    ("heads-not-divisible", _set("o_groups", 7), r"o_groups.*num_attention_heads 64.*o_groups 7"),
    ("rope-gt-head-dim", lambda d: d.update(qk_rope_head_dim=1024, index_head_dim=2048),
     r"qk_rope_head_dim.*1024.*head_dim 512"),
    ("rope-odd", _set("qk_rope_head_dim", 63), r"qk_rope_head_dim.*even"),
    ("ratios-length", _set("compress_ratios", [0, 4, 128] * 3), r"compress_ratios.*9 entries.*44"),
    ("ratio-8", _ratio(2, 8), r"compress_ratios.*\b8\b.*\(0, 4, 128\)"),
    ("mtp-nonzero", _ratio(43, 4), r"compress_ratios.*MTP"),
    ("mtp-128", _ratio(-1, 128), r"compress_ratios.*MTP"),
    ("scoring-relu", _set("scoring_func", "relu"), r"scoring_func.*relu.*sqrtsoftplus.*sigmoid.*softmax"),
    ("k-gt-experts", _set("num_experts_per_tok", 257), r"num_experts_per_tok.*257.*256"),
    ("index-dim-not-pow2", _set("index_head_dim", 96), r"index_head_dim.*power of two"),
    ("str-for-int", _set("hidden_size", "4096"), r"hidden_size.*integer"),
    ("float-for-int", _set("num_attention_heads", 64.0), r"num_attention_heads.*integer"),
    ("bool-for-int", _set("num_hidden_layers", True), r"num_hidden_layers.*integer"),
    ("bool-for-float", _set("routed_scaling_factor", True), r"routed_scaling_factor.*number"),
    ("str-for-float", _set("rope_theta", "ten thousand"), r"rope_theta.*number"),
    ("int-for-bool", _set("norm_topk_prob", 1), r"norm_topk_prob.*true/false"),
    ("str-ratio", _ratio(2, "4"), r"compress_ratios"),
    ("float-ratio", _ratio(2, 4.5), r"compress_ratios"),
    ("ratios-not-list", _set("compress_ratios", 4), r"compress_ratios"),
    ("ratios-null", _set("compress_ratios", None), r"compress_ratios"),
    ("weight-format", _set("weight_format", "int4"), r"weight_format.*int4.*bf16.*fp8"),
    ("expert-format", _set("expert_format", "fp2"), r"expert_format.*fp2"),
    ("scale-format", _set("scale_format", "e5m2"), r"scale_format.*e5m2"),
    ("tied", _set("tie_word_embeddings", True), r"tie_word_embeddings"),
    ("zero-heads", _set("num_attention_heads", 0), r"num_attention_heads.*> 0"),
    ("negative-hash", _set("num_hash_layers", -1), r"num_hash_layers.*>= 0"),
    ("two-shared", _set("n_shared_experts", 2), r"n_shared_experts"),
]


@pytest.mark.parametrize("mutate,match", [c[1:] for c in YAML_ERRORS], ids=[c[0] for c in YAML_ERRORS])
def test_yaml_validation_errors(tmp_path, mutate, match):
    d = _flash_yaml()
    mutate(d)
    path = _write_yaml(tmp_path / "bad.yaml", d)
    with pytest.raises(ConfigError, match=match) as info:
        ModelConfig.from_file(path)
    assert "bad.yaml" in str(info.value)  # the source is named too


def test_from_dict_rejects_same_as_file():
    d = _flash_yaml()
    d["o_groups"] = 7
    with pytest.raises(ConfigError, match="o_groups"):
        ModelConfig.from_dict(d)
    with pytest.raises(ConfigError, match="o_groups"):
        ModelConfig.preset("v4-flash").replace(o_groups=7)
    with pytest.raises(ConfigError, match="not_a_field"):
        ModelConfig.preset("v4-flash").replace(not_a_field=1)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def _ofset(key, value):
    def mutate(d):
        d[key] = value
    return mutate


def _ofsub(outer, key, value):
    def mutate(d):
        d[outer][key] = value
    return mutate


OFFICIAL_ERRORS = [
    ("unknown-key", _ofset("dspark_num_layers", 2), "dspark_num_layers"),
    ("kv-heads-8", _ofset("num_key_value_heads", 8), r"num_key_value_heads.*8.*\(1,\)"),
    ("rope-linear", _ofsub("rope_scaling", "type", "linear"), r"rope_scaling.*linear.*yarn"),
    ("rope-mscale", _ofsub("rope_scaling", "mscale", 0.707), r"rope_scaling.*mscale"),
    ("rope-unknown", _ofsub("rope_scaling", "low_freq_factor", 1), r"low_freq_factor.*rope_scaling"),
    ("rope-lacks-factor", lambda d: d["rope_scaling"].pop("factor"), r"rope_scaling.*factor"),
    ("quant-int8", _ofsub("quantization_config", "quant_method", "int8"), r"quant_method.*int8.*fp8"),
    ("quant-e5m2", _ofsub("quantization_config", "fmt", "e5m2"), r"fmt.*e5m2.*e4m3"),
    ("quant-block", _ofsub("quantization_config", "weight_block_size", [64, 64]), r"weight_block_size"),
    ("quant-static", _ofsub("quantization_config", "activation_scheme", "static"), r"activation_scheme.*static"),
    ("quant-scale", _ofsub("quantization_config", "scale_fmt", "e4m3"), r"scale_fmt.*e4m3.*ue8m0.*fp32"),
    ("quant-unknown", _ofsub("quantization_config", "group_size", 128), r"group_size.*quantization_config"),
    ("expert-dtype", _ofset("expert_dtype", "int4"), r"expert_dtype.*int4.*bf16.*fp8.*fp4"),
    ("topk-method", _ofset("topk_method", "greedy"), r"topk_method.*greedy.*noaux_tc"),
    ("dense-layers", _ofset("first_k_dense_replace", 3), r"first_k_dense_replace"),
    ("act", _ofset("hidden_act", "gelu"), r"hidden_act.*gelu"),
    ("ratio-8", lambda d: d["compress_ratios"].__setitem__(5, 8), r"compress_ratios.*\(0, 4, 128\)"),
    ("mtp-nonzero", lambda d: d["compress_ratios"].__setitem__(-1, 4), r"compress_ratios.*MTP"),
    ("str-for-int", _ofset("num_hidden_layers", "43"), r"num_hidden_layers.*integer"),
    ("ratios-not-list", _ofset("compress_ratios", 4), r"compress_ratios.*list"),
    ("ratios-null", _ofset("compress_ratios", None), r"compress_ratios.*list"),
    ("ratios-length", lambda d: d["compress_ratios"].extend([0, 0]), r"compress_ratios.*46 entries.*44"),
]


@pytest.mark.parametrize("mutate,match", [c[1:] for c in OFFICIAL_ERRORS], ids=[c[0] for c in OFFICIAL_ERRORS])
def test_official_validation_errors(tmp_path, mutate, match):
    d = copy.deepcopy(official_flash_json())
    mutate(d)
    path = _write_json(tmp_path / "config.json", d)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_file(path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"v4-ultra.*tiny") as info:
        ModelConfig.preset("v4-ultra")
    for name in ("small", "v4-flash", "v4-pro"):
        assert name in str(info.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml.*does not exist"):
        ModelConfig.from_file(missing)
    with pytest.raises(ConfigError, match="config.json"):  # a directory without config.json
        ModelConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(missing))


def test_unparseable_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("hidden_size: [1, 2\nnum_hidden_layers: : :\n")
    with pytest.raises(ConfigError, match="broken.yaml.*cannot parse"):
        ModelConfig.from_file(path)


def test_unparseable_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 4096,')
    with pytest.raises(ConfigError, match="config.json.*cannot parse"):
        ModelConfig.from_file(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ConfigError, match="binary.yaml"):
        ModelConfig.from_file(path)


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "just a string\n"])
def test_yaml_not_a_mapping(tmp_path, text):
    path = tmp_path / "notmap.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="notmap.yaml.*mapping"):
        ModelConfig.from_file(path)


# ----------------------------------------------------------------------------------------------- 5. config_hash
# A valid change of every numeric field of the tiny preset (compress_ratios adjusted where the length depends on it).
NUMERIC_CHANGES = {
    "vocab_size": {"vocab_size": 1024},
    "hidden_size": {"hidden_size": 96},
    "num_hidden_layers": {"num_hidden_layers": 5, "compress_ratios": [0, 4, 128, 4, 128, 0]},
    "num_attention_heads": {"num_attention_heads": 8},
    "head_dim": {"head_dim": 128},
    "qk_rope_head_dim": {"qk_rope_head_dim": 32},
    "q_lora_rank": {"q_lora_rank": 48},
    "o_groups": {"o_groups": 4},
    "o_lora_rank": {"o_lora_rank": 16},
    "sliding_window": {"sliding_window": 64},
    "compress_ratios": {"compress_ratios": [0, 128, 4, 4, 0]},
    "index_n_heads": {"index_n_heads": 8},
    "index_head_dim": {"index_head_dim": 64},
    "index_topk": {"index_topk": 16},
    "n_routed_experts": {"n_routed_experts": 16},
    "n_shared_experts": {"n_shared_experts": 0},
    "num_experts_per_tok": {"num_experts_per_tok": 3},
    "moe_intermediate_size": {"moe_intermediate_size": 48},
    "num_hash_layers": {"num_hash_layers": 3},
    "routed_scaling_factor": {"routed_scaling_factor": 2.5},
    "swiglu_limit": {"swiglu_limit": 7.0},
    "hc_mult": {"hc_mult": 2},
    "hc_sinkhorn_iters": {"hc_sinkhorn_iters": 10},
    "hc_eps": {"hc_eps": 1e-5},
    "rms_norm_eps": {"rms_norm_eps": 1e-5},
    "rope_theta": {"rope_theta": 20000.0},
    "compress_rope_theta": {"compress_rope_theta": 40000.0},
    "rope_factor": {"rope_factor": 40.0},
    "rope_original_max_position": {"rope_original_max_position": 0},
    "rope_beta_fast": {"rope_beta_fast": 16.0},
    "rope_beta_slow": {"rope_beta_slow": 2.0},
    "max_position_embeddings": {"max_position_embeddings": 4096},
    "num_nextn_predict_layers": {"num_nextn_predict_layers": 0, "compress_ratios": [0, 4, 128, 4]},
    "bos_token_id": {"bos_token_id": 2},
    "eos_token_id": {"eos_token_id": 3},
}
OTHER_CHANGES = {
    "scoring_func": {"scoring_func": "sigmoid"},
    "norm_topk_prob": {"norm_topk_prob": False},
    "weight_format": {"weight_format": "fp8"},
    "expert_format": {"expert_format": "fp4"},
    "scale_format": {"scale_format": "fp32"},
}


def test_numeric_change_table_covers_every_numeric_field():
    tiny = ModelConfig.preset("tiny")
    numeric = {f.name for f in dataclasses.fields(ModelConfig)
               if isinstance(getattr(tiny, f.name), (int, float, tuple)) and not isinstance(getattr(tiny, f.name), bool)}
    assert numeric == set(NUMERIC_CHANGES)


def test_config_hash_equal_for_equal_configs(tmp_path):
    a = ModelConfig.preset("tiny")
    b = ModelConfig.from_dict(a.to_dict())
    assert a is not b and a == b
    assert a.config_hash() == b.config_hash()
    assert isinstance(a.config_hash(), str) and len(a.config_hash()) >= 8
    # int written where a float is expected: the same config, the same hash
    d = a.to_dict()
    d.update(rope_theta=10000, compress_rope_theta=160000, rope_factor=16, swiglu_limit=10,
             routed_scaling_factor=1.5, rope_beta_fast=32, rope_beta_slow=1)
    c = ModelConfig.from_dict(d)
    assert c == a
    assert c.config_hash() == a.config_hash()


def test_config_hash_ignores_name():
    a = ModelConfig.preset("tiny")
    assert a.replace(name="something-else").config_hash() == a.config_hash()


@pytest.mark.parametrize("field_name", sorted(NUMERIC_CHANGES) + sorted(OTHER_CHANGES))
def test_config_hash_changes_with_every_field(field_name):
    a = ModelConfig.preset("tiny")
    changes = {**NUMERIC_CHANGES, **OTHER_CHANGES}[field_name]
    b = a.replace(**changes)
    assert getattr(b, field_name) != getattr(a, field_name)
    assert b.config_hash() != a.config_hash()


def test_config_hash_distinguishes_presets():
    hashes = {ModelConfig.preset(n).config_hash() for n in ("tiny", "small", "v4-flash", "v4-pro")}
    assert len(hashes) == 4


# ----------------------------------------------------------------------------------------------- 6. RoPE bases
def _spec_theta(base: float, r: int = 64, yarn: bool = False) -> list[float]:
    """θ_i of spec §7.3 (base^(-2i/r)), with the YaRN blend (s 16, original 65536, β 32/1) when ``yarn``."""
    theta = [base ** (-2 * i / r) for i in range(r // 2)]
    if not yarn:
        return theta

    def corr_dim(n):
        return r * math.log(65536 / (n * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(corr_dim(32)), 0)
    hi = min(math.ceil(corr_dim(1)), r - 1)
    out = []
    for i, t in enumerate(theta):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        smooth = 1 - ramp
        out.append(t / 16 * (1 - smooth) + t * smooth)
    return out


def test_yarn_bounds_from_spec():
    # §7.3: for base 160000, lo = 15 and hi = 25.
    r, base = 64, 160000.0
    corr = lambda n: r * math.log(65536 / (n * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    assert max(math.floor(corr(32)), 0) == 15
    assert min(math.ceil(corr(1)), 63) == 25


@pytest.mark.parametrize("kind,base,yarn", [("swa", 10000.0, False), (0, 10000.0, False),
                                            ("csa", 160000.0, True), ("hca", 160000.0, True), (4, 160000.0, True),
                                            (128, 160000.0, True)])
def test_rope_tables_use_the_layer_base(kind, base, yarn):
    cfg = ModelConfig.preset("v4-flash")
    positions = torch.tensor([0, 1, 3, 17, 1000])
    cos, sin = ascend_v4.rope_tables(cfg, kind, positions)
    assert cos.shape == sin.shape == (5, 32)
    assert cos.dtype == torch.float64  # rounded once to the compute dtype inside apply_rope
    theta = torch.tensor(_spec_theta(base, yarn=yarn), dtype=torch.float64)
    angles = positions.to(torch.float64)[:, None] * theta
    torch.testing.assert_close(cos, angles.cos(), atol=1e-12, rtol=0)
    torch.testing.assert_close(sin, angles.sin(), atol=1e-12, rtol=0)


def test_rope_tables_swa_and_csa_differ():
    cfg = ModelConfig.preset("v4-flash")
    positions = torch.arange(4)
    cos_swa, sin_swa = ascend_v4.rope_tables(cfg, "swa", positions)
    cos_csa, sin_csa = ascend_v4.rope_tables(cfg, "csa", positions)
    # pair 1 at p = 1: 10000^(-1/32) vs 160000^(-1/32) (YaRN leaves pairs 0..15 alone)
    assert cos_swa[1, 1].item() == pytest.approx(math.cos(10000 ** (-2 / 64)), abs=1e-6)
    assert cos_csa[1, 1].item() == pytest.approx(math.cos(160000 ** (-2 / 64)), abs=1e-6)
    assert not torch.allclose(cos_swa[1:], cos_csa[1:], atol=1e-3)
    # pair 31 (beyond hi = 25) of CSA is divided by the YaRN factor 16
    assert sin_csa[1, 31].item() == pytest.approx(math.sin(160000 ** (-62 / 64) / 16), rel=1e-5)
    assert sin_swa[1, 31].item() == pytest.approx(math.sin(10000 ** (-62 / 64)), rel=1e-5)
    # the int form of positions gives arange
    cos_int, _ = ascend_v4.rope_tables(cfg, "swa", 4)
    torch.testing.assert_close(cos_int, cos_swa)


def test_rope_tables_follow_config_bases():
    cfg = ModelConfig.preset("tiny").replace(rope_theta=500.0, compress_rope_theta=7000.0, rope_factor=1.0)
    positions = torch.tensor([2])
    r = cfg.qk_rope_head_dim
    cos_swa, _ = ascend_v4.rope_tables(cfg, "swa", positions)
    cos_csa, _ = ascend_v4.rope_tables(cfg, "csa", positions)
    want_swa = [math.cos(2 * 500.0 ** (-2 * i / r)) for i in range(r // 2)]
    want_csa = [math.cos(2 * 7000.0 ** (-2 * i / r)) for i in range(r // 2)]  # factor 1: no YaRN
    torch.testing.assert_close(cos_swa[0], torch.tensor(want_swa, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(cos_csa[0], torch.tensor(want_csa, dtype=torch.float64), atol=1e-12, rtol=0)


def test_rope_tables_reject_unknown_kind():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="mla"):
        ascend_v4.rope_tables(cfg, "mla", 4)
    with pytest.raises(ValueError, match="8"):
        ascend_v4.rope_tables(cfg, 8, 4)
