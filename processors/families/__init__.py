"""Adapter families beyond SD1.5/SDXL attn2 (Flux, SD3.5): their adapter models and image attention, pure torch."""
