"""Per-frame image K/V (Apply Batch with unfold_batch): values against plain float64 maths, row gathering by
frame index, memory (N frames cost N image token sets, whatever the number of steps) and no host reads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from processors.ipadapter import EMBEDS_SCALING, ImageTokens, IPAdapterInputError, ipadapter_from_state_dict
from processors.ipadapter.frames import FrameKVCache, check_frame_weights, gather_rows
from tests.unit.ipadapter_fixtures import TINY_CROSS, TINY_INNER, tiny_adapter

T = 4  # tokens per image of the tiny base adapter
SITE_FACTORS = (1.0, 0.5, 0.0)


class Calls(TorchFunctionMode):
    """Records every torch function and tensor method called."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def setup(images: int, weights, scaling="V only"):
    model = ipadapter_from_state_dict(tiny_adapter("base", seed=4))
    gen = torch.Generator().manual_seed(11)
    tokens = ImageTokens(cond=torch.randn(1, images * T, TINY_CROSS, generator=gen),
                         uncond=torch.randn(1, images * T, TINY_CROSS, generator=gen), tokens_per_image=T)
    return model, tokens, FrameKVCache(model, tokens, SITE_FACTORS, weights, scaling)


def reference_frame(model, tokens, site, frame, weights, scaling):
    """(k_cond, v_cond, k_uncond, v_uncond, output scale) of one frame at one site, in float64, from scratch:
    frame j uses image min(j, last) and weight min(j, last)."""
    images = tokens.cond.shape[1] // T
    image = min(frame, images - 1)
    w = weights[min(frame, len(weights) - 1)] * SITE_FACTORS[site]
    wk, wv = model.to_k_ip[site].weight.double(), model.to_v_ip[site].weight.double()
    out = []
    for x in (tokens.cond, tokens.uncond):
        x = x[0, image * T:(image + 1) * T].double()
        k, v = x @ wk.T, x @ wv.T
        if scaling == "V only":
            out += [k, v]
            continue
        we = w if scaling == "K+V" else w * TINY_INNER[site] / 1280
        if scaling == "K+mean(V) w/ C penalty":
            mean = v.mean(0, keepdim=True)
            out += [k * we, v - mean + mean * we]
        else:
            out += [k * we, v * we]
    return (*out, w if scaling == "V only" else 1.0)


@pytest.mark.parametrize("scaling", EMBEDS_SCALING)
@pytest.mark.parametrize("images,weights", [(3, (1.0, -0.5, 2.0, 0.25, 0.75)), (4, (0.6,)), (1, (0.0, 1.5))])
def test_gathered_rows_equal_each_frames_own_maths(scaling, images, weights):
    model, tokens, cache = setup(images, weights, scaling)
    frames = (4, 0, 2, 6, 1)  # out of order, and past the last image and weight
    negative = (False, True)  # cond_or_uncond = [0, 1]: positive chunk, then negative chunk
    for site in (0, 1):
        k, v, scale = cache.frame_rows(site, torch.device("cpu"), torch.float32, negative, frames)
        assert k.shape == (len(negative) * len(frames), T, TINY_INNER[site]) and scale.shape == (k.shape[0],)
        for chunk, is_negative in enumerate(negative):
            for position, frame in enumerate(frames):
                row = chunk * len(frames) + position
                kc, vc, ku, vu, s = reference_frame(model, tokens, site, frame, weights, scaling)
                want_k, want_v = (ku, vu) if is_negative else (kc, vc)
                torch.testing.assert_close(k[row].double(), want_k, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v[row].double(), want_v, atol=1e-5, rtol=1e-5)
                assert float(scale[row]) == pytest.approx(s, abs=1e-6)


def test_precise_modes_give_the_image_to_negative_rows_only():
    model, tokens, cache = setup(2, (1.0, 0.5))
    k, _, scale = cache.frame_rows(0, torch.device("cpu"), torch.float32, (False, True), (0, 1), swap=True)
    kc = reference_frame(model, tokens, 0, 1, (1.0, 0.5), "V only")[0]
    torch.testing.assert_close(k[3].double(), kc, atol=1e-5, rtol=1e-5)  # negative row of frame 1: cond image
    assert scale.tolist() == [0.0, 0.0, 1.0, 0.5]
    assert cache.frame_rows(0, torch.device("cpu"), torch.float32, (False,), (0, 1), swap=True) is None


def stored_bytes(cache: FrameKVCache) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.store.tensors()}
    return sum(storages.values())


class CountLinear(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is F.linear
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frames", [4, 16])
def test_n_frames_cost_n_token_sets_per_site_whatever_the_steps(frames):
    weights = tuple(i / frames for i in range(frames))
    _, _, cache = setup(frames, weights)
    with CountLinear() as counter:
        for _step in range(6):
            for window in ((0, 1, 2, 3), (2, 3, 0, 1)):
                for site in range(len(SITE_FACTORS)):
                    cache.frame_rows(site, torch.device("cpu"), torch.float32, (False, True), window)
    assert counter.count == len(SITE_FACTORS) * 4  # K and V of cond and uncond, once per site
    # per site: 4 tensors of frames x T x inner float32, and one float32 scale per frame
    expected = sum(4 * frames * T * inner * 4 + frames * 4 for inner in TINY_INNER)
    assert stored_bytes(cache) == expected and len(cache.store) == len(SITE_FACTORS)


def test_gathering_reads_no_tensor_value_back():
    _, _, cache = setup(4, (1.0, 0.5, 0.25, 0.0))
    entry = cache.get(0, torch.device("cpu"), torch.float32)
    index = torch.tensor([3, 1, 2, 0])
    with Calls() as calls:
        gather_rows(entry, index, (False, True))
    host_reads = {"item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "numpy", "__index__"}
    assert calls.names and not host_reads & set(calls.names)


def test_all_zero_frames_add_nothing_and_bad_weights_are_named():
    _, _, cache = setup(2, (0.0, 0.0))
    assert cache.site_weights == (0.0, 0.0, 0.0) and cache.frame_count == 2
    for bad, match in (([], "empty"), ([1.0, float("nan")], "finite"), ([1.0, "x"], "finite"), ([True], "finite")):
        with pytest.raises(IPAdapterInputError, match=match):
            check_frame_weights(bad)


def test_frame_indices_reach_the_device_once_per_window_and_go_with_the_run():
    _, _, cache = setup(4, (1.0, 0.5))
    cpu = torch.device("cpu")
    for _step in range(3):
        for site in range(len(SITE_FACTORS)):
            for window in ((0, 1, 2), (1, 2, 3)):
                cache.frame_rows(site, cpu, torch.float32, (False, True), window)
    assert len(cache.indices) == 2  # one index tensor per window, shared by every site and step
    first = cache.indices.get((cpu, (0, 1, 2)), lambda: None)
    assert first.tolist() == [0, 1, 2] and first.dtype == torch.long
    cache.release()
    assert len(cache.indices) == 0 and len(cache.store) == 0
