"""IP-Adapter files: projection models, safe loading, shape-based detection, validation, image tokens
and the per-site image K/V cache. Pure torch; never imports a host application."""
from .detection import AdapterInfo, base_model_name, clip_encoder_name, detect_adapter
from .errors import IPAdapterError, IPAdapterFileError, IPAdapterInputError, IPAdapterMismatchError
from .kv_cache import EMBEDS_SCALING, AdapterKVCache, SiteKVEntry, scale_kv
from .projection import ImageProjModel, MLPProjModel, PerceiverAttention, Resampler, projection_config
from .tokens import (COMBINE_EMBEDS, COMBINE_METHODS, ImageTokens, combine_embeddings, encode_embeddings,
                     encode_positive, image_tokens, project, tokens_from_embeddings)
from .validation import (SiteSpec, check_finite, check_image_batch, validate_against_sites,
                         validate_clip_output)
from .weights import IPAdapterModel, ipadapter_from_state_dict, load_ipadapter_file, normalize_layout

__all__ = [
    "AdapterInfo", "AdapterKVCache", "COMBINE_EMBEDS", "COMBINE_METHODS", "encode_embeddings", "encode_positive",
    "tokens_from_embeddings", "EMBEDS_SCALING", "IPAdapterError", "IPAdapterFileError",
    "IPAdapterInputError", "IPAdapterMismatchError", "IPAdapterModel", "ImageProjModel", "ImageTokens",
    "MLPProjModel", "PerceiverAttention", "Resampler", "SiteKVEntry", "SiteSpec", "base_model_name",
    "check_finite", "check_image_batch", "clip_encoder_name", "combine_embeddings", "detect_adapter",
    "image_tokens", "ipadapter_from_state_dict", "load_ipadapter_file", "normalize_layout", "project",
    "projection_config", "scale_kv", "validate_against_sites", "validate_clip_output",
]
