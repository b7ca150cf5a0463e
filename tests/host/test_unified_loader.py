"""XformersIPAdapterUnifiedLoader on a real ComfyUI: model folders from extra_model_paths.yaml, each preset's pick
among decoys for the tiny SD1.5 UNet, ties broken by name, chaining, the nothing-fits error, nothing written, and
ComfyUI's own CLIP vision loader on the pick."""

import copy
import shutil

import pytest

from harness import host_helpers as hh
from harness import tiny_models as tm
from tests.unit.model_files import adapter_shapes, clip_hf_shapes, folder_snapshot, write_safetensors

TINY_SITES = (tm.TINY_UNET_INNER_DIM,) * len(tm.TINY_UNET_ATTN2_SITES)
PLUS, PLUS_FACE = "PLUS (high strength)", "PLUS FACE (portraits)"


@pytest.fixture(scope="module")
def loader(pack):
    return hh.pack_module("nodes.unified_loader")


@pytest.fixture
def model_folders(pack, tmp_path, monkeypatch):
    """Empty `ipadapter` and `clip_vision` folder lists, then two roots added by an extra_model_paths.yaml."""
    import folder_paths
    from utils.extra_config import load_extra_path_config

    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for name in ("ipadapter", "clip_vision"):
        folder_paths.folder_names_and_paths[name] = ([], set(folder_paths.supported_pt_extensions))
    roots = [tmp_path / "root_a", tmp_path / "root_b"]
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text("".join(f"r{i}:\n    base_path: {root}\n    ipadapter: ipadapter\n    clip_vision: clip_vision\n"
                            for i, root in enumerate(roots)))
    for root in roots:
        (root / "ipadapter").mkdir(parents=True)
        (root / "clip_vision").mkdir(parents=True)
    load_extra_path_config(str(yaml))
    yield roots
    folder_paths.filename_list_cache.clear()


@pytest.fixture
def clip_loads(loader, monkeypatch):
    """Stand-in for comfy.clip_vision.load (a full-size ViT-H is GBs): records the paths, returns a marker."""
    loaded = []

    def load(path):
        loaded.append(path)
        return {"clip_vision": path}

    monkeypatch.setattr(loader, "_load_clip_vision", load)
    return loaded


def decoys(roots):
    """Tiny-UNet-sized adapters of every kind (light/standard and plus/plus-face twins by name) spread over both
    roots, decoys that do not fit (full-size SD1.5 and SDXL, a broken file), ViT-H and ViT-bigG encoders."""
    a, b = roots[0] / "ipadapter", roots[1] / "ipadapter"
    files = {a / "my_light_model.safetensors": "base", b / "standard.safetensors": "base",
             a / "g.safetensors": "vit-g", b / "plus-thing.safetensors": "plus", a / "x_face.safetensors": "plus",
             b / "ff.safetensors": "full-face"}
    for path, kind in files.items():
        write_safetensors(path, adapter_shapes(kind, inner=TINY_SITES))
    write_safetensors(a / "ip-adapter-plus-face_sd15.safetensors", adapter_shapes("plus"))  # 16 sites
    write_safetensors(b / "ip-adapter-plus-face_sdxl_vit-h.safetensors", adapter_shapes("plus", "SDXL"))
    (a / "broken.safetensors").write_bytes(b"\x01\x02")
    write_safetensors(roots[1] / "clip_vision" / "encoder_one.safetensors", clip_hf_shapes("ViT-H"))
    write_safetensors(roots[0] / "clip_vision" / "big.safetensors", clip_hf_shapes("ViT-bigG"))


EXPECTED = {  # preset -> (adapter, CLIP vision)
    "LIGHT - SD1.5 only (low strength)": ("my_light_model.safetensors", "encoder_one.safetensors"),
    "STANDARD (medium strength)": ("standard.safetensors", "encoder_one.safetensors"),
    "VIT-G (medium strength)": ("g.safetensors", "big.safetensors"),
    PLUS: ("plus-thing.safetensors", "encoder_one.safetensors"),
    PLUS_FACE: ("x_face.safetensors", "encoder_one.safetensors"),
    "FULL FACE - SD1.5 only (portraits stronger)": ("ff.safetensors", "encoder_one.safetensors"),
}


def run(loader, model, preset, ipadapter=None):
    return loader.XformersIPAdapterUnifiedLoader.execute(model, preset, ipadapter).result


def test_each_preset_loads_its_files_found_in_extra_model_paths(loader, unet, model_folders, clip_loads):
    decoys(model_folders)
    before = folder_snapshot(model_folders[0].parent)
    for preset, (adapter_name, clip_name) in EXPECTED.items():
        model, adapter, clip_vision = run(loader, unet, preset)
        assert model is unet
        assert adapter.name == adapter_name, preset
        assert clip_vision == {"clip_vision": clip_loads[-1]} and clip_loads[-1].endswith(clip_name), preset
    assert folder_snapshot(model_folders[0].parent) == before  # nothing written in the model folders


def test_chained_loaders_reuse_what_upstream_loaded(loader, unet, model_folders, clip_loads, monkeypatch):
    decoys(model_folders)
    adapter_loads = []
    real = loader.load_ipadapter_file
    monkeypatch.setattr(loader, "load_ipadapter_file", lambda p: adapter_loads.append(p) or real(p))
    _, plus, clip = run(loader, unet, PLUS)
    _, face, face_clip = run(loader, unet, PLUS_FACE, plus)
    assert face is not plus and face.name == "x_face.safetensors"
    assert face_clip is clip and len(clip_loads) == 1  # the same CLIP vision file: reused, not reloaded
    _, again, again_clip = run(loader, unet, PLUS, face)
    assert again.name == "plus-thing.safetensors" and again_clip is clip
    _, same, _ = run(loader, unet, PLUS, plus)  # the same file as upstream: its very object
    assert same is plus and len(adapter_loads) == 3
    with pytest.raises(TypeError, match="ipadapter must come from"):
        run(loader, unet, PLUS, {"ipadapter": "standard pack pipeline"})


def test_nothing_fits_names_every_file_and_the_download(loader, unet, model_folders, clip_loads):
    with pytest.raises(ValueError) as empty:
        run(loader, unet, PLUS_FACE)
    assert "ip-adapter-plus-face_sd15.safetensors" in str(empty.value)
    assert str(empty.value).count("(no files)") == 2
    decoys(model_folders)
    for path in model_folders[0].glob("ipadapter/x_face*"):
        path.unlink()
    for path in model_folders[1].glob("ipadapter/plus-thing*"):
        path.unlink()
    with pytest.raises(ValueError) as err:
        run(loader, unet, PLUS_FACE)
    text = str(err.value)
    assert "for this SD1.5 model" in text and "Download into models/ipadapter: ip-adapter-plus-face_sd15" in text
    assert "- ip-adapter-plus-face_sd15.safetensors: SD1.5 IP-Adapter (plus" in text  # found, but 16 sites
    assert "- ip-adapter-plus-face_sdxl_vit-h.safetensors: SDXL IP-Adapter (plus" in text
    assert "- broken.safetensors: not usable: 2 bytes: too short" in text
    assert "- big.safetensors: CLIP vision ViT-bigG" in text and not clip_loads


def test_wrong_preset_value_is_refused_at_validation_and_at_run_time(loader, unet):
    node = loader.XformersIPAdapterUnifiedLoader
    assert "preset: 'PLUS'" in node.validate_inputs(preset="PLUS")
    with pytest.raises(ValueError, match="preset"):
        run(loader, unet, "PLUS")


def test_stock_clip_vision_loader_loads_the_pick(loader, unet, model_folders, tiny_models):
    """The real loaders: the tiny base adapter (sized for ViT-L) and the random ViT-L through ComfyUI's own
    clip_vision.load (the example workflow's e2e test samples with them)."""
    import comfy.clip_vision

    shutil.copy(tiny_models.files["ipadapter_base"], model_folders[0] / "ipadapter" / "anything.safetensors")
    shutil.copy(tiny_models.files["ipadapter_plus"], model_folders[0] / "ipadapter" / "other.safetensors")
    (model_folders[1] / "clip_vision" / "vision.safetensors").symlink_to(tiny_models.files["clip_vision"])
    model, adapter, clip_vision = run(loader, unet, "STANDARD (medium strength)")
    assert adapter.name == "anything.safetensors" and adapter.info.clip_encoder == "ViT-L"
    assert isinstance(clip_vision, comfy.clip_vision.ClipVisionModel)
    assert clip_vision.model.visual_projection.weight.shape == (768, 1024)


def test_schema_is_the_contract_with_tooltips_and_registered(loader):
    import asyncio

    node = loader.XformersIPAdapterUnifiedLoader
    schema = node.define_schema()
    assert schema.node_id == "XformersIPAdapterUnifiedLoader"
    assert schema.display_name == "IP-Adapter Unified Loader (xformers)"
    assert [(i.id, i.optional) for i in schema.inputs] == [("model", False), ("preset", False), ("ipadapter", True)]
    assert [o.display_name for o in schema.outputs] == ["model", "ipadapter", "clip_vision"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs) and schema.description
    extension = hh.pack_module("nodes.extension").XformersIPAdapterExtension()
    assert node in asyncio.run(extension.get_node_list())
