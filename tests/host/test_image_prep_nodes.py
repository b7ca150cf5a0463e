"""Prep Image For ClipVision and IP-Adapter Noise on a real ComfyUI: registration, schema, ComfyUI's validation,
their outputs feeding the apply node through a real KSampler run, and errors naming the input."""

import asyncio

import pytest
import torch

from harness import host_helpers as hh

APPLY = dict(weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
             embeds_scaling="V only")


@pytest.fixture(scope="module")
def registered(pack):
    extension = asyncio.run(pack.comfy_entrypoint())
    return {node.define_schema().node_id: node for node in asyncio.run(extension.get_node_list())}


@pytest.fixture(scope="module")
def prep(registered):
    return registered["XformersPrepImageForClipVision"]


@pytest.fixture(scope="module")
def noise(registered):
    return registered["XformersIPAdapterNoise"]


def test_schema_is_the_contract(prep, noise):
    info = prep.INPUT_TYPES()
    assert list(info["required"]) == ["image", "interpolation", "crop_position", "sharpening"]
    assert info["required"]["interpolation"][1]["options"] == ["LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX",
                                                               "NEAREST"]
    assert info["required"]["crop_position"][1]["options"] == ["top", "bottom", "left", "right", "center", "pad"]
    assert (info["required"]["sharpening"][1]["min"], info["required"]["sharpening"][1]["max"]) == (0.0, 1.0)
    info = noise.INPUT_TYPES()
    assert list(info["required"]) == ["type", "strength", "blur"] and list(info["optional"]) == ["image"]
    assert info["required"]["type"][1]["options"] == ["fade", "dissolve", "gaussian", "shuffle"]
    for node in (prep, noise):
        schema = node.define_schema()
        assert [o.io_type for o in schema.outputs] == ["IMAGE"] and schema.description
        assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)


def test_host_validation_refuses_a_value_outside_the_lists(prep, noise, monkeypatch):
    import execution
    import nodes

    for node in (prep, noise):
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, node.define_schema().node_id, node)
    prompt = {"1": {"class_type": "XformersIPAdapterNoise", "inputs": {"type": "salt", "strength": 0.5, "blur": 0}}}
    valid, errors, _ = asyncio.run(execution.validate_inputs("t", prompt, "1", {}))
    assert not valid and "type: 'salt' is not one of" in str(errors)
    prompt["1"]["inputs"]["type"] = "dissolve"
    assert asyncio.run(execution.validate_inputs("t", prompt, "1", {}))[0]


def test_prep_output_is_224_and_noise_is_repeatable(prep, noise):
    tall = hh.image(3, batch=2, height=300, width=180)
    out = prep.execute(tall, "LANCZOS", "top", 0.2).result[0]
    assert out.shape == (2, 224, 224, 3) and out.dtype == torch.float32
    half = prep.execute(tall.half(), "LANCZOS", "top", 0.2).result[0]  # fp16 IMAGE from another node: cast
    assert half.dtype == torch.float32 and (half - out).abs().max() < 5e-3
    first = noise.execute("shuffle", 0.7, 3, image=tall).result[0]
    assert torch.equal(first, noise.execute("shuffle", 0.7, 3, image=tall.clone()).result[0])
    assert noise.execute("fade", 1.0, 0).result[0].shape == (1, 224, 224, 3)


@pytest.mark.parametrize("call, message", [
    (lambda prep, noise: prep.execute(torch.zeros(0, 64, 64, 3), "LANCZOS", "center", 0.0), "image batch is empty"),
    (lambda prep, noise: prep.execute(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), "BOX", "pad", 0.0),
     "image has dtype torch.uint8"),
    (lambda prep, noise: prep.execute(torch.rand(1, 64, 64, 3), "CUBIC", "pad", 0.0), "interpolation: 'CUBIC'"),
    (lambda prep, noise: noise.execute("fade", 2.0, 0), "strength must be a number from 0.0 to 1.0"),
])
def test_bad_input_names_the_input(prep, noise, call, message):
    with pytest.raises(ValueError, match=message):
        call(prep, noise)


def test_prepped_image_and_noise_negative_drive_the_apply_node(comfy, pack, tiny_models, prep, noise,
                                                                tmp_path_factory):
    import comfy.sd

    unet = comfy.sd.load_diffusion_model(str(tiny_models.files["unet"]))
    clip_vision = hh.tiny_clip_vision(tmp_path_factory.mktemp("clip_vision"))
    adapter = hh.adapter("plus", seed=2)
    apply = hh.pack_module("nodes.apply").ApplyXformersIPAdapterAttention
    reference = prep.execute(hh.image(4, height=320, width=224), "BICUBIC", "center", 0.0).result[0]
    negative = noise.execute("fade", 0.8, 0, image=reference).result[0]
    default = hh.sample(apply.execute(unet, adapter, clip_vision, reference, **APPLY).result[0], steps=2)
    with_noise = hh.sample(apply.execute(unet, adapter, clip_vision, reference, **APPLY,
                                         image_negative=negative).result[0], steps=2)
    assert torch.isfinite(with_noise).all()
    assert (with_noise - default).abs().max() > 1e-3 * default.abs().max()  # the negative image is used
