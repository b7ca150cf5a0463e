"""FaceAnalysis end to end on the real onnxruntime with tiny models that have the real packs' signatures
(harness/tiny_onnx.py): detections where faces are drawn, largest first, none on an empty image; the recognizer's
input (alignment, normalisation, channel order) checked against numpy maths on the model's own weights; packs
found by signature; errors; the providers report; the bounded cache."""
import os
import shutil

import numpy as np
import pytest
import torch

from harness.testing import require

ort = require("onnxruntime")
onnx = require("onnx")

from onnx import numpy_helper  # noqa: E402

from harness import tiny_onnx  # noqa: E402
from processors.face import analysis as fa  # noqa: E402


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_onnx.write_model_pack(root, "buffalo_l")
    tiny_onnx.write_model_pack(root, "antelopev2")
    return root


@pytest.fixture(scope="module")
def buffalo(models_dir):
    return fa.FaceAnalysis(models_dir / "insightface" / "models" / "buffalo_l")


def blank(height=640, width=640):
    return torch.zeros(height, width, 3)


def test_one_face_found_where_drawn(buffalo):
    box = (100, 80, 260, 240)
    faces = buffalo.analyze(tiny_onnx.draw_face(blank(), box))
    assert len(faces) == 1
    face = faces[0]
    np.testing.assert_allclose(face.bbox, box, atol=1e-3)
    np.testing.assert_allclose(face.kps, tiny_onnx.expected_kps(box), atol=1e-3)
    assert face.score > 0.5
    assert face.embedding.shape == (512,) and face.embedding.dtype == torch.float32


def test_several_faces_largest_first(buffalo):
    boxes = [(20, 20, 80, 80), (120, 120, 300, 300), (400, 400, 520, 520)]  # no shared rows or columns
    image = blank()
    for box in boxes:
        image = tiny_onnx.draw_face(image, box)
    faces = buffalo.analyze(image)
    assert [tuple(round(v) for v in f.bbox) for f in faces] == [boxes[1], boxes[2], boxes[0]]


def test_no_face_is_an_empty_list(buffalo):
    assert buffalo.analyze(blank(200, 300)) == []


def test_resized_image_boxes_in_original_pixels(buffalo):
    box = (300, 200, 500, 400)  # a 1000x800 image is shrunk to 640x512 for the detector
    faces = buffalo.analyze(tiny_onnx.draw_face(blank(800, 1000), box))
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].bbox, box, atol=2.0)


def test_smaller_detector_sizes_tried_in_turn(buffalo):
    image = tiny_onnx.draw_face(blank(), (100, 100, 300, 300))
    assert len(buffalo.analyze(image, det_sizes=fa.STANDARD_DET_SIZES)) == 1
    found = buffalo.detect(image, det_size=320)  # 640 -> 320: boxes still in image pixels
    np.testing.assert_allclose(found.boxes[0], (100, 100, 300, 300), atol=1e-3)


def _recognizer_oracle(path, crop_u8_hwc):
    """The tiny recognizer's maths in numpy on its own weights: (x - 127.5) / 127.5, NCHW, 8x8 mean, linear."""
    model = onnx.load(str(path))
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    x = (crop_u8_hwc.astype(np.float64) - 127.5) / 127.5
    pooled = x.transpose(2, 0, 1).reshape(3, 14, 8, 14, 8).mean(axis=(2, 4)).reshape(-1)
    return pooled @ consts["weight"] + consts["bias"]


def test_embedding_is_arcface_preprocessing_of_the_aligned_crop(models_dir, buffalo):
    image = tiny_onnx.draw_face(blank(), (100, 80, 260, 240))
    image[..., 0] *= 0.9  # red differs from blue: the channel order shows
    image[150:170, 120:140, 1] = 0.6
    face = buffalo.analyze(image)[0]
    crop = (fa.FaceAnalysis.aligned_crop((image * 255).floor(), face, 112)).round().clamp(0, 255).numpy()
    rec = models_dir / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx"
    np.testing.assert_allclose(face.embedding.numpy(), _recognizer_oracle(rec, crop), rtol=1e-4, atol=1e-4)
    bgr = fa.FaceAnalysis(buffalo.pack_dir, channels="BGR").analyze(image)[0]
    np.testing.assert_allclose(bgr.embedding.numpy(), _recognizer_oracle(rec, crop[..., ::-1]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(bgr.embedding, face.embedding)


def test_normed_embedding_and_different_images(buffalo):
    first = buffalo.analyze(tiny_onnx.draw_face(blank(), (100, 80, 260, 240)))[0]
    again = buffalo.analyze(tiny_onnx.draw_face(blank(), (100, 80, 260, 240)))[0]
    other = buffalo.analyze(tiny_onnx.draw_face(blank(), (100, 80, 260, 240), value=0.7))[0]
    assert torch.equal(first.embedding, again.embedding)
    assert not torch.allclose(first.embedding, other.embedding)
    normed = first.normed_embedding
    assert float(normed.norm()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(normed * first.embedding.norm(), first.embedding)


def test_aligned_crop_sizes_frame_the_face(buffalo):
    image = tiny_onnx.draw_face(blank(), (100, 80, 260, 240))
    face = buffalo.analyze(image)[0]
    # the tiny detector's keypoints are the template's fractions of the box, so the 112 crop is the box
    crop = fa.FaceAnalysis.aligned_crop(image, face, 112)
    assert crop.shape == (112, 112, 3) and float(crop[1:-1, 1:-1].min()) > 0.95
    wide = fa.FaceAnalysis.aligned_crop(image, face.kps, 256)  # 128-based: the box is x 16..240, y 0..224
    assert wide.shape == (256, 256, 3)
    assert float(wide[:, :14].max()) < 0.05 and float(wide[:, 242:].max()) < 0.05
    assert float(wide[226:].max()) < 0.05 and float(wide[1:222, 18:238].min()) > 0.95


def test_detected_face_and_analysis_are_immutable(buffalo):
    face = buffalo.analyze(tiny_onnx.draw_face(blank(), (100, 80, 260, 240)))[0]
    with pytest.raises(AttributeError):
        face.score = 2.0
    with pytest.raises(ValueError):
        face.kps[0, 0] = 1.0
    with pytest.raises(AttributeError, match="immutable"):
        buffalo.provider = "CUDA"


def test_bad_images_are_refused(buffalo):
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        buffalo.analyze(torch.zeros(1, 64, 64, 3))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        buffalo.analyze(torch.zeros(64, 64))


def test_antelopev2_found_by_signature_others_ignored(models_dir):
    analysis = fa.FaceAnalysis(models_dir / "insightface" / "models" / "antelopev2")
    assert analysis.detector_path.name == "scrfd_10g_bnkps.onnx"
    assert analysis.recognizer_path.name == "glintr100.onnx"
    assert set(analysis.ignored_files) == {"2d106det.onnx", "genderage.onnx"}
    assert len(analysis.analyze(tiny_onnx.draw_face(blank(), (50, 60, 250, 260)))) == 1


def test_renamed_files_found_by_signature(tmp_path):
    folder = tmp_path / "buffalo_l"
    tiny_onnx.save(tiny_onnx.recognizer_model(), folder / "a_model.onnx")
    tiny_onnx.save(tiny_onnx.landmark_model(), folder / "b_landmarks.onnx")
    tiny_onnx.save(tiny_onnx.detector_model(), folder / "c_detector.onnx")
    analysis = fa.FaceAnalysis(folder)
    assert (analysis.detector_path.name, analysis.recognizer_path.name) == ("c_detector.onnx", "a_model.onnx")
    assert analysis.ignored_files == ("b_landmarks.onnx",)


def test_pack_without_recognizer_names_what_is_missing(tmp_path):
    folder = tmp_path / "buffalo_l"
    tiny_onnx.save(tiny_onnx.detector_model(), folder / "det_10g.onnx")
    with pytest.raises(fa.ModelPackError, match="face recognizer") as error:
        fa.FaceAnalysis(folder)
    assert "w600k_r50.onnx" in str(error.value) and str(folder) in str(error.value)


def test_unreadable_model_file(tmp_path):
    folder = tmp_path / "buffalo_l"
    folder.mkdir()
    (folder / "det_10g.onnx").write_bytes(b"not a model")
    with pytest.raises(fa.ModelPackError, match="det_10g.onnx is not a model"):
        fa.FaceAnalysis(folder)


def test_find_model_pack(models_dir, tmp_path):
    empty = tmp_path / "empty"
    assert fa.find_model_pack("buffalo_l", [empty, models_dir / "insightface"]) == \
        models_dir / "insightface" / "models" / "buffalo_l"
    nested = tmp_path / "nested" / "models" / "antelopev2" / "antelopev2"
    shutil.copytree(models_dir / "insightface" / "models" / "antelopev2", nested)
    assert fa.find_model_pack("antelopev2", [tmp_path / "nested"]) == nested
    with pytest.raises(fa.ModelPackError) as error:
        fa.find_model_pack("buffalo_l", [empty])
    message = str(error.value)
    assert str(empty / "models" / "buffalo_l") in message
    assert "det_10g.onnx" in message and "w600k_r50.onnx" in message
    with pytest.raises(ValueError, match="model_name must be one of"):
        fa.find_model_pack("buffalo_s", [empty])


def test_providers_report_follows_onnxruntime():
    report = fa.providers_report()
    available = set(ort.get_available_providers())
    assert report["onnxruntime"] == ort.__version__ and report["problem"] == ""
    rows = {row["name"]: row for row in report["providers"]}
    assert list(rows) == ["CPU", "CUDA", "ROCM", "CoreML", "DirectML", "OpenVINO"]
    for row in rows.values():
        assert row["available"] == (row["onnx_name"] in available)
        assert (row["reason"] == "") == row["available"]
        if not row["available"]:
            assert row["onnx_name"] in row["reason"]
    assert rows["CPU"]["available"]


def test_unavailable_provider_falls_back_to_cpu(buffalo):
    missing = [row["name"] for row in fa.providers_report()["providers"] if not row["available"]]
    if not missing:
        pytest.skip("every provider is available on this machine")
    analysis = fa.FaceAnalysis(buffalo.pack_dir, missing[0])
    assert analysis.provider == "CPU" and analysis.provider_requested == missing[0]
    assert missing[0] in analysis.describe() and analysis.fallback_reason
    with pytest.raises(ValueError, match="provider must be one of"):
        fa.FaceAnalysis(buffalo.pack_dir, "TPU")


def test_missing_onnxruntime_message(monkeypatch):
    def refuse(name):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(fa.importlib, "import_module", refuse)
    with pytest.raises(fa.OnnxRuntimeMissingError, match="pip install onnxruntime-gpu"):
        fa.import_onnxruntime()
    report = fa.providers_report()
    assert report["onnxruntime"] is None and not any(r["available"] for r in report["providers"])


def test_cache_per_files_and_bounded(models_dir, tmp_path):
    fa.clear_cache()
    folder = tmp_path / "buffalo_l"
    shutil.copytree(models_dir / "insightface" / "models" / "buffalo_l", folder)
    first = fa.load_face_analysis(folder)
    assert fa.load_face_analysis(folder) is first
    assert fa.load_face_analysis(folder, channels="BGR") is not first
    stat = (folder / "w600k_r50.onnx").stat()
    os.utime(folder / "w600k_r50.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = fa.load_face_analysis(folder)
    assert second is not first
    for index in range(fa._CACHE_SIZE):
        copy = tmp_path / f"copy{index}" / "buffalo_l"
        shutil.copytree(folder, copy)
        fa.load_face_analysis(copy)
    assert len(fa._cache) == fa._CACHE_SIZE
    assert fa.load_face_analysis(folder) is not second  # the oldest was dropped
    fa.clear_cache()
