"""SD3.5 InstantX IP-Adapter on the real ComfyUI: a tiny SD3 (MMDiT, 2 joint blocks, 128 wide) from ComfyUI's own
classes, a synthetic adapter in the release's key layout loaded through the pack's loader, patched through the
host's dit replace hook."""

import pytest
import torch
from safetensors.torch import save_file

from harness import host_helpers as hh
from harness.sd3_models import instantx_sd3_state_dict, nested, shape_with
from harness.tiny_dit import run_sd3, sd3_inputs, tiny_flux, tiny_sd3

ENCODER_WIDTH = hh.TINY_CLIP_VISION["hidden_size"]  # the tiny CLIP vision's penultimate hidden states
SHAPE = shape_with(hidden=128, head_dim=64, blocks=2, encoder_width=ENCODER_WIDTH, tokens=8)


@pytest.fixture(scope="module")
def sd3(comfy, pack):
    return tiny_sd3(seed=0)


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "sd35_ip_adapter.safetensors"
    save_file(instantx_sd3_state_dict(SHAPE, seed=3), str(path))
    return path


@pytest.fixture(scope="module")
def adapter(pack, adapter_file):
    return hh.pack_module("processors.ipadapter.weights").load_ipadapter_file(adapter_file)


def embeds(seed: int = 0, images: int = 1):
    AdapterEmbeds = hh.pack_module("processors.ipadapter.embeds").AdapterEmbeds
    g = torch.Generator().manual_seed(seed)
    return AdapterEmbeds(torch.randn(images, 10, ENCODER_WIDTH, generator=g), "penultimate_hidden_states", "test")


def apply(model, adapter, weight=1.0, seed=0, **options):
    sd3_nodes = hh.pack_module("nodes.sd3")
    kwargs = dict(weight_type="linear", start_at=0.0, end_at=1.0, embeds_scaling="V only")
    kwargs.update(options)
    return sd3_nodes.apply_sd3_embeds(model, adapter, embeds(seed), weight, **kwargs)


def test_loader_reads_the_release_layouts(adapter, adapter_file, tmp_path):
    weights = hh.pack_module("processors.ipadapter.weights")
    SD3IPAdapter = hh.pack_module("processors.families.sd3").SD3IPAdapter
    assert isinstance(adapter, SD3IPAdapter)
    assert (adapter.info.hidden, adapter.info.blocks, adapter.info.encoder_width) == (128, 2, ENCODER_WIDTH)
    # the .bin release nests image_proj / ip_adapter: same weights
    binary = tmp_path / "ip-adapter.bin"
    torch.save(nested(instantx_sd3_state_dict(SHAPE, seed=3)), binary)
    again = weights.load_ipadapter_file(binary)
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), again.state_dict().values()))


def test_adapter_changes_the_output_and_weight_zero_is_bit_identical(sd3, adapter):
    inputs = sd3_inputs(sd3)
    base = run_sd3(sd3.patcher, inputs)
    assert not torch.equal(run_sd3(apply(sd3.patcher, adapter), inputs), base)
    assert torch.equal(run_sd3(apply(sd3.patcher, adapter, weight=0.0), inputs), base)
    # the input model is never patched
    assert not sd3.patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit")


def test_excluded_window_is_bit_identical_and_included_is_not(sd3, adapter):
    late = apply(sd3.patcher, adapter, start_at=0.9, end_at=1.0)  # small sigmas only
    early = sd3_inputs(sd3, sigma=0.95)
    assert torch.equal(run_sd3(late, early), run_sd3(sd3.patcher, early))
    small = sd3_inputs(sd3, sigma=0.01)
    assert not torch.equal(run_sd3(late, small), run_sd3(sd3.patcher, small))


def test_every_block_once_and_resampler_once_per_step(sd3, adapter, monkeypatch):
    engine = hh.pack_module("processors.families.sd3")
    nodes_sd3 = hh.pack_module("nodes.sd3")
    counts = {"resample": 0, "blocks": []}
    real_resample, real_kv = engine.resample, nodes_sd3.block_image_kv

    def counting_resample(*args, **kwargs):
        counts["resample"] += 1
        return real_resample(*args, **kwargs)

    def counting_kv(block, *args, **kwargs):
        counts["blocks"].append(next(i for i, b in enumerate(adapter.ip_adapter) if b is block))
        return real_kv(block, *args, **kwargs)

    monkeypatch.setattr(engine, "resample", counting_resample)
    monkeypatch.setattr(nodes_sd3, "block_image_kv", counting_kv)
    patched = apply(sd3.patcher, adapter)
    for sigma in (0.9, 0.5):  # two steps: a new sigmas tensor each, as the sampler passes
        run_sd3(patched, sd3_inputs(sd3, sigma=sigma))
    assert counts["resample"] == 2
    assert counts["blocks"] == [0, 1, 0, 1]


def test_cond_or_uncond_layout_follows_the_rows(sd3, adapter):
    patched = apply(sd3.patcher, adapter)
    inputs = sd3_inputs(sd3)
    out = run_sd3(patched, inputs, {"cond_or_uncond": [1, 0]})
    swapped = {**inputs, **{k: inputs[k].flip(0) for k in ("x", "c_crossattn", "y")}}
    out_swapped = run_sd3(patched, swapped, {"cond_or_uncond": [0, 1]})
    torch.testing.assert_close(out_swapped, out.flip(0), rtol=1e-5, atol=1e-5)
    # and the negative row really differs from the positive one (zeros through the resampler)
    same_rows = run_sd3(patched, inputs, {"cond_or_uncond": [0, 0]})
    assert not torch.allclose(same_rows[0], out[0]) and torch.allclose(same_rows[1], out[1], atol=1e-6)


def test_chaining_two_adapters_and_upstream_unchanged(sd3, adapter):
    inputs = sd3_inputs(sd3)
    first = apply(sd3.patcher, adapter, seed=1)
    before = run_sd3(first, inputs)
    both = apply(first, adapter, weight=0.8, seed=2)
    other_order = apply(apply(sd3.patcher, adapter, weight=0.8, seed=2), adapter, seed=1)
    chained = run_sd3(both, inputs)
    assert torch.equal(run_sd3(first, inputs), before)  # applying the second left the first model as it was
    assert not torch.allclose(chained, before)
    torch.testing.assert_close(chained, run_sd3(other_order, inputs), rtol=1e-5, atol=1e-5)


def test_foreign_dit_replace_is_kept(sd3, adapter):
    calls = []

    def foreign(args, extra):
        calls.append(args["img"].shape)
        out = extra["original_block"](args)
        return {"txt": out["txt"], "img": out["img"] * 1.5}

    model = sd3.patcher.clone()
    model.set_model_patch_replace(foreign, "dit", "double_block", 0)
    inputs = sd3_inputs(sd3)
    foreign_only = run_sd3(model, inputs)
    calls.clear()
    patched = apply(model, adapter)
    out = run_sd3(patched, inputs)
    assert len(calls) == 1  # still called, once
    assert not torch.allclose(out, foreign_only)
    assert torch.equal(run_sd3(apply(model, adapter, weight=0.0), inputs), foreign_only)


def test_attention_op_is_honoured(sd3, adapter):
    planner = hh.pack_module("processors.planner")
    AttentionOpConfig = hh.pack_module("processors.backends").AttentionOpConfig
    patched = apply(sd3.patcher, adapter, attention_op=AttentionOpConfig(op="sdpa:math"))
    planner.begin_run()
    run_sd3(patched, sd3_inputs(sd3))
    assert any(line.startswith("attention op 'sdpa:math': ran sdpa:math") for line in planner.run_reports())


def test_mask_resized_to_the_token_grid(sd3, adapter):
    inputs = sd3_inputs(sd3, height=8, width=12)  # 4 x 6 image tokens
    plain = run_sd3(apply(sd3.patcher, adapter), inputs)
    ones = run_sd3(apply(sd3.patcher, adapter, attn_mask=torch.ones(30, 45)), inputs)
    torch.testing.assert_close(ones, plain, rtol=0, atol=0)
    zeros = run_sd3(apply(sd3.patcher, adapter, attn_mask=torch.zeros(30, 45)), inputs)
    torch.testing.assert_close(zeros, run_sd3(sd3.patcher, inputs), rtol=1e-6, atol=1e-6)


def test_apply_with_clip_vision_and_its_validation(sd3, adapter, clip_vision):
    from xformers_ipadapter.processors.ipadapter.errors import IPAdapterInputError, IPAdapterMismatchError

    sd3_nodes = hh.pack_module("nodes.sd3")
    image = torch.rand(1, 64, 64, 3)
    args = dict(weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
                embeds_scaling="V only")
    patched = sd3_nodes.apply_sd3(sd3.patcher, adapter, clip_vision, image, **args)
    assert not torch.equal(run_sd3(patched, sd3_inputs(sd3)), run_sd3(sd3.patcher, sd3_inputs(sd3)))
    with pytest.raises(IPAdapterInputError, match="weight_type 'style transfer'.*linear, ease in"):
        sd3_nodes.apply_sd3(sd3.patcher, adapter, clip_vision, image, **{**args, "weight_type": "style transfer"})
    with pytest.raises(IPAdapterInputError, match="embeds_scaling 'K\\+V'.*V only"):
        sd3_nodes.apply_sd3(sd3.patcher, adapter, clip_vision, image, **{**args, "embeds_scaling": "K+V"})
    narrow = hh.pack_module("processors.families.sd3").read_sd3_adapter(
        instantx_sd3_state_dict(shape_with(encoder_width=32)), "narrow.safetensors")
    with pytest.raises(IPAdapterMismatchError, match=f"clip_vision gives {ENCODER_WIDTH}-wide.*needs 32-wide.*SigLIP"):
        sd3_nodes.apply_sd3(sd3.patcher, narrow, clip_vision, image, **args)


def test_model_mismatches_name_both_sides(comfy, pack, adapter):
    from xformers_ipadapter.processors.ipadapter.errors import IPAdapterMismatchError

    with pytest.raises(IPAdapterMismatchError, match="SD3.5 IP-Adapter.*the model is Flux, not an SD3 MMDiT"):
        apply(tiny_flux().patcher, adapter)
    with pytest.raises(IPAdapterMismatchError, match="128 wide .* 2 joint blocks.*this model is 192 wide .* 3 joint"):
        apply(tiny_sd3(depth=3).patcher, adapter)


def test_whole_model_equals_diffusers(comfy, pack):
    """ComfyUI's MMDiT with our patches == diffusers' SD3Transformer2DModel with the InstantX adapter loaded by
    diffusers' own loader, on identical weights (ComfyUI's own diffusers -> MMDiT key map, comfy.utils); the
    adapter's scale 0.5 on their side, weight 0.5 on ours. fp32, <= 1e-5 relative."""
    from harness.testing import require

    require("diffusers.models.transformers.transformer_sd3")
    import comfy.utils
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    state = instantx_sd3_state_dict(shape_with(hidden=128, head_dim=64, blocks=2, encoder_width=48, tokens=8), seed=3)
    torch.manual_seed(0)
    theirs = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                   num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=128,
                                   pooled_projection_dim=32, out_channels=16, pos_embed_max_size=8,
                                   qk_norm="rms_norm").eval()
    norms = ("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            parameter.copy_(1 + 0.3 * torch.randn_like(parameter) if name.endswith(norms) else
                            0.1 * torch.randn_like(parameter))
    theirs._load_ip_adapter_weights(nested(state), low_cpu_mem_usage=False)
    ours = tiny_sd3()
    model = ours.patcher.model.diffusion_model
    target, mapped = model.state_dict(), set()
    with torch.no_grad():
        for their_key, our_key in comfy.utils.mmdit_to_diffusers(ours.config).items():
            if their_key not in theirs.state_dict():
                continue
            weight = theirs.state_dict()[their_key]
            if isinstance(our_key, str):
                target[our_key].copy_(weight)
            elif our_key[1] is None:  # (key, None, conversion)
                target[our_key[0]].copy_(our_key[2](weight))
            else:  # (fused qkv key, (dim, offset, size))
                target[our_key[0]].narrow(*our_key[1]).copy_(weight)
            mapped.add(our_key if isinstance(our_key, str) else our_key[0])
    assert mapped == set(target)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 5, 48, generator=g)
    pooled, features = torch.randn(2, 32, generator=g), torch.randn(1, 10, 48, generator=g)
    timestep = torch.full((2,), 500.0)
    AdapterEmbeds = hh.pack_module("processors.ipadapter.embeds").AdapterEmbeds
    adapter = hh.pack_module("processors.families.sd3").read_sd3_adapter(state, "instantx.safetensors")
    patched = hh.pack_module("nodes.sd3").apply_sd3_embeds(
        ours.patcher, adapter, AdapterEmbeds(features, "penultimate_hidden_states", "test"), 0.5, "linear", 0.0, 1.0,
        "V only")
    options = {**patched.model_options["transformer_options"], "sigmas": timestep / 1000, "cond_or_uncond": [0, 0]}
    with torch.no_grad():
        expected = theirs(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                          timestep=timestep,
                          joint_attention_kwargs={"ip_adapter_image_embeds": features.expand(2, -1, -1)}).sample
        got = model(x, timestep, context=context, y=pooled, transformer_options=options)
        plain = model(x, timestep, context=context, y=pooled, transformer_options={})
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5
    assert float((plain - expected).abs().max() / expected.abs().max()) > 1e-2  # the adapter is what matched


def test_nodes_encoder_then_apply_embeds_samples_as_apply(sd3, adapter, clip_vision):
    """The real nodes: Apply and Encoder -> Apply Embeds route an SD3.5 adapter to its handlers and sample alike."""
    apply_node = hh.pack_module("nodes.apply").ApplyXformersIPAdapterAttention
    embeds_nodes = hh.pack_module("nodes.embeds")
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    common = dict(weight=0.8, weight_type="ease in", start_at=0.0, end_at=1.0, embeds_scaling="V only")
    direct = apply_node.execute(sd3.patcher, adapter, clip_vision, image, combine_embeds="concat", **common).result[0]
    pos, neg = embeds_nodes.XformersIPAdapterEncoder.execute(adapter, clip_vision, image, weight=1.0).result
    assert pos.clip_output == "penultimate_hidden_states" and pos.num_images == 2 and not neg.tensor.any()
    via_embeds = embeds_nodes.ApplyXformersIPAdapterEmbeds.execute(sd3.patcher, adapter, pos, neg_embeds=neg,
                                                                   **common).result[0]
    inputs = sd3_inputs(sd3)
    assert torch.equal(run_sd3(via_embeds, inputs), run_sd3(direct, inputs))
    assert not torch.equal(run_sd3(direct, inputs), run_sd3(sd3.patcher, inputs))
