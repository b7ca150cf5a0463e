"""Loading IP-Adapter files: layouts, strict keys, refusal of code-carrying pickles, projection maths."""
from __future__ import annotations

import pickle
import pickletools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from processors.ipadapter import (IPAdapterFileError, MLPProjModel, Resampler, ipadapter_from_state_dict,
                                  load_ipadapter_file)
from processors.ipadapter.weights import build_projection
from tests.unit.ipadapter_fixtures import (SD15_INNER, TINY_CLIP, TINY_INNER, build, image_proj_shapes,
                                           ip_layer_shapes, resampler_shapes, tiny_adapter, zeros)


def _nested(kind: str, seed: int = 0) -> dict:
    return tiny_adapter(kind, seed=seed)


def _assert_loaded_exactly(model, nested: dict) -> None:
    got = model.image_proj.state_dict()
    assert set(got) == set(nested["image_proj"])
    for key, value in nested["image_proj"].items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], value.float()), key
    for i in range(len(model.to_k_ip)):
        assert torch.equal(model.to_k_ip[i].weight, nested["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"])
        assert torch.equal(model.to_v_ip[i].weight, nested["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"])
        assert model.to_k_ip[i].bias is None
    params = list(model.image_proj.parameters()) + [m.weight for m in model.to_k_ip + model.to_v_ip]
    assert not any(p.requires_grad for p in params)
    assert not model.image_proj.training


@pytest.mark.parametrize("kind,projection", [("base", "ImageProjModel"), ("plus", "Resampler"),
                                             ("full", "MLPProjModel")])
def test_safetensors_flat_file_loads_exactly(tmp_path, kind, projection):
    path = tmp_path / f"adapter_{kind}.safetensors"
    save_file(tiny_adapter(kind, layout="flat"), str(path))
    model = load_ipadapter_file(path)
    assert type(model.image_proj).__name__ == projection
    assert model.name == path.name and model.info.site_inner_dims == TINY_INNER
    _assert_loaded_exactly(model, _nested(kind))


@pytest.mark.parametrize("layout", ["nested", "adapter_modules"])
def test_bin_file_loads_with_weights_only(tmp_path, layout):
    path = tmp_path / "adapter.bin"
    sd = tiny_adapter("plus", layout=layout)
    if layout == "adapter_modules":  # the training-checkpoint naming, nested
        sd = {"image_proj": _nested("plus")["image_proj"], "adapter_modules": _nested("plus")["ip_adapter"]}
    torch.save({k: v for k, v in sd.items()}, path)
    _assert_loaded_exactly(load_ipadapter_file(path), _nested("plus"))


def test_fp16_file_gives_fp32_projection(tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in tiny_adapter("base", layout="flat").items()}, str(path))
    model = load_ipadapter_file(path)
    assert all(p.dtype == torch.float32 for p in model.image_proj.parameters())
    assert model.to_k_ip[0].weight.dtype == torch.float16


class _Payload:
    """Pickles to a call of open(marker, "w"): creates the file only if unpickling runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _assert_refused(path: Path, marker: Path) -> None:
    with pytest.raises(IPAdapterFileError) as err:
        load_ipadapter_file(path)
    text = str(err.value)
    assert path.name in text and "only weight tensors are accepted" in text
    assert not marker.exists(), "the pickle payload ran"


def _references_open(data: bytes) -> bool:
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    return any("open" in str(arg) for name, arg in ops if name in ("GLOBAL", "SHORT_BINUNICODE", "BINUNICODE"))


def test_torch_archive_with_code_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.bin"
    torch.save({"ip_adapter": _Payload(marker), "image_proj": {}}, path)
    _assert_refused(path, marker)


def test_plain_pickle_with_code_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.bin"
    data = pickle.dumps({"ip_adapter": _Payload(marker)}, protocol=2)
    assert _references_open(data)  # the payload is live: it does reference a callable
    path.write_bytes(data)
    _assert_refused(path, marker)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(IPAdapterFileError, match="not found"):
        load_ipadapter_file(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(IPAdapterFileError, match="bad.safetensors"):
        load_ipadapter_file(bad)
    tensor_only = tmp_path / "tensor.bin"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(IPAdapterFileError, match="not a dict of tensors"):
        load_ipadapter_file(tensor_only)


def test_strict_keys_list_missing_and_unexpected():
    sd = _nested("plus")
    sd["image_proj"].pop("layers.1.0.to_q.weight")
    sd["image_proj"]["layers.1.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(IPAdapterFileError) as err:
        ipadapter_from_state_dict(sd, name="my_adapter.bin")
    text = str(err.value)
    assert "my_adapter.bin" in text
    assert "missing keys: layers.1.0.to_q.weight" in text and "unexpected keys: layers.1.0.extra.weight" in text


@pytest.mark.parametrize("sd,message", [
    ({"image_proj": {"proj.weight": torch.zeros(4, 4)}}, "no 'ip_adapter' weights"),
    ({"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": {}}, "no 'ip_adapter' weights"),
    ({"ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)}, "no 'image_proj' weights"),
    ({"image_proj": {"proj.weight": [1, 2]}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)}}, "not a tensor"),
])
def test_incomplete_state_dicts(sd, message):
    with pytest.raises(IPAdapterFileError, match=message):
        ipadapter_from_state_dict(sd)


@pytest.mark.parametrize("part,key", [("image_proj", "proj.weight"), ("ip_adapter", "3.to_v_ip.weight")])
def test_non_finite_weights_are_refused(part, key):
    sd = _nested("base")
    sd[part][key] = sd[part][key].clone()
    sd[part][key].view(-1)[5] = float("nan")
    with pytest.raises(IPAdapterFileError, match="NaN or infinite"):
        ipadapter_from_state_dict(sd)


@pytest.mark.parametrize("proj", [
    resampler_shapes(dim=768, depth=4, heads=12, queries=16, clip_width=1280, out=768),
    resampler_shapes(dim=1280, depth=4, heads=20, queries=16, clip_width=1280, out=2048),
], ids=["sd15-plus", "sdxl-plus-vit-h"])
def test_real_size_resamplers_load_strictly(proj):
    module = build_projection({k: zeros(s) for k, s in proj.items()})
    assert isinstance(module, Resampler) and len(module.layers) == 4
    assert module.layers[0][0].heads == proj["layers.0.0.to_q.weight"][0] // 64


def test_real_size_sd15_adapter_builds():
    model = ipadapter_from_state_dict(build(image_proj_shapes(1024, 768), ip_layer_shapes(768, SD15_INNER), zeros))
    assert [m.out_features for m in model.to_k_ip] == list(SD15_INNER)


# --- projection maths against float64 formulas written from the paper, not from our modules ---

def _ln(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"].double(), sd[prefix + "bias"].double(), 1e-5)


def _lin(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    bias = sd.get(prefix + "bias")
    return x @ sd[prefix + "weight"].double().T + (0 if bias is None else bias.double())


def _ref_resampler(x: torch.Tensor, sd: dict, heads: int) -> torch.Tensor:
    lat = sd["latents"].double().expand(x.shape[0], -1, -1)
    x = _lin(x, sd, "proj_in.")
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for n in range(depth):
        a = f"layers.{n}.0."
        xn, ln = _ln(x, sd, a + "norm1."), _ln(lat, sd, a + "norm2.")
        q = _lin(ln, sd, a + "to_q.")
        k, v = _lin(torch.cat([xn, ln], 1), sd, a + "to_kv.").chunk(2, -1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        lat = _lin(att.transpose(1, 2).reshape(lat.shape[0], lat.shape[1], -1), sd, a + "to_out.") + lat
        f = f"layers.{n}.1."
        lat = _lin(F.gelu(_lin(_ln(lat, sd, f + "0."), sd, f + "1.")), sd, f + "3.") + lat
    return _ln(_lin(lat, sd, "proj_out."), sd, "norm_out.")


def test_projection_models_match_reference_maths():
    x_emb = torch.randn(3, TINY_CLIP, dtype=torch.float64)
    x_hid = torch.randn(2, 9, TINY_CLIP, dtype=torch.float64)
    sd = _nested("base")["image_proj"]
    got = ipadapter_from_state_dict(_nested("base")).image_proj(x_emb.float())
    want = _ln(_lin(x_emb, sd, "proj.").reshape(3, 4, -1), sd, "norm.")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)

    sd = _nested("full")["image_proj"]
    model = ipadapter_from_state_dict(_nested("full"))
    assert isinstance(model.image_proj, MLPProjModel)
    want = _ln(_lin(F.gelu(_lin(x_hid, sd, "proj.0.")), sd, "proj.2."), sd, "proj.3.")
    torch.testing.assert_close(model.image_proj(x_hid.float()).double(), want, atol=1e-5, rtol=1e-5)

    sd = _nested("plus")["image_proj"]
    model = ipadapter_from_state_dict(_nested("plus"))
    torch.testing.assert_close(model.image_proj(x_hid.float()).double(), _ref_resampler(x_hid, sd, heads=2),
                               atol=1e-5, rtol=1e-5)
