"""Apply Batch and IP-Adapter Weights on a real ComfyUI: frame i of an unfolded batch is what a single-image
Apply of image i gives to latent i (same noise per latent), also when ComfyUI's own Context Windows node
samples the frames in overlapping windows; bad input fails at the node with a message naming the input."""

import logging

import pytest
import torch

from harness import host_helpers as hh

FRAMES = 4
DEFAULTS = dict(weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat", embeds_scaling="V only")
STEPS = 2


@pytest.fixture(scope="module")
def nodes(pack):
    return {"apply": hh.pack_module("nodes.apply").ApplyXformersIPAdapterAttention,
            "batch": hh.pack_module("nodes.batch").ApplyXformersIPAdapterBatch,
            "weights": hh.pack_module("nodes.frame_weights").XformersIPAdapterWeights}


@pytest.fixture(scope="module")
def images():
    return torch.cat([hh.image(20 + i) for i in range(FRAMES)])


def apply_batch(nodes, model, adapter, clip_vision, image, weight=1.0, unfold_batch=True, encode_batch_size=0,
                **overrides):
    args = {**DEFAULTS, **overrides}
    return nodes["batch"].execute(model, adapter, clip_vision, image, weight=weight, unfold_batch=unfold_batch,
                                  encode_batch_size=encode_batch_size, **args).result[0]


def apply(nodes, model, adapter, clip_vision, image, weight, combine_embeds="concat"):
    args = {**DEFAULTS, "combine_embeds": combine_embeds}
    return nodes["apply"].execute(model, adapter, clip_vision, image, weight=weight, **args).result[0]


def sample(model, steps=STEPS):
    return hh.sample(model, steps=steps, batch=FRAMES)  # latent i always gets the same noise slice


def assert_frame_close(got, want):
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_frame_i_equals_a_single_image_apply_of_image_i(nodes, unet, clip_vision, adapters, images):
    # K+V folds each frame's weight into its keys and values (V only, the per-row output scale, runs below)
    scaling, weights = "K+V", [1.0, 0.0, 0.5, 1.5]
    batch = sample(apply_batch(nodes, unet, adapters["plus"], clip_vision, images, weight=weights,
                               embeds_scaling=scaling))
    singles = [sample(nodes["apply"].execute(unet, adapters["plus"], clip_vision, images[i:i + 1],
                                             **{**DEFAULTS, "weight": weights[i], "embeds_scaling": scaling}
                                             ).result[0]) for i in range(FRAMES)]
    for i in range(FRAMES):
        assert_frame_close(batch[i], singles[i][i])
    # the frames really differ by image: frame 2 is not what image 3 gives it
    assert (batch[2] - singles[3][2]).abs().max() > 1e-2 * batch[2].abs().max()
    # weight 0 on frame 1: the unpatched model's frame 1
    assert_frame_close(batch[1], sample(unet)[1])


# ComfyUI 0.3.75's context_windows.py indexes with a list (its own deprecation warning under torch 2.10; not ours)
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing:UserWarning")
def test_context_windows_use_the_frame_indices_not_batch_positions(nodes, unet, clip_vision, adapters, images,
                                                                   caplog):
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    weights = [1.0, 0.25, 0.5, 2.0]
    patched = apply_batch(nodes, unet, adapters["base"], clip_vision, images, weight=weights)
    # ComfyUI 0.3.75 finds the step of a batch (dim 0) window by comparing the sigmas with the per-latent
    # timesteps elementwise (IndexListContextHandler.set_step), which only broadcasts when the batch is steps + 1
    steps = FRAMES - 1
    whole = sample(patched, steps)
    # windows [0, 1, 2] and [1, 2, 3]: frame 3 sits at position 2 of the second window, frames 1-2 in both
    windowed_model = ContextWindowsManualNode.execute(
        patched, context_length=3, context_overlap=2, context_schedule="standard_static", context_stride=1,
        closed_loop=False, fuse_method="pyramid", dim=0).result[0]
    with caplog.at_level(logging.INFO):
        windowed = sample(windowed_model, steps)
    assert "Using context windows 3 for 4 frames" in caplog.text
    assert "without frame indices" not in caplog.text
    for i in range(FRAMES):
        assert_frame_close(windowed[i], whole[i])
    # the same windows on a model whose frames followed batch positions would give frame 3 image 2
    shifted = sample(apply_batch(nodes, unet, adapters["base"], clip_vision, images[[0, 1, 2, 2]],
                                 weight=weights[:3] + [weights[2]]), steps)
    assert (windowed[3] - shifted[3]).abs().max() > 1e-2 * windowed[3].abs().max()


def test_fewer_latents_than_frames_without_indices_is_logged_once(nodes, unet, clip_vision, adapters, images,
                                                                  caplog):
    patched = apply_batch(nodes, unet, adapters["base"], clip_vision, images)
    with caplog.at_level(logging.WARNING):
        hh.sample(patched, steps=STEPS, batch=2)
    notices = [r for r in caplog.records if "without frame indices" in r.getMessage()]
    assert len(notices) == 1 and "2 latents" in notices[0].getMessage() and "4 frames" in notices[0].getMessage()


def last_application(model):
    patches = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    return next(iter(patches.values())).applications[-1]


def test_without_unfold_it_is_apply_with_the_first_weight(nodes, unet, clip_vision, adapters, images):
    batch = last_application(apply_batch(nodes, unet, adapters["base"], clip_vision, images[:2], weight=[0.7, 0.1],
                                         unfold_batch=False, combine_embeds="average"))
    plain = last_application(apply(nodes, unet, adapters["base"], clip_vision, images[:2], 0.7, "average"))
    assert not hasattr(batch.kv, "frame_count") and batch.kv.site_weights == plain.kv.site_weights
    assert torch.equal(batch.kv.tokens.cond, plain.kv.tokens.cond) and batch.kv.tokens.cond.shape[1] == 4  # 1 image


class CountingClipVision:
    """The tiny CLIP vision, recording the batch size of every encode."""

    def __init__(self, inner) -> None:
        self.inner, self.batches = inner, []

    def encode_image(self, pixels, crop=True):
        self.batches.append(pixels.shape[0])
        return self.inner.encode_image(pixels, crop=crop)


def test_encode_batch_size_encodes_in_chunks_with_the_same_result(nodes, unet, clip_vision, adapters, images):
    counting = CountingClipVision(clip_vision)
    chunked = last_application(apply_batch(nodes, unet, adapters["plus"], counting, images, encode_batch_size=3))
    assert counting.batches[0:2] == [3, 1]
    whole = last_application(apply_batch(nodes, unet, adapters["plus"], clip_vision, images))
    assert chunked.kv.frame_count == whole.kv.frame_count == FRAMES
    torch.testing.assert_close(chunked.kv.tokens.cond, whole.kv.tokens.cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.kv.tokens.uncond, whole.kv.tokens.uncond, atol=1e-5, rtol=1e-5)


def test_weights_node_feeds_apply_batch(nodes, unet, clip_vision, adapters, images):
    weights, inverted, total, image_1, image_2 = nodes["weights"].execute(
        weights="1.0, 0.0", timing="linear", frames=2, start_frame=0, end_frame=9999, add_starting_frames=0,
        add_ending_frames=0, method="shift batches", image=images[:2]).result
    assert weights == [1.0, 0.0] and inverted == [0.0, 1.0] and total == 2
    assert torch.equal(image_1, images[:1].repeat(2, 1, 1, 1)) and torch.equal(image_2, images[1:2].repeat(2, 1, 1, 1))
    model = apply_batch(nodes, unet, adapters["base"], clip_vision, image_1, weight=weights)
    model = apply_batch(nodes, model, adapters["base"], clip_vision, image_2, weight=inverted)
    latent = hh.sample(model, steps=STEPS, batch=total)
    assert torch.isfinite(latent).all()


@pytest.mark.parametrize("weight,unfold,encode_batch_size,match", [
    ([1.0] * 5, True, 0, "weight has 5 per-frame values but image has 4 frames"),
    ([], True, 0, "empty"),
    ([1.0, "x"], True, 0, "finite number"),
    ("1.0", True, 0, "weight must be a number or a list"),
    (float("inf"), True, 0, "finite"),
    (1.0, "yes", 0, "unfold_batch"),
    (1.0, True, -1, "encode_batch_size"),
])
def test_bad_apply_batch_input_is_a_node_error(nodes, unet, clip_vision, adapters, images, weight, unfold,
                                               encode_batch_size, match):
    with pytest.raises(Exception, match=match):
        apply_batch(nodes, unet, adapters["base"], clip_vision, images, weight=weight, unfold_batch=unfold,
                    encode_batch_size=encode_batch_size)


@pytest.mark.parametrize("overrides,match", [
    (dict(start_frame=8, end_frame=4, frames=10), "start_frame"),
    (dict(start_frame=12, frames=10), "start_frame"),
    (dict(timing="custom", weights="1, 0.5, 0", frames=2), "weights lists 3 values but frames is 2"),
    (dict(weights="1, zero"), "'zero' is not a number"),
    (dict(weights=0.5), "weights must be a string"),
    (dict(method="shift batches", image=torch.rand(1, 8, 8, 3)), "at least 2"),
])
def test_bad_weights_input_is_a_node_error(nodes, overrides, match):
    args = dict(weights="1.0, 0.0", timing="linear", frames=4, start_frame=0, end_frame=9999,
                add_starting_frames=0, add_ending_frames=0, method="full batch")
    with pytest.raises(Exception, match=match):
        nodes["weights"].execute(**{**args, **overrides})


class Window:
    def __init__(self, index_list):
        self.index_list = index_list


def test_frame_indices_come_from_the_host_window_else_positions(pack, caplog):
    frame_indices = hh.pack_module("nodes.patch").frame_indices
    notices: set = set()
    with caplog.at_level(logging.WARNING):
        assert frame_indices({"context_window": Window([5, 6, 7])}, 3, 8, notices) == (5, 6, 7)
        assert frame_indices({"ad_params": {"sub_idxs": [2, 3]}}, 2, 8, notices) == (2, 3)
        assert not caplog.records
        # announced indices that do not fit the batch: positions, and the log says so once
        for _ in range(3):
            assert frame_indices({"context_window": Window([5, 6, 7])}, 2, 8, notices) == (0, 1)
        # nothing announced, fewer latents than frames: positions, said once
        for _ in range(3):
            assert frame_indices({}, 4, 8, notices) == (0, 1, 2, 3)
        assert frame_indices({}, 8, 8, notices) == tuple(range(8))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "announced 3 frame indices for a batch of 2" in messages[0]
    assert "passed 4 latents without frame indices while the adapter has 8 frames" in messages[1]


def test_rows_and_a_mask_per_frame_follow_the_window(nodes, unet, clip_vision, adapters, images):
    """One attention call of a window holding frames 3 and 1, cond then uncond rows: K/V rows, weights and
    the mask batch all come from frames 3 and 1, not from batch positions 0 and 1."""
    masks = torch.stack([torch.full((16, 16), (i + 1) / 10) for i in range(FRAMES)])
    weights = [1.0, 0.5, 0.25, 2.0]
    application = last_application(apply_batch(nodes, unet, adapters["base"], clip_vision, images, weight=weights,
                                               attn_mask=masks))
    site = hh.pack_module("nodes.sites").attn2_sites(unet)[0]
    q = torch.zeros(4, 64, site.heads * site.dim_head)
    options = {"cond_or_uncond": [0, 1], "original_shape": [4, 4, 8, 8], "activations_shape": [4, 320, 8, 8],
               "context_window": Window([3, 1])}
    branch = application.branch(site, q, options)
    frames = application.kv.get(site.index, torch.device("cpu"), torch.float32)
    expected_k = torch.cat([frames.k_cond[[3, 1]], frames.k_uncond[[3, 1]]])
    assert torch.equal(branch.k, expected_k)
    assert branch.scale.tolist() == [2.0, 0.5, 2.0, 0.5]  # linear weight type: site factor 1
    torch.testing.assert_close(branch.mask[:, 0], torch.tensor([0.4, 0.2, 0.4, 0.2]))
    # the same call again is served from the caches: the very same tensors
    again = application.branch(site, q, {**options, "context_window": Window([3, 1])})
    assert again.k is branch.k and again.mask is branch.mask


def test_an_adapter_of_another_family_is_named(nodes, unet, clip_vision, images):
    from xformers_ipadapter.nodes.families import APPLY_HANDLERS

    other_family = next(iter(APPLY_HANDLERS))
    with pytest.raises(Exception, match=f"takes SD1.5 and SDXL IP-Adapters; this one is a {other_family.__name__}"):
        apply_batch(nodes, unet, object.__new__(other_family), clip_vision, images)
