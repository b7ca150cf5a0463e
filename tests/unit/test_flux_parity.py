"""Flux IP-Adapters: parity on identical synthetic weights (fp32, <= 1e-5 relative).

XLabs: ComfyUI's own `DoubleStreamBlock` run through our dit patch (query captured in the attention override, RoPE
undone, image attention on the engine, added to the block's image output) equals diffusers' `FluxTransformerBlock`
with `FluxIPAdapterAttnProcessor`. Key conversions (what diffusers' FluxIPAdapterMixin and flux_to_diffusers do):

    XLabs file                                                  diffusers
    ip_adapter_proj_model.proj.{weight,bias}                    image_proj (ImageProjection) image_embeds.*
    ip_adapter_proj_model.norm.*                                image_proj norm.*
    double_blocks.{i}.processor.ip_adapter_double_stream_k_proj  transformer_blocks.{i} processor to_k_ip.0.*
    double_blocks.{i}.processor.ip_adapter_double_stream_v_proj  transformer_blocks.{i} processor to_v_ip.0.*

    ComfyUI DoubleStreamBlock       diffusers FluxTransformerBlock
    img_mod.lin / txt_mod.lin       norm1.linear / norm1_context.linear (same 6-way chunk order)
    img_attn.qkv (rows q|k|v)       attn.to_q / to_k / to_v
    txt_attn.qkv                    attn.add_q_proj / add_k_proj / add_v_proj
    img_attn.norm.{query,key}_norm  attn.norm_q / norm_k (.scale -> .weight); txt: norm_added_q / norm_added_k
    img_attn.proj / txt_attn.proj   attn.to_out.0 / attn.to_add_out
    img_mlp.0 / .2, txt_mlp.0 / .2  ff.net.0.proj / ff.net.2, ff_context.net.0.proj / ff_context.net.2

InstantX: diffusers has no InstantX Flux processor; the oracle is a float64 re-implementation of the Flux double and
single blocks (BFL's maths) with InstantX's image attention inserted where its processor adds it, written here
independently of the code under test.
"""

import pytest
import torch
import torch.nn.functional as F

from harness.flux_adapters import instantx_tensors, xlabs_tensors
from harness.testing import comfy, pack, require  # noqa: F401  (fixtures)

require("diffusers.models.transformers.transformer_flux")
from diffusers.models.embeddings import ImageProjection  # noqa: E402
from diffusers.models.transformers.transformer_flux import (FluxIPAdapterAttnProcessor, FluxPosEmbed,  # noqa: E402
                                                            FluxTransformerBlock)

TOLERANCE = 1e-5
WIDTH, HEADS, HEAD_DIM, CONTEXT, EMBED = 64, 2, 32, 48, 32
AXES = [8, 12, 12]
TXT, GRID = 5, (3, 4)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def tiny(pack):
    from harness.tiny_dit import tiny_flux

    return tiny_flux(seed=5, depth=1, depth_single_blocks=1, mlp_ratio=4.0)  # diffusers fixes the MLP at 4x


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    batch = 2
    img = torch.randn(batch, GRID[0] * GRID[1], WIDTH, generator=g)
    txt = torch.randn(batch, TXT, WIDTH, generator=g)
    vec = torch.randn(batch, WIDTH, generator=g)
    ids = torch.zeros(TXT + GRID[0] * GRID[1], 3)
    ids[TXT:, 1] = torch.arange(GRID[0]).repeat_interleave(GRID[1]).float()
    ids[TXT:, 2] = torch.arange(GRID[1]).repeat(GRID[0]).float()
    embeds = torch.randn(1, EMBED, generator=g)
    return dict(img=img, txt=txt, vec=vec, ids=ids, embeds=embeds)


def comfy_pe(ids: torch.Tensor, batch: int) -> torch.Tensor:
    from comfy.ldm.flux.layers import EmbedND

    return EmbedND(dim=HEAD_DIM, theta=10000, axes_dim=AXES)(ids.unsqueeze(0).expand(batch, -1, -1))


def run_patched(tiny, kind: str, block_index: int, application, args: dict) -> dict:
    """A block of the tiny ComfyUI Flux through our DitBlockPatch, the way forward_orig calls a dit replace."""
    from xformers_ipadapter.nodes.dit_patch import DitBlock, DitBlockPatch

    diffusion = tiny.patcher.model.diffusion_model
    position = block_index if kind == "double_block" else len(diffusion.double_blocks) + block_index
    block = DitBlock(kind, block_index, position, len(application.weights))
    if kind == "double_block":
        module = diffusion.double_blocks[block_index]

        def original(a):
            img, txt = module(img=a["img"], txt=a["txt"], vec=a["vec"], pe=a["pe"], attn_mask=None,
                              transformer_options=a["transformer_options"])
            return {"img": img, "txt": txt}
    else:
        module = diffusion.single_blocks[block_index]

        def original(a):
            return {"img": module(a["img"], vec=a["vec"], pe=a["pe"], attn_mask=None,
                                  transformer_options=a["transformer_options"])}
    patch = DitBlockPatch(block, (application,))
    with torch.no_grad():
        return patch({**args, "transformer_options": {"cond_or_uncond": [0]}}, {"original_block": original})


def flux_application(model, tiny, weights, embeds):
    from xformers_ipadapter.processors.families.flux import FluxApplication, FluxGeometry, tokens_for

    diffusion = tiny.patcher.model.diffusion_model
    geometry = FluxGeometry(WIDTH, HEADS, len(diffusion.double_blocks), len(diffusion.single_blocks))
    tokens = tokens_for(model, embeds)
    return FluxApplication(model=model, cond=tokens, uncond=torch.zeros_like(tokens), geometry=geometry,
                           weights=tuple(weights))


# ------------------------------------------------------------------------------------------------------------
# XLabs vs diffusers


def diffusers_block(comfy_block) -> FluxTransformerBlock:
    block = FluxTransformerBlock(dim=WIDTH, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    sd = comfy_block.state_dict()
    out = {}
    for side, attn, prefix, norm in (("img", "to_", "", "norm_"), ("txt", "add_", "context", "norm_added_")):
        out[f"norm1{'_' + prefix if prefix else ''}.linear.weight"] = sd[f"{side}_mod.lin.weight"]
        out[f"norm1{'_' + prefix if prefix else ''}.linear.bias"] = sd[f"{side}_mod.lin.bias"]
        for name, w, b in zip("qkv", sd[f"{side}_attn.qkv.weight"].chunk(3), sd[f"{side}_attn.qkv.bias"].chunk(3)):
            target = f"attn.to_{name}" if side == "img" else f"attn.add_{name}_proj"
            out[f"{target}.weight"], out[f"{target}.bias"] = w, b
        out[f"attn.{norm}q.weight"] = sd[f"{side}_attn.norm.query_norm.scale"]
        out[f"attn.{norm}k.weight"] = sd[f"{side}_attn.norm.key_norm.scale"]
        proj = "attn.to_out.0" if side == "img" else "attn.to_add_out"
        ff = "ff" if side == "img" else "ff_context"
        for suffix in ("weight", "bias"):
            out[f"{proj}.{suffix}"] = sd[f"{side}_attn.proj.{suffix}"]
            out[f"{ff}.net.0.proj.{suffix}"] = sd[f"{side}_mlp.0.{suffix}"]
            out[f"{ff}.net.2.{suffix}"] = sd[f"{side}_mlp.2.{suffix}"]
    block.load_state_dict(out, strict=True)
    return block.eval()


@pytest.mark.parametrize("tokens", [4, 16])
def test_xlabs_double_block_equals_diffusers(tiny, inputs, tokens):
    from xformers_ipadapter.processors.families.flux import read_xlabs

    weight = 0.8
    tensors = xlabs_tensors(WIDTH, CONTEXT, EMBED, tokens, doubles=1, seed=11)
    model = read_xlabs(tensors, "xlabs")
    application = flux_application(model, tiny, [weight], inputs["embeds"])
    batch = inputs["img"].shape[0]
    args = dict(img=inputs["img"].clone(), txt=inputs["txt"].clone(), vec=inputs["vec"],
                pe=comfy_pe(inputs["ids"], batch), attn_mask=None)
    ours = run_patched(tiny, "double_block", 0, application, args)

    reference = diffusers_block(tiny.patcher.model.diffusion_model.double_blocks[0])
    processor = FluxIPAdapterAttnProcessor(hidden_size=WIDTH, cross_attention_dim=CONTEXT, num_tokens=(tokens,),
                                           scale=weight)
    processor.load_state_dict({"to_k_ip.0.weight": tensors["double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight"],
                               "to_k_ip.0.bias": tensors["double_blocks.0.processor.ip_adapter_double_stream_k_proj.bias"],
                               "to_v_ip.0.weight": tensors["double_blocks.0.processor.ip_adapter_double_stream_v_proj.weight"],
                               "to_v_ip.0.bias": tensors["double_blocks.0.processor.ip_adapter_double_stream_v_proj.bias"]})
    reference.attn.set_processor(processor)
    projection = ImageProjection(image_embed_dim=EMBED, cross_attention_dim=CONTEXT, num_image_text_embeds=tokens)
    projection.load_state_dict({k.replace("ip_adapter_proj_model.", "").replace("proj", "image_embeds"): v
                                for k, v in tensors.items() if k.startswith("ip_adapter_proj_model.")})
    with torch.no_grad():
        ip_tokens = projection(inputs["embeds"]).expand(batch, -1, -1)
        rope = FluxPosEmbed(theta=10000, axes_dim=AXES)(inputs["ids"])
        txt, img = reference(inputs["img"].clone(), inputs["txt"].clone(), inputs["vec"], rope,
                             joint_attention_kwargs={"ip_hidden_states": [ip_tokens]})
    assert relative(ours["img"], img) <= TOLERANCE
    assert relative(ours["txt"], txt) <= TOLERANCE
    # the adapter really contributed (the comparison is not between two unadapted blocks)
    unadapted = run_patched(tiny, "double_block", 0, flux_application(model, tiny, [0.0], inputs["embeds"]),
                            {**args, "img": inputs["img"].clone(), "txt": inputs["txt"].clone()})
    assert relative(unadapted["img"], img) > 1e-3


# ------------------------------------------------------------------------------------------------------------
# InstantX vs a float64 oracle of the Flux blocks


def _rms(x, scale, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def _rope(x, ids):
    """BFL's rotary embedding in float64: adjacent channel pairs rotated by position x frequency, per axis."""
    angles = []
    for axis, dim in enumerate(AXES):
        omega = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles.append(ids[:, axis, None].double() * omega)
    theta = torch.cat(angles, -1)  # [L, D/2]
    cos, sin = theta.cos(), theta.sin()
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(x.shape)


def _heads(x):
    return x.reshape(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)


def _attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5, -1)
    return (weights @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _instantx_ip(q_heads, tensors, index, tokens, scale):
    k = tokens @ tensors[f"ip_adapter.{index}.to_k_ip.weight"].double().T
    v = tokens @ tensors[f"ip_adapter.{index}.to_v_ip.weight"].double().T
    k = _heads(k.expand(q_heads.shape[0], -1, -1))
    v = _heads(v.expand(q_heads.shape[0], -1, -1))
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5)
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)
    return scale * _attention(q_heads, k, v)


def _instantx_tokens(tensors, embeds):
    p = {k[len("image_proj."):]: v.double() for k, v in tensors.items() if k.startswith("image_proj.")}
    hidden = F.gelu(embeds.double() @ p["proj.0.weight"].T + p["proj.0.bias"])
    out = (hidden @ p["proj.2.weight"].T + p["proj.2.bias"]).reshape(1, -1, CONTEXT)
    return F.layer_norm(out, (CONTEXT,), p["norm.weight"], p["norm.bias"], 1e-5)


def _layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def oracle_double(sd, img, txt, vec, ids, ip):
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda x, name: x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]  # noqa: E731
    mods = {side: lin(F.silu(vec), f"{side}_mod.lin")[:, None].chunk(6, -1) for side in ("img", "txt")}
    qkv = {}
    for side, x in (("img", img), ("txt", txt)):
        shift, scale = mods[side][0], mods[side][1]
        q, k, v = lin(_layer_norm(x) * (1 + scale) + shift, f"{side}_attn.qkv").chunk(3, -1)
        q = _rms(_heads(q), sd[f"{side}_attn.norm.query_norm.scale"])
        k = _rms(_heads(k), sd[f"{side}_attn.norm.key_norm.scale"])
        qkv[side] = (q, k, _heads(v))
    q = torch.cat([qkv["txt"][0], qkv["img"][0]], 2)
    k = torch.cat([qkv["txt"][1], qkv["img"][1]], 2)
    v = torch.cat([qkv["txt"][2], qkv["img"][2]], 2)
    attn = _attention(_rope(q, ids), _rope(k, ids), v)
    txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
    img_attn = img_attn + ip(qkv["img"][0])  # InstantX: on the image attention, before proj
    out = {}
    for side, x, a in (("img", img, img_attn), ("txt", txt, txt_attn)):
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[side]
        x = x + gate1 * lin(a, f"{side}_attn.proj")
        hidden = _layer_norm(x) * (1 + scale2) + shift2
        x = x + gate2 * lin(F.gelu(lin(hidden, f"{side}_mlp.0"), approximate="tanh"), f"{side}_mlp.2")
        out[side] = x
    return out


def oracle_single(sd, x, vec, ids, ip):
    sd = {k: v.double() for k, v in sd.items()}
    shift, scale, gate = (vec_out[:, None] for vec_out in (F.silu(vec) @ sd["modulation.lin.weight"].T +
                                                          sd["modulation.lin.bias"]).chunk(3, -1))
    hidden = (_layer_norm(x) * (1 + scale) + shift) @ sd["linear1.weight"].T + sd["linear1.bias"]
    qkv, mlp = hidden[..., :3 * WIDTH], hidden[..., 3 * WIDTH:]
    q, k, v = (_heads(t) for t in qkv.chunk(3, -1))
    q, k = _rms(q, sd["norm.query_norm.scale"]), _rms(k, sd["norm.key_norm.scale"])
    attn = _attention(_rope(q, ids), _rope(k, ids), v) + ip(q)  # InstantX: whole sequence, before linear2
    out = torch.cat([attn, F.gelu(mlp, approximate="tanh")], -1) @ sd["linear2.weight"].T + sd["linear2.bias"]
    return x + gate * out


def test_instantx_double_and_single_blocks_equal_float64_oracle(tiny, inputs):
    from xformers_ipadapter.processors.families.flux import read_instantx

    weights = (0.7, 1.3)
    tensors = instantx_tensors(WIDTH, CONTEXT, EMBED, tokens=8, blocks=2, seed=13)
    model = read_instantx(tensors, "instantx")
    application = flux_application(model, tiny, weights, inputs["embeds"])
    tokens = _instantx_tokens(tensors, inputs["embeds"])
    diffusion = tiny.patcher.model.diffusion_model
    batch = inputs["img"].shape[0]
    pe = comfy_pe(inputs["ids"], batch)
    img, txt, vec, ids = inputs["img"], inputs["txt"], inputs["vec"], inputs["ids"]

    ours = run_patched(tiny, "double_block", 0, application,
                       dict(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, attn_mask=None))
    expected = oracle_double(diffusion.double_blocks[0].state_dict(), img.double(), txt.double(), vec.double(), ids,
                             lambda q: _instantx_ip(q, tensors, 0, tokens, weights[0]))
    assert relative(ours["img"], expected["img"]) <= TOLERANCE
    assert relative(ours["txt"], expected["txt"]) <= TOLERANCE

    joint = torch.cat([txt, img], 1)
    ours_single = run_patched(tiny, "single_block", 0, application,
                              dict(img=joint.clone(), vec=vec, pe=pe, attn_mask=None))
    expected_single = oracle_single(diffusion.single_blocks[0].state_dict(), joint.double(), vec.double(), ids,
                                    lambda q: _instantx_ip(q, tensors, 1, tokens, weights[1]))
    assert relative(ours_single["img"], expected_single) <= TOLERANCE
    # without the adapter the oracle differs: the image attention is really in the comparison
    plain = oracle_single(diffusion.single_blocks[0].state_dict(), joint.double(), vec.double(), ids,
                          lambda q: 0.0)
    assert relative(ours_single["img"], plain) > 1e-3


def test_siglip_pooling_head_equals_transformers():
    transformers = require("transformers")
    from harness.flux_adapters import siglip_head_tensors
    from processors.families.siglip import HEAD_PREFIX, SiglipPoolingHead

    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                             num_hidden_layers=1, image_size=28, patch_size=14)
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    reference = SiglipMultiheadAttentionPoolingHead(config).eval()
    weights = {k[len(HEAD_PREFIX):]: v for k, v in siglip_head_tensors(32, 48, seed=3).items()}
    reference.load_state_dict(weights)
    tokens = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens)
    assert relative(SiglipPoolingHead(weights, heads=4)(tokens), expected) <= TOLERANCE
