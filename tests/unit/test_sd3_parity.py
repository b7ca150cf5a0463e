"""SD3.5 InstantX IP-Adapter: parity with real diffusers on identical synthetic weights (fp32, <= 1e-5 relative).

- The resampler equals diffusers' `IPAdapterTimeImageProjection`, which diffusers builds from the same InstantX
  file with its own key conversion (loaders/transformer_sd3.py); `diffusers_resampler_keys` is that conversion.
- One joint block with the adapter equals diffusers' `JointTransformerBlock` + `SD3IPAdapterJointAttnProcessor2_0`
  (loaded by `SD3Transformer2DModel._load_ip_adapter_weights`). Ours runs the way ComfyUI's MMDiT hands it the
  tensors: text first, q/k already through the block's own RMSNorm (random weights here, so the renormalisation
  matters), the joint attention computed by the host, our image attention added on the engine.
"""

import copy

import pytest
import torch

from harness.sd3_models import HostLikeProcessor, SD3AdapterShape, instantx_sd3_state_dict, nested
from harness.testing import require

require("diffusers.loaders.transformer_sd3")  # the oracle: fails under CI when missing, never skips there
from diffusers.loaders.transformer_sd3 import SD3Transformer2DLoadersMixin  # noqa: E402
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel  # noqa: E402

from processors.backends import AttentionOpConfig  # noqa: E402
from processors.families.sd3 import JointBranch, block_image_kv, diffusers_resampler_keys, read_sd3_adapter  # noqa: E402,E501
from processors.planner import Planner  # noqa: E402

SHAPE = SD3AdapterShape(hidden=128, head_dim=64, blocks=2, encoder_width=48, tokens=8)
TOLERANCE = 1e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def state():
    return instantx_sd3_state_dict(SHAPE, seed=3)


@pytest.fixture(scope="module")
def features():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(3, 20, SHAPE.encoder_width, generator=gen), torch.tensor([999.0, 421.5, 3.0])


def their_resampler(state):
    return SD3Transformer2DLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, nested(state)["image_proj"], low_cpu_mem_usage=False).eval()


def test_resampler_equals_diffusers(state, features):
    ours = read_sd3_adapter(state, "synthetic.safetensors")
    theirs = their_resampler(state)
    x, timesteps = features
    with torch.no_grad():
        tokens, temb = ours.image_proj(x, timesteps)
        their_tokens, their_temb = theirs(x, timesteps)
    assert tokens.shape == (3, SHAPE.tokens, SHAPE.hidden)
    assert relative(temb, their_temb) <= TOLERANCE
    assert relative(tokens, their_tokens) <= TOLERANCE
    # the timestep really conditions the tokens (a resampler that ignored it would pass the check above only
    # if diffusers' did too; this guards the test's inputs)
    assert relative(tokens[0], tokens[2]) > 1e-3


def test_documented_key_conversion_is_diffusers(state):
    """Our parameter names mapped by `diffusers_resampler_keys` load diffusers' module strictly, value for value."""
    ours = read_sd3_adapter(state, "synthetic.safetensors").image_proj.state_dict()
    theirs = their_resampler(state).state_dict()
    mapped = {diffusers_resampler_keys(k): v for k, v in ours.items()}
    assert set(mapped) == set(theirs)
    assert all(torch.equal(mapped[k], theirs[k]) for k in theirs)


# ---------------------------------------------------------------------------------------------------------------
# One joint block


def tiny_transformer(state, qk_norm):
    torch.manual_seed(11)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=SHAPE.blocks,
                                  attention_head_dim=SHAPE.head_dim, num_attention_heads=SHAPE.hidden // SHAPE.head_dim,
                                  joint_attention_dim=32, caption_projection_dim=SHAPE.hidden,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, qk_norm=qk_norm).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))  # host norms that are not identities
    model._load_ip_adapter_weights(nested(state), low_cpu_mem_usage=False)
    return model


@pytest.mark.parametrize("qk_norm", ["rms_norm", None])
@pytest.mark.parametrize("op", ["auto", "sdpa:math"])
def test_joint_block_equals_diffusers(state, features, qk_norm, op):
    model = tiny_transformer(state, qk_norm)
    ours = read_sd3_adapter(state, "synthetic.safetensors")
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 16, SHAPE.hidden, generator=gen)
    context = torch.randn(3, 6, SHAPE.hidden, generator=gen)
    conditioning = torch.randn(3, SHAPE.hidden, generator=gen)
    x, timesteps = features
    scale = 0.7
    with torch.no_grad():
        ip_tokens, ip_temb = model.image_proj(x, timesteps)
        block = model.transformer_blocks[0]
        block.attn.processor.scale = scale
        their_txt, their_img = block(hidden, context, conditioning,
                                     joint_attention_kwargs={"ip_hidden_states": ip_tokens, "temb": ip_temb})

        tokens, temb = ours.image_proj(x, timesteps)
        k, v = block_image_kv(ours.ip_adapter[0], tokens, temb, SHAPE.head_dim)
        adapter = ours.ip_adapter[0]
        branch = JointBranch(k, v, adapter.norm_q.weight, adapter.norm_k.weight, scale)
        ours_block = copy.deepcopy(block)
        ours_block.attn.set_processor(HostLikeProcessor(branch, Planner(AttentionOpConfig(op=op)).attention))
        our_txt, our_img = ours_block(hidden, context, conditioning)
        # the adapter changes the block's output: the comparison is not of two unpatched blocks
        block.attn.processor.scale = 0.0
        _, plain_img = block(hidden, context, conditioning,
                             joint_attention_kwargs={"ip_hidden_states": ip_tokens, "temb": ip_temb})
    assert relative(our_img, their_img) <= TOLERANCE
    assert relative(our_txt, their_txt) <= TOLERANCE
    assert relative(plain_img, their_img) > 1e-3
