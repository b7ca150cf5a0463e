"""XformersFaceAnalysisLoader on a real ComfyUI: the insightface folder (models/insightface and an
extra_model_paths.yaml root), the tiny pack loaded and analysing, the missing-pack error naming folder and files,
provider fallback, combo validation, registration, tooltips and the help page."""
import copy
from pathlib import Path

import pytest
import torch

from harness import host_helpers as hh
from harness.testing import require

require("onnxruntime")
require("onnx")

from harness import tiny_onnx  # noqa: E402


@pytest.fixture(scope="module")
def node(pack):
    return hh.pack_module("nodes.face_analysis").XformersFaceAnalysisLoader


@pytest.fixture
def insightface_root(pack, tmp_path, monkeypatch):
    """Only an extra_model_paths.yaml root for `insightface` (plus the default models/insightface)."""
    import folder_paths
    from utils.extra_config import load_extra_path_config

    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    folder_paths.folder_names_and_paths.pop("insightface", None)
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text(f"mine:\n    base_path: {tmp_path}\n    insightface: face_models\n")
    load_extra_path_config(str(yaml))
    return tmp_path / "face_models"


def test_loads_the_pack_from_an_extra_path_and_analyses(node, insightface_root):
    tiny_onnx.write_model_pack(insightface_root.parent, "buffalo_l")  # <base>/insightface/models/buffalo_l
    (insightface_root.parent / "insightface").rename(insightface_root)
    analysis = node.execute("buffalo_l", "CPU").result[0]
    assert analysis.pack_dir == insightface_root / "models" / "buffalo_l"
    image = tiny_onnx.draw_face(torch.zeros(320, 320, 3), (40, 50, 200, 210))
    faces = analysis.analyze(image)
    assert len(faces) == 1 and [round(v) for v in faces[0].bbox] == [40, 50, 200, 210]
    assert node.execute("buffalo_l", "CPU").result[0] is analysis  # cached while the files are unchanged


def test_missing_pack_names_the_folders_and_files(node, insightface_root):
    with pytest.raises(FileNotFoundError) as error:
        node.execute("antelopev2", "CPU")
    message = str(error.value)
    assert message.startswith("model_name 'antelopev2'")
    assert str(insightface_root / "models" / "antelopev2") in message
    assert "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message


def test_unavailable_provider_runs_on_cpu(node, insightface_root):
    import onnxruntime

    tiny_onnx.write_model_pack(insightface_root.parent, "buffalo_l")
    (insightface_root.parent / "insightface").rename(insightface_root)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    analysis = node.execute("buffalo_l", "CUDA").result[0]
    assert analysis.provider == "CPU" and "CUDAExecutionProvider" in analysis.fallback_reason


def test_bad_choices_name_the_input(node):
    with pytest.raises(ValueError, match="provider"):
        node.execute("buffalo_l", "TPU")
    with pytest.raises(ValueError, match="model_name"):
        node.execute("buffalo_s", "CPU")
    assert "provider" in node.validate_inputs(model_name="buffalo_l", provider="TPU")
    assert node.validate_inputs(model_name="antelopev2", provider="CoreML") is True


def test_schema_registration_and_help_page(node, pack):
    import asyncio

    schema = node.define_schema()
    assert schema.node_id == "XformersFaceAnalysisLoader" and schema.description
    assert [i.id for i in schema.inputs] == ["model_name", "provider"]
    assert schema.outputs[0].io_type == "XFORMERS_FACE_ANALYSIS"
    for item in [*schema.inputs, *schema.outputs]:
        assert item.tooltip
    docs = Path(hh.pack_module("nodes").__file__).resolve().parents[1] / "web" / "docs"
    assert (docs / "XformersFaceAnalysisLoader.md").is_file()
    extension = hh.pack_module("nodes.extension").XformersIPAdapterExtension()
    assert node in asyncio.run(extension.get_node_list())
