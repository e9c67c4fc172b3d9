"""Cross-attention LoRA: targets, audit, saving in diffusers format, exact reload in plain diffusers."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from adapt.facts import AdapterFacts
from adapt import lora, model
from conftest import diffusers_lora_with_text_encoder


def _randomize(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.2


def _out(unet, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 32, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([100, 700]), e, **kwargs).sample


def test_presets_select_the_right_layers(tiny_base):
    pipe, _ = model.load_base(str(tiny_base))
    cross = lora.target_modules(pipe.unet, "cross_attn")
    kv = lora.target_modules(pipe.unet, "cross_attn_kv")
    both = lora.target_modules(pipe.unet, "all_attn")
    assert cross and all(".attn2." in n for n in cross)
    assert not any(".attn1." in n for n in cross)
    assert {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n in cross} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert set(kv) < set(cross) and all(n.endswith(("to_k", "to_v")) for n in kv)
    assert set(cross) < set(both) and any(".attn1." in n for n in both)
    # tiny UNet: 4 transformer blocks (down 1, up 2, mid 1) x 4 projections
    assert (len(cross), len(kv), len(both)) == (16, 8, 32)


@pytest.mark.parametrize("which", ["tiny", "embedded"])  # embedded: down_blocks.0 has no attention, a conv key sorts first
def test_conv_preset_adds_resnet_convs_and_loads_exactly_in_plain_diffusers_and_kohya(which, tiny_base, tmp_path):
    """cross_attn_conv (LoCon): attn2 plus every resnet's conv1/conv2, nothing else; the file has one key naming and
    reloads bit-exactly in plain diffusers, and its kohya export imports back to the same outputs."""
    from adapt import kohya
    base = str(tiny_base) if which == "tiny" else "tiny-faces"
    pipe, bf = model.load_base(base)
    names = lora.target_modules(pipe.unet, "cross_attn_conv")
    convs = [n for n in names if ".resnets." in n]
    resnets = [n for n, m in pipe.unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    assert sorted(convs) == sorted(f"{r}.conv{i}" for r in resnets for i in (1, 2))
    assert sorted(set(names) - set(convs)) == sorted(lora.target_modules(pipe.unet, "cross_attn"))
    base_out = _out(pipe.unet)
    a = lora.attach(pipe.unet, "cross_attn_conv", rank=4, alpha=2)
    assert a["num_modules"] == len(names) and any(m.endswith("resnets.0.conv1") for m in a["modules"])
    _randomize(pipe.unet)
    trained = _out(pipe.unet)
    for conv in convs:  # LoCon: the down projection keeps the conv's kernel
        layer = dict(pipe.unet.named_modules())[conv]
        assert layer.lora_A["default"].weight.shape[-2:] == layer.base_layer.weight.shape[-2:]
    lora.save(tmp_path, pipe.unet, AdapterFacts(base=base, rank=4, alpha=2, architecture="sd"))
    tensors, _ = lora.read(tmp_path)
    assert all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in tensors) and len(tensors) == 2 * len(names)
    plain = StableDiffusionPipeline.from_pretrained(bf.resolved, safety_checker=None)
    plain.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")  # as the model card
    assert torch.equal(_out(plain.unet), trained) and (trained - base_out).abs().max() > 1e-3
    # the model card's plain-diffusers scale, cross_attention_kwargs={"scale": s}, scales the convs' layers too
    doubled, _ = model.load_base(base)
    lora.load_into(doubled, tmp_path, scale=2.0)
    assert (_out(plain.unet, cross_attention_kwargs={"scale": 2.0}) - _out(doubled.unet)).abs().max() < 1e-5
    assert (_out(doubled.unet) - trained).abs().max() > 1e-3

    k = kohya.to_kohya(tmp_path, tmp_path / "k.safetensors")
    back = kohya.from_kohya(k, tmp_path / "back", base_cfg=dict(pipe.unet.config), log=lambda m: None)
    ours, _ = model.load_base(base)
    lora.load_into(ours, back, scale=1.0)
    assert (_out(ours.unet) - trained).abs().max() < 1e-5


def test_mixed_key_naming_loads_every_layer_and_a_partial_load_is_refused(tmp_path, monkeypatch):
    """A file as diffusers' own training scripts write it (attention layers .lora.down/.up, convs .lora_A/_B): when a
    conv key sorts first, diffusers' loader keeps only the convs; load_into loads every layer, and refuses a load
    that leaves any of the file's layers out."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    pipe, bf = model.load_base("tiny-faces")
    lora.attach(pipe.unet, "cross_attn_conv", rank=4, alpha=2)
    _randomize(pipe.unet)
    trained = _out(pipe.unet)
    lora.save(tmp_path / "ours", pipe.unet, AdapterFacts(base="tiny-faces", rank=4, alpha=2, architecture="sd"))
    with safe_open(str(tmp_path / "ours" / lora.WEIGHTS_NAME), "pt") as h:
        meta = h.metadata()
    mixed = {f"unet.{k}": v.contiguous() for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)).items()}
    assert sorted(mixed)[0].endswith(".lora_A.weight") and any(k.endswith(".lora.down.weight") for k in mixed)
    (tmp_path / "mixed").mkdir()
    save_file(mixed, str(tmp_path / "mixed" / lora.WEIGHTS_NAME), metadata=meta)
    ours, _ = model.load_base("tiny-faces")
    lora.load_into(ours, tmp_path / "mixed", scale=1.0)
    assert torch.equal(_out(ours.unet), trained)

    short, _ = model.load_base("tiny-faces")
    real = short.load_lora_weights

    def drops_attention(folder, weight_name, adapter_name):  # a loader that silently leaves layers out
        with safe_open(str(Path(folder) / weight_name), "pt") as h:
            kept = {k: h.get_tensor(k) for k in h.keys() if ".attn2." not in k}
        save_file(kept, str(tmp_path / "kept.safetensors"), metadata=meta)
        real(str(tmp_path), weight_name="kept.safetensors", adapter_name=adapter_name)
    monkeypatch.setattr(short, "load_lora_weights", drops_attention)
    with pytest.raises(lora.AdapterError, match=r"diffusers loaded 22 of the file's 50 UNet LoRA layers; not loaded: .*attn2"):
        lora.load_into(short, tmp_path / "ours", scale=1.0)


def test_attach_audit_counts(tiny_base):
    pipe, _ = model.load_base(str(tiny_base))
    a = lora.attach(pipe.unet, "cross_attn", rank=4, alpha=2)
    assert a["num_modules"] == 16 and a["self_attention_modules"] == []
    # rank 4: sum over layers of 4 * (in + out)
    expected = sum(4 * (m.in_features + m.out_features) for n, m in pipe.unet.named_modules()
                   if n in a["modules"] for m in [m.base_layer])
    assert a["trainable_params"] == expected == 4864
    assert all(p.dtype == torch.float32 for n, p in pipe.unet.named_parameters() if "lora_" in n)


def test_unknown_or_empty_preset_is_refused(tiny_base):
    pipe, _ = model.load_base(str(tiny_base))
    with pytest.raises(lora.AdapterError, match="unknown LoRA preset"):
        lora.attach(pipe.unet, "everything")
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(lora.AdapterError, match="matches no Linear"):
        lora.attach(lin, "cross_attn")


def test_save_then_plain_diffusers_load_is_exact(tiny_base, tmp_path):
    pipe, facts = model.load_base(str(tiny_base))
    base_out = _out(pipe.unet)
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=2)  # alpha != rank: scale 0.5 must survive
    _randomize(pipe.unet)
    trained = _out(pipe.unet)
    assert (trained - base_out).abs().max() > 1e-3
    lora.save(tmp_path, pipe.unet, AdapterFacts(base=str(tiny_base), rank=4, alpha=2, strength=0.6, architecture="sd"))
    assert (tmp_path / lora.WEIGHTS_NAME).is_file()
    assert lora.facts(tmp_path).strength == 0.6

    plain = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None)
    plain.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")  # as the model card
    assert torch.equal(_out(plain.unet), trained)  # bit-exact, alpha included
    import diffusers
    from packaging.version import Version
    if Version(diffusers.__version__) >= Version("0.40"):  # before 0.40 diffusers asks offline for weight_name
        bare = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None)
        bare.load_lora_weights(str(tmp_path))  # the folder alone, as diffusers' docs write it
        assert torch.equal(_out(bare.unet), trained)

    plain.fuse_lora(components=["unet"])  # W + s·BA folded: other arithmetic, equal to float32 rounding
    assert (_out(plain.unet) - trained).abs().max() <= 1e-5  # (1.2e-6 on an Intel Xeon, <= 1e-6 on an AMD Zen 4)

    ours, _ = model.load_base(str(tiny_base))
    name = lora.load_into(ours, tmp_path, scale=1.0)
    assert torch.equal(_out(ours.unet), trained)
    ours.set_adapters([name], [0.0])
    assert torch.equal(_out(ours.unet), base_out)  # scale 0 is the base exactly


def test_pickle_adapters_are_refused(tmp_path):
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"not really a pickle")
    with pytest.raises(lora.AdapterError, match="pickle"):
        lora.weights_path(tmp_path)
    with pytest.raises(lora.AdapterError, match="pickle"):
        lora.weights_path(tmp_path / "pytorch_lora_weights.bin")


def test_keys_for_another_architecture_fail_loudly(tiny_base, tmp_path):
    from safetensors.torch import save_file
    save_file({"unet.down_blocks.9.attentions.0.transformer_blocks.0.attn2.to_q.lora.down.weight": torch.zeros(4, 32),
               "unet.down_blocks.9.attentions.0.transformer_blocks.0.attn2.to_q.lora.up.weight": torch.zeros(32, 4)},
              str(tmp_path / lora.WEIGHTS_NAME))
    pipe, _ = model.load_base(str(tiny_base))
    with pytest.raises(lora.AdapterError, match="map to no module"):
        lora.load_into(pipe, tmp_path)


def test_applied_fused_matches_unfused_and_restores(tiny_base, tmp_path):
    pipe, _ = model.load_base(str(tiny_base))
    base_out = _out(pipe.unet)
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=2)
    _randomize(pipe.unet)
    lora.save(tmp_path, pipe.unet, AdapterFacts(architecture="sd"))
    ours, _ = model.load_base(str(tiny_base))
    name = lora.load_into(ours, tmp_path)
    with lora.applied(ours, [name], [0.7], fuse=False):
        unfused = _out(ours.unet)
    with lora.applied(ours, [name], [0.7], fuse=True):
        fused = _out(ours.unet)
    assert (fused - unfused).abs().max() <= 1e-5 and (unfused - base_out).abs().max() > 1e-3
    # after either block the adapter is unfused at the block's scale (diffusers' fuse_lora(lora_scale) scales the
    # layers, and unfusing leaves that scale)
    assert (_out(ours.unet) - unfused).abs().max() <= 1e-5
    with lora.applied(ours, [name], [0.0]):
        assert (_out(ours.unet) - base_out).abs().max() <= 1e-6  # unfuse restored the base weights


def test_a_diffusers_file_with_text_encoder_layers_runs_them_at_the_adapter_scale(tiny_base, tmp_path):
    """diffusers' train_dreambooth_lora.py --train_text_encoder writes text-encoder layers beside the UNet's (through
    save_lora_weights, as here). At scale s they must run at s, fused or not, not at 1 while the UNet's part is
    fused at s; at 0 the base."""
    diffusers_lora_with_text_encoder(tiny_base, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base))  # as a user's own script builds it
    ids = pipe.tokenizer(["a face"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
        said = []
        name = lora.load_into(pipe, tmp_path, log=said.append)
        out = {}
        for s in (0.5, 1.0):
            for fuse in (False, True):
                with lora.applied(pipe, [name], [s], fuse=fuse):
                    out[s, fuse] = pipe.text_encoder(ids)[0]
        with lora.applied(pipe, [name], [0.0]):
            assert torch.equal(pipe.text_encoder(ids)[0], base)
    assert (out[0.5, True] - out[0.5, False]).abs().max() < 1e-5 and (out[1.0, True] - out[1.0, False]).abs().max() < 1e-5
    assert (out[0.5, False] - out[1.0, False]).abs().max() > 1e-2 and (out[0.5, False] - base).abs().max() > 1e-2
    assert any("8 text_encoder LoRA layers loaded" in m for m in said), said  # 2 CLIP layers x q, k, v, out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_many_fuse_cycles_leave_the_base_bit_identical(tiny_base, tmp_path, dtype):
    """An eval sweep fuses and unfuses dozens of times; subtracting back in fp16 alone drifts by ~2e-3."""
    pipe, _ = model.load_base(str(tiny_base))
    lora.attach(pipe.unet, "cross_attn", rank=4)
    _randomize(pipe.unet)
    lora.save(tmp_path, pipe.unet, AdapterFacts(architecture="sd"))
    ours, _ = model.load_base(str(tiny_base), torch_dtype=dtype)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    name = lora.load_into(ours, tmp_path)
    for i in range(36):
        with lora.applied(ours, [name], [0.5 if i % 2 else 1.0]):
            pass
    after = {k.replace(".base_layer.", "."): v for k, v in ours.unet.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_noop_adapter_is_refused(tiny_base, tmp_path):
    pipe, _ = model.load_base(str(tiny_base))
    lora.attach(pipe.unet, "cross_attn", rank=4)  # fresh: B = 0
    lora.save(tmp_path, pipe.unet, AdapterFacts(architecture="sd"))
    other, _ = model.load_base(str(tiny_base))
    with pytest.raises(lora.AdapterError, match="changes nothing"):
        lora.load_into(other, tmp_path)


def test_a_base_changed_under_the_same_path_is_a_warning(tmp_path):
    """The adapter records a probe of the base UNet's weights: loading it into the same folder after the base was
    retrained there (as the embedded base was, 32 heads -> 4) warns, naming a weight; the same weights in bf16 do not."""
    from adapt.tiny import save_tiny_pipeline
    base = save_tiny_pipeline(tmp_path / "base", seed=0)
    pipe, bf = model.load_base(str(base))
    probe = lora.base_probe(pipe.unet)
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=2)
    _randomize(pipe.unet)
    assert lora.base_probe(pipe.unet) == probe  # the same names and values with the adapter attached
    lora.save(tmp_path / "ad", pipe.unet, AdapterFacts(base=str(base), base_resolved=bf.resolved, base_probe=probe,
                                                       rank=4, alpha=2, architecture="sd"))
    for dtype in (torch.float32, torch.bfloat16):
        logs = []
        same, sf = model.load_base(str(base), torch_dtype=dtype)
        lora.load_into(same, tmp_path / "ad", base_resolved=sf.resolved, log=logs.append)
        assert not logs, logs
    save_tiny_pipeline(base, seed=1)  # retrained in place
    logs = []
    other, of = model.load_base(str(base))
    lora.load_into(other, tmp_path / "ad", base_resolved=of.resolved, log=logs.append)
    assert len(logs) == 1 and "trained against other UNet weights" in logs[0] and "conv_in.weight starts" in logs[0], logs


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "rank_pattern": {"attn2.to_k": 8}, "alpha_pattern": {"attn1.to_v": 2}}],
                         ids=["plain", "rslora-with-patterns"])
def test_a_peft_save_pretrained_folder_loads_as_peft_computes_it_and_exports(extra, tiny_base, tmp_path):
    """`PeftModel.save_pretrained` on a UNet (custom training scripts) writes base_model.model.* keys and
    adapter_config.json, which diffusers' loader does not read. adapt samples it exactly as peft's own
    PeftModel.from_pretrained computes it (ranks, alphas and rsLoRA's alpha/sqrt(r) per module), and its kohya
    export, read back, too."""
    import shutil
    from peft import LoraConfig, PeftModel, get_peft_model
    from adapt import kohya
    src, _ = model.load_base(str(tiny_base))
    torch.manual_seed(0)
    get_peft_model(src.unet, LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_v"], init_lora_weights=False,
                                        **extra)).save_pretrained(tmp_path / "peft")
    ref, _ = model.load_base(str(tiny_base))
    want = _out(PeftModel.from_pretrained(ref.unet, tmp_path / "peft"))
    pipe, _ = model.load_base(str(tiny_base))
    base = _out(pipe.unet)
    lora.load_into(pipe, tmp_path / "peft", log=lambda m: None)
    assert (_out(pipe.unet) - want).abs().max() < 1e-5 and (want - base).abs().max() > 1e-2
    kohya.to_kohya(tmp_path / "peft", tmp_path / "k.safetensors")
    again, _ = model.load_base(str(tiny_base))
    lora.load_into(again, tmp_path / "k.safetensors", log=lambda m: None)
    assert (_out(again.unet) - want).abs().max() < 1e-5
    # the config is what gives the scale: without it, or for DoRA, a clear refusal
    shutil.copytree(tmp_path / "peft", tmp_path / "noconfig")
    (tmp_path / "noconfig" / "adapter_config.json").unlink()
    with pytest.raises(lora.AdapterError, match="base_model.model.*but no adapter_config.json beside it"):
        lora.load_into(model.load_base(str(tiny_base))[0], tmp_path / "noconfig", log=lambda m: None)
    import json
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(lora.AdapterError, match="a DoRA adapter"):
        lora.read(tmp_path / "peft")
