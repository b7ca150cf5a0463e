"""Identification of model files from their headers: every adapter kind and CLIP vision size, header-only
reads, the (path, size, mtime) cache, unreadable files, and the presets' choice among identified files."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from processors.ipadapter.identify import (ADAPTER, CLIP_VISION, FileIdentifier, read_safetensors_shapes)
from processors.ipadapter.presets import PRESET_NAMES, NothingFits, choose, preset_named
from processors.ipadapter.validation import SiteSpec
from tests.unit.ipadapter_fixtures import SD15_INNER, SDXL_INNER, build, image_proj_shapes, ip_layer_shapes, zeros
from tests.unit.model_files import (adapter_shapes, clip_hf_shapes, clip_openclip_shapes, folder_snapshot,
                                    write_safetensors)

# kind, family -> (variant, projection, CLIP output, width, encoder, sites): the released files' facts
ADAPTER_CASES = {
    ("base", "SD1.5"): ("base", "ImageProjModel", "image_embeds", 1024, "ViT-H", 16),
    ("vit-g", "SD1.5"): ("base", "ImageProjModel", "image_embeds", 1280, "ViT-bigG", 16),
    ("plus", "SD1.5"): ("plus", "Resampler", "penultimate_hidden_states", 1280, "ViT-H", 16),
    ("full-face", "SD1.5"): ("full-face", "MLPProjModel", "penultimate_hidden_states", 1280, "ViT-H", 16),
    ("base", "SDXL"): ("base", "ImageProjModel", "image_embeds", 1024, "ViT-H", 70),
    ("vit-g", "SDXL"): ("base", "ImageProjModel", "image_embeds", 1280, "ViT-bigG", 70),
    ("plus", "SDXL"): ("plus", "Resampler", "penultimate_hidden_states", 1280, "ViT-H", 70),
}


def identify(path, role=ADAPTER):
    return FileIdentifier().identify(path, role)


@pytest.mark.parametrize("kind,family", list(ADAPTER_CASES), ids=[f"{k}-{f}" for k, f in ADAPTER_CASES])
def test_every_adapter_kind_is_identified_from_its_header(tmp_path, kind, family):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, adapter_shapes(kind, family))
    found = identify(path)
    assert found.problem == "" and found.info is not None
    info = found.info
    variant, projection, output, width, encoder, sites = ADAPTER_CASES[kind, family]
    assert (info.variant, info.projection, info.clip_output, info.clip_width) == (variant, projection, output, width)
    assert (info.clip_encoder, info.base_model, info.num_sites) == (encoder, family, sites)
    assert info.site_inner_dims == (SD15_INNER if family == "SD1.5" else SDXL_INNER)


def test_our_writer_makes_files_the_safetensors_library_reads(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "x.safetensors"
    write_safetensors(path, adapter_shapes("plus"))
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(adapter_shapes("plus"))
        assert tuple(f.get_slice("image_proj.latents").get_shape()) == (1, 16, 768)


def test_bin_adapters_are_identified_through_weights_only_torch_load(tmp_path):
    path = tmp_path / "ip-adapter_sd15_light_v11.bin"
    torch.save(build(image_proj_shapes(1024, 768), ip_layer_shapes(768, SD15_INNER), zeros, "nested"), path)
    info = identify(path).info
    assert (info.variant, info.clip_encoder, info.base_model) == ("base", "ViT-H", "SD1.5")


class Payload:
    """Pickled by reference: a plain unpickler would import and call this module's code."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_a_bin_with_code_references_is_refused_not_run(tmp_path):
    zipped, legacy = tmp_path / "evil.bin", tmp_path / "evil_legacy.bin"
    torch.save({"image_proj.proj.weight": Payload()}, zipped)  # torch's zip format: the unpickler is asked
    with open(legacy, "wb") as f:
        pickle.dump({"image_proj.proj.weight": Payload()}, f)
    for path in (zipped, legacy):
        found = identify(path)
        assert found.info is None and "only tensor files" in found.problem, found.problem
    assert "UnpicklingError: Weights only load failed" in identify(zipped).problem  # refused by the unpickler


# --- CLIP vision --------------------------------------------------------------------------------------------

# size -> (image_embeds width, hidden width, layers)
CLIP_CASES = {"ViT-L": (768, 1024, 24), "ViT-H": (1024, 1280, 32), "ViT-bigG": (1280, 1664, 48)}


@pytest.mark.parametrize("layout", ["hf", "openclip"])
@pytest.mark.parametrize("size", list(CLIP_CASES))
def test_every_clip_vision_size_in_both_loadable_layouts(tmp_path, size, layout):
    path = tmp_path / "encoder.safetensors"
    write_safetensors(path, clip_hf_shapes(size) if layout == "hf" else clip_openclip_shapes(size))
    info = identify(path, CLIP_VISION).info
    embeds, hidden, layers = CLIP_CASES[size]
    assert (info.name, info.embeds_width, info.hidden_width, info.layers, info.image_size) == (
        size, embeds, hidden, layers, 224)
    assert info.layout == ("HF" if layout == "hf" else "OpenCLIP")
    assert info.output_width("image_embeds") == embeds and info.output_width("penultimate_hidden_states") == hidden


def test_clip_vision_fits_the_adapters_fed_by_it(tmp_path):
    infos = {}
    for size in CLIP_CASES:
        write_safetensors(tmp_path / f"{size}.safetensors", clip_hf_shapes(size))
        infos[size] = identify(tmp_path / f"{size}.safetensors", CLIP_VISION).info
    for kind in ("base", "vit-g", "plus", "full-face"):
        write_safetensors(tmp_path / f"{kind}.safetensors", adapter_shapes(kind))
        adapter = identify(tmp_path / f"{kind}.safetensors").info
        fitting = [s for s, info in infos.items() if info.fits(adapter)]
        # ViT-H's hidden states are 1280 wide like bigG's image_embeds: the output kind keeps them apart
        assert fitting == (["ViT-bigG"] if kind == "vit-g" else ["ViT-H"]), kind


def test_vit_l_336_and_encoders_comfyui_cannot_load(tmp_path):
    write_safetensors(tmp_path / "l336.safetensors", clip_hf_shapes("ViT-L", image=336))
    assert identify(tmp_path / "l336.safetensors", CLIP_VISION).info.name == "ViT-L-336"
    odd = {k: v for k, v in clip_hf_shapes("ViT-L").items() if ".layers.23." not in k and ".layers.22." not in k}
    write_safetensors(tmp_path / "odd.safetensors", odd)
    found = identify(tmp_path / "odd.safetensors", CLIP_VISION)
    assert found.info is None and "22 layers" in found.problem
    write_safetensors(tmp_path / "adapter.safetensors", adapter_shapes("base"))
    assert "not a CLIP vision model" in identify(tmp_path / "adapter.safetensors", CLIP_VISION).problem
    write_safetensors(tmp_path / "enc.safetensors", clip_hf_shapes("ViT-H"))
    assert "not an IP-Adapter" in identify(tmp_path / "enc.safetensors", ADAPTER).problem


# --- header only ----------------------------------------------------------------------------------------------

class CountingFile:
    def __init__(self, path, mode):
        self._f = open(path, mode)
        self.read_bytes = 0

    def read(self, n=-1):
        data = self._f.read(n)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_only_the_header_is_read(tmp_path):
    path = tmp_path / "bigG.safetensors"
    header_length = write_safetensors(path, clip_hf_shapes("ViT-bigG"))
    opened = []

    def opener(p, mode):
        opened.append(CountingFile(p, mode))
        return opened[-1]

    shapes = read_safetensors_shapes(path, opener=opener)
    assert len(shapes) == len(clip_hf_shapes("ViT-bigG"))
    assert os.path.getsize(path) > 3_000_000_000  # 3.7 GB declared; a sparse hole on disk
    assert [f.read_bytes for f in opened] == [8 + header_length]


def test_a_garbage_data_section_still_identifies(tmp_path):
    path = tmp_path / "plus.safetensors"
    write_safetensors(path, adapter_shapes("plus"), data="garbage")
    assert identify(path).info.variant == "plus"


# --- the cache ------------------------------------------------------------------------------------------------

def test_unchanged_files_are_read_once_changed_ones_again(tmp_path):
    path = tmp_path / "a.safetensors"
    write_safetensors(path, adapter_shapes("base"))
    identifier = FileIdentifier()
    first = identifier.identify(path, ADAPTER)
    assert identifier.identify(path, ADAPTER) == first and identifier.reads == 1
    write_safetensors(path, adapter_shapes("plus"))  # replaced: new size and mtime
    assert identifier.identify(path, ADAPTER).info.variant == "plus" and identifier.reads == 2
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, touched
    identifier.identify(path, ADAPTER)
    assert identifier.reads == 3


def test_the_cache_is_bounded(tmp_path):
    identifier = FileIdentifier(capacity=2)
    for i in range(5):
        write_safetensors(tmp_path / f"{i}.safetensors", adapter_shapes("base"))
        identifier.identify(tmp_path / f"{i}.safetensors", ADAPTER)
    assert len(identifier) == 2 and identifier.reads == 5


# --- unreadable files -------------------------------------------------------------------------------------------

def _raw(path, data: bytes):
    path.write_bytes(data)
    return path


UNKNOWN_DTYPE = b'{"a": {"dtype": "X9", "shape": [], "data_offsets": [0, 0]}}'
NOT_A_TENSOR = b'{"a": [1, 2]}'


@pytest.mark.parametrize("content,expected", [
    (b"abc", "too short"),
    ((10 ** 9).to_bytes(8, "little") + b"{}", "does not fit the file"),
    ((8).to_bytes(8, "little") + b"not json", "not valid JSON"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    (len(UNKNOWN_DTYPE).to_bytes(8, "little") + UNKNOWN_DTYPE, "which torch cannot hold"),
    (len(NOT_A_TENSOR).to_bytes(8, "little") + NOT_A_TENSOR, "not a tensor record"),
    (b"", "too short"),
])
def test_corrupt_headers_are_reported_not_raised(tmp_path, content, expected):
    found = identify(_raw(tmp_path / "bad.safetensors", content))
    assert found.info is None and expected in found.problem, found.problem


def test_truncated_download_is_reported(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_safetensors(path, adapter_shapes("base"), cut=1000)
    found = identify(path)
    assert found.info is None and "truncated" in found.problem and "re-download" in found.problem


def test_quantized_adapters_say_why_and_faceid_adapters_are_identified(tmp_path):
    write_safetensors(tmp_path / "q.safetensors", adapter_shapes("base"), dtype="I8")
    assert "int8" in identify(tmp_path / "q.safetensors").problem
    faceid = {"image_proj.proj.0.weight": (1024, 512), "image_proj.proj.2.weight": (3072, 1024),
              "image_proj.norm.weight": (768,), **{f"ip_adapter.{k}": s for k, s in
                                                     ip_layer_shapes(768, SD15_INNER).items()}}
    write_safetensors(tmp_path / "faceid.safetensors", faceid)
    found = identify(tmp_path / "faceid.safetensors")  # every variant: tests/unit/test_ipadapter_faceid.py
    assert found.problem == "" and found.info.variant == "faceid-portrait" and found.info.num_tokens == 4


def test_a_vanished_file_is_reported(tmp_path):
    assert "cannot be read" in identify(tmp_path / "gone.safetensors").problem


# --- presets ------------------------------------------------------------------------------------------------

def sites(family: str) -> list[SiteSpec]:
    inner, ctx, dim_head = (SD15_INNER, 768, 40) if family == "SD1.5" else (SDXL_INNER, 2048, 64)
    return [SiteSpec(key=("s", i), heads=d // dim_head, dim_head=dim_head, context_dim=ctx)
            for i, d in enumerate(inner)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A mixed ipadapter folder with decoys (other family, same-shaped twins, broken files) and encoders."""
    root = tmp_path_factory.mktemp("models")
    adapters = {
        "a_light.safetensors": ("base", "SD1.5"), "b_light_v11.safetensors": ("base", "SD1.5"),
        "c_base.safetensors": ("base", "SD1.5"), "d_plus-face.safetensors": ("plus", "SD1.5"),
        "e_plus.safetensors": ("plus", "SD1.5"), "f_full.safetensors": ("full-face", "SD1.5"),
        "g_vitg.safetensors": ("vit-g", "SD1.5"), "h_xl_vit-h.safetensors": ("base", "SDXL"),
        "i_xl_plus.safetensors": ("plus", "SDXL"), "j_xl_face.safetensors": ("plus", "SDXL"),
        "k_xl_bigg.safetensors": ("vit-g", "SDXL"), "l_composition_plus.safetensors": ("plus", "SD1.5"),
    }
    for name, (kind, family) in adapters.items():
        write_safetensors(root / "ipadapter" / name, adapter_shapes(kind, family))
    _raw(root / "ipadapter" / "broken.safetensors", b"\x00" * 4)
    write_safetensors(root / "clip_vision" / "h.safetensors", clip_hf_shapes("ViT-H"))
    write_safetensors(root / "clip_vision" / "g.safetensors", clip_openclip_shapes("ViT-bigG"))
    write_safetensors(root / "clip_vision" / "l.safetensors", clip_hf_shapes("ViT-L"))
    identifier = FileIdentifier()
    found = {role: [identifier.identify(p, role) for p in sorted((root / role).iterdir())]
             for role in (ADAPTER, CLIP_VISION)}
    return root, found


# family -> preset -> (adapter file, clip vision file)
EXPECTED = {
    "SD1.5": {"LIGHT - SD1.5 only (low strength)": ("b_light_v11.safetensors", "h.safetensors"),
              "STANDARD (medium strength)": ("c_base.safetensors", "h.safetensors"),
              "VIT-G (medium strength)": ("g_vitg.safetensors", "g.safetensors"),
              "PLUS (high strength)": ("e_plus.safetensors", "h.safetensors"),
              "PLUS FACE (portraits)": ("d_plus-face.safetensors", "h.safetensors"),
              "FULL FACE - SD1.5 only (portraits stronger)": ("f_full.safetensors", "h.safetensors")},
    "SDXL": {"STANDARD (medium strength)": ("h_xl_vit-h.safetensors", "h.safetensors"),
             "VIT-G (medium strength)": ("k_xl_bigg.safetensors", "g.safetensors"),
             "PLUS (high strength)": ("i_xl_plus.safetensors", "h.safetensors"),
             "PLUS FACE (portraits)": ("j_xl_face.safetensors", "h.safetensors")},
}


@pytest.mark.parametrize("family,preset", [(f, p) for f, ps in EXPECTED.items() for p in ps])
def test_each_preset_picks_its_files_among_decoys(folders, family, preset):
    _, found = folders
    choice = choose(preset_named(preset), sites(family), found[ADAPTER], found[CLIP_VISION])
    assert (choice.adapter.name, choice.clip_vision.name) == EXPECTED[family][preset]
    assert choice.name_says_it


def test_presets_are_the_standard_packs_strings():
    assert PRESET_NAMES == ("LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)",
                            "VIT-G (medium strength)", "PLUS (high strength)", "PLUS FACE (portraits)",
                            "FULL FACE - SD1.5 only (portraits stronger)")


def test_a_same_shaped_twin_serves_when_the_named_one_is_missing(folders):
    _, found = folders
    no_face = [a for a in found[ADAPTER] if "face" not in a.name]
    choice = choose(preset_named("PLUS FACE (portraits)"), sites("SD1.5"), no_face, found[CLIP_VISION])
    assert choice.adapter.name == "e_plus.safetensors" and not choice.name_says_it


def test_reused_files_win_otherwise_equal_choices(folders):
    _, found = folders
    h2 = found[CLIP_VISION][1]  # h.safetensors
    twin = type(h2)(path=h2.path + ".twin", name="h_twin.safetensors", role=h2.role, info=h2.info)
    encoders = [twin, *found[CLIP_VISION]]
    plain = choose(preset_named("PLUS (high strength)"), sites("SD1.5"), found[ADAPTER], encoders)
    assert plain.clip_vision.name == "h_twin.safetensors"  # folder order
    reused = choose(preset_named("PLUS (high strength)"), sites("SD1.5"), found[ADAPTER], encoders, reuse={h2.path})
    assert reused.clip_vision.path == h2.path


def test_nothing_fits_lists_every_file_and_names_the_download(folders):
    _, found = folders
    with pytest.raises(NothingFits) as err:
        choose(preset_named("FULL FACE - SD1.5 only (portraits stronger)"), sites("SDXL"), found[ADAPTER],
               found[CLIP_VISION])
    text = str(err.value)
    assert "SD1.5 only" in text and "SDXL model" in text
    for identified in found[ADAPTER] + found[CLIP_VISION]:
        assert f"- {identified.name}: " in text
    assert "broken.safetensors: not usable: " in text and "ViT-bigG" in text


def test_missing_clip_vision_names_the_encoder_to_download(folders):
    _, found = folders
    only_l = [e for e in found[CLIP_VISION] if e.name == "l.safetensors"]
    with pytest.raises(NothingFits, match="CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"):
        choose(preset_named("VIT-G (medium strength)"), sites("SD1.5"), found[ADAPTER], only_l)


def test_empty_folders_name_the_preset_files(tmp_path):
    with pytest.raises(NothingFits) as err:
        choose(preset_named("PLUS FACE (portraits)"), sites("SDXL"), [], [])
    text = str(err.value)
    assert "ip-adapter-plus-face_sdxl_vit-h.safetensors" in text and "CLIP-ViT-H-14-laion2B-s32B-b79K" in text
    assert text.count("(no files)") == 2


def test_identification_writes_nothing(folders):
    root, _ = folders
    before = folder_snapshot(root)
    identifier = FileIdentifier()
    for role in (ADAPTER, CLIP_VISION):
        for path in (root / role).iterdir():
            identifier.identify(path, role)
    assert folder_snapshot(root) == before


@pytest.mark.parametrize("family", ["xlabs", "instantx", "sd3"])
def test_flux_and_sd35_adapters_are_named_not_called_malformed(tmp_path, family):
    """A DiT adapter in models/ipadapter is a valid file the SD presets cannot use: the scan says what it is and
    which node loads it, instead of the attn2 detection's layout complaint."""
    from safetensors.torch import save_file

    from harness.flux_adapters import instantx_tensors, xlabs_tensors
    from harness.sd3_models import instantx_sd3_state_dict

    tensors = {"xlabs": xlabs_tensors, "instantx": instantx_tensors, "sd3": instantx_sd3_state_dict}[family]()
    path = tmp_path / "adapter.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    found = identify(path)
    expected = {"xlabs": "Flux.1 XLabs IP-Adapter", "instantx": "Flux.1 InstantX IP-Adapter",
                "sd3": "SD3.5 InstantX IP-Adapter"}[family]
    assert found.info is None
    assert found.problem.startswith(expected) and "Load IP-Adapter Model" in found.problem, found.problem
