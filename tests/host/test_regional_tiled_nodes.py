"""Regional conditioning, Apply From Params, Apply Tiled and Apply's enhance_tiles on a real ComfyUI (tiny UNet)."""
import pytest
import torch
import torch.nn.functional as F

from harness import host_helpers as hh

SIZE = 32  # 4 x 4 latent: every token grid splits evenly into halves
APPLY = dict(weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat", embeds_scaling="V only")


@pytest.fixture(scope="module")
def nodes(pack):
    return {name: hh.pack_module(f"nodes.{name}") for name in ("regional", "tiled", "apply")}


def half_mask(side: str, height: int = 64, width: int = 64) -> torch.Tensor:
    mask = torch.zeros(1, height, width)
    mask[..., :width // 2] = 1.0
    return mask if side == "left" else 1.0 - mask


def region(nodes, image, mask, weight=1.0, prompt_weight=1.0, positive=None, negative=None):
    node = nodes["regional"].XformersIPAdapterRegionalConditioning
    return node.execute(image, weight, prompt_weight, "linear", 0.0, 1.0, mask=mask, positive=positive,
                        negative=negative).result


def from_params(nodes, model, adapter, clip_vision, params):
    node = nodes["regional"].ApplyXformersIPAdapterFromParams
    return node.execute(model, adapter, clip_vision, params, "concat", "V only").result[0]


def combine(nodes, *params):
    return nodes["regional"].XformersIPAdapterCombineParams.execute(*params).result[0]


def attn2(model):
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


def apply(nodes, model, adapter, clip_vision, image, **overrides):
    args = {**APPLY, "weight": 1.0, **overrides}
    return nodes["apply"].ApplyXformersIPAdapterAttention.execute(model, adapter, clip_vision, image,
                                                                   **args).result[0]


def test_two_regions_with_their_own_reference_and_prompt_in_one_run(nodes, unet, clip_vision, adapters):
    left_prompt, right_prompt = hh.conditioning(3), hh.conditioning(4)
    params_a, pos_a, neg_a = region(nodes, hh.image(0), half_mask("left"), 1.0, 0.8, left_prompt, hh.conditioning(2))
    params_b, pos_b, neg_b = region(nodes, hh.image(1), half_mask("right"), 0.6, 1.5, right_prompt,
                                    hh.conditioning(2))
    # the host's conditioning-mask keys, as Conditioning (Set Mask) writes them; the inputs stay untouched
    assert pos_a[0][1]["mask_strength"] == 0.8 and pos_b[0][1]["mask_strength"] == 1.5
    assert pos_a[0][1]["set_area_to_bounds"] is False and torch.equal(pos_a[0][1]["mask"], half_mask("left"))
    assert pos_a[0][0] is left_prompt[0][0] and left_prompt[0][1] == {}
    model = from_params(nodes, unet, adapters["base"], clip_vision, combine(nodes, params_a, params_b))
    applications = next(iter(attn2(model).values())).applications
    assert len(applications) == 2
    assert torch.equal(applications[0].mask, half_mask("left")) and torch.equal(applications[1].mask,
                                                                              half_mask("right"))
    # the same as one Apply per region, chained: each region keeps its own image, weight and mask
    chained = apply(nodes, apply(nodes, unet, adapters["base"], clip_vision, hh.image(0), attn_mask=half_mask("left")),
                    adapters["base"], clip_vision, hh.image(1), weight=0.6, attn_mask=half_mask("right"))
    positive, negative = pos_a + pos_b, neg_a + neg_b
    regional = hh.sample(model, steps=1, size=SIZE, positive=positive, negative=negative)
    assert torch.equal(regional, hh.sample(chained, steps=1, size=SIZE, positive=positive, negative=negative))
    text_only = hh.sample(unet, steps=1, size=SIZE, positive=positive, negative=negative)
    assert (regional - text_only).abs().max() > 1e-2 * text_only.abs().max()


def test_a_region_changes_nothing_where_its_mask_is_zero(nodes, unet, clip_vision, adapters):
    """Exactly provable: at every attn2 call, the region's image attention is multiplied by its mask per query
    token, so where that mask is 0 the call's output equals the output without the region (spatial mixing by
    convolutions makes the sampled latents differ everywhere, so the proof is per call, on a real run's calls)."""
    params_a, _, _ = region(nodes, hh.image(0), None)
    params_b, _, _ = region(nodes, hh.image(1), half_mask("left"), weight=2.0)
    both = from_params(nodes, unet, adapters["plus"], clip_vision, combine(nodes, params_a, params_b))
    only_a = attn2(from_params(nodes, unet, adapters["plus"], clip_vision, params_a))
    checked = {}
    for key, patch in attn2(both).items():
        def spy(q, k, v, extra, key=key, call=patch):
            out, without = call(q, k, v, extra), only_a[key](q, k, v, extra)
            height, width = extra["activations_shape"][-2:]
            zero = F.interpolate(half_mask("left")[:, None], size=(height, width), mode="bilinear",
                                 align_corners=False).flatten(1)[0] == 0
            assert bool(zero.any()) and bool((~zero).any())
            assert torch.equal(out[:, zero], without[:, zero]), key
            checked[key] = max(checked.get(key, 0.0), float((out[:, ~zero] - without[:, ~zero]).abs().max()))
            return out

        both.set_model_attn2_replace(spy, *key)
    hh.sample(both, steps=1, size=SIZE)
    assert set(checked) == set(only_a) and min(checked.values()) > 1e-3  # every site; B acts where its mask is 1


def test_tiled_reference_of_2_to_1_aspect(nodes, unet, clip_vision, adapters):
    node = nodes["tiled"].ApplyXformersIPAdapterTiled
    image = hh.image(2, height=96, width=192)
    attn_mask = torch.ones(1, 32, 64)
    attn_mask[..., 48:] = 0.0  # the right quarter of the picture: no adapter there
    model, tiles, masks = node.execute(unet, adapters["base"], clip_vision, image, sharpening=0.3,
                                       attn_mask=attn_mask, weight=1.0, **APPLY).result
    assert tiles.shape == (2, 256, 256, 3) and masks.shape == (2, 256, 512)
    assert float(masks[0, :, 256:].abs().max()) == 0.0 and float(masks[1, :, :256].abs().max()) == 0.0
    assert float(masks[0, :, :256].min()) == 1.0 and float(masks[1, :, 256:380].min()) == 1.0
    assert float(masks[1, :, 400:].max()) == 0.0  # the user's mask combined into the right tile's
    applications = next(iter(attn2(model).values())).applications
    assert [a.mask.shape for a in applications] == [(1, 256, 512)] * 2
    assert torch.equal(applications[1].mask, masks[1:2])
    plain = hh.sample(unet, steps=1, size=SIZE)
    assert (hh.sample(model, steps=1, size=SIZE) - plain).abs().max() > 1e-2 * plain.abs().max()


def test_enhance_tiles_one_is_plain_apply_and_more_adds_the_pooled_tiles(nodes, unet, clip_vision, adapters):
    image = hh.image(3, height=320, width=320)
    plain = apply(nodes, unet, adapters["plus"], clip_vision, image)
    off = apply(nodes, unet, adapters["plus"], clip_vision, image, enhance_tiles=1)
    plain_latent = hh.sample(plain, steps=1, size=SIZE)
    assert torch.equal(hh.sample(off, steps=1, size=SIZE), plain_latent)
    enhanced = apply(nodes, unet, adapters["plus"], clip_vision, image, enhance_tiles=2)
    tokens = [next(iter(attn2(m).values())).applications[0].kv.tokens for m in (plain, enhanced)]
    assert tokens[1].cond.shape[1] == 2 * tokens[0].cond.shape[1]  # concat: plain tokens + pooled tiles' tokens
    assert torch.equal(tokens[1].cond[:, :tokens[0].cond.shape[1]], tokens[0].cond)
    assert not torch.equal(hh.sample(enhanced, steps=1, size=SIZE), plain_latent)
    with pytest.raises(ValueError, match="enhance_tiles=2 needs an adapter fed by CLIP vision hidden states"):
        apply(nodes, unet, adapters["base"], clip_vision, image, enhance_tiles=2)


def test_bad_inputs_are_node_errors_naming_the_input(nodes, unet, clip_vision, adapters):
    with pytest.raises(ValueError, match="mask is zero everywhere"):
        region(nodes, hh.image(0), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="mask has zero area"):
        region(nodes, hh.image(0), torch.zeros(1, 0, 8))
    with pytest.raises(ValueError, match="positive must be a CONDITIONING"):
        region(nodes, hh.image(0), half_mask("left"), positive="a cat")
    with pytest.raises(ValueError, match="prompt_weight must be a finite number"):
        region(nodes, hh.image(0), half_mask("left"), prompt_weight=float("nan"))
    two, three = (region(nodes, hh.image(0), torch.ones(n, 8, 8))[0] for n in (2, 3))
    with pytest.raises(ValueError, match="fit no latent batch"):
        from_params(nodes, unet, adapters["base"], clip_vision, combine(nodes, two, three))
    with pytest.raises(ValueError, match="ipadapter_params must come from IP-Adapter Regional Conditioning"):
        from_params(nodes, unet, adapters["base"], clip_vision, {"image": [hh.image(0)]})
    with pytest.raises(ValueError, match="params_2 must come from"):
        combine(nodes, two, "params")
    tiled = nodes["tiled"].ApplyXformersIPAdapterTiled
    with pytest.raises(ValueError, match="sharpening"):
        tiled.execute(unet, adapters["base"], clip_vision, hh.image(0), sharpening=2.0, weight=1.0, **APPLY)
    with pytest.raises(ValueError, match="image batch is empty"):
        tiled.execute(unet, adapters["base"], clip_vision, None, sharpening=0.0, weight=1.0, **APPLY)
