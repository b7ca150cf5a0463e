"""Proves the host-test harness: ComfyUI in-process, tiny models loadable by ComfyUI's own loaders."""
import pytest
import torch
from safetensors.torch import load_file

from harness import meta_unets, tiny_models as tm


def test_tiny_unet_is_detected_as_sd15_with_four_attn2_sites(comfy, tiny_models):
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(str(tiny_models.files["unet"]))
    assert type(patcher.model.model_config).__name__ == "SD15"
    sites = meta_unets.attn2_sites(patcher.model.diffusion_model)
    assert sites == list(tm.TINY_UNET_ATTN2_SITES)
    for name, number, index in sites:
        block = patcher.model.diffusion_model
        blocks = {"input": block.input_blocks, "output": block.output_blocks}.get(name)
        seq = block.middle_block if name == "middle" else blocks[number]
        attn2 = next(layer for layer in seq if hasattr(layer, "transformer_blocks")).transformer_blocks[index].attn2
        assert attn2.to_k.weight.shape == (tm.TINY_UNET_INNER_DIM, tm.CROSS_ATTENTION_DIM)


@pytest.mark.parametrize("name", ["SD15", "SDXL"])
def test_meta_unet_layouts_have_the_real_attn2_site_counts(comfy, name):
    unet = meta_unets.meta_unet(name)
    assert next(unet.parameters()).device.type == "meta"
    sites = meta_unets.attn2_sites(unet)
    assert len(sites) == meta_unets.EXPECTED_ATTN2_SITES[name]
    assert ("middle", 0, 0) in sites
    if name == "SDXL":
        assert sum(1 for s in sites if s[:2] == ("middle", 0)) == 10


def test_taesd_decodes_a_latent_to_a_finite_image(comfy, tiny_models):
    import comfy.sd

    sd = {f"taesd_{part}.{k}": v for part in ("encoder", "decoder")
          for k, v in load_file(tiny_models.files[f"taesd_{part}"]).items()}
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)  # what VAELoader "taesd" adds
    image = comfy.sd.VAE(sd=sd).decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert image.shape[-3:] == (64, 64, 3)
    assert torch.isfinite(image).all()
    assert image.std() > 0


def test_clip_text_encoder_encodes_to_finite_conditioning(comfy, tiny_models):
    import comfy.sd

    clip = comfy.sd.load_clip([str(tiny_models.files["clip_l"])], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)
    assert cond.shape == (1, 77, 768)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()


def test_clip_vision_loads_with_the_stock_loader_and_matches_the_ipadapters(comfy, tiny_models):
    import comfy.clip_vision

    clip_vision = comfy.clip_vision.load(str(tiny_models.files["clip_vision"]))
    assert clip_vision is not None
    out = clip_vision.encode_image(torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(0)))
    assert out.image_embeds.shape == (1, tiny_models.clip_embed_dim)
    assert out.penultimate_hidden_states.shape == (1, 257, tiny_models.clip_hidden_dim)
    assert torch.isfinite(out.penultimate_hidden_states).all() and torch.isfinite(out.image_embeds).all()

    base = load_file(tiny_models.files["ipadapter_base"])
    assert base["image_proj.proj.weight"].shape == (4 * 768, tiny_models.clip_embed_dim)
    plus = load_file(tiny_models.files["ipadapter_plus"])
    assert plus["image_proj.proj_in.weight"].shape[1] == tiny_models.clip_hidden_dim
    for adapter in (base, plus):
        ip_keys = sorted(k for k in adapter if k.startswith("ip_adapter."))
        assert ip_keys == sorted(f"ip_adapter.{2 * i + 1}.{n}.weight" for i in range(4) for n in ("to_k_ip", "to_v_ip"))
