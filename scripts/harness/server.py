"""A real ComfyUI server on loopback with this pack installed as ``custom_nodes/xformers_ipadapter``.

``ComfyServer`` is a context manager: it writes an extra_model_paths YAML (model folders from the tiny
models dir, ``custom_nodes:`` a work dir holding a symlink ``xformers_ipadapter -> repo root``), starts
``main.py --cpu`` on a free port with input/output/temp/user dirs and a sqlite database under the work dir
(``sqlite:///:memory:`` makes SQLAlchemy's pool log cross-thread errors after each prompt), waits for ``/system_stats``, logs to ``<workdir>/comfyui.log``, and stops the process on exit
(SIGTERM, then SIGKILL). Its methods are a small client for the HTTP API and the websocket.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from . import REPO_ROOT, comfy_bootstrap
from .tiny_models import write_extra_model_paths

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 120.0


def rejection_message(status: int, body: dict) -> str:
    """A /prompt rejection (400 body) as readable lines: the error, then each node's errors."""
    lines = [f"/prompt answered {status}: {(body.get('error') or {}).get('message', json.dumps(body)[:2000])}"]
    for node_id, info in (body.get("node_errors") or {}).items():
        for error in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {error.get('message')}: "
                         f"{error.get('details')}")
    return "\n".join(lines)


class ComfyServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, workdir: Path | str, models_dir: Path | str, comfyui: Path | str | None = None,
                 python: str = sys.executable, extra_args: tuple[str, ...] | list[str] = (),
                 pack_name: str = comfy_bootstrap.PACK_NAME, startup_timeout: float = STARTUP_TIMEOUT):
        self.workdir = Path(workdir).resolve()
        self.models_dir = Path(models_dir).resolve()
        self.comfyui = Path(comfyui) if comfyui else comfy_bootstrap.resolve_comfyui()
        self.python = python
        self.extra_args = list(extra_args)
        self.pack_name = pack_name
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "comfyui.log"
        self.output_dir = self.workdir / "output"
        self.input_dir = self.workdir / "input"
        self.client_id = uuid.uuid4().hex
        self.http = requests.Session()

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.python, str(self.comfyui / "main.py"), "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--extra-model-paths-config", str(self.workdir / "extra_model_paths.yaml"),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.workdir / "temp"), "--user-directory", str(self.workdir / "user"),
            "--disable-auto-launch", "--database-url", f"sqlite:///{self.workdir / 'user' / 'comfyui.db'}",
            *self.extra_args,
        ]

    def _prepare(self) -> None:
        custom_nodes = self.workdir / "custom_nodes"
        for d in (custom_nodes, self.output_dir, self.input_dir, self.workdir / "temp", self.workdir / "user"):
            d.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / self.pack_name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO_ROOT, target_is_directory=True)
        write_extra_model_paths(self.workdir / "extra_model_paths.yaml", self.models_dir, custom_nodes)

    def start(self) -> "ComfyServer":
        self._prepare()
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as logfile:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfyui, env=env, stdout=logfile,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n"
                                       f"{self.log_tail()}")
            try:
                if self.http.get(self.base_url + "/system_stats", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyServerError(f"ComfyUI did not answer /system_stats within {self.startup_timeout:.0f} s:\n"
                                       f"{self.log_tail()}")
            time.sleep(0.25)
        self.startup_seconds = time.perf_counter() - t0
        log.info("ComfyUI up at %s in %.1f s (log %s)", self.base_url, self.startup_seconds, self.log_path)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.http.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- HTTP client ----------------------------------------------------------------------------------

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.http.get(self.base_url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def object_info(self, node_id: str | None = None) -> dict:
        """``/object_info`` (all nodes) or ``/object_info/<node_id>`` ({} if the node is unknown)."""
        r = self.get("/object_info" + (f"/{node_id}" if node_id else ""))
        r.raise_for_status()
        return r.json()

    def post_prompt(self, prompt: dict, **extra) -> tuple[int, dict]:
        """POST an API-format prompt; returns (HTTP status, JSON body)."""
        body = {"prompt": prompt, "client_id": self.client_id, **extra}
        r = self.http.post(self.base_url + "/prompt", json=body, timeout=30)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {"raw": r.text}

    def wait_for(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll ``/history/<id>`` until the prompt completed or failed.

        Returns ``{"status": "success"|"error", "outputs": {...}, "error": <execution_error data or None>,
        "message": <its exception_message or "">, "history": <the raw entry>}``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").json().get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                error = next((data for event, data in status.get("messages", [])
                              if event == "execution_error"), None)
                return {"status": status.get("status_str"), "outputs": entry.get("outputs", {}), "error": error,
                        "message": (error or {}).get("exception_message", ""), "history": entry}
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """post_prompt + wait_for; raises if the prompt is rejected (the 400 body is in the message)."""
        status, body = self.post_prompt(prompt)
        if status != 200:
            raise ComfyServerError(rejection_message(status, body))
        return self.wait_for(body["prompt_id"], timeout)

    def upload_image(self, path: Path | str, subfolder: str = "", overwrite: bool = True) -> dict:
        """POST /upload/image; returns {"name", "subfolder", "type"} (use "name" as LoadImage's image)."""
        path = Path(path)
        with open(path, "rb") as fh:
            r = self.http.post(self.base_url + "/upload/image", timeout=30,
                               files={"image": (path.name, fh, "image/png")},
                               data={"overwrite": str(overwrite).lower(), "subfolder": subfolder, "type": "input"})
        r.raise_for_status()
        return r.json()

    def output_files(self, outputs: dict, kind: str = "images") -> list[Path]:
        """Files named in a history ``outputs`` dict (type "output") as paths in the output directory."""
        files = []
        for node_output in outputs.values():
            for item in node_output.get(kind, []):
                if item.get("type", "output") == "output":
                    files.append(self.output_dir / item.get("subfolder", "") / item["filename"])
        return files

    # --- websocket ------------------------------------------------------------------------------------

    def run_ws(self, prompt: dict, timeout: float = 300.0) -> tuple[str, list[dict]]:
        """Run a prompt while listening on ``/ws``; returns (prompt_id, JSON messages for it, in order).

        Ends at ``executing`` with ``node: null`` (success) or ``execution_error``/``execution_interrupted``.
        Binary frames (previews) are skipped.
        """
        import websocket  # websocket-client (requirements-dev.txt)

        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout)
        try:
            status, body = self.post_prompt(prompt)
            if status != 200:
                raise ComfyServerError(rejection_message(status, body))
            prompt_id, messages = body["prompt_id"], []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                raw = ws.recv()
                if not isinstance(raw, str):
                    continue
                msg = json.loads(raw)
                msg["received"] = time.perf_counter()  # arrival time, for step timings
                data = msg.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                messages.append(msg)
                kind = msg.get("type")
                if kind in ("execution_error", "execution_interrupted"):
                    break
                if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
            else:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s")
            return prompt_id, messages
        finally:
            ws.close()
