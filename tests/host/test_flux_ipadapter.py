"""Flux IP-Adapters on the real ComfyUI (tiny Flux from ComfyUI's own classes, synthetic adapters in the real
layouts): blocks fire once per model call in a real sampler, weight 0 and an excluded window are bit-identical to
the unpatched model, adapters chain, foreign dit replaces are wrapped and called, and mismatches are node errors
naming both sides."""

from types import SimpleNamespace

import pytest
import torch

from harness.flux_adapters import instantx_tensors, siglip_head_tensors, xlabs_tensors
from harness.tiny_dit import flux_inputs, run_flux, tiny_flux

WIDTH, CONTEXT, EMBED = 64, 48, 32


@pytest.fixture(scope="module")
def flux(pack):
    return tiny_flux(seed=2)


@pytest.fixture(scope="module")
def adapters(pack):
    from xformers_ipadapter.processors.families.flux import read_flux_adapter

    return {"xlabs": read_flux_adapter(xlabs_tensors(WIDTH, CONTEXT, EMBED, 4, doubles=1, seed=3), "xlabs"),
            "instantx": read_flux_adapter(instantx_tensors(WIDTH, CONTEXT, EMBED, 8, blocks=2, seed=4), "instantx")}


class StubClipVision:
    """A CLIP_VISION stand-in: CLIP (2-D image_embeds) or SigLIP (token sequences, head in its state dict)."""

    def __init__(self, width: int, siglip: bool = False) -> None:
        self.width, self.siglip = width, siglip
        state = siglip_head_tensors(width, 48, seed=5) if siglip else {}
        self.model = SimpleNamespace(state_dict=lambda: state)

    def encode_image(self, image):
        g = torch.Generator().manual_seed(int(image.sum() * 1000) % 1000)
        n = image.shape[0]
        if self.siglip:
            tokens = torch.randn(n, 9, self.width, generator=g)
            return {"image_embeds": tokens, "last_hidden_state": tokens}
        return {"image_embeds": torch.randn(n, self.width, generator=g)}


def apply(model, adapter, clip_vision=None, **overrides):
    from xformers_ipadapter.nodes.flux import apply_flux

    kind = adapter.info.kind
    clip_vision = clip_vision or StubClipVision(EMBED, siglip=kind == "InstantX")
    inputs = dict(model=model, ipadapter=adapter, clip_vision=clip_vision, image=torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)),
                  weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
                  embeds_scaling="V only")
    inputs.update(overrides)
    return apply_flux(**inputs)


def test_weight_zero_and_excluded_window_are_bit_identical(flux, adapters):
    inputs = flux_inputs(flux)
    plain = run_flux(flux.patcher, inputs)
    for adapter in adapters.values():
        assert torch.equal(run_flux(apply(flux.patcher, adapter, weight=0.0), inputs), plain)
        # sigma 0.7 lies outside the window of the last 10 % of the schedule
        assert torch.equal(run_flux(apply(flux.patcher, adapter, start_at=0.9, end_at=1.0), inputs), plain)
        active = run_flux(apply(flux.patcher, adapter), inputs)
        assert (active - plain).abs().max() > 1e-3


def test_chained_adapters_and_upstream_model_unchanged(flux, adapters):
    inputs = flux_inputs(flux)
    plain = run_flux(flux.patcher, inputs)
    first = apply(flux.patcher, adapters["xlabs"])
    first_out = run_flux(first, inputs)
    both = apply(first, adapters["instantx"])
    both_out = run_flux(both, inputs)
    second_only = run_flux(apply(flux.patcher, adapters["instantx"]), inputs)
    assert not torch.equal(both_out, first_out) and not torch.equal(both_out, second_only)
    assert torch.equal(run_flux(first, inputs), first_out)  # the upstream model kept its single adapter
    assert torch.equal(run_flux(flux.patcher, inputs), plain)
    dit = both.model_options["transformer_options"]["patches_replace"]["dit"]
    assert len(dit[("double_block", 0)].applications) == 2 and len(dit[("single_block", 0)].applications) == 1


def test_foreign_dit_replace_is_wrapped_and_called(flux, adapters):
    inputs = flux_inputs(flux)
    calls = []

    def foreign(args, extra):
        calls.append(args["img"].shape)
        out = extra["original_block"](args)
        return {**out, "img": out["img"] * 0.5}

    model = flux.patcher.clone()
    model.set_model_patch_replace(foreign, "dit", "double_block", 0)
    foreign_only = run_flux(model, inputs)
    calls.clear()
    patched = apply(model, adapters["xlabs"])
    out = run_flux(patched, inputs)
    assert len(calls) == 1
    assert patched.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].wrapped \
        is foreign
    assert not torch.equal(out, foreign_only)


def test_every_block_fires_once_per_model_call_in_a_sampler(flux, adapters):
    import comfy.sample

    seen = []
    patched = apply(flux.patcher, adapters["instantx"])
    application = patched.model_options["transformer_options"]["patches_replace"]["dit"][
        ("single_block", 0)].applications[0]
    engine = application.engine_for

    def spy(config):
        run = engine(config)

        def call(q, k, v, heads, branches, **kwargs):
            seen.append(q.shape[1])
            return run(q, k, v, heads, branches, **kwargs)
        return call

    application.engine_for = spy
    try:
        calls = []
        patched.set_model_unet_function_wrapper(lambda f, a: calls.append(1) or f(a["input"], a["timestep"], **a["c"]))
        cond = [[torch.randn(1, 5, 48), {"pooled_output": torch.randn(1, 32), "guidance": 3.5}]]
        latent = torch.zeros(1, 16, 8, 8)
        comfy.sample.sample(patched, torch.randn(1, 16, 8, 8), 2, 2.0, "euler", "simple", cond, cond, latent,
                            disable_pbar=True, seed=1)
    finally:
        application.engine_for = engine
    # per model call: the double block attends with the 16 image tokens, the single block with txt + image
    assert len(calls) >= 2 and seen == [16, 21] * len(calls)


def test_mismatches_are_node_errors_naming_both_sides(flux, adapters, pack):
    from xformers_ipadapter.processors.families.flux import read_flux_adapter
    from xformers_ipadapter.processors.ipadapter.errors import IPAdapterInputError, IPAdapterMismatchError

    wide = read_flux_adapter(xlabs_tensors(96, CONTEXT, EMBED, 4, doubles=1), "wide")
    with pytest.raises(IPAdapterMismatchError, match="width 96.*hidden size is 64"):
        apply(flux.patcher, wide)
    with pytest.raises(IPAdapterMismatchError, match="expects CLIP ViT-L/14.*24-wide"):
        apply(flux.patcher, adapters["xlabs"], clip_vision=StubClipVision(24))
    with pytest.raises(IPAdapterMismatchError, match="SigLIP.*CLIP image_embeds"):
        apply(flux.patcher, adapters["instantx"], clip_vision=StubClipVision(EMBED))
    with pytest.raises(IPAdapterInputError, match="no meaning for Flux.*linear, ease in"):
        apply(flux.patcher, adapters["xlabs"], weight_type="style transfer")


def test_flux_adapter_on_a_unet_model_is_refused(unet, adapters):
    from xformers_ipadapter.processors.ipadapter.errors import IPAdapterMismatchError

    with pytest.raises(IPAdapterMismatchError, match="Flux.1 IP-Adapter.*not Flux"):
        apply(unet, adapters["xlabs"])


def test_siglip_without_head_names_the_file_to_load(flux, adapters):
    from xformers_ipadapter.processors.ipadapter.errors import IPAdapterMismatchError

    headless = StubClipVision(EMBED, siglip=True)
    headless.model = SimpleNamespace(state_dict=lambda: {})
    with pytest.raises(IPAdapterMismatchError, match="siglip-so400m-patch14-384.*models/clip_vision"):
        apply(flux.patcher, adapters["instantx"], clip_vision=headless)


def test_sd_adapter_on_flux_is_refused(flux, pack):
    from harness import host_helpers as hh
    from xformers_ipadapter.nodes.apply import prepare_target

    from xformers_ipadapter.processors.ipadapter.errors import IPAdapterMismatchError

    # names both sides: the adapter's UNet and a model without any UNet cross-attention
    with pytest.raises(IPAdapterMismatchError, match=r"IP-Adapter is for SD1\.5.*the model is .*0 sites"):
        prepare_target(flux.patcher, hh.adapter("base"), 1.0, 0.0, 1.0, None, None)


def test_loader_recognises_both_layouts_by_keys(tmp_path, pack):
    from safetensors.torch import save_file
    from xformers_ipadapter.processors.families.flux import INSTANTX, XLABS, FluxIPAdapterModel
    from xformers_ipadapter.processors.ipadapter import load_ipadapter_file

    save_file(xlabs_tensors(WIDTH, CONTEXT, EMBED, 16, doubles=2), str(tmp_path / "ip_adapter.safetensors"))
    torch.save(instantx_tensors(WIDTH, CONTEXT, EMBED, 8, blocks=3, nested=True), str(tmp_path / "ip-adapter.bin"))
    xlabs = load_ipadapter_file(tmp_path / "ip_adapter.safetensors")
    instantx = load_ipadapter_file(tmp_path / "ip-adapter.bin")
    assert isinstance(xlabs, FluxIPAdapterModel) and isinstance(instantx, FluxIPAdapterModel)
    assert (xlabs.info.kind, xlabs.info.tokens, xlabs.info.blocks, xlabs.info.embed_dim) == (XLABS, 16, 2, EMBED)
    assert (instantx.info.kind, instantx.info.tokens, instantx.info.blocks) == (INSTANTX, 8, 3)


def test_masks_follow_the_token_grid(flux, adapters):
    inputs = flux_inputs(flux, height=8, width=12)
    plain = run_flux(flux.patcher, inputs)
    unmasked = run_flux(apply(flux.patcher, adapters["xlabs"]), inputs)
    zero = run_flux(apply(flux.patcher, adapters["xlabs"], attn_mask=torch.zeros(1, 30, 40)), inputs)
    half = torch.zeros(1, 30, 40)
    half[:, :, :20] = 1.0  # the left half of a 4:3 mask: the left half of the 4x6 token grid
    left = run_flux(apply(flux.patcher, adapters["xlabs"], attn_mask=half), inputs)
    assert torch.equal(zero, plain)
    assert not torch.equal(left, plain) and not torch.equal(left, unmasked)


def test_attention_op_is_honoured_and_reported(flux, adapters):
    from xformers_ipadapter.processors import planner
    from xformers_ipadapter.processors.backends import AttentionOpConfig

    inputs = flux_inputs(flux)
    planner.begin_run()
    math_op = run_flux(apply(flux.patcher, adapters["instantx"], attention_op=AttentionOpConfig(op="sdpa:math")),
                       inputs)
    assert any("attention op 'sdpa:math': ran sdpa:math" in line for line in planner.run_reports())
    auto = run_flux(apply(flux.patcher, adapters["instantx"]), inputs)
    assert torch.allclose(math_op, auto, rtol=1e-4, atol=1e-5)


def test_apply_embeds_equals_apply_on_the_same_features(flux, adapters):
    from xformers_ipadapter.nodes.flux import apply_flux_embeds
    from xformers_ipadapter.processors.ipadapter.embeds import AdapterEmbeds

    inputs = flux_inputs(flux)
    image = torch.rand(1, 32, 32, 3)
    clip_vision = StubClipVision(EMBED)
    from_image = run_flux(apply(flux.patcher, adapters["xlabs"], clip_vision=clip_vision, image=image), inputs)
    embeds = AdapterEmbeds(clip_vision.encode_image(image)["image_embeds"], "image_embeds")
    from_embeds = run_flux(apply_flux_embeds(model=flux.patcher, ipadapter=adapters["xlabs"], pos_embeds=embeds,
                                             weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0,
                                             embeds_scaling="V only"), inputs)
    assert torch.equal(from_embeds, from_image)


def test_adapter_weights_follow_model_management_and_caches_are_released(flux, adapters):
    patched = apply(flux.patcher, adapters["instantx"])
    inputs = flux_inputs(flux)
    run_flux(patched, inputs)
    handle = adapters["instantx"].host_handle
    assert handle is not None and handle.model is adapters["instantx"]
    assert handle in patched.model_patches_models()
    from xformers_ipadapter.nodes.dit_patch import dit_applications_in, release_dit_caches

    application = dit_applications_in(patched)[0]
    assert len(application._kv) == 2  # one K/V entry per block, computed once
    run_flux(patched, inputs)
    assert len(application._kv) == 2
    patched.model_patches_to(torch.device("meta"))  # a move elsewhere drops what is cached on the CPU
    assert len(application._kv) == 0
    run_flux(patched, inputs)
    release_dit_caches(patched)
    assert len(application._kv) == 0 and len(application._rows) == 0


def test_apply_node_routes_flux_adapters_and_equals_the_handler(flux, adapters, pack):
    from xformers_ipadapter.nodes.apply import ApplyXformersIPAdapterAttention

    inputs = flux_inputs(flux)
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    node_model = ApplyXformersIPAdapterAttention.execute(
        flux.patcher, adapters["xlabs"], StubClipVision(EMBED), image, 0.9, "ease in", 0.0, 1.0, "concat",
        "V only").result[0]
    handler_model = apply(flux.patcher, adapters["xlabs"], image=image, weight=0.9, weight_type="ease in")
    assert torch.equal(run_flux(node_model, inputs), run_flux(handler_model, inputs))
    with pytest.raises(ValueError, match="enhance_tiles must be 1"):
        ApplyXformersIPAdapterAttention.execute(flux.patcher, adapters["xlabs"], StubClipVision(EMBED), image, 0.9,
                                                "linear", 0.0, 1.0, "concat", "V only", enhance_tiles=2)
