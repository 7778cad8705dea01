"""The converter, gemma_mlx.convert (spec §1.2, §1.5, §2.2, §6): layouts against mlx-lm's and our module trees,
converted targets against transformers' logits and mlx-lm's loader, quantization records, the assistant's
int32 `token_ordering`, already-MLX input, bad input (one line, nothing written), atomic output under interrupts
and SIGKILL, and (slow) the peak memory of a streaming conversion."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from convert_fixtures import (
    EOS_IDS,
    LAYOUT_ONLY,
    TARGETS,
    assistant_config,
    build_assistant,
    build_target,
    build_unified_assistant,
    hf_logits,
    text_config,
    to_bf16,
)
from gemma_mlx.convert import ConvertError, convert, is_mlx_checkpoint

import gemma_mlx  # (first: OpenBLAS set-up before mlx.core)
from gemma_mlx.models.gemma4_assistant import DrafterConfig
from gemma_mlx.models.gemma4_text import TextConfig

IDS = [2] + np.random.default_rng(5).integers(3, 500, 20).tolist()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """hf(name) -> a transformers checkpoint dir: a TARGETS name, "plain-bf16" (stored in bf16), "assistant"
    (centroid head), "assistant-dense" or "unified-assistant"."""
    made = {}

    def get(name):
        if name not in made:
            out = tmp_path_factory.mktemp("hf") / name
            if name == "plain-bf16":
                made[name] = to_bf16(get("plain"), out)
            elif name == "unified-assistant":
                made[name] = build_unified_assistant(out)
            elif name.startswith("assistant"):
                made[name] = build_assistant(out, ordered=name == "assistant")
            else:
                made[name] = build_target(name, out)
        return made[name]

    return get


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    """converted(name, **convert kwargs) -> the converted dir (fp32 unless told), made once per module."""
    made = {}

    def get(name, **kw):
        kw = {"dtype": "fp32", **kw}
        key = (name, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = convert(hf(name), tmp_path_factory.mktemp("mlx") / name, progress=False, **kw)
        return made[key]

    return get


def weights_of(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def config_of(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def hf_text_config(name: str) -> dict:
    """The config dict as transformers 5.23 saves it (per_layer_config instead of global_head_dim, spec §1.2.1)."""
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**text_config(name)).to_dict()


# --- layouts (spec §1.5, §2.2) --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*TARGETS, *LAYOUT_ONLY])
def test_target_layout_is_mlx_lm_and_our_module_tree(name):
    from gemma_mlx.convert.weights import target_layout
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma4_text

    from gemma_mlx.models.gemma4_text import Target

    cfg = TextConfig.from_dict(hf_text_config(name))
    layout = target_layout(cfg)
    for model in (gemma4_text.Model(gemma4_text.ModelArgs.from_dict(cfg.to_dict())), Target(cfg)):
        assert {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())} == layout.shapes
        assert {p for p, m in model.named_modules() if hasattr(m, "to_quantized")} == layout.quantizable


@pytest.mark.parametrize("ordered", [False, True])
def test_drafter_layout_is_our_module_tree(ordered):
    from gemma_mlx.convert.weights import drafter_layout
    from mlx.utils import tree_flatten

    from gemma_mlx.models.gemma4_assistant import Drafter

    cfg = DrafterConfig.from_dict(assistant_config(ordered).to_dict())
    layout, model = drafter_layout(cfg), Drafter(cfg)
    assert {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())} == layout.shapes
    assert {p for p, m in model.named_modules() if hasattr(m, "to_quantized")} == layout.quantizable


# --- converted targets against transformers, through mlx-lm ------------------------------------------------------


@pytest.mark.parametrize("name", list(TARGETS))
def test_converted_target_loads_in_mlx_lm_with_transformers_logits(name, hf, converted):
    from mlx_lm import load

    out = converted(name)
    ref = hf_logits(hf(name), IDS)
    target = gemma_mlx.load(str(out)).target  # the converted file is the transformers model (oracle tolerance)
    ours, _ = target(mx.array([IDS]), target.make_cache(1))
    assert np.abs(np.array(ours[0]) - ref).max() < 1e-4
    model, tokenizer = load(str(out))  # and mlx-lm reads it as the same model
    logits = np.array(model(mx.array([IDS]))[0])
    assert (logits.argmax(-1) == ref.argmax(-1)).all()
    # mlx-lm's own fp32 arithmetic drifts more than ours: on the wrapper target it is 1.2e-4 from transformers in
    # fp64 where transformers fp32 and our runtime are 3.6e-5 (measured layer by layer; it grows from layer 1 on).
    # A wrong tensor in the file moves logits by O(1); this bound is for mlx-lm's rounding, not for the converter.
    assert np.abs(logits - ref).max() < 1e-3
    assert set(EOS_IDS) <= set(tokenizer.eos_token_ids)

    cfg, keys = config_of(out), set(weights_of(out))
    assert cfg["model_type"] == "gemma4_text" and cfg["eos_token_id"] == EOS_IDS
    assert cfg["global_head_dim"] == 32 and "per_layer_config" not in cfg  # explicit (spec §1.2)
    assert not any(k.startswith(("model.vision", "model.audio", "model.embed_vision", "model.embed_audio",
                                 "model.language_model", "lm_head")) for k in keys)
    shared = TARGETS[name].get("num_kv_shared_layers", 0)
    assert ("model.layers.5.self_attn.k_proj.weight" in keys) == (shared == 0)  # consumers own no K/V
    assert ("model.layers.0.experts.switch_glu.gate_proj.weight" in keys) == (name == "moe")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / f).read_bytes() == (hf(name) / f).read_bytes()


def test_expert_gate_up_is_split_gate_first(hf, converted):
    from safetensors.numpy import load_file

    src = load_file(str(hf("moe") / "model.safetensors"))["model.layers.1.experts.gate_up_proj"]  # [E, 2I, H]
    w = weights_of(converted("moe"))
    assert np.array_equal(np.array(w["model.layers.1.experts.switch_glu.gate_proj.weight"]), src[:, :32])
    assert np.array_equal(np.array(w["model.layers.1.experts.switch_glu.up_proj.weight"]), src[:, 32:])


def test_dtype_casts_floats_only(converted):
    for dtype, want in (("bf16", mx.bfloat16), ("fp16", mx.float16)):
        w = weights_of(converted("assistant", dtype=dtype))
        assert w["masked_embedding.token_ordering"].dtype == mx.int32
        assert {v.dtype for k, v in w.items() if k != "masked_embedding.token_ordering"} == {want}


def test_bf16_source_is_read_exactly(hf, converted):
    from safetensors.torch import load_file

    src = {k: v.float().numpy() for k, v in load_file(str(hf("plain-bf16") / "model.safetensors")).items()}
    for dtype in ("bf16", "fp32"):
        w = weights_of(converted("plain-bf16", dtype=dtype))
        assert set(w) == set(src)
        assert all(np.array_equal(np.array(w[k].astype(mx.float32)), src[k]) for k in w)


# --- quantization (recorded the way mlx-lm records it) -----------------------------------------------------------


def _record_predicate(rec: dict):
    """What a loader reading the record does: listed paths as listed, else every module MLX can quantize."""
    return lambda path, module: rec.get(path, hasattr(module, "to_quantized"))


# moe in fp32: MLX's CPU backend runs the float experts (down_proj stays float here) in float32 only
@pytest.mark.parametrize("name,bits,dtype", [("moe", 4, "fp32"), ("moe", 8, "fp32"), ("wrapper", 4, "bf16"),
                                             ("wrapper", 8, "bf16")])
def test_quantized_target_loads_in_mlx_lm(name, bits, dtype, converted):
    from mlx_lm import load
    from mlx_lm.models import gemma4_text

    out = converted(name, dtype=dtype, quantize=bits)
    cfg = config_of(out)
    rec = cfg["quantization"]
    assert cfg["quantization_config"] == rec
    assert {k: rec[k] for k in ("group_size", "bits", "mode")} == {"group_size": 64, "bits": bits, "mode": "affine"}
    overrides = {k: v for k, v in rec.items() if k not in ("group_size", "bits", "mode")}
    # the router stays at 8 bits, recorded per layer like mlx-lm's quant_predicate does; quantizable modules whose
    # input dim (experts' down_proj 32, PLE 8 and 48) does not divide by 64 stay float, recorded as false
    if name == "moe":
        assert overrides == {**{f"model.layers.{i}.router.proj": {"group_size": 64, "bits": 8} for i in range(6)},
                             **{f"model.layers.{i}.experts.switch_glu.down_proj": False for i in range(6)}}
    else:
        assert overrides == {"model.embed_tokens_per_layer": False,
                             **{f"model.layers.{i}.per_layer_projection": False for i in range(6)}}

    w = weights_of(out)
    for k, v in w.items():
        if k.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale")):
            assert v.dtype == {"fp32": mx.float32, "bf16": mx.bfloat16}[dtype], k
            assert k.rsplit(".", 1)[0] + ".scales" not in w, k
    model, _ = load(str(out))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == bits
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    if name == "moe":
        assert layer.router.proj.bits == 8 and layer.experts.switch_glu.gate_proj.bits == bits
        assert not hasattr(layer.experts.switch_glu.down_proj, "bits")
    else:
        assert type(layer.per_layer_projection) is nn.Linear
    assert np.isfinite(np.array(model(mx.array([IDS])).astype(mx.float32))).all()

    # mlx.nn.quantize with a predicate reading the record rebuilds the same tree (strict load: names and shapes)
    fresh = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(cfg))
    nn.quantize(fresh, rec["group_size"], rec["bits"], mode=rec["mode"], class_predicate=_record_predicate(rec))
    fresh.load_weights(list(w.items()), strict=True)


def test_quantize_fp32_with_group_size_32(hf, converted):
    from mlx_lm import load

    out = converted("plain", dtype="fp32", quantize=8, group_size=32)
    rec = config_of(out)["quantization"]
    assert (rec["bits"], rec["group_size"]) == (8, 32)
    w = weights_of(out)
    assert w["model.layers.0.mlp.down_proj.scales"].dtype == mx.float32
    assert w["model.layers.0.mlp.down_proj.scales"].shape == (64, 128 // 32)
    model, _ = load(str(out))
    logits = np.array(model(mx.array([IDS]))[0])
    assert np.isfinite(logits).all()


def test_assistant_keeps_token_ordering_int32_and_unquantized(hf, converted):
    from safetensors.numpy import load_file

    from gemma_mlx.models.gemma4_assistant import Drafter

    out = converted("assistant", dtype="bf16", quantize=4, group_size=32)
    w, cfg = weights_of(out), config_of(out)
    src = load_file(str(hf("assistant") / "model.safetensors"))
    assert src["masked_embedding.token_ordering"].dtype == np.int64
    assert w["masked_embedding.token_ordering"].dtype == mx.int32
    assert np.array_equal(np.array(w["masked_embedding.token_ordering"]), src["masked_embedding.token_ordering"])
    assert not any(k.startswith("masked_embedding.token_ordering.") for k in w)
    assert "lm_head.weight" not in w and "model.layers.0.layer_scalar" in w
    assert w["model.norm.weight"].dtype == mx.bfloat16 and "model.norm.scales" not in w
    assert w["pre_projection.weight"].dtype == mx.uint32 and "masked_embedding.centroids.scales" in w
    assert cfg["model_type"] == "gemma4_assistant" and cfg["use_ordered_embeddings"] is True
    assert cfg["text_config"]["num_kv_shared_layers"] == 4 and cfg["text_config"]["global_head_dim"] == 32
    rec = cfg["quantization"]
    model = Drafter(DrafterConfig.from_dict(cfg))
    nn.quantize(model, rec["group_size"], rec["bits"], class_predicate=_record_predicate(rec))
    model.load_weights(list(w.items()), strict=True)


def test_assistant_fp32_is_the_hf_weights(hf, converted):
    from safetensors.numpy import load_file

    src = load_file(str(hf("assistant-dense") / "model.safetensors"))
    w = weights_of(converted("assistant-dense"))
    assert set(w) == set(src) - {"lm_head.weight"}
    assert all(np.array_equal(np.array(w[k]), src[k]) for k in w)


def test_unified_assistant_converts_like_the_assistant(hf, converted):
    from safetensors.numpy import load_file

    from gemma_mlx.models.gemma4_assistant import Drafter

    out = converted("unified-assistant")
    cfg, w = config_of(out), weights_of(out)
    assert cfg["model_type"] == "gemma4_unified_assistant" and cfg["text_config"]["global_head_dim"] == 512
    src = load_file(str(hf("unified-assistant") / "model.safetensors"))
    assert set(w) == set(src) - {"lm_head.weight"} and w["masked_embedding.token_ordering"].dtype == mx.int32
    Drafter(DrafterConfig.from_dict(cfg)).load_weights(list(w.items()), strict=True)


# --- already-MLX input ------------------------------------------------------------------------------------------


def _safetensors(d: Path, names, metadata=None, config=None):
    from safetensors.numpy import save_file

    d.mkdir(parents=True)
    save_file({k: np.zeros((2, 2), np.float32) for k in names}, str(d / "model.safetensors"), metadata=metadata)
    (d / "config.json").write_text(json.dumps(config or {"model_type": "gemma4_text"}))
    return d


def test_mlx_checkpoints_are_recognized(hf, converted, tmp_path):
    assert is_mlx_checkpoint(converted("plain")) and is_mlx_checkpoint(converted("moe", quantize=4))
    assert not any(is_mlx_checkpoint(hf(n)) for n in ("plain", "moe", "wrapper", "assistant"))
    assert not is_mlx_checkpoint(tmp_path / "nowhere") and not is_mlx_checkpoint(tmp_path)
    hf_names = ["model.layers.0.mlp.up_proj.weight"]
    assert not is_mlx_checkpoint(_safetensors(tmp_path / "hf", hf_names, {"format": "pt"}))
    assert is_mlx_checkpoint(_safetensors(tmp_path / "fmt", hf_names, {"format": "mlx"}))
    for signal_name in ("language_model.model.layers.0.mlp.up_proj.weight",
                        "model.layers.0.experts.switch_glu.up_proj.weight", "model.layers.0.mlp.up_proj.scales"):
        assert is_mlx_checkpoint(_safetensors(tmp_path / signal_name, [signal_name], {"format": "pt"}))
    quant = {"model_type": "gemma4", "quantization": {"group_size": 64, "bits": 4}}
    assert is_mlx_checkpoint(_safetensors(tmp_path / "q", hf_names, {"format": "pt"}, quant))


def test_mlx_checkpoint_is_refused_unless_requantized(converted, tmp_path):
    from gemma_mlx.models.gemma4_assistant import Drafter

    for src in (converted("plain"), converted("assistant", dtype="bf16", quantize=4, group_size=32)):
        with pytest.raises(ConvertError, match="already an MLX checkpoint") as e:
            convert(src, tmp_path / "again", progress=False)
        assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
    out = convert(src, tmp_path / "q8", dtype="bf16", quantize=8, group_size=32, progress=False)
    cfg, w = config_of(out), weights_of(out)
    assert cfg["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}  # 32 | d: everything quantized
    assert w["masked_embedding.token_ordering"].dtype == mx.int32
    model = Drafter(DrafterConfig.from_dict(cfg))
    nn.quantize(model, 32, 8, class_predicate=_record_predicate(cfg["quantization"]))
    model.load_weights(list(w.items()), strict=True)


def _mlx_community_layout(src: Path, dst: Path) -> Path:
    """An mlx-lm `gemma4` wrapper dir (what mlx-community Gemma 4 repos look like): `language_model.model.…` names,
    a leftover vision tensor, the quantization record under the same names, a wrapper config."""
    w = {("language_model." + k): v for k, v in weights_of(src).items()}
    w["vision_tower.encoder.layers.0.mlp.up_proj.weight"] = mx.zeros((4, 4))
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), w, metadata={"format": "mlx"})
    text = config_of(src)
    rec = text.pop("quantization")
    text.pop("quantization_config")
    rec = {(k if k in ("group_size", "bits", "mode") else "language_model." + k): v for k, v in rec.items()}
    cfg = {"model_type": "gemma4", "vocab_size": text["vocab_size"], "text_config": text, "quantization": rec,
           "quantization_config": rec}
    (dst / "config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "tokenizer.json", dst)
    shutil.copy(src / "tokenizer_config.json", dst)
    return dst


def test_mlx_community_checkpoint_requantizes(converted, tmp_path):
    from mlx_lm import load

    q4 = converted("wrapper", dtype="fp32", quantize=4)
    src = _mlx_community_layout(q4, tmp_path / "community")
    assert is_mlx_checkpoint(src)
    load(str(src))  # the layout is genuine: mlx-lm's gemma4 wrapper loads it

    again = convert(src, tmp_path / "again4", dtype="fp32", quantize=4, progress=False)
    assert config_of(again)["model_type"] == "gemma4_text"
    # 4-bit values re-quantized at 4 bits with the same groups come back within one quantization step (MLX's affine
    # re-quantization of its own dequantized values is not exactly idempotent)
    a, b = weights_of(q4), weights_of(again)
    assert set(a) == set(b)
    for k in (k for k in a if k.endswith(".scales")):
        p = k.removesuffix(".scales")
        wa = mx.dequantize(a[p + ".weight"], a[k], a[p + ".biases"], group_size=64, bits=4)
        wb = mx.dequantize(b[p + ".weight"], b[k], b[p + ".biases"], group_size=64, bits=4)
        assert float(mx.abs(wa - wb).max()) <= 1.01 * float(mx.abs(a[k]).max()), p

    q8 = convert(src, tmp_path / "again8", dtype="bf16", quantize=8, progress=False)
    model, _ = load(str(q8))
    assert model.model.layers[0].self_attn.q_proj.bits == 8


# --- bad input: one line, nothing written ------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _edit_weights(d: Path, drop=(), add=None) -> Path:
    from safetensors.numpy import load_file, save_file

    w = load_file(str(d / "model.safetensors"))
    for k in drop:
        del w[k]
    w.update(add or {})
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _bad_inputs(hf, tmp: Path) -> dict:
    plain = hf("plain")
    f = lambda name: _copy(plain, tmp / name)  # noqa: E731
    cases = {}
    (d := f("noconfig")).joinpath("config.json").unlink()
    cases["no config.json"] = (d, {}, "no config.json")
    (d := f("configdir")).joinpath("config.json").unlink()
    (d / "config.json").mkdir()
    cases["unreadable config"] = (d, {}, "config.json: unreadable")
    (d := f("badjson")).joinpath("config.json").write_text("{not json")
    cases["invalid JSON"] = (d, {}, "config.json: unreadable")
    (d := f("list")).joinpath("config.json").write_text("[1, 2]")
    cases["config not an object"] = (d, {}, "not a JSON object")
    cases["unknown model_type"] = (_edit_config(f("llama"), model_type="llama"), {}, "unknown model_type 'llama'")
    cases["no model_type"] = (_edit_config(f("nomt"), model_type=None), {}, "unknown model_type None")
    # a unified config whose shapes are not the checkpoint's: refused on the shape check, before writing
    cases["unified wrapper, wrong shapes"] = (_edit_config(f("uni"), model_type="gemma4_unified", text_config={}), {},
                                              r"model.embed_tokens.weight has shape \[512, 64\]")
    cases["pre-quantized HF"] = (_edit_config(f("fp8"), quantization_config={"quant_method": "fp8"}), {},
                                 "pre-quantized Hugging Face checkpoint \\(fp8\\)")
    cases["gemma3"] = (_edit_config(f("g3"), model_type="gemma3_text"), {}, "GGUF")
    cases["invalid config"] = (_edit_config(f("kv9"), num_kv_shared_layers=9), {}, "num_kv_shared_layers=9")
    d = f("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-1000])
    cases["truncated data"] = (d, {}, "truncated or corrupt")
    (d := f("tiny")).joinpath("model.safetensors").write_bytes(b"\x05\x00")
    cases["truncated header"] = (d, {}, "truncated")
    (d := f("garbage")).joinpath("model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header!}")
    cases["corrupt header"] = (d, {}, "unreadable safetensors header")
    (d := f("huge")).joinpath("model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    cases["header length"] = (d, {}, "corrupt or truncated header")
    d = f("entry")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    k = "model.layers.0.mlp.up_proj.weight"
    header[k]["shape"] = [128, 65]  # the byte range no longer matches the shape
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    (d / "model.safetensors").write_bytes(data[:8] + raw.ljust(n) + data[8 + n:])
    cases["entry size"] = (d, {}, "wrong byte size")
    (d := f("noweights")).joinpath("model.safetensors").unlink()
    cases["no weights"] = (d, {}, r"no \*.safetensors")
    (d := f("index")).joinpath("model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    cases["index names a missing shard"] = (d, {}, "model-00002-of-00002.safetensors, which is missing")
    cases["wrong shape"] = (_edit_config(f("shape"), intermediate_size=96), {},
                            r"model.layers.0.mlp.down_proj.weight has shape \[64, 128\], the config implies \[64, 96\]")
    cases["missing weight"] = (_edit_weights(f("missing"), drop=["model.layers.3.mlp.up_proj.weight"]), {},
                               "missing weight model.layers.3.mlp.up_proj.weight")
    cases["unexpected weight"] = (_edit_weights(f("extra"), add={"model.layers.3.mlp.extra.weight": np.zeros(4)}),
                                  {}, "unexpected weight model.layers.3.mlp.extra.weight")
    cases["tower in a text checkpoint"] = (
        _edit_weights(f("tower"), add={"model.vision_tower.x.weight": np.zeros(4, np.float32)}), {},
        "unexpected weight model.vision_tower.x.weight")
    d = _copy(hf("assistant"), tmp / "assistant-missing")
    cases["assistant missing weight"] = (_edit_weights(d, drop=["masked_embedding.token_ordering"]), {},
                                         "missing weight masked_embedding.token_ordering")
    d = _copy(hf("assistant"), tmp / "assistant-untied")
    cases["assistant untied head"] = (_edit_config(d, tie_word_embeddings=False), {}, "untied")
    cases["quantize 3 bits"] = (plain, {"quantize": 3}, "--quantize 3 is not supported")
    cases["group size 16"] = (plain, {"quantize": 4, "group_size": 16}, "--group-size 16 is not supported")
    cases["dtype"] = (plain, {"dtype": "int8"}, "--dtype int8 is not supported")
    cases["not a dir nor a hub id"] = (tmp / "nope" / "x" / "y", {}, "no such directory, and not a hub id")
    cases["a file"] = (plain / "config.json", {}, "not a directory")
    return cases


def test_bad_input_gets_one_line_and_writes_nothing(hf, tmp_path):
    cases = _bad_inputs(hf, tmp_path / "in")
    for name, (src, kwargs, message) in cases.items():
        out = tmp_path / "out" / name.replace(" ", "_")
        with pytest.raises(ConvertError, match=message) as e:
            convert(src, out, progress=False, **kwargs)
        assert "\n" not in str(e.value), name
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), name


def test_existing_output_needs_force_and_is_replaced_atomically(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConvertError, match="already exists"):
        convert(hf("plain"), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep"]
    convert(hf("plain"), out, force=True, progress=False)
    assert (out / "config.json").exists() and not (out / "keep").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left behind


def test_an_interrupted_conversion_leaves_nothing(hf, tmp_path, monkeypatch):
    """KeyboardInterrupt (or any failure) mid-write: the temp dir is removed, an existing OUT is untouched."""
    import gemma_mlx.convert.writer as writer

    calls = []
    original = writer.ShardWriter.add

    def interrupted(self, *a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        original(self, *a)

    monkeypatch.setattr(writer.ShardWriter, "add", interrupted)
    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 20_000)  # shards are on disk when it stops
    with pytest.raises(KeyboardInterrupt):
        convert(hf("plain"), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        convert(hf("plain"), tmp_path / "out", force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep").exists()


def test_a_killed_conversion_leaves_no_output(hf, tmp_path):
    """SIGKILL while shards are being written: OUT never appears; the hidden temp dir left behind never has a
    config.json, so it never looks complete."""
    out = tmp_path / "killed"
    script = (
        "import time, gemma_mlx.convert.writer as w\n"
        "w.MAX_SHARD_BYTES = 20_000\n"
        "flush = w.ShardWriter.flush\n"
        "def slow(self):\n"
        "    flush(self); print('shard', flush=True); time.sleep(0.5)\n"
        "w.ShardWriter.flush = slow\n"
        f"from gemma_mlx.convert import convert\nconvert({str(hf('plain'))!r}, {str(out)!r}, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(2):
        assert proc.stdout.readline().startswith("shard")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".killed.tmp-*"))
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in leftovers]
    assert leftovers and list(leftovers[0].glob("shard-*.safetensors"))
    assert not any((d / "config.json").exists() for d in leftovers)

    # the next conversion of the same output removes what the killed one left, not a live conversion's temp dir
    import fcntl

    from gemma_mlx.convert.writer import LOCK

    live = tmp_path / ".killed.tmp-live"
    live.mkdir()
    with open(live / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        convert(hf("plain"), out, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".killed.tmp-live", "killed"]
    assert not (out / LOCK).exists()


# --- sharding, hub ids, progress ---------------------------------------------------------------------------------


def _reshard(src: Path, dst: Path, parts: int) -> Path:
    """The same checkpoint as `parts` safetensors shards with an index, like save_pretrained(max_shard_size=...)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    keys, weight_map = sorted(w), {}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = {k: w[k] for k in keys[i::parts]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_input_and_output(hf, tmp_path, monkeypatch, capsys):
    import gemma_mlx.convert.writer as writer
    from mlx_lm import load

    src = _reshard(hf("moe"), tmp_path / "in", parts=3)
    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 100_000)
    out = convert(src, tmp_path / "out", dtype="fp32", progress=True)
    assert capsys.readouterr().out == ""  # the progress bar goes to stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["format"] == "mlx" and set(index["weight_map"]) == set(weights_of(out))
    biggest = max(v.nbytes for v in weights_of(out).values())
    assert all((out / s).stat().st_size <= max(100_000, biggest) + 10_000 for s in shards)
    model, _ = load(str(out))
    assert np.abs(np.array(model(mx.array([IDS]))[0]) - hf_logits(hf("moe"), IDS)).max() < 1e-4


def test_hub_id_is_downloaded_with_only_the_needed_files(hf, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, allow_patterns, **kw):
        calls.append((repo_id, allow_patterns))
        return str(hf("plain"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    convert("google/gemma-4-tiny", tmp_path / "out", progress=False)
    (repo, patterns), = calls
    assert repo == "google/gemma-4-tiny" and (tmp_path / "out" / "config.json").exists()
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "chat_template.jinja", "*.safetensors", "*.safetensors.index.json"} <= set(patterns)
    assert not any(p in ("*", "*.bin", "*.pth") for p in patterns)

    def offline(**kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConvertError, match="cannot download google/gemma-4-tiny") as e:
        convert("google/gemma-4-tiny", tmp_path / "out2", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out2").exists()


# --- streaming memory (slow) -------------------------------------------------------------------------------------


def _synthetic_checkpoint(d: Path, shard_mb: int = 300) -> list[int]:
    """A gemma4_text checkpoint in HF layout (fp32, ~1.3 GB) written one shard at a time with safetensors' numpy
    writer; returns the shard sizes."""
    from safetensors.numpy import save_file

    H, I, V, layers, kv = 1024, 4096, 65536, 16, 256
    types = ["sliding_attention"] * 3 + ["full_attention"]
    cfg = dict(model_type="gemma4_text", vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=2, head_dim=128, global_head_dim=128,
               hidden_size_per_layer_input=0, sliding_window=128, layer_types=types * (layers // 4))
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (1024, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, 1024),
                       p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I), p + "layer_scalar": (1,)})
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            shapes[p + n + ".weight"] = (H,)
    rng = np.random.default_rng(0)
    shard, size, files = {}, 0, []

    def write():
        files.append(d / f"model-{len(files) + 1:05d}.safetensors")
        save_file(shard, str(files[-1]), metadata={"format": "pt"})

    for name, shape in shapes.items():
        shard[name] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        size += shard[name].nbytes
        if size >= shard_mb * 2**20:
            write()
            shard, size = {}, 0
    if shard:
        write()
    return [f.stat().st_size for f in files]


def _peak_rss_bytes(code: str) -> int:
    """Peak RSS of a fresh interpreter running `code`: VmHWM of /proc/self/status (kB). Not ru_maxrss: on Linux a
    forked child starts with its parent's (pytest's) high-water mark and keeps it across exec."""
    probe = code + "\nimport re\nprint(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1])\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) * 1024


@pytest.mark.slow
def test_conversion_streams_tensor_by_tensor(tmp_path):
    """Peak memory ≈ one input shard + one output shard (+ the interpreter and MLX), not the whole model: fp32 in and
    out, output shards limited to 300 MB, so holding the whole 1.3 GB model (as input or as output) breaks the
    budget."""
    in_shards = _synthetic_checkpoint(tmp_path / "big")
    total = sum(in_shards)
    assert total >= 1.2e9 and len(in_shards) >= 4
    imports = "import gemma_mlx.convert, mlx.core as mx\nmx.eval(mx.zeros(8) + 1)"
    baseline = _peak_rss_bytes(imports)
    t0 = time.time()
    peak = _peak_rss_bytes(
        f"{imports}\nimport gemma_mlx.convert.writer as w\nw.MAX_SHARD_BYTES = {300 * 2**20}\n"
        f"gemma_mlx.convert.convert({str(tmp_path / 'big')!r}, {str(tmp_path / 'out')!r}, dtype='fp32', "
        "progress=False)")
    out_shards = [f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")]
    budget = (max(in_shards) + max(out_shards)) * 1.25 + baseline
    print(f"\npeak RSS {peak / 2**20:.0f} MB (baseline {baseline / 2**20:.0f} MB) converting {total / 2**20:.0f} MB "
          f"in {len(in_shards)} shards; budget {budget / 2**20:.0f} MB; {time.time() - t0:.0f}s")
    assert len(out_shards) >= 2
    assert peak <= budget
