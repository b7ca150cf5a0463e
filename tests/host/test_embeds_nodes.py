"""The embeds nodes and Style & Composition on a real ComfyUI: Encoder -> Apply Embeds samples exactly as Apply,
save -> load is bit-identical, wrong embeds and files are node errors; layer_weights on both apply nodes."""

import shutil

import pytest
import torch

from harness import host_helpers as hh

APPLY = dict(weight=0.8, weight_type="ease in", start_at=0.0, end_at=0.6, embeds_scaling="V only")


@pytest.fixture(scope="module")
def nodes(pack):
    return hh.pack_module("nodes.embeds"), hh.pack_module("nodes.apply"), hh.pack_module("nodes.style_composition")


@pytest.fixture()
def folders(comfy, tmp_path):
    import folder_paths

    saved = folder_paths.get_output_directory(), folder_paths.get_input_directory()
    (tmp_path / "output").mkdir()
    (tmp_path / "input").mkdir()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_input_directory(str(tmp_path / "input"))
    yield tmp_path
    folder_paths.set_output_directory(saved[0])
    folder_paths.set_input_directory(saved[1])


def encode(embeds, adapter, clip_vision, image, **extra):
    return embeds.XformersIPAdapterEncoder.execute(adapter, clip_vision, image, **{"weight": 1.0, **extra}).result


def apply_embeds(embeds, model, adapter, pos, neg=None, **extra):
    args = {**APPLY, **extra}
    return embeds.ApplyXformersIPAdapterEmbeds.execute(model, adapter, pos, neg_embeds=neg, **args).result[0]


def test_encoder_apply_embeds_and_save_load_sample_exactly_as_apply(nodes, unet, clip_vision, adapters, folders):
    embeds, apply, _ = nodes
    import folder_paths

    images, negative = hh.image(3, batch=2), hh.image(4)
    mask = torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(5))
    common = dict(attn_mask=mask, layer_weights="0:1, 2:0.5, 3:1.5")
    direct = apply.ApplyXformersIPAdapterAttention.execute(unet, adapters["plus"], clip_vision, images,
                                                           combine_embeds="concat", image_negative=negative,
                                                           **APPLY, **common).result[0]
    pos, neg = encode(embeds, adapters["plus"], clip_vision, images, image_negative=negative)
    via_embeds = apply_embeds(embeds, unet, adapters["plus"], pos, neg, **common)

    embeds.SaveXformersIPAdapterEmbeds.execute(pos, "ipadapter_embeds/embeds")
    saved = sorted((folders / "output" / "ipadapter_embeds").iterdir())
    assert [p.name for p in saved] == ["embeds_00001_.safetensors"]
    shutil.copy(saved[0], folders / "input" / "reference.safetensors")
    assert embeds.embeds_files() == ["reference.safetensors"]
    loaded = embeds.LoadXformersIPAdapterEmbeds.execute("reference.safetensors").result[0]
    assert torch.equal(loaded.tensor, pos.tensor) and loaded.clip_output == pos.clip_output
    via_file = apply_embeds(embeds, unet, adapters["plus"], loaded, neg, **common)

    reference = hh.sample(direct)
    assert torch.equal(hh.sample(via_embeds), reference)
    assert torch.equal(hh.sample(via_file), reference)
    assert not torch.equal(reference, hh.sample(unet))
    assert folder_paths.get_output_directory() == str(folders / "output")


def _tokens(model):
    """The image tokens of every application installed on `model` (first site's patch)."""
    patches = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    return [(a.kv.tokens.cond, a.kv.tokens.uncond) for a in next(iter(patches.values())).applications]


def test_combine_average_and_weight_equal_apply_parameters(nodes, unet, clip_vision, adapters):
    """Encoder -> Combine (average) -> Apply Embeds builds Apply's tokens for combine_embeds='average'; an
    Encoder weight of 2 on a base adapter doubles the projected input."""
    embeds, apply, _ = nodes
    images = hh.image(6, batch=3)
    direct = apply.ApplyXformersIPAdapterAttention.execute(unet, adapters["base"], clip_vision, images,
                                                           combine_embeds="average", **APPLY).result[0]
    pos, neg = encode(embeds, adapters["base"], clip_vision, images)
    combined = embeds.XformersIPAdapterCombineEmbeds.execute(pos, "average").result[0]
    via = apply_embeds(embeds, unet, adapters["base"], combined, neg)
    (cond_a, uncond_a), (cond_b, uncond_b) = _tokens(direct)[0], _tokens(via)[0]
    assert torch.equal(cond_a, cond_b) and torch.equal(uncond_a, uncond_b)
    double, _ = encode(embeds, adapters["base"], clip_vision, images, weight=2.0)
    assert torch.equal(double.tensor, pos.tensor * 2.0)
    single, _ = encode(embeds, adapters["base"], clip_vision, images[:1])
    two = embeds.XformersIPAdapterCombineEmbeds.execute(single, "max", embeds_3=pos).result[0]
    assert torch.equal(two.tensor, torch.cat([single.tensor, pos.tensor]).amax(dim=0, keepdim=True))


def test_encoder_mask_hides_the_clip_input(nodes, clip_vision, adapters):
    embeds, _, _ = nodes
    image = hh.image(8)
    plain, _ = encode(embeds, adapters["base"], clip_vision, image)
    ones, _ = encode(embeds, adapters["base"], clip_vision, image, mask=torch.ones(1, 30, 30))
    half = torch.ones(1, 30, 30)
    half[:, :, 15:] = 0.0
    masked, _ = encode(embeds, adapters["base"], clip_vision, image, mask=half)
    assert torch.equal(ones.tensor, plain.tensor)
    assert not torch.allclose(masked.tensor, plain.tensor)


def test_embeds_from_another_adapter_kind_are_a_node_error(nodes, unet, clip_vision, adapters):
    embeds, _, _ = nodes
    pos, neg = encode(embeds, adapters["base"], clip_vision, hh.image(1))
    with pytest.raises(ValueError) as error:
        apply_embeds(embeds, unet, adapters["plus"], pos)
    message = str(error.value)
    assert "pos_embeds are 96-d image_embeds" in message and "fed with 64-d penultimate_hidden_states" in message
    plus_pos, _ = encode(embeds, adapters["plus"], clip_vision, hh.image(1))
    with pytest.raises(ValueError, match="neg_embeds are 96-d image_embeds"):
        apply_embeds(embeds, unet, adapters["plus"], plus_pos, neg)
    with pytest.raises(ValueError, match="embeds_2 are .*image_embeds.*embeds_1 are .*penultimate"):
        embeds.XformersIPAdapterCombineEmbeds.execute(plus_pos, "concat", embeds_2=pos)
    with pytest.raises(TypeError, match="pos_embeds must come from IP-Adapter Encoder"):
        apply_embeds(embeds, unet, adapters["base"], pos.tensor)


def test_layer_weights_errors_at_the_apply_nodes(nodes, unet, clip_vision, adapters):
    embeds, apply, _ = nodes
    pos, _ = encode(embeds, adapters["base"], clip_vision, hh.image(1))
    with pytest.raises(ValueError, match=r"layer_weights: index 4 in '4:1' is out of range: this model has 4"):
        apply_embeds(embeds, unet, adapters["base"], pos, layer_weights="4:1")
    with pytest.raises(ValueError, match="layer_weights: 'one' is not an 'index:weight' pair"):
        apply.ApplyXformersIPAdapterAttention.execute(unet, adapters["base"], clip_vision, hh.image(1),
                                                      combine_embeds="concat", layer_weights="one", **APPLY)
    patched = apply_embeds(embeds, unet, adapters["base"], pos, layer_weights="1:2")
    app = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values())).applications[0]
    sites = hh.pack_module("nodes.sites").attn2_sites(unet)  # adapter order: input, output, middle
    assert app.kv.site_weights == tuple(1.6 if s.transformer_index == 1 else 0.0 for s in sites)  # 0.8 x 2
    assert app.kv.site_weights.count(1.6) == 1


def test_pickled_embeds_are_refused_with_advice(nodes, folders):
    embeds, _, _ = nodes
    torch.save(torch.zeros(1, 96), folders / "input" / "old.ipadpt")
    assert "old.ipadpt" in embeds.embeds_files()
    with pytest.raises(ValueError, match="pickle.*re-encode the reference image with IP-Adapter Encoder"):
        embeds.LoadXformersIPAdapterEmbeds.execute("old.ipadpt")
    with pytest.raises(ValueError, match="embeds_file: 'missing.safetensors' is not one of"):
        embeds.LoadXformersIPAdapterEmbeds.execute("missing.safetensors")


def test_style_composition_is_two_applications_with_the_table_weights(nodes, unet, clip_vision, adapters):
    """On the tiny SD1.5-like UNet (transformers 0-3: all style blocks) Style & Composition equals Apply with
    'style transfer' on the style image; the composition application is installed with the table's weights."""
    _, apply, style_composition = nodes
    weights = hh.pack_module("processors.weight_types")
    style, composition = hh.image(11, batch=2), hh.image(12)
    args = dict(start_at=0.0, end_at=1.0, embeds_scaling="V only")
    patched = style_composition.ApplyXformersIPAdapterStyleComposition.execute(
        unet, adapters["base"], clip_vision, style, composition, weight_style=0.9, weight_composition=1.3,
        expand_style=False, combine_embeds="average", **args).result[0]
    patches = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    sites = hh.pack_module("nodes.sites").attn2_sites(unet)
    for site in sites:
        style_app, comp_app = patches[site.key].applications
        expected = weights.style_composition_weights(0.9, 1.3, False, site.transformer_index, False)
        assert (style_app.kv.site_weights[site.index], comp_app.kv.site_weights[site.index]) == expected
    reference = apply.ApplyXformersIPAdapterAttention.execute(
        unet, adapters["base"], clip_vision, style, weight=0.9, weight_type="style transfer",
        combine_embeds="average", **args).result[0]
    assert torch.equal(hh.sample(patched), hh.sample(reference))
    with pytest.raises(ValueError, match="image_composition batch is empty"):
        style_composition.ApplyXformersIPAdapterStyleComposition.execute(
            unet, adapters["base"], clip_vision, style, composition[:0], weight_style=1.0, weight_composition=1.0,
            expand_style=True, combine_embeds="average", **args)


def test_every_new_node_has_tooltips_a_description_and_a_help_page(nodes):
    from pathlib import Path

    embeds, _, style_composition = nodes
    docs = Path(embeds.__file__).resolve().parents[1] / "web" / "docs"
    for node in [*embeds.NODES, style_composition.ApplyXformersIPAdapterStyleComposition]:
        schema = node.define_schema()
        assert schema.description and (docs / f"{schema.node_id}.md").is_file(), schema.node_id
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip, (schema.node_id, getattr(item, "id", item))
