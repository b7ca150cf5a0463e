"""FaceID IP-Adapters: projections against diffusers on the same weights, strict loading from the original key
layout, detection of every variant by shape (SD1.5 and SDXL, full-size layouts read from file headers), and the
image tokens (Plus V2 shortcut, Portrait's several faces, the uncond side)."""

import pytest
import torch
import torch.nn.functional as F

from harness import tiny_faceid as tf
from harness import tiny_models as tm
from harness.model_files import write_safetensors
from harness.testing import require

require("diffusers.models.embeddings")  # the oracle: fails under CI when missing, never skips there
from diffusers.models.embeddings import (IPAdapterFaceIDImageProjection,  # noqa: E402
                                         IPAdapterFaceIDPlusImageProjection)

from processors.ipadapter import (IPAdapterFileError, IPAdapterModel, detect_adapter,  # noqa: E402
                                  load_ipadapter_file, normalize_layout)
from processors.ipadapter.faceid import FaceIDInfo, detect_faceid, plus_v2_from_name  # noqa: E402
from processors.ipadapter.faceid_adapter import (FaceIDAdapterModel, faceid_from_state_dict,  # noqa: E402
                                                 faceid_tokens)
from processors.ipadapter.identify import adapter_from_shapes, read_safetensors_shapes  # noqa: E402

CROSS, CLIP = 128, 96  # 2 heads of 64 in the Plus perceiver


def random_state(shapes: dict, seed: int = 0) -> dict:
    """Random weights for flat `image_proj.` / `ip_adapter.` shapes; layer-norm weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * 0.1
        out[key] = t + 1.0 if tf._NORM_KEY.search(key) and key.endswith("weight") else t
    return out


def adapter(kind: str, name: str = "adapter.safetensors", seed: int = 0, **proj) -> FaceIDAdapterModel:
    shapes = tf.faceid_adapter_layout(kind, cross=CROSS, inner_dims=(64, 128), **proj)
    return faceid_from_state_dict(normalize_layout(random_state(shapes, seed)), name)


def image_proj(state: dict) -> dict:
    return {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}


# --- diffusers parity (key conversion to diffusers' module names written out here) ----------------------------

def to_diffusers_faceid(sd: dict) -> dict:
    """MLPProjModelFaceId -> IPAdapterFaceIDImageProjection: proj.0 is ff.net.0.proj (GELU's linear), proj.2
    is ff.net.2; norm keeps its name."""
    return {k.replace("proj.0.", "ff.net.0.proj.").replace("proj.2.", "ff.net.2."): v for k, v in sd.items()}


def to_diffusers_plus(sd: dict) -> dict:
    """ProjModelFaceIdPlus -> IPAdapterFaceIDPlusImageProjection: the perceiver's keys lose their prefix;
    per layer norm1/norm2 are ln0/ln1, to_q/to_out are attn.to_q/attn.to_out.0, to_kv splits into attn.to_k and
    attn.to_v (rows: keys first), the feed-forward 1.0/1.1/1.3 is ff.0/ff.1.net.0.proj/ff.1.net.2; the face MLP's
    proj.0/proj.2 are proj.net.0.proj/proj.net.2."""
    out = {}
    for key, value in sd.items():
        if key.startswith("proj."):
            out[key.replace("proj.0.", "proj.net.0.proj.").replace("proj.2.", "proj.net.2.")] = value
            continue
        key = key.removeprefix("perceiver_resampler.")
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        head, rest = f"layers.{parts[1]}.", ".".join(parts[2:])
        if rest.startswith("0.to_kv."):
            k, v = value.chunk(2, dim=0)
            out[head + "attn.to_k.weight"], out[head + "attn.to_v.weight"] = k, v
            continue
        renamed = {"0.norm1.": "ln0.", "0.norm2.": "ln1.", "0.to_q.": "attn.to_q.", "0.to_out.": "attn.to_out.0.",
                   "1.0.": "ff.0.", "1.1.": "ff.1.net.0.proj.", "1.3.": "ff.1.net.2."}
        prefix = next(p for p in renamed if rest.startswith(p))
        out[head + renamed[prefix] + rest[len(prefix):]] = value
    return out


@pytest.mark.parametrize("tokens_kind", ["faceid", "portrait"])
def test_faceid_projection_matches_diffusers(tokens_kind):
    ours = adapter(tokens_kind)
    state = {k: v for k, v in ours.image_proj.state_dict().items()}
    tokens = 4 if tokens_kind == "faceid" else 16
    theirs = IPAdapterFaceIDImageProjection(image_embed_dim=512, cross_attention_dim=CROSS, mult=2,
                                            num_tokens=tokens).eval()
    theirs.load_state_dict(to_diffusers_faceid(state), strict=True)
    faces = torch.randn(3, 512, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(faces)
        got = ours.image_proj(faces)
    assert got.shape == (3, tokens, CROSS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("v2_scale", [None, 0.0, 1.7])
def test_faceid_plus_projection_matches_diffusers(v2_scale):
    ours = adapter("plus", clip_hidden=CLIP)  # released layout: depth 4, heads = width / 64, feed-forward x4
    theirs = IPAdapterFaceIDPlusImageProjection(embed_dims=CROSS, output_dims=CROSS, hidden_dims=CLIP,
                                                heads=CROSS // 64, id_embeddings_dim=512).eval()
    theirs.load_state_dict(to_diffusers_plus(ours.image_proj.state_dict()), strict=True)
    gen = torch.Generator().manual_seed(4)
    faces, clip = torch.randn(2, 512, generator=gen), torch.randn(2, 257, CLIP, generator=gen)
    theirs.clip_embeds = clip.unsqueeze(0)  # diffusers reads [batch, images, tokens, width] from the attribute
    theirs.shortcut, theirs.shortcut_scale = v2_scale is not None, v2_scale if v2_scale is not None else 1.0
    with torch.no_grad():
        expected = theirs(faces)
        got = ours.image_proj(faces, clip, v2_scale)
    assert got.shape == (2, 4, CROSS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- strict loading -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(tf.TINY_FACEID_FILES))
def test_strict_loading_refuses_missing_and_unexpected_keys(kind):
    shapes = tf.faceid_adapter_layout(kind, cross=CROSS, inner_dims=(64,), **tf.TINY_PROJ.get(kind, {}))
    state = random_state(shapes)
    model = faceid_from_state_dict(normalize_layout(state), "f.safetensors")
    assert set(model.image_proj.state_dict()) == set(image_proj(state))  # every file key, nothing else
    victim = [k for k in state if k.startswith("image_proj.") and k.endswith(".bias")][-1]
    missing = {k: v for k, v in state.items() if k != victim}
    with pytest.raises(IPAdapterFileError, match=f"missing keys: {victim[len('image_proj.'):]}"):
        faceid_from_state_dict(normalize_layout(missing), "f.safetensors")
    extra = dict(state, **{"image_proj.extra.weight": torch.zeros(2)})
    with pytest.raises(IPAdapterFileError, match="unexpected keys: extra.weight"):
        faceid_from_state_dict(normalize_layout(extra), "f.safetensors")


def test_loaded_file_is_a_faceid_adapter_and_lora_keys_are_ignored_for_attention(tmp_path):
    from safetensors.torch import save_file

    state = random_state(tf.faceid_adapter_layout("faceid", cross=CROSS, inner_dims=(64, 128)))
    path = tmp_path / "anything.safetensors"
    save_file(state, str(path))
    model = load_ipadapter_file(path)
    assert isinstance(model, FaceIDAdapterModel) and isinstance(model, IPAdapterModel)
    assert [lin.weight.shape for lin in model.to_k_ip] == [(64, CROSS), (128, CROSS)]
    torch.testing.assert_close(model.to_v_ip[1].weight, state["ip_adapter.3.to_v_ip.weight"])
    assert model.info.lora_rank == tf.LORA_RANK and model.info.lora_modules == 4


def test_plain_adapters_still_load_as_plain(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plus.safetensors"
    save_file({k: v.float() for k, v in tm.fill(tm.ipadapter_plus_layout(1280), 1).items()}, str(path))
    model = load_ipadapter_file(path)
    assert type(model) is IPAdapterModel and model.info.variant == "plus"


def test_non_finite_faceid_weights_are_refused():
    state = random_state(tf.faceid_adapter_layout("portrait", cross=CROSS, inner_dims=(64,)))
    state["image_proj.proj.0.weight"][0, 0] = float("nan")
    with pytest.raises(IPAdapterFileError, match="NaN"):
        faceid_from_state_dict(normalize_layout(state), "p.safetensors")


# --- detection of every variant, full-size layouts read from file headers -------------------------------------

FULL = {  # kind, base model -> (variant, projection, tokens, CLIP output, LoRA rank)
    ("faceid", "SD1.5"): ("faceid", "MLPProjModelFaceId", 4, "none", 128),
    ("faceid", "SDXL"): ("faceid", "MLPProjModelFaceId", 4, "none", 128),
    ("plus", "SD1.5"): ("faceid-plus", "ProjModelFaceIdPlus", 4, "penultimate_hidden_states", 128),
    ("plus", "SDXL"): ("faceid-plus", "ProjModelFaceIdPlus", 4, "penultimate_hidden_states", 128),
    ("portrait", "SD1.5"): ("faceid-portrait", "MLPProjModelFaceId", 16, "none", None),
    ("portrait", "SDXL"): ("faceid-portrait", "MLPProjModelFaceId", 16, "none", None),
    ("portrait-unnorm", "SDXL"): ("faceid-portrait-unnorm", "Resampler", 16, "none", None),
}


@pytest.mark.parametrize("kind,base", list(FULL))
def test_every_variant_is_detected_from_a_file_header(tmp_path, kind, base):
    cross, inner = (768, tf.SD15_INNER) if base == "SD1.5" else (2048, tf.SDXL_INNER)
    path = tmp_path / "no_name_hint.safetensors"  # the name says nothing: shapes decide
    write_safetensors(path, tf.faceid_adapter_layout(kind, cross=cross, inner_dims=inner, rank=128))
    info = adapter_from_shapes(read_safetensors_shapes(path))
    variant, projection, tokens, clip_output, rank = FULL[(kind, base)]
    assert isinstance(info, FaceIDInfo)
    assert (info.variant, info.projection, info.num_tokens, info.clip_output, info.lora_rank) == \
        (variant, projection, tokens, clip_output, rank)
    assert (info.base_model, info.num_sites, info.site_inner_dims) == (base, len(inner), inner)
    assert info.face_embedding == ("embedding" if kind == "portrait-unnorm" else "normed_embedding")
    assert info.clip_width == (1280 if kind == "plus" else 0)  # ViT-H hidden states of the face crop
    assert info.lora_modules == (2 * len(inner) if rank else 0)
    assert info.face_crop_size == (224 if base == "SD1.5" else 256)


def test_plus_or_plus_v2_only_names_can_tell_and_sdxl_plus_is_v2():
    sd15 = detect_faceid({"image_proj": image_proj(_lazy(tf.faceid_adapter_layout("plus", cross=768))),
                          "ip_adapter": _ip(_lazy(tf.faceid_adapter_layout("plus", cross=768)))})
    assert not sd15.plus_v2
    assert plus_v2_from_name(sd15, "ip-adapter-faceid-plusv2_sd15.bin")
    assert plus_v2_from_name(sd15, "My_FaceID_Plus_V2.safetensors")
    assert not plus_v2_from_name(sd15, "ip-adapter-faceid-plus_sd15.bin")
    layout = tf.faceid_adapter_layout("plus", cross=2048, inner_dims=tf.SDXL_INNER)
    sdxl = detect_faceid({"image_proj": image_proj(_lazy(layout)), "ip_adapter": _ip(_lazy(layout))})
    assert sdxl.plus_v2 and plus_v2_from_name(sdxl, "anything.bin")


def test_plain_adapters_are_not_faceid():
    for layout in (tm.ipadapter_base_layout(1024), tm.ipadapter_plus_layout(1280)):
        info = detect_adapter(normalize_layout(_lazy({k: s for k, (_, s) in layout.items()})))
        assert not isinstance(info, FaceIDInfo)


def test_a_broken_faceid_layout_is_named():
    layout = tf.faceid_adapter_layout("faceid", cross=768, inner_dims=(320,))
    layout["image_proj.norm.weight"] = layout["image_proj.norm.bias"] = (700,)  # rows are not whole tokens
    with pytest.raises(IPAdapterFileError, match="not a multiple of norm width"):
        detect_adapter(normalize_layout(_lazy(layout)))


def _lazy(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _ip(flat: dict) -> dict:
    return {k[len("ip_adapter."):]: v for k, v in flat.items() if k.startswith("ip_adapter.")}


# --- tokens -----------------------------------------------------------------------------------------------

def face_mlp(sd: dict, faces: torch.Tensor, cross: int) -> torch.Tensor:
    """The face MLP written from the formula: LayerNorm(W2 gelu(W0 x + b0) + b2) per token."""
    h = F.gelu(faces @ sd["proj.0.weight"].T + sd["proj.0.bias"]) @ sd["proj.2.weight"].T + sd["proj.2.bias"]
    return F.layer_norm(h.reshape(faces.shape[0], -1, cross), (cross,), sd["norm.weight"], sd["norm.bias"])


def test_faceid_tokens_cond_and_zero_uncond():
    model = adapter("faceid")
    sd = model.image_proj.state_dict()
    faces = torch.randn(2, 512, generator=torch.Generator().manual_seed(5))
    tokens = faceid_tokens(model, faces, "concat")
    torch.testing.assert_close(tokens.cond[0], face_mlp(sd, faces, CROSS).reshape(-1, CROSS), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens.uncond[0], face_mlp(sd, torch.zeros(2, 512), CROSS).reshape(-1, CROSS),
                               rtol=1e-5, atol=1e-5)
    assert tokens.tokens_per_image == 4 and tokens.num_images == 2


def test_portrait_several_faces_concat_or_average():
    model = adapter("portrait")
    sd = model.image_proj.state_dict()
    faces = torch.randn(3, 512, generator=torch.Generator().manual_seed(6))
    assert faceid_tokens(model, faces, "concat").cond.shape == (1, 48, CROSS)
    averaged = faceid_tokens(model, faces, "average")
    torch.testing.assert_close(averaged.cond[0], face_mlp(sd, faces.mean(0, keepdim=True), CROSS)[0],
                               rtol=1e-5, atol=1e-5)
    assert averaged.uncond.shape == (1, 16, CROSS)


def test_plus_v2_shortcut_is_face_tokens_plus_scaled_resampler():
    v2 = adapter("plus", name="x_plusv2.bin", clip_hidden=CLIP, depth=1, inner=64, ff_mult=1)
    v1 = v2.with_plus_v2(False)
    assert v2.info.plus_v2 and not v1.info.plus_v2 and v1.image_proj is v2.image_proj
    gen = torch.Generator().manual_seed(7)
    faces, clip, black = torch.randn(1, 512, generator=gen), torch.randn(1, 257, CLIP, generator=gen), \
        torch.randn(1, 257, CLIP, generator=gen)
    plain = faceid_tokens(v1, faces, "concat", clip, black, weight_faceidv2=3.0)  # V1 ignores the weight
    at_zero = faceid_tokens(v2, faces, "concat", clip, black, weight_faceidv2=0.0)
    at_two = faceid_tokens(v2, faces, "concat", clip, black, weight_faceidv2=2.0)
    torch.testing.assert_close(at_zero.cond[0], face_mlp(v2.image_proj.state_dict(), faces, CROSS)[0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at_two.cond, at_zero.cond + 2.0 * plain.cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at_two.uncond, at_zero.uncond + 2.0 * plain.uncond, rtol=1e-5, atol=1e-5)


def test_plus_negative_rows_follow_combine():
    model = adapter("plus", clip_hidden=CLIP, depth=1, inner=64, ff_mult=1)
    gen = torch.Generator().manual_seed(8)
    faces, clip = torch.randn(3, 512, generator=gen), torch.randn(3, 257, CLIP, generator=gen)
    negative = torch.randn(1, 257, CLIP, generator=gen)
    concat = faceid_tokens(model, faces, "concat", clip, negative)
    assert concat.uncond.shape == (1, 12, CROSS)  # the one negative repeated for each face
    torch.testing.assert_close(concat.uncond[0, :4], concat.uncond[0, 8:])
    average = faceid_tokens(model, faces, "average", clip, negative)
    assert average.cond.shape == average.uncond.shape == (1, 4, CROSS)
    with pytest.raises(ValueError, match="needs the CLIP vision features"):
        faceid_tokens(model, faces, "concat")


def test_wrong_face_embedding_width_is_refused():
    with pytest.raises(ValueError, match=r"expects \[faces, 512\]"):
        faceid_tokens(adapter("faceid"), torch.randn(1, 256))


@pytest.mark.parametrize("kind", ["faceid", "plus", "portrait-unnorm"])
def test_the_clip_image_paths_refuse_faceid_adapters(kind):
    """Encoder, Style & Composition, Batch, Tiled... project CLIP features: a FaceID adapter there says which
    node to use instead of failing inside its projection."""
    from processors.ipadapter import image_tokens

    model = adapter(kind, **({"clip_hidden": CLIP, "depth": 1, "inner": 64, "ff_mult": 1} if kind == "plus" else {}))

    def encode(pixels):
        return {"image_embeds": torch.randn(pixels.shape[0], 1024),
                "penultimate_hidden_states": torch.randn(pixels.shape[0], 257, CLIP)}

    with pytest.raises(ValueError, match=r"^this is a FaceID adapter: use Apply xformers IP-Adapter FaceID"):
        image_tokens(model, encode, torch.rand(1, 32, 32, 3))


# --- FaceID LoRA files ----------------------------------------------------------------------------------------

def lora_shapes(blocks: int, rank: int, inner: int = 320, cross: int = 768, naming: str = "kohya") -> dict:
    """{key: (dtype, shape)} of an attention-only LoRA over `blocks` transformer blocks (attn1 + attn2)."""
    shapes = {}
    for b in range(blocks):
        for attn, context in (("1", inner), ("2", cross)):
            for proj, width in (("q", inner), ("k", context), ("v", context), ("out", inner)):
                module = f"down_blocks.{b}.attentions.0.transformer_blocks.0.attn{attn}"
                if naming == "kohya":
                    name = "lora_unet_" + f"{module}.to_{proj}{'.0' if proj == 'out' else ''}".replace(".", "_")
                    down, up = f"{name}.lora_down.weight", f"{name}.lora_up.weight"
                    shapes[f"{name}.alpha"] = (torch.float16, ())
                else:  # PEFT
                    name = f"unet.{module}.to_{proj}{'.0' if proj == 'out' else ''}"
                    down, up = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
                shapes[down], shapes[up] = (torch.float16, (rank, width)), (torch.float16, (inner, rank))
    return shapes


@pytest.mark.parametrize("naming", ["kohya", "peft"])
def test_faceid_lora_files_are_read_from_their_shapes_and_matched_to_the_adapter(naming):
    from processors.ipadapter.faceid import faceid_lora_from_shapes

    lora = faceid_lora_from_shapes(lora_shapes(blocks=2, rank=8, naming=naming))
    assert (lora.rank, lora.modules, lora.context_dim, lora.base_model) == (8, 4, 768, "SD1.5")
    layout = tf.faceid_adapter_layout("faceid", cross=768, inner_dims=(320, 320), rank=8)
    info = detect_adapter(normalize_layout(_lazy(layout)))
    assert lora.fits(info)
    other_rank = tf.faceid_adapter_layout("faceid", cross=768, inner_dims=(320, 320), rank=4)
    assert not lora.fits(detect_adapter(normalize_layout(_lazy(other_rank))))
    three_sites = tf.faceid_adapter_layout("faceid", cross=768, inner_dims=(320,) * 3, rank=8)
    assert not lora.fits(detect_adapter(normalize_layout(_lazy(three_sites))))


def test_other_loras_are_not_faceid_loras():
    from processors.ipadapter.faceid import faceid_lora_from_shapes

    style_lora = dict(lora_shapes(blocks=1, rank=8))
    style_lora["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = (torch.float16, (8, 768))
    with pytest.raises(IPAdapterFileError, match="not a FaceID LoRA: it has 'lora_te_text_model"):
        faceid_lora_from_shapes(style_lora)
    mixed = lora_shapes(blocks=2, rank=4)
    mixed["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"] = \
        (torch.float16, (8, 320))
    with pytest.raises(IPAdapterFileError, match=r"ranks \[4, 8\]"):
        faceid_lora_from_shapes(mixed)
