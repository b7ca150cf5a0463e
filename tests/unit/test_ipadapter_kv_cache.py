"""Per-site image K/V: computed once per (site, device, dtype), scaled as the standard pack does."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from processors.ipadapter import (EMBEDS_SCALING, AdapterKVCache, ImageTokens, IPAdapterInputError,
                                  ipadapter_from_state_dict)
from tests.unit.ipadapter_fixtures import TINY_CROSS, TINY_INNER, tiny_adapter

WEIGHTS = (0.7, 0.0, -1.3)


class CountLinear(TorchFunctionMode):
    """Counts every F.linear call, whoever makes it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _setup(images: int = 2, tokens: int = 4):
    model = ipadapter_from_state_dict(tiny_adapter("base", seed=3))
    gen = torch.Generator().manual_seed(5)
    toks = ImageTokens(cond=torch.randn(1, images * tokens, TINY_CROSS, generator=gen),
                       uncond=torch.randn(1, images * tokens, TINY_CROSS, generator=gen), tokens_per_image=tokens)
    return model, toks


def test_one_projection_per_site_per_device_and_dtype():
    model, toks = _setup()
    cache = AdapterKVCache(model, toks, WEIGHTS, "K+V")
    with CountLinear() as counter:
        for _step in range(20):
            for _cfg_row in range(2):
                for site in range(len(WEIGHTS)):
                    cache.get(site, "cpu", torch.float32)
    # one computation per site: K and V for the cond and the uncond tokens
    assert counter.count == len(WEIGHTS) * 4
    with CountLinear() as counter:
        for _ in range(5):
            entry = cache.get(0, torch.device("cpu"), torch.float16)
    assert counter.count == 4 and entry.k_cond.dtype == torch.float16
    assert cache.get(0, "cpu", torch.float16) is entry and len(cache.store) == len(WEIGHTS) + 1


def _reference(model, toks, site, w, scaling):
    x_c, x_u = toks.cond.double(), toks.uncond.double()
    wk, wv = model.to_k_ip[site].weight.double(), model.to_v_ip[site].weight.double()
    out = []
    for x in (x_c, x_u):
        k, v = x @ wk.T, x @ wv.T
        c = TINY_INNER[site]
        if scaling == "V only":
            out.append((k, v, w))
            continue
        we = w if scaling == "K+V" else w * c / 1280
        if scaling == "K+mean(V) w/ C penalty":
            per_image = [v[:, :4], v[:, 4:]]
            v = torch.cat([(p - p.mean(1, keepdim=True)) + p.mean(1, keepdim=True) * we for p in per_image], 1)
            out.append((k * we, v, 1.0))
        else:
            out.append((k * we, v * we, 1.0))
    return out


@pytest.mark.parametrize("scaling", EMBEDS_SCALING)
def test_embeds_scaling_matches_reference(scaling):
    model, toks = _setup()
    cache = AdapterKVCache(model, toks, WEIGHTS, scaling)
    for site, w in enumerate(WEIGHTS):
        entry = cache.get(site, "cpu", torch.float32)
        (kc, vc, s), (ku, vu, _) = _reference(model, toks, site, w, scaling)
        for got, want in ((entry.k_cond, kc), (entry.v_cond, vc), (entry.k_uncond, ku), (entry.v_uncond, vu)):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert entry.out_scale == pytest.approx(s)


def test_c_penalty_uses_the_site_k_width():
    model, toks = _setup()
    plain = AdapterKVCache(model, toks, WEIGHTS, "K+V")
    penalty = AdapterKVCache(model, toks, WEIGHTS, "K+V w/ C penalty")
    for site in (0, 2):  # site 1 has weight 0, so its ratio is undefined
        ratio = penalty.get(site, "cpu", torch.float32).k_cond / plain.get(site, "cpu", torch.float32).k_cond
        torch.testing.assert_close(ratio, torch.full_like(ratio, TINY_INNER[site] / 1280))


def test_cache_does_not_mutate_model_or_tokens():
    model, toks = _setup()
    before_params = {k: v.clone() for k, v in model.image_proj.state_dict().items()}
    before_ip = [m.weight.clone() for m in model.to_k_ip + model.to_v_ip]
    cond, uncond = toks.cond.clone(), toks.uncond.clone()
    for scaling in EMBEDS_SCALING:
        cache = AdapterKVCache(model, toks, (2.0, 3.0, 4.0), scaling)
        for site in range(3):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                cache.get(site, "cpu", dtype)
    assert torch.equal(toks.cond, cond) and torch.equal(toks.uncond, uncond)
    assert all(torch.equal(a, b.weight) for a, b in zip(before_ip, model.to_k_ip + model.to_v_ip))
    assert all(torch.equal(v, model.image_proj.state_dict()[k]) for k, v in before_params.items())


def test_results_in_requested_dtype_close_to_fp32():
    model, toks = _setup()
    cache = AdapterKVCache(model, toks, WEIGHTS, "V only")
    ref = cache.get(2, "cpu", torch.float32)
    half = cache.get(2, "cpu", torch.bfloat16)
    assert half.v_uncond.dtype == torch.bfloat16 and half.v_uncond.device.type == "cpu"
    torch.testing.assert_close(half.v_uncond.float(), ref.v_uncond, atol=2e-2, rtol=2e-2)


def test_deepcopy_shares():
    model, toks = _setup()
    cache = AdapterKVCache(model, toks, WEIGHTS)
    assert copy.deepcopy({"c": cache})["c"] is cache


def test_release_frees_everything_and_recomputes_equal_values():
    model, toks = _setup()
    cache = AdapterKVCache(model, toks, WEIGHTS, "K+V")
    before = cache.get(1, "cpu", torch.float32)
    kept = before.k_cond.clone()
    cache.release()
    assert len(cache.store) == 0 and cache.store.tensors() == []
    with CountLinear() as counter:
        again = cache.get(1, "cpu", torch.float32)
    assert again is not before and counter.count == 4
    assert torch.equal(again.k_cond, kept)


def test_keep_device_drops_other_devices_only():
    model, toks = _setup()
    cache = AdapterKVCache(model, toks, WEIGHTS)
    cpu_entry = cache.get(0, "cpu", torch.float32)
    cache.keep_device(torch.device("cpu"))  # the model stays here: nothing to rebuild
    assert cache.get(0, "cpu", torch.float32) is cpu_entry
    cache.keep_device(torch.device("meta"))  # the model moved elsewhere: CPU copies go
    assert len(cache.store) == 0


def test_bounded_to_two_device_dtype_pairs_per_site():
    model, toks = _setup()
    cache = AdapterKVCache(model, toks, WEIGHTS)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for site in range(len(WEIGHTS)):
            cache.get(site, "cpu", dtype)
    assert len(cache.store) == 2 * len(WEIGHTS)
    held = {(t.dtype, t.shape) for t in cache.store.tensors()}
    assert {dtype for dtype, _ in held} == {torch.bfloat16, torch.float64}  # the least recently used went


@pytest.mark.parametrize("weights,scaling,message", [
    ((1.0, 1.0), "V only", "2 site weights for 3 sites"),
    ((1.0, float("nan"), 1.0), "V only", "finite"),
    (WEIGHTS, "K only", "embeds_scaling"),
])
def test_bad_arguments(weights, scaling, message):
    model, toks = _setup()
    with pytest.raises(IPAdapterInputError, match=message):
        AdapterKVCache(model, toks, weights, scaling)
