"""Where an Apply node sends an adapter of another family (FaceID, Flux, SD3.5).

The SD1.5/SDXL attn2 path (apply.py) handles `IPAdapterModel`; a family's loader returns its own adapter class
(processors/ipadapter/families.py), and registers here what Apply and Apply Embeds do with it: install that
family's patches, or raise a node error saying which node to use. One entry per family and node, keyed by
the adapter class; handlers take the node's inputs as keyword arguments and return the patched model.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..processors.ipadapter.faceid_adapter import FaceIDAdapterModel
from .faceid import refuse_faceid_adapter

FamilyHandler = Callable[..., Any]

# ApplyXformersIPAdapterAttention: adapter class -> handler(**the node's inputs) -> MODEL
APPLY_HANDLERS: dict[type, FamilyHandler] = {}
# ApplyXformersIPAdapterEmbeds: adapter class -> handler(**the node's inputs) -> MODEL
EMBEDS_HANDLERS: dict[type, FamilyHandler] = {}
# XformersIPAdapterEncoder: adapter class -> handler(**the node's inputs) -> (pos_embeds, neg_embeds)
ENCODER_HANDLERS: dict[type, FamilyHandler] = {}

# FaceID adapters need faces: the plain nodes say which node to use (nodes/faceid.py).
APPLY_HANDLERS[FaceIDAdapterModel] = EMBEDS_HANDLERS[FaceIDAdapterModel] = refuse_faceid_adapter


def family_handler(handlers: dict[type, FamilyHandler], ipadapter: Any) -> Optional[FamilyHandler]:
    """The handler registered for `ipadapter`'s family, or None for the SD1.5/SDXL path."""
    for adapter_class, handler in handlers.items():
        if isinstance(ipadapter, adapter_class):
            return handler
    return None


from .flux import FLUX_APPLY, FLUX_EMBEDS  # noqa: E402  (the handlers import this module's neighbours)

APPLY_HANDLERS.update(FLUX_APPLY)
EMBEDS_HANDLERS.update(FLUX_EMBEDS)

from .sd3 import SD3_APPLY, SD3_EMBEDS, SD3_ENCODER  # noqa: E402

APPLY_HANDLERS.update(SD3_APPLY)
EMBEDS_HANDLERS.update(SD3_EMBEDS)
ENCODER_HANDLERS.update(SD3_ENCODER)
