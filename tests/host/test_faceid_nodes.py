"""FaceID on a real ComfyUI: Apply xformers IP-Adapter FaceID with the tiny ONNX face models (real onnxruntime) and
the tiny SD1.5 UNet sampling for real; the node errors (no face in image 3, several faces, a FaceID adapter on the
plain Apply / Apply Embeds, Plus without CLIP vision); the Unified Loader FaceID choosing adapter, CLIP vision and
LoRA by shape and applying the LoRA with ComfyUI's loader; schemas, tooltips, help pages and registration."""
import asyncio
import copy
import logging
import shutil

import pytest
import torch

from harness import host_helpers as hh
from harness import tiny_faceid as tf
from harness.model_files import clip_hf_shapes, write_safetensors
from harness.testing import require

require("onnxruntime")
require("onnx")

from harness import tiny_onnx  # noqa: E402

ARGS = dict(weight=1.0, weight_faceidv2=1.0, weight_type="linear", combine_embeds="concat", start_at=0.0,
            end_at=1.0, embeds_scaling="V only")
BIG, SMALL = (40, 30, 200, 190), (210, 200, 250, 240)  # faces must not share rows or columns


@pytest.fixture(scope="module")
def faceid(pack):
    return hh.pack_module("nodes.faceid")


@pytest.fixture(scope="module")
def analysis(pack, tmp_path_factory):
    face = hh.pack_module("processors.face")
    return face.load_face_analysis(tiny_onnx.write_model_pack(tmp_path_factory.mktemp("faces"), "buffalo_l"))


def tiny_faceid_adapter(kind: str, name: str):
    """A FaceID adapter for the tiny UNet (Plus sized for the tiny CLIP vision), K/V weights scaled up so the
    effect on the latent is visible."""
    build = hh.pack_module("processors.ipadapter.faceid_adapter")
    layout = tf.tiny_adapter_layout(kind, hh.TINY_CLIP_VISION["hidden_size"])
    state = {k: t.float() * (25.0 if "_ip." in k else 1.0) for k, t in tf.tm.fill(layout, seed=3).items()}
    nested = build.nested_or_none(state)
    return build.faceid_from_state_dict(nested, name)


@pytest.fixture(scope="module")
def adapters(pack):
    return {kind: tiny_faceid_adapter(kind, name) for kind, name in tf.TINY_FACEID_FILES.items()}


def face_image(*boxes, size: int = 256) -> torch.Tensor:
    image = torch.zeros(size, size, 3)
    for box in boxes:
        image = tiny_onnx.draw_face(image, box)
    return image


def run(faceid, model, adapter, analysis, image, **overrides):
    return faceid.ApplyXformersIPAdapterFaceID.execute(model, adapter, analysis, image, **{**ARGS, **overrides})


# --- Apply xformers IP-Adapter FaceID -------------------------------------------------------------------------

def test_faceid_changes_sampling_and_outputs_the_aligned_crop(faceid, unet, adapters, analysis):
    image = face_image(BIG)[None]
    out = run(faceid, unet, adapters["faceid"], analysis, image)
    patched, crops = out.result
    assert crops.shape == (1, 224, 224, 3)
    expected = hh.pack_module("processors.face").FaceAnalysis.aligned_crop(image[0], tiny_onnx.expected_kps(BIG), 224)
    torch.testing.assert_close(crops[0], expected, atol=2e-2, rtol=0)  # keypoints from the detector vs exact
    plain = hh.sample(unet, steps=2, size=32)
    with_face = hh.sample(patched, steps=2, size=32)
    assert (with_face - plain).abs().max() > 1e-3 * plain.abs().max()
    assert "patches_replace" not in unet.model_options.get("transformer_options", {})  # input untouched


def test_tokens_come_from_the_face_embedding_of_the_largest_face(faceid, unet, adapters, analysis, caplog):
    build = hh.pack_module("processors.ipadapter.faceid_adapter")
    several, alone = face_image(BIG, SMALL), face_image(BIG)
    with caplog.at_level(logging.INFO):
        patched = run(faceid, unet, adapters["portrait"], analysis, torch.stack([several, alone])).result[0]
    assert "image 1 of 2: 2 faces found; using the largest" in caplog.text
    tokens = next(iter(attn2_patches(patched).values())).applications[-1].kv.tokens
    assert tokens.cond.shape == (1, 32, 768)  # Portrait: 16 tokens per face, concatenated
    largest = analysis.analyze(alone)[0].normed_embedding  # the same face alone: the same embedding
    expected = build.faceid_tokens(adapters["portrait"], largest[None], "concat")
    torch.testing.assert_close(tokens.cond[:, :16], expected.cond, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokens.cond[:, 16:], expected.cond, rtol=1e-4, atol=1e-4)


def test_portrait_unnorm_is_fed_the_raw_embedding(faceid, unet, adapters, analysis):
    build = hh.pack_module("processors.ipadapter.faceid_adapter")
    image = face_image(BIG)
    patched = run(faceid, unet, adapters["portrait-unnorm"], analysis, image[None]).result[0]
    tokens = next(iter(attn2_patches(patched).values())).applications[-1].kv.tokens
    raw = analysis.analyze(image)[0].embedding
    assert abs(float(raw.norm()) - 1.0) > 1e-2  # really unnormalised
    torch.testing.assert_close(tokens.cond, build.faceid_tokens(adapters["portrait-unnorm"], raw[None]).cond)


def test_plus_v2_encodes_the_crop_and_weight_faceidv2_moves_the_tokens(faceid, unet, adapters, analysis,
                                                                       clip_vision):
    plus = adapters["plus"]
    assert plus.info.plus_v2 and plus.info.needs_clip_vision
    image = face_image(BIG)[None]
    one = run(faceid, unet, plus, analysis, image, clip_vision=clip_vision).result[0]
    three = run(faceid, unet, plus, analysis, image, clip_vision=clip_vision, weight_faceidv2=3.0).result[0]
    v1 = run(faceid, unet, plus.with_plus_v2(False), analysis, image, clip_vision=clip_vision).result[0]
    t1, t3, tv1 = (next(iter(attn2_patches(m).values())).applications[-1].kv.tokens for m in (one, three, v1))
    torch.testing.assert_close(t3.cond - t1.cond, 2.0 * tv1.cond, rtol=1e-4, atol=1e-4)  # x + s * resampler


def test_no_face_in_image_3_names_it(faceid, unet, adapters, analysis):
    batch = torch.stack([face_image(BIG), face_image(BIG), torch.zeros(256, 256, 3)])
    with pytest.raises(ValueError, match=r"^image: no face found in image 3 of 3 \(counted from 1\)"):
        run(faceid, unet, adapters["faceid"], analysis, batch)


def test_plus_without_clip_vision_is_a_node_error(faceid, unet, adapters, analysis):
    with pytest.raises(ValueError, match=r"^clip_vision: FaceID Plus V2 encodes the aligned face crop"):
        run(faceid, unet, adapters["plus"], analysis, face_image(BIG)[None])


def test_a_plain_adapter_or_a_wrong_face_analysis_is_refused(faceid, unet, analysis):
    with pytest.raises(ValueError, match="is not a FaceID IP-Adapter; use Apply xformers IP-Adapter Attention"):
        run(faceid, unet, hh.adapter("base"), analysis, face_image(BIG)[None])
    with pytest.raises(TypeError, match="face_analysis must come from Face Analysis Loader"):
        run(faceid, unet, tiny_faceid_adapter("faceid", "f.bin"), "buffalo_l", face_image(BIG)[None])


def test_plain_apply_and_apply_embeds_say_which_node_to_use(pack, unet, adapters, clip_vision):
    apply = hh.pack_module("nodes.apply").ApplyXformersIPAdapterAttention
    message = r"this is a FaceID adapter: use Apply xformers IP-Adapter FaceID \(with a Face Analysis Loader\)"
    with pytest.raises(ValueError, match=message):
        apply.execute(unet, adapters["faceid"], clip_vision, hh.image(0), weight=1.0, weight_type="linear",
                      start_at=0.0, end_at=1.0, combine_embeds="concat", embeds_scaling="V only")
    embeds = hh.pack_module("nodes.embeds").ApplyXformersIPAdapterEmbeds
    with pytest.raises(ValueError, match=message):
        embeds.execute(unet, adapters["plus"], None, weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0,
                       embeds_scaling="V only")


def attn2_patches(model):
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


# --- Unified Loader FaceID ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_root(pack, tmp_path_factory):
    """One models tree: the tiny FaceID adapters (Plus sized for ViT-L), the FaceID LoRA and decoy LoRAs (same
    shapes under another name; rank 4), a ViT-L header in clip_vision, the tiny buffalo_l pack."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("faceid_models")
    files = tf.generate_faceid(root)
    save_file(tf.tm.fill(tf.faceid_lora_layout(), seed=9), str(root / "loras" / "a_same_shaped_lora.safetensors"))
    save_file(tf.tm.fill(tf.faceid_lora_layout(rank=4), seed=9), str(root / "loras" / "aa_rank4.safetensors"))
    write_safetensors(root / "clip_vision" / "vit_l.safetensors", clip_hf_shapes("ViT-L"))
    tiny_onnx.write_model_pack(root, "buffalo_l")
    return root, files


@pytest.fixture
def folders(model_root, tmp_path, monkeypatch):
    """The models tree copied and registered as the only ipadapter, clip_vision, loras and insightface folders
    (an extra_model_paths.yaml root)."""
    import folder_paths
    from utils.extra_config import load_extra_path_config

    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    kinds = ("ipadapter", "clip_vision", "loras", "insightface")
    for name in kinds:
        folder_paths.folder_names_and_paths[name] = ([], set(folder_paths.supported_pt_extensions) | {".onnx"})
    root = tmp_path / "models"
    shutil.copytree(model_root[0], root)
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text(f"r:\n    base_path: {root}\n" + "".join(f"    {f}: {f}\n" for f in kinds))
    load_extra_path_config(str(yaml))
    yield root, model_root[1]
    folder_paths.filename_list_cache.clear()


@pytest.fixture
def loader(pack, monkeypatch):
    unified = hh.pack_module("nodes.unified_loader")
    monkeypatch.setattr(unified, "_load_clip_vision", lambda path: {"clip_vision": path})  # a full-size ViT-L
    module = hh.pack_module("nodes.unified_loader_faceid")
    monkeypatch.setattr(module, "_load_clip_vision", lambda path: {"clip_vision": path})
    return module.XformersIPAdapterUnifiedLoaderFaceID


def lora_keys(model) -> set:
    return {k for k in model.patches}


def test_faceid_preset_finds_adapter_and_lora_and_applies_it(loader, folders, unet):
    root, files = folders
    model, adapter, clip_vision, analysis = loader.execute(unet, "FACEID", 0.6, "CPU").result
    assert adapter.info.variant == "faceid" and adapter.name == files["faceid"].name
    assert clip_vision is None  # FaceID does not use CLIP vision
    assert analysis.pack_dir == root / "insightface" / "models" / "buffalo_l"
    assert lora_keys(unet) == set()  # the input model is never patched
    patched = lora_keys(model)
    assert len(patched) == 32 and all(".attn1." in k or ".attn2." in k for k in patched)  # 4 blocks x 2 x 4
    # ComfyUI's loader took the named file (name contains the adapter's), at lora_strength
    strength, lora_weights = next(iter(model.patches.values()))[0][:2]
    assert strength == 0.6


def test_plus_presets_read_the_same_file_as_v1_or_v2_and_bring_clip_vision(loader, folders, unet):
    root, files = folders
    _, v2, clip_vision, _ = loader.execute(unet, "FACEID PLUS V2", 0.6, "CPU").result
    assert v2.info.plus_v2 and v2.name == files["plus"].name
    assert clip_vision == {"clip_vision": str(root / "clip_vision" / "vit_l.safetensors")}
    _, v1, _, _ = loader.execute(unet, "FACEID PLUS - SD1.5 only", 0.6, "CPU").result
    assert v1.name == files["plus"].name and not v1.info.plus_v2


def test_portrait_presets_have_no_lora(loader, folders, unet):
    model, adapter, clip_vision, _ = loader.execute(unet, "FACEID PORTRAIT (style transfer)", 0.6, "CPU").result
    assert model is unet and adapter.info.variant == "faceid-portrait" and clip_vision is None


def test_missing_lora_and_sdxl_only_presets_say_what_to_download(loader, folders, unet):
    root, _ = folders
    with pytest.raises(ValueError, match="SDXL only|exists for SDXL only"):
        loader.execute(unet, "FACEID PORTRAIT UNNORM - SDXL only (strong)", 0.6, "CPU")
    for lora in (root / "loras").iterdir():
        if "rank4" not in lora.name:
            lora.unlink()
    with pytest.raises(ValueError) as error:
        loader.execute(unet, "FACEID", 0.6, "CPU")
    message = str(error.value)
    assert "no LoRA in the loras folder fits" in message and "ip-adapter-faceid_tiny_sd15_lora.safetensors" in message
    assert "aa_rank4.safetensors: not usable" not in message and "rank 4" in message  # the inventory says why
    model = loader.execute(unet, "FACEID", 0.0, "CPU").result[0]
    assert model is unet  # strength 0: no LoRA needed


# --- schema ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module,node_id", [("faceid", "ApplyXformersIPAdapterFaceID"),
                                            ("unified_loader_faceid", "XformersIPAdapterUnifiedLoaderFaceID")])
def test_schema_tooltips_help_page_and_registration(pack, module, node_id):
    node = getattr(hh.pack_module(f"nodes.{module}"), node_id)
    schema = node.define_schema()
    assert schema.node_id == node_id and schema.description
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    page = (hh.pack_module("nodes").__file__.rsplit("/", 2)[0] + f"/web/docs/{node_id}.md")
    text = open(page).read()
    assert text.startswith(f"# {schema.display_name}\n")
    assert all(f"`{i.id}`" in text for i in schema.inputs)
    extension = hh.pack_module("nodes.extension").XformersIPAdapterExtension()
    assert node in asyncio.run(extension.get_node_list())


def test_the_tiny_model_setup_holds_what_the_faceid_example_needs(pack, tiny_models):
    identify = hh.pack_module("processors.ipadapter.identify")
    identifier = identify.FileIdentifier()
    variants = {identifier.identify(tiny_models.files[f"faceid_{kind}"], identify.ADAPTER).info.variant
                for kind in tf.TINY_FACEID_FILES}
    assert variants == {"faceid", "faceid-plus", "faceid-portrait", "faceid-portrait-unnorm"}
    lora = identifier.identify(tiny_models.files["faceid_lora"], identify.FACEID_LORA)
    plus = identifier.identify(tiny_models.files["faceid_plus"], identify.ADAPTER).info
    assert lora.info.fits(plus) and plus.clip_width == tiny_models.clip_hidden_dim
    assert sorted(p.name for p in (tiny_models.root / "insightface" / "models" / "buffalo_l").iterdir()) == \
        ["det_10g.onnx", "w600k_r50.onnx"]
