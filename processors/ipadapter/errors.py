"""Exceptions raised for IP-Adapter files and inputs.

All derive from ValueError so that a host can show them as a plain "bad input" message at the node that
caused them, instead of a traceback deep inside the sampler.
"""


class IPAdapterError(ValueError):
    """Base class of every IP-Adapter error in this package."""


class IPAdapterFileError(IPAdapterError):
    """The file (or state dict) is not a usable IP-Adapter: unreadable, unsafe, malformed or unsupported."""


class IPAdapterMismatchError(IPAdapterError):
    """The IP-Adapter does not fit the diffusion model or the CLIP vision output it is combined with."""


class IPAdapterInputError(IPAdapterError):
    """A runtime input is unusable: empty image batch, non-finite embeddings, bad option."""
