"""Cross-attention (attn2) sites of a loaded UNet, read from the model itself.

Keys are what ComfyUI's BasicTransformerBlock looks up first: (block name, block number, index within the
SpatialTransformer). The middle block is always ("middle", 0, i). IP-Adapter weights `ip_adapter.{2i+1}` follow
diffusers' processor order: input blocks, output blocks, then the middle block.
"""

from __future__ import annotations

from dataclasses import dataclass

from comfy.ldm.modules.attention import SpatialTransformer

from ..processors.ipadapter import SiteSpec


@dataclass(frozen=True)
class Attn2Site(SiteSpec):
    """A `SiteSpec` (key, heads, dim_head, context_dim: what an adapter is validated against) plus where the
    site sits in the model."""

    index: int  # adapter weight index i (file key 2i+1)
    transformer_index: int  # SpatialTransformer position in forward order (extra_options["transformer_index"])

    @property
    def block(self) -> str:
        return self.key[0]


def _transformers(diffusion_model) -> list[tuple[str, int, SpatialTransformer]]:
    """(block name, number, SpatialTransformer) in forward order: input, middle, output."""
    found = []
    if not hasattr(diffusion_model, "input_blocks"):  # a DiT (Flux, SD3): no UNet cross-attention at all
        return found
    groups = [("input", enumerate(diffusion_model.input_blocks))]
    if getattr(diffusion_model, "middle_block", None) is not None:
        groups.append(("middle", [(0, diffusion_model.middle_block)]))
    groups.append(("output", enumerate(diffusion_model.output_blocks)))
    for name, blocks in groups:
        for number, block in blocks:
            found.extend((name, number, layer) for layer in block if isinstance(layer, SpatialTransformer))
    return found


def attn2_sites(model_patcher) -> list[Attn2Site]:
    """Every attn2 site, in adapter weight order (input, output, middle)."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    found = []
    for t, (name, number, transformer) in enumerate(_transformers(diffusion_model)):
        for i, block in enumerate(transformer.transformer_blocks):
            attn2 = getattr(block, "attn2", None)
            if attn2 is not None:
                found.append((name, number, i, t, block.n_heads, block.d_head, attn2.to_k.in_features))
    order = {"input": 0, "output": 1, "middle": 2}
    found.sort(key=lambda s: (order[s[0]], s[1], s[2]))
    return [Attn2Site(key=(name, number, i), heads=heads, dim_head=dim, context_dim=ctx, index=index,
                      transformer_index=t)
            for index, (name, number, i, t, heads, dim, ctx) in enumerate(found)]


def transformer_count(model_patcher) -> int:
    return len(_transformers(model_patcher.get_model_object("diffusion_model")))
