"""GET /xformers_ipadapter/ops through a running ComfyUI server, checked against the contract
(README, "Nodes"; docs/widget.md): versions, device, and every `op` choice once, in order, with
`available` booleans and a `reason` that is empty exactly when the op is available."""
import torch

from processors.backends import OP_CHOICES, OPERATORS

ROUTE = "/xformers_ipadapter/ops"


def check_report(report: dict) -> None:
    assert set(report) >= {"versions", "device", "ops"}, report.keys()
    assert report["versions"]["torch"] == torch.__version__  # the server runs in this venv
    assert "xformers" in report["versions"]
    assert report["versions"]["xformers"] is None or isinstance(report["versions"]["xformers"], str)
    assert report["device"] == "cpu"  # the harness starts ComfyUI with --cpu
    names = [op["name"] for op in report["ops"]]
    assert names == list(OP_CHOICES), names
    for op in report["ops"]:
        assert isinstance(op["available"], bool), op
        assert isinstance(op["reason"], str), op
        assert (op["reason"] == "") == op["available"], op
        # the capabilities the widget shows mask_mode and fused from: the engine's declarations
        spec = OPERATORS[op["name"]]
        assert (op["tensor_bias"], op["fused"]) == (spec.tensor_bias, spec.fused), op
    by_name = {op["name"]: op for op in report["ops"]}
    assert by_name["auto"]["available"] and by_name["sdpa"]["available"] and by_name["sdpa:math"]["available"]
    assert not by_name["sdpa:flash"]["available"]  # needs CUDA
    assert "cuda" in by_name["sdpa:flash"]["reason"]


def test_ops_route_matches_the_contract(comfy_server):
    r = comfy_server.get(ROUTE)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers.get("Cache-Control") == "no-store"
    check_report(r.json())


def test_ops_route_under_api_prefix_and_refresh(comfy_server):
    """The frontend's api.fetchApi() calls /api/<route>; ?refresh=1 recomputes the same answer here."""
    first = comfy_server.get("/api" + ROUTE)
    assert first.status_code == 200, first.text
    check_report(first.json())
    again = comfy_server.get(ROUTE, params={"refresh": "1"})
    assert again.status_code == 200, again.text
    check_report(again.json())
    assert again.json()["ops"] == first.json()["ops"]
