"""Convert a ComfyUI_IPAdapter_plus workflow (UI or API JSON) to this pack's nodes.

    python scripts/migrate_workflow.py my_workflow.json -o my_workflow_xformers.json
    python scripts/migrate_workflow.py my_workflow.json --server http://127.0.0.1:8188   # UI form, from a server
    python scripts/migrate_workflow.py my_workflow.json --object-info object_info.json

API-form workflows convert by input name alone. UI-form workflows store widget values and sockets by position,
so they need this pack's node definitions: from a running ComfyUI that has the pack (``--server``), a saved
``/object_info`` answer (``--object-info``), or, by default, this pack loaded in-process into the ComfyUI that
scripts/harness/comfy_host.py finds ($COMFYUI_PATH, or the copy scripts/setup_env.sh fetched). Prints what it converted
and what it could not; exits 1 when something could not be converted. The input file is never changed.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import migration  # noqa: E402


def object_info_from_server(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as response:
        return json.loads(response.read())


def object_info_in_process() -> dict:
    from harness import comfy_bootstrap

    comfy_bootstrap.bootstrap()
    return migration.pack_object_info(comfy_bootstrap.load_pack())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="standard-pack workflow JSON (UI or API form)")
    parser.add_argument("-o", "--output", type=Path,
                        help="where to write the result (default: <name>_xformers.json next to the input)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--server", help="URL of a running ComfyUI with this pack, for its /object_info")
    source.add_argument("--object-info", type=Path, help="a saved /object_info JSON")
    args = parser.parse_args(argv)

    data = json.loads(args.workflow.read_text())
    info = None
    if args.object_info:
        info = json.loads(args.object_info.read_text())
    elif args.server:
        info = object_info_from_server(args.server)
    elif migration.is_ui_workflow(data):
        info = object_info_in_process()
    converted, report = migration.convert(data, info)
    output = args.output or args.workflow.with_name(f"{args.workflow.stem}_xformers.json")
    output.write_text(json.dumps(converted, indent=2) + "\n")
    print(report.text())
    print(f"written: {output}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
