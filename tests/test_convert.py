"""The converter (spec §1.2, §1.5, §2.2, §6): layouts, quantization records, mlx-lm compatibility, bad input,
atomic output, streaming memory."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gemma_mlx  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from oracle import hf_forward

from gemma_mlx.convert import ConvertError, convert, is_mlx_checkpoint

IDS = [2] + np.random.default_rng(5).integers(3, 500, 20).tolist()


def test_converted_target_loads_in_mlx_lm_with_the_same_logits(mlx_dir, hf_dir):
    from mlx_lm import load

    for variant in ("plain", "moe", "kvshared", "mm"):
        model, tokenizer = load(str(mlx_dir(variant)))
        logits = np.array(model(mx.array([IDS]))[0])
        ref, _ = hf_forward(hf_dir(variant), IDS)
        assert np.abs(logits - ref).max() < 1e-4, variant
        assert (logits.argmax(-1) == ref.argmax(-1)).all()
        assert tokenizer.eos_token_ids >= {1, 106}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_target_loads_in_mlx_lm(bits, mlx_dir):
    from mlx_lm import load

    out = mlx_dir("moe", quantize=bits)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits and cfg["quantization"]["group_size"] == 64
    # the MoE router is kept at 8 bits
    assert bits == 8 or cfg["quantization"]["model.layers.0.router.proj"] == {"group_size": 64, "bits": 8}
    model, _ = load(str(out))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert model.model.layers[0].self_attn.q_proj.bits == bits
    assert np.isfinite(np.array(model(mx.array([IDS])))).all()


def test_wrapper_is_reduced_to_text(mlx_dir):
    out = mlx_dir("mm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_text" and cfg["global_head_dim"] == 32
    keys = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith(("model.vision", "model.audio", "model.embed_vision", "model.embed_audio"))
                   for k in keys)
    assert "model.layers.5.self_attn.k_proj.weight" not in keys  # kv-shared consumer: its K/V come from layer 2


def test_explicit_config_resolves_per_layer_config(mlx_dir, hf_dir):
    raw = json.loads((hf_dir("keqv") / "config.json").read_text())
    assert "global_head_dim" not in raw and "per_layer_config" in raw  # how transformers 5.23 saves it
    cfg = json.loads((mlx_dir("keqv") / "config.json").read_text())
    assert cfg["global_head_dim"] == 32 and cfg["num_global_key_value_heads"] == 1
    assert "per_layer_config" not in cfg and cfg["num_kv_shared_layers"] == 0


def test_drafter_keeps_token_ordering_int32_and_unquantized(hf_drafter_dir, tmp_path):
    out = convert(hf_drafter_dir("plain", True), tmp_path / "d", dtype="bf16", quantize=4, progress=False)
    w = mx.load(str(out / "model.safetensors"))
    assert w["masked_embedding.token_ordering"].dtype == mx.int32
    assert "masked_embedding.token_ordering.scales" not in w
    assert w["model.norm.weight"].dtype == mx.bfloat16
    assert "lm_head.weight" not in w
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_assistant" and cfg["text_config"]["num_kv_shared_layers"] == 4


def test_already_mlx_checkpoint_is_recognized(mlx_dir, hf_dir, tmp_path):
    assert is_mlx_checkpoint(mlx_dir("plain")) and not is_mlx_checkpoint(hf_dir("plain"))
    with pytest.raises(ConvertError, match="already an MLX checkpoint"):
        convert(mlx_dir("plain"), tmp_path / "again", progress=False)


def test_sharded_output_with_index(hf_dir, tmp_path, monkeypatch):
    import gemma_mlx.convert.writer as writer

    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 200_000)
    out = convert(hf_dir("plain"), tmp_path / "sharded", dtype="fp32", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).stat().st_size <= 200_000 + 70_000 for s in shards)
    from gemma_mlx.loader import load_checkpoint

    model = load_checkpoint(out)
    ref, _ = hf_forward(hf_dir("plain"), IDS)
    assert np.abs(np.array(model(mx.array([IDS]), model.make_cache())[0][0]) - ref).max() < 1e-4


# --- bad input: one line, nothing written --------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _bad_inputs(hf_dir, tmp):
    cases = {}
    d = _copy(hf_dir("plain"), tmp / "noconfig")
    (d / "config.json").unlink()
    cases["no config.json"] = (d, {}, "no config.json")
    d = _copy(hf_dir("plain"), tmp / "badjson")
    (d / "config.json").write_text("{not json")
    cases["unreadable config"] = (d, {}, "unreadable")
    d = _copy(hf_dir("plain"), tmp / "unknown")
    _edit_config(d, model_type="llama")
    cases["unknown model_type"] = (d, {}, "unknown model_type 'llama'")
    d = _copy(hf_dir("plain"), tmp / "truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    cases["truncated safetensors"] = (d, {}, "truncated")
    d = _copy(hf_dir("plain"), tmp / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header!}")
    cases["corrupt safetensors"] = (d, {}, "unreadable safetensors|corrupt")
    d = _copy(hf_dir("plain"), tmp / "shape")
    _edit_config(d, intermediate_size=96)
    cases["wrong shape"] = (d, {}, r"mlp.down_proj.weight has shape \[64, 128\], the config implies \[64, 96\]")
    from safetensors.numpy import load_file, save_file

    d = _copy(hf_dir("plain"), tmp / "missing")
    w = load_file(str(d / "model.safetensors"))
    del w["model.layers.3.mlp.up_proj.weight"]
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    cases["missing weight"] = (d, {}, "missing weight model.layers.3.mlp.up_proj.weight")
    d = _copy(hf_dir("plain"), tmp / "unexpected")
    w = load_file(str(d / "model.safetensors"))
    w["model.layers.3.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    cases["unexpected weight"] = (d, {}, "unexpected weight model.layers.3.mlp.extra_proj.weight")
    cases["quantize 3 bits"] = (hf_dir("plain"), {"quantize": 3}, "--quantize 3 is not supported")
    cases["group size 16"] = (hf_dir("plain"), {"quantize": 4, "group_size": 16}, "--group-size 16")
    cases["dtype"] = (hf_dir("plain"), {"dtype": "int8"}, "--dtype int8")
    cases["not a dir nor a hub id"] = (tmp / "nope" / "x" / "y", {}, "no such directory")
    return cases


def test_bad_input_gets_one_line_and_writes_nothing(hf_dir, tmp_path):
    for name, (src, kwargs, message) in _bad_inputs(hf_dir, tmp_path / "in").items():
        out = tmp_path / "out" / name.replace(" ", "_")
        with pytest.raises(ConvertError, match=message) as e:
            convert(src, out, progress=False, **kwargs)
        assert "\n" not in str(e.value), name
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), name


def test_existing_output_needs_force(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConvertError, match="already exists"):
        convert(hf_dir("plain"), out, progress=False)
    assert (out / "keep").exists()
    convert(hf_dir("plain"), out, force=True, progress=False)
    assert (out / "config.json").exists() and not (out / "keep").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left behind


def test_a_killed_conversion_leaves_no_output(hf_dir, tmp_path):
    """SIGKILL mid-write: the output dir never appears (the temp dir is hidden and never has a config.json)."""
    out = tmp_path / "killed"
    script = (
        "import time, gemma_mlx.convert.writer as w\n"
        "orig = w.ShardWriter.add\n"
        "def slow(self, *a):\n"
        "    orig(self, *a); print('tensor', flush=True); time.sleep(0.2)\n"
        "w.ShardWriter.add = slow\n"
        f"from gemma_mlx.convert import convert\nconvert({str(hf_dir('plain'))!r}, {str(out)!r}, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        assert proc.stdout.readline().startswith("tensor")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".killed.tmp-*"))
    assert all(not (d / "config.json").exists() for d in leftovers)


def test_hub_id_without_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConvertError, match="cannot download google/gemma-4-e2b-it") as e:
        convert("google/gemma-4-e2b-it", tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


# --- streaming memory ------------------------------------------------------------------------------------------


def _synthetic_checkpoint(d: Path, shards: int = 4, shard_mb: int = 300):
    """A gemma4_text checkpoint in HF layout, several fp32 shards of ~shard_mb each (random weights)."""
    from safetensors.numpy import save_file

    H, layers = 1024, 16
    cfg = dict(model_type="gemma4_text", vocab_size=32768, hidden_size=H, intermediate_size=4 * H,
               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
               global_head_dim=128, hidden_size_per_layer_input=0, sliding_window=128,
               layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 4)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    names = {"model.embed_tokens.weight": (32768, H), "model.norm.weight": (H,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        names.update({p + "self_attn.q_proj.weight": (8 * 128, H), p + "self_attn.k_proj.weight": (256, H),
                      p + "self_attn.v_proj.weight": (256, H), p + "self_attn.o_proj.weight": (H, 8 * 128),
                      p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,),
                      p + "mlp.gate_proj.weight": (4 * H, H), p + "mlp.up_proj.weight": (4 * H, H),
                      p + "mlp.down_proj.weight": (H, 4 * H), p + "layer_scalar": (1,)})
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            names[p + n + ".weight"] = (H,)
    shard, size, k, files = {}, 0, 0, []
    for name, shape in names.items():
        shard[name] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        size += shard[name].nbytes
        if size >= shard_mb * 2**20:
            k += 1
            save_file(shard, str(d / f"model-{k:05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
    if shard:
        k += 1
        save_file(shard, str(d / f"model-{k:05d}.safetensors"), metadata={"format": "pt"})
    return max(f.stat().st_size for f in d.glob("*.safetensors")), sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _conversion_peak_mb(src: Path, out: Path) -> float:
    """Peak RSS growth of a conversion in a fresh process: the high-water mark is reset after the imports
    (/proc/self/clear_refs), so import-time transients don't hide the conversion."""
    code = (
        "import re\nfrom gemma_mlx.convert import convert, writer\n"
        f"writer.MAX_SHARD_BYTES = {300 * 2**20}\n"
        "status = lambda k: int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\nbefore = status('VmRSS')\n"
        f"convert({str(src)!r}, {str(out)!r}, dtype='fp32', progress=False)\n"
        "print((status('VmHWM') - before) / 1024)\n"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.slow
def test_conversion_streams_tensor_by_tensor(tmp_path):
    largest_in, total = _synthetic_checkpoint(tmp_path / "big")
    assert total >= 1e9
    t0 = time.time()
    growth = _conversion_peak_mb(tmp_path / "big", tmp_path / "out")
    largest_out = max(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    budget = (largest_in + largest_out) / 2**20 * 1.25
    print(f"conversion peak +{growth:.0f} MB over {total / 2**20:.0f} MB of input, budget {budget:.0f} MB, "
          f"{time.time() - t0:.0f}s")
    assert largest_in < total / 2  # several shards, so whole-model loading would blow the budget
    assert growth <= budget
