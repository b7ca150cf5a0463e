"""The `ipadapter` model folder, shared with other IP-Adapter packs and extra_model_paths.yaml."""

from __future__ import annotations

import os

import folder_paths

FOLDER = "ipadapter"
# InsightFace model packs: models/insightface/models/<pack>/*.onnx, the layout other packs use too
INSIGHTFACE_FOLDER = "insightface"


def _register_folder(name: str, extensions: set[str]) -> list[str]:
    """Add models/<name>, keeping paths that extra_model_paths.yaml (loaded before custom nodes) added."""
    paths, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
    paths = list(paths)
    default = os.path.join(folder_paths.models_dir, name)
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[name] = (paths, extensions)
    return paths


def register_ipadapter_folder() -> list[str]:
    """Add models/ipadapter (and extra_model_paths.yaml's ipadapter paths stay)."""
    return _register_folder(FOLDER, set(folder_paths.supported_pt_extensions))


def register_insightface_folder() -> list[str]:
    """Add models/insightface (and extra_model_paths.yaml's insightface paths stay)."""
    return _register_folder(INSIGHTFACE_FOLDER, {".onnx"})
