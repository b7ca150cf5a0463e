"""ApplyXformersIPAdapterAttention and friends on a real ComfyUI, with the tiny SD1.5 UNet sampling for real."""

import copy

import pytest
import torch

from harness import host_helpers as hh
from harness import tiny_models as tm
from harness.oracle import reference_attention

DEFAULTS = dict(weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
                embeds_scaling="V only")


@pytest.fixture(scope="module")
def nodes(pack):
    return {name: hh.pack_module(f"nodes.{module}") for name, module in
            [("apply", "apply"), ("select", "select_op"), ("patch_model", "patch_model"), ("patch", "patch")]}


def apply(nodes, model, adapter, clip_vision, image=None, **overrides):
    args = {**DEFAULTS, **overrides}
    image = hh.image(0) if image is None else image
    node = nodes["apply"].ApplyXformersIPAdapterAttention
    return node.execute(model, adapter, clip_vision, image, **args).result[0]


def select(nodes, **config):
    node = nodes["select"].SelectXformersAttentionOp
    args = {**dict(op="auto", mask_mode="multiply output", fused=False, on_unsupported="fall back"), **config}
    return node.execute(**args).result[0]


def sdpa_model(nodes, model):
    """The unpatched model with every attention on the same kernel our patch uses (for exact comparisons)."""
    return nodes["patch_model"].PatchXformersModelAttention.execute(model, select(nodes, op="sdpa")).result[0]


def attn2_patches(model):
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


# --- effect on sampling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["base", "plus"])
def test_weight_one_changes_the_latent_and_weight_zero_does_not(nodes, unet, clip_vision, adapters, kind):
    reference = sdpa_model(nodes, unet)
    unpatched = hh.sample(reference)
    zero = hh.sample(apply(nodes, reference, adapters[kind], clip_vision, weight=0.0))
    assert torch.equal(zero, unpatched)
    one = hh.sample(apply(nodes, reference, adapters[kind], clip_vision))
    assert (one - unpatched).abs().max() > 1e-2 * unpatched.abs().max()
    # against ComfyUI's own CPU attention the unpatched model differs only by rounding: measured with torch
    # 2.10, a max difference of 1.4e-3 on a latent whose largest value is 408 (3.5e-6 of it)
    zero_auto, plain = hh.sample(apply(nodes, unet, adapters[kind], clip_vision, weight=0.0)), hh.sample(unet)
    assert (zero_auto - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_window_that_excludes_every_step_and_all_zero_mask_equal_unpatched(nodes, unet, clip_vision, adapters):
    reference = sdpa_model(nodes, unet)
    unpatched = hh.sample(reference)
    late = apply(nodes, reference, adapters["base"], clip_vision, start_at=1.0, end_at=1.0)
    assert torch.equal(hh.sample(late), unpatched)
    masked = apply(nodes, reference, adapters["base"], clip_vision, attn_mask=torch.zeros(1, 37, 53))
    assert torch.equal(hh.sample(masked), unpatched)
    half = apply(nodes, reference, adapters["base"], clip_vision, start_at=0.0, end_at=0.5)
    full = apply(nodes, reference, adapters["base"], clip_vision)
    assert not torch.equal(hh.sample(half), unpatched) and not torch.equal(hh.sample(half), hh.sample(full))


def test_same_graph_twice_gives_identical_latents(nodes, unet, clip_vision, adapters):
    patched = apply(nodes, unet, adapters["plus"], clip_vision, attn_mask=torch.rand(1, 64, 64,
                    generator=torch.Generator().manual_seed(0)))
    again = apply(nodes, unet, adapters["plus"], clip_vision, attn_mask=torch.rand(1, 64, 64,
                  generator=torch.Generator().manual_seed(0)))
    assert torch.equal(hh.sample(patched), hh.sample(patched))  # cached K/V reused across runs
    assert torch.equal(hh.sample(patched), hh.sample(again))


# --- immutability and composition ------------------------------------------------------------------------

def test_chaining_builds_new_patches_and_leaves_upstream_untouched(nodes, unet, clip_vision, adapters):
    before = copy.copy(unet.model_options["transformer_options"])
    first = apply(nodes, unet, adapters["base"], clip_vision)
    first_patches = dict(attn2_patches(first))
    first_apps = {key: patch.applications for key, patch in first_patches.items()}
    second = apply(nodes, first, adapters["plus"], clip_vision, weight=0.5)
    assert unet.model_options["transformer_options"] == before and "patches_replace" not in before
    assert attn2_patches(first) == first_patches  # same objects ...
    assert {k: p.applications for k, p in attn2_patches(first).items()} == first_apps  # ... not mutated
    for key, patch in attn2_patches(second).items():
        assert patch is not first_patches[key] and len(patch.applications) == 2
        assert patch.applications[0] is first_apps[key][0]
    chained = hh.sample(second)
    assert not torch.equal(chained, hh.sample(first))


def test_patch_objects_survive_clone_deepcopy_and_to(nodes, unet, clip_vision, adapters):
    patched = apply(nodes, unet, adapters["base"], clip_vision)
    clone = patched.clone()
    for key, patch in attn2_patches(clone).items():
        assert patch is attn2_patches(patched)[key]  # deep copy shares the immutable patch and its weights
        assert patch.to(torch.float16) is patch and patch.to(torch.device("cpu")) is patch
    assert copy.deepcopy(patched.model_options)["transformer_options"]["patches_replace"]["attn2"] == attn2_patches(patched)


def test_a_foreign_replace_callable_is_wrapped_not_clobbered(nodes, unet, clip_vision, adapters):
    reference = sdpa_model(nodes, unet)
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(extra_options["block"])
        from comfy.ldm.modules.attention import attention_pytorch
        return attention_pytorch(q, k, v, extra_options["n_heads"]) * 0.5

    foreign_model = reference.clone()
    foreign_model.set_model_attn2_replace(foreign, "input", 1, 0)
    foreign_model.set_model_attn2_replace(foreign, "output", 0)  # a 2-tuple key, as some packs use
    alone = hh.sample(foreign_model)
    calls.clear()
    wrapped = apply(nodes, foreign_model, adapters["base"], clip_vision, weight=0.0)
    assert attn2_patches(wrapped)[("input", 1, 0)].wrapped is foreign
    assert attn2_patches(wrapped)[("output", 0, 0)].wrapped is foreign
    assert torch.equal(hh.sample(wrapped), alone)
    assert {b for b in calls} == {("input", 1), ("output", 0)}
    assert not torch.equal(hh.sample(apply(nodes, foreign_model, adapters["base"], clip_vision)), alone)


# --- sites and the replace contract ----------------------------------------------------------------------

def test_every_enumerated_site_is_called_during_a_real_forward(nodes, unet, clip_vision, adapters):
    patched = apply(nodes, unet, adapters["base"], clip_vision)
    seen = set()
    for key, patch in attn2_patches(patched).items():
        original = patch.__call__

        def spy(q, k, v, extra_options, key=key, call=patch):
            seen.add((key, tuple(extra_options["block"]), extra_options["block_index"]))
            return call(q, k, v, extra_options)

        patched.set_model_attn2_replace(spy, *key)
        del original
    hh.sample(patched, steps=1)
    assert {s[0] for s in seen} == set(tm.TINY_UNET_ATTN2_SITES)
    assert all(s[0] == (*s[1], s[2]) for s in seen)


@pytest.mark.parametrize("chunks", [[0], [1, 0], [1, 0, 0]])
def test_any_cond_or_uncond_layout(nodes, unet, clip_vision, adapters, chunks):
    from xformers_ipadapter.processors.ip_attention import IPBranch

    patched = apply(nodes, unet, adapters["base"], clip_vision, image_negative=hh.image(5))
    patch = attn2_patches(patched)[("input", 1, 0)]
    application = patch.applications[0]
    per_chunk, heads, q_len = 2, 8, 64
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(per_chunk * len(chunks), q_len, 320, generator=gen)
    k = torch.randn(q.shape[0], 77, 320, generator=gen)
    extra = {"n_heads": heads, "cond_or_uncond": chunks, "block": ("input", 1), "block_index": 0,
             "activations_shape": [q.shape[0], 320, 8, 8], "original_shape": [q.shape[0], 4, 8, 8]}
    out = patch(q, k, k, extra)
    entry = application.kv.get(0, q.device, q.dtype)
    rows_k = torch.cat([(entry.k_uncond if c == 1 else entry.k_cond).expand(per_chunk, -1, -1) for c in chunks])
    rows_v = torch.cat([(entry.v_uncond if c == 1 else entry.v_cond).expand(per_chunk, -1, -1) for c in chunks])
    expected = reference_attention(q, k, k, heads, [IPBranch(rows_k, rows_v, entry.out_scale)])
    assert out.shape == q.shape
    assert (out - expected).abs().max() < 1e-4


def test_mask_of_any_aspect_is_resized_per_block(nodes, unet, clip_vision, adapters):
    import torch.nn.functional as F
    from xformers_ipadapter.processors.ip_attention import IPBranch

    mask = torch.rand(1, 37, 91, generator=torch.Generator().manual_seed(4))
    patched = apply(nodes, unet, adapters["base"], clip_vision, attn_mask=mask)
    patch = attn2_patches(patched)[("output", 1, 0)]
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6 * 10, 320, generator=gen)  # a 6 x 10 token grid: a wide latent
    k = torch.randn(2, 77, 320, generator=gen)
    extra = {"n_heads": 8, "cond_or_uncond": [1, 0], "block": ("output", 1), "block_index": 0,
             "activations_shape": [2, 320, 6, 10], "original_shape": [2, 4, 6, 10]}
    out = patch(q, k, k, extra)
    entry = patch.applications[0].kv.get(patch.site.index, q.device, q.dtype)
    weights = F.interpolate(mask[:, None], size=(6, 10), mode="bilinear", align_corners=False).flatten(1)
    rows = [torch.cat([entry.k_uncond, entry.k_cond]), torch.cat([entry.v_uncond, entry.v_cond])]
    expected = reference_attention(q, k, k, 8, [IPBranch(*rows, entry.out_scale, weights)])
    assert (out - expected).abs().max() < 1e-4


def test_weight_types_reach_the_middle_block(nodes, unet, clip_vision, adapters):
    linear = apply(nodes, unet, adapters["base"], clip_vision, weight=0.8)
    weak_middle = apply(nodes, unet, adapters["base"], clip_vision, weight=0.8, weight_type="weak middle")
    middle = attn2_patches(linear)[("middle", 0, 0)].site.index
    assert attn2_patches(linear)[("middle", 0, 0)].applications[0].kv.site_weights[middle] == pytest.approx(0.8)
    weights = attn2_patches(weak_middle)[("middle", 0, 0)].applications[0].kv.site_weights
    assert weights[middle] == pytest.approx(0.16)
    assert [w for i, w in enumerate(weights) if i != middle] == [pytest.approx(0.8)] * 3


# --- negatives ---------------------------------------------------------------------------------------------

def test_negative_defaults_and_image_negative(nodes, unet, clip_vision, adapters):
    def tokens(model):
        return attn2_patches(model)[("input", 1, 0)].applications[0].kv.tokens

    ipadapter = hh.pack_module("processors.ipadapter")
    base = tokens(apply(nodes, unet, adapters["base"], clip_vision))
    zeros = ipadapter.project(adapters["base"], torch.zeros(1, hh.TINY_CLIP_VISION["projection_dim"]))
    torch.testing.assert_close(base.uncond, zeros.reshape(1, -1, zeros.shape[-1]))
    plus = tokens(apply(nodes, unet, adapters["plus"], clip_vision))
    black = clip_vision.encode_image(torch.zeros(1, 224, 224, 3)).penultimate_hidden_states
    expected = ipadapter.project(adapters["plus"], black.float())
    torch.testing.assert_close(plus.uncond, expected.reshape(1, -1, expected.shape[-1]))
    given = tokens(apply(nodes, unet, adapters["plus"], clip_vision, image_negative=hh.image(9)))
    encoded = ipadapter.project(adapters["plus"], clip_vision.encode_image(hh.image(9)).penultimate_hidden_states.float())
    torch.testing.assert_close(given.uncond, encoded.reshape(1, -1, encoded.shape[-1]))
    assert not torch.allclose(given.uncond, plus.uncond)


# --- operators ---------------------------------------------------------------------------------------------

def test_the_selected_operator_is_the_one_that_runs(nodes, unet, clip_vision, adapters):
    planner = hh.pack_module("processors.planner")
    planner.begin_run()
    hh.sample(apply(nodes, unet, adapters["base"], clip_vision, attention_op=select(nodes, op="sdpa:math")), steps=1)
    assert planner.run_reports() and all(r.startswith("attention op 'sdpa:math': ran sdpa:math")
                                         for r in planner.run_reports())
    hh.sample(apply(nodes, unet, adapters["base"], clip_vision, attention_op=select(nodes, op="xformers:cutlass")),
              steps=1)  # the sampler's pre-run callback starts a new run
    reports = planner.run_reports()
    assert reports and all("'xformers:cutlass': ran sdpa because xformers:cutlass: device=cpu" in r for r in reports)


def test_unsupported_operator_with_error_fails_at_the_node(nodes, unet, clip_vision, adapters):
    with pytest.raises(RuntimeError, match=r"'xformers:flash' cannot run on this machine \(cpu\)"):
        select(nodes, op="xformers:flash", on_unsupported="error")
    config = hh.pack_module("processors.backends").AttentionOpConfig(op="xformers:flash", on_unsupported="error")
    with pytest.raises(RuntimeError, match=r"xformers:flash.*device=cpu"):
        apply(nodes, unet, adapters["base"], clip_vision, attention_op=config)


def test_patch_model_attention_routes_every_attn1_and_attn2_call(nodes, unet, monkeypatch):
    planner = hh.pack_module("processors.planner")
    calls = []
    real = planner.Planner.attention
    monkeypatch.setattr(planner.Planner, "attention",
                        lambda self, q, *a, **kw: calls.append(tuple(q.shape)) or real(self, q, *a, **kw))
    routed = nodes["patch_model"].PatchXformersModelAttention.execute(unet, select(nodes, op="sdpa:math")).result[0]
    evaluations = []
    routed.set_model_unet_function_wrapper(lambda apply_model, args: evaluations.append(1) or
                                           apply_model(args["input"], args["timestep"], **args["c"]))
    hh.sample(routed, steps=2)
    blocks = len(tm.TINY_UNET_ATTN2_SITES)
    assert len(calls) == 2 * blocks * len(evaluations) and evaluations  # one attn1 + one attn2 per block


# --- bad input ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors_at_the_node(nodes, unet, clip_vision, adapters):
    with pytest.raises(ValueError, match="weight must be a finite number"):
        apply(nodes, unet, adapters["base"], clip_vision, weight=float("nan"))
    with pytest.raises(ValueError, match="image batch is empty"):
        apply(nodes, unet, adapters["base"], clip_vision, image=torch.zeros(0, 224, 224, 3))
    with pytest.raises(ValueError, match="zero area"):
        apply(nodes, unet, adapters["base"], clip_vision, attn_mask=torch.zeros(1, 0, 64))
    with pytest.raises(ValueError, match="start_at and end_at"):
        apply(nodes, unet, adapters["base"], clip_vision, start_at=0.8, end_at=0.2)
    sdxl = hh.adapter("base", sites=70, inner=640, cross=2048)
    with pytest.raises(ValueError, match=r"this IP-Adapter is for SDXL \(cross-attention 2048, 70 sites\); "
                                         r"the model is SD1.5 \(768, 4 sites\)"):
        apply(nodes, unet, sdxl, clip_vision)
    wrong_clip = hh.pack_module("processors.ipadapter").ipadapter_from_state_dict(
        {k: t.float() for k, t in tm.fill(tm.ipadapter_base_layout(1280), seed=3).items()})
    with pytest.raises(ValueError, match=r"expects 1280-d CLIP vision embeddings.*has 96"):
        apply(nodes, unet, wrong_clip, clip_vision)


def test_window_is_decided_once_per_step_not_per_call(nodes, unet, clip_vision, adapters):
    """The sigma gate reads the step's sigma to the host once per sigmas tensor (one per step), not per call."""
    windowed = apply(nodes, unet, adapters["base"], clip_vision, start_at=0.2, end_at=0.8)
    application = attn2_patches(windowed)[("input", 1, 0)].applications[0]
    reads = []

    class Sigmas:  # stands in for the step's sigmas tensor: counts host reads
        def __init__(self, value):
            self.value = value

        def reshape(self, *shape):
            return self

        def __getitem__(self, index):
            return self

        def __float__(self):
            reads.append(self.value)
            return self.value

    start, end = application.sigma_window
    inside, outside = Sigmas((start + end) / 2), Sigmas(start * 2)
    assert all(application.active_at({"sigmas": inside}) for _ in range(16))
    assert not any(application.active_at({"sigmas": outside}) for _ in range(16))
    assert reads == [inside.value, outside.value]
    full = attn2_patches(apply(nodes, unet, adapters["base"], clip_vision))[("input", 1, 0)].applications[0]
    assert full.active_at({"sigmas": Sigmas(1.0)}) and len(reads) == 2  # full window: never read
