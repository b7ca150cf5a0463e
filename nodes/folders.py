"""The `ipadapter` model folder, shared with other IP-Adapter packs and extra_model_paths.yaml."""

from __future__ import annotations

import os

import folder_paths

FOLDER = "ipadapter"


def register_ipadapter_folder() -> list[str]:
    """Add models/ipadapter, keeping paths that extra_model_paths.yaml (loaded before custom nodes) added."""
    paths, _ = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths)
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(folder_paths.supported_pt_extensions))
    return paths
