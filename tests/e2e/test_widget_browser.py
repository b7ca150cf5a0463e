"""The "Select Attention Op" widget in a real browser on the real frontend.

A real ComfyUI server (the shared ``comfy_server`` fixture: --cpu, loopback, this pack as
custom_nodes/xformers_ipadapter) serves the frontend from ``comfyui-frontend-package``; headless Debian
Chromium (``/usr/bin/chromium``, or ``XIPA_CHROMIUM``) is driven by Playwright for Python. Nothing downloads
a browser, and every request that does not go to the server is aborted.

Checked, in the classic LiteGraph canvas and in the Vue node renderer (Nodes 2.0):
- the op labels and the status line agree with GET /xformers_ipadapter/ops;
- picking an op (through the real drop-down) shows why it cannot run and what on_unsupported does;
- mask_mode / fused are shown only where they apply, also after a workflow is loaded;
- the workflow's widgets_values and ``app.graphToPrompt()``'s inputs are exactly the contract strings.
Screenshots go to tests/artifacts/ (git-ignored).
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from processors.backends import MASK_MODES, ON_UNSUPPORTED, OP_CHOICES

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("XIPA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NODE_ID = "SelectXformersAttentionOp"
EXTENSION = "xformers_ipadapter.attentionOp"
ROUTE = "/xformers_ipadapter/ops"
INPUTS = ("op", "mask_mode", "fused", "on_unsupported")

# The visibility rule (docs/widget.md), restated here on purpose: the test is the spec.
TENSOR_BIAS_OPS = {"auto", "xformers", "xformers:cutlass", "xformers:ck", "xformers:triton_splitk",
                   "sdpa", "sdpa:efficient", "sdpa:math"}
FUSED_OPS = {"auto", "xformers", "xformers:cutlass", "xformers:flash", "xformers:flash3", "xformers:ck"}

# Page-side helpers, installed before the app loads (test code only; the extension defines no globals).
HELPERS = """
window.__xipa = {
  node(id) { return app.graph.getNodeById(id); },
  widget(id, name) { return app.graph.getNodeById(id).widgets.find((w) => w.name === name); },
  add(x, y, values = {}) {
    const node = LiteGraph.createNode('%(node)s');
    node.pos = [x, y];
    app.graph.add(node);
    for (const [name, value] of Object.entries(values)) window.__xipa.set(node.id, name, value);
    return node.id;
  },
  set(id, name, value) {           // what a user's pick does: value, then the widget's callback
    const node = app.graph.getNodeById(id);
    const w = node.widgets.find((w) => w.name === name);
    w.value = value;
    w.callback?.(value, app.canvas, node);
  },
  state(id) {
    const node = app.graph.getNodeById(id);
    const get = (name) => node.widgets.find((w) => w.name === name);
    return {
      values: Object.fromEntries(%(inputs)s.map((n) => [n, get(n).value])),
      labels: Object.fromEntries(get('op').options.values.map((v) => [v, get('op').options.getOptionLabel(v)])),
      hidden: { mask_mode: Boolean(get('mask_mode').hidden), fused: Boolean(get('fused').hidden) },
      status: get('op_status').statusLines,
      level: get('op_status').element.dataset.level,
      statusText: get('op_status').element.innerText,
      clipped: get('op_status').element.scrollHeight > get('op_status').element.clientHeight + 1,
      tooltip: get('op').tooltip,
      widgetNames: node.widgets.map((w) => w.name),
      layout: node.widgets.filter((w) => !w.hidden).map((w) => ({ name: w.name, y: w.y, h: w.computedHeight })),
      height: node.size[1],
    };
  },
};
""" % {"node": NODE_ID, "inputs": list(INPUTS)}


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise RuntimeError("the browser tests need Playwright for Python: "
                           ".venv/bin/pip install -r requirements-browser.txt") from exc
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"the browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium "
                           "(or set XIPA_CHROMIUM)")
    with sync_playwright() as api:
        yield api


@pytest.fixture(scope="module")
def ops_report(comfy_server) -> dict:
    r = comfy_server.get(ROUTE)
    r.raise_for_status()
    return r.json()


@contextlib.contextmanager
def editor(playwright_api, server, *, vue: bool, ops: dict | None = None):
    """A fresh browser profile on the server's frontend, with the Vue node renderer on or off; `ops` replaces
    the ops route's JSON (the widget must follow whatever the route says)."""
    r = server.http.post(server.base_url + "/settings", timeout=30,
                         json={"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": vue})
    r.raise_for_status()
    profile = tempfile.mkdtemp(prefix="xipa-chromium-")
    context = playwright_api.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 800}, device_scale_factor=1)
    problems: list[str] = []
    try:
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.base_url)
                      else route.abort())
        if ops is not None:  # only the route itself (the pack's own JS lives under /extensions/xformers_ipadapter/)
            context.route(lambda url: urlsplit(url).path in (ROUTE, "/api" + ROUTE),
                          lambda route: route.fulfill(json=ops, headers={"Cache-Control": "no-store"}))
        context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true');"
                                "localStorage.setItem('comfy.vueNodesMigration.dismissed', 'true');" + HELPERS)
        page = context.pages[0] if context.pages else context.new_page()
        page.on("pageerror", lambda err: problems.append(f"pageerror: {err}\n{err.stack or ''}"))
        page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
                if msg.type in ("error", "warning") else None)
        page.goto(server.base_url)
        page.wait_for_function(
            f"""() => window.app?.graph && window.LiteGraph?.registered_node_types?.['{NODE_ID}']
                && app.extensions?.some((e) => e.name === '{EXTENSION}')""", timeout=90_000)
        assert page.evaluate("() => Boolean(app.extensionManager.setting.get('Comfy.VueNodes.Enabled'))") is vue
        page.evaluate("() => app.graph.clear()")
        yield page
        ours = [p for p in problems if "xformers_ipadapter" in p or "attention_op_widget" in p or "ops_logic" in p]
        assert not ours, "\n".join(ours)
    finally:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


def add_node(page, x: int, y: int, **values) -> int:
    node_id = page.evaluate("([x, y, values]) => window.__xipa.add(x, y, values)", [x, y, values])
    page.wait_for_function("(id) => !window.__xipa.state(id).status[0].includes('checking')", arg=node_id)
    return node_id


def set_widget(page, node_id: int, name: str, value) -> dict:
    page.evaluate("([id, name, value]) => window.__xipa.set(id, name, value)", [node_id, name, value])
    return state(page, node_id)


def state(page, node_id: int) -> dict:
    return page.evaluate("(id) => window.__xipa.state(id)", node_id)


def expected_status(report: dict, op: str, on_unsupported: str) -> list[str]:
    entry = next(o for o in report["ops"] if o["name"] == op)
    if entry["available"]:
        return [f"\u2713 {op} runs here"]
    action = "stops with an error" if on_unsupported == "error" else "falls back to sdpa"
    return [f"\u2717 {op} cannot run here", "why: ", f"on_unsupported = {on_unsupported}: {action}"]


def check_status(st: dict, report: dict, op: str, on_unsupported: str) -> None:
    entry = next(o for o in report["ops"] if o["name"] == op)
    lines = st["status"]
    want = expected_status(report, op, on_unsupported)
    assert lines[0] == want[0], (op, lines)
    if entry["available"]:
        assert st["level"] == "ok", (op, st)
        assert st["labels"][op] == op
        if entry["notes"]:
            assert lines[1].startswith("note: " + entry["notes"][:40]), lines
    else:
        assert st["labels"][op] == f"{op} (unavailable)"
        reason_shown = lines[1][len("why: "):].rstrip("\u2026")
        assert lines[1].startswith("why: ") and entry["reason"].startswith(reason_shown), (op, lines)
        assert entry["reason"] in st["tooltip"], st["tooltip"]
        assert lines[2] == want[2], lines
        assert st["level"] == ("error" if on_unsupported == "error" else "warn")


def check_layout(page, node_id: int) -> None:
    """Classic canvas: the visible widgets follow each other without gaps and the status fits in the node."""
    page.evaluate("() => new Promise((r) => { app.canvas.draw(true, true); requestAnimationFrame(r); })")
    st = state(page, node_id)
    rows = st["layout"]
    for above, below in zip(rows, rows[1:]):
        assert abs(above["y"] + above["h"] - below["y"]) < 1, rows
    status = rows[-1]
    assert status["name"] == "op_status"
    assert status["h"] >= 14 + 15 * len(st["status"]) - 1, (st["status"], rows)
    assert not st["clipped"], st
    assert status["y"] + status["h"] <= st["height"] + 1, (rows, st["height"])


def check_exports(page, node_values: dict[int, dict]) -> None:
    """Workflow widgets_values and API prompt inputs are exactly the contract's strings, nothing more."""
    exported = page.evaluate("""async () => {
        const { output, workflow } = await app.graphToPrompt();
        return { output, nodes: workflow.nodes.map((n) => ({ id: n.id, type: n.type, widgets_values: n.widgets_values })) };
    }""")
    for node_id, values in node_values.items():
        inputs = exported["output"][str(node_id)]
        assert inputs["class_type"] == NODE_ID
        assert inputs["inputs"] == values, inputs  # no op_status, no decoration
        assert values["op"] in OP_CHOICES and values["mask_mode"] in MASK_MODES
        assert values["on_unsupported"] in ON_UNSUPPORTED and isinstance(values["fused"], bool)
        node = next(n for n in exported["nodes"] if n["id"] == node_id)
        assert node["widgets_values"] == [values[name] for name in INPUTS], node


def screenshot(page, name: str, node_ids: list[int]) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    box = page.evaluate("""(ids) => {
        const nodes = ids.map((id) => app.graph.getNodeById(id));
        const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect();
        const title = LiteGraph.NODE_TITLE_HEIGHT;
        const xs = nodes.flatMap((n) => [n.pos[0], n.pos[0] + n.size[0]]);
        const ys = nodes.flatMap((n) => [n.pos[1] - title, n.pos[1] + n.size[1]]);
        const [x0, y0] = ds.convertOffsetToCanvas([Math.min(...xs), Math.min(...ys)]);
        const [x1, y1] = ds.convertOffsetToCanvas([Math.max(...xs), Math.max(...ys)]);
        return { x: rect.left + x0 - 20, y: rect.top + y0 - 20, width: x1 - x0 + 40, height: y1 - y0 + 40 };
    }""", node_ids)
    page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.screenshot(path=str(path), clip=box)
    return path


def test_classic_canvas(playwright_api, comfy_server, ops_report):
    with editor(playwright_api, comfy_server, vue=False) as page:
        page.evaluate("() => { app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; }")
        node = add_node(page, 120, 160)
        st = state(page, node)
        assert st["widgetNames"] == [*INPUTS, "op_status"]
        assert st["values"] == {"op": "auto", "mask_mode": "multiply output", "fused": False,
                                "on_unsupported": "fall back"}
        # every op: label, status and visibility against the route's JSON
        for on_unsupported in ON_UNSUPPORTED:
            set_widget(page, node, "on_unsupported", on_unsupported)
            for op in OP_CHOICES:
                st = set_widget(page, node, "op", op)
                assert st["values"]["op"] == op
                check_status(st, ops_report, op, on_unsupported)
                assert st["hidden"] == {"mask_mode": op not in TENSOR_BIAS_OPS, "fused": op not in FUSED_OPS}, op
                check_layout(page, node)
        set_widget(page, node, "on_unsupported", "fall back")

        # a value that does not apply is shown, with a warning, never hidden
        set_widget(page, node, "op", "sdpa")
        set_widget(page, node, "mask_mode", "attention bias")
        st = set_widget(page, node, "op", "sdpa:flash")
        assert st["hidden"]["mask_mode"] is False
        assert any("attention bias" in line and "sdpa:flash does not" in line for line in st["status"]), st
        st = set_widget(page, node, "mask_mode", "multiply output")
        assert st["hidden"]["mask_mode"] is True

        # the real drop-down: labels mark unavailable ops; picking one stores the plain combo string
        set_widget(page, node, "op", "auto")
        point = page.evaluate("""(id) => {
            const node = app.graph.getNodeById(id), w = window.__xipa.widget(id, 'op');
            const [x, y] = app.canvas.ds.convertOffsetToCanvas(
                [node.pos[0] + node.size[0] / 2, node.pos[1] + w.y + LiteGraph.NODE_WIDGET_HEIGHT / 2]);
            const rect = app.canvas.canvas.getBoundingClientRect();
            return [rect.left + x, rect.top + y];
        }""", node)
        page.mouse.click(*point)
        menu = page.locator(".litecontextmenu .litemenu-entry")
        menu.first.wait_for()
        labels = menu.all_inner_texts()
        assert labels == [st["labels"][op] for op in OP_CHOICES], labels
        unavailable = [o["name"] for o in ops_report["ops"] if not o["available"]]
        assert unavailable, "CPU runs should have unavailable ops"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "select_attention_op_menu.png"))
        pick = "xformers:flash" if "xformers:flash" in unavailable else unavailable[0]
        menu.filter(has_text=f"{pick} (unavailable)").first.click()
        st = state(page, node)
        assert st["values"]["op"] == pick
        check_status(st, ops_report, pick, "fall back")

        # a second node, then the exports
        other = add_node(page, 460, 160, op="sdpa", mask_mode="attention bias", fused=True, on_unsupported="error")
        values = {node: state(page, node)["values"], other: state(page, other)["values"]}
        assert values[other] == {"op": "sdpa", "mask_mode": "attention bias", "fused": True,
                                 "on_unsupported": "error"}
        check_exports(page, values)
        check_layout(page, node)
        check_layout(page, other)
        shot = screenshot(page, "select_attention_op_canvas.png", [node, other])
        assert shot.stat().st_size > 5_000

        # load a workflow: visibility and status are re-applied, values are kept as saved
        workflow = page.evaluate("() => app.graph.serialize()")
        loaded = {"sdpa:flash|multiply output": ["sdpa:flash", "multiply output", False, "fall back"],
                  "sdpa:flash|attention bias": ["sdpa:flash", "attention bias", False, "error"]}
        saved_nodes = [n for n in workflow["nodes"] if n["type"] == NODE_ID]
        for n, wv in zip(saved_nodes, loaded.values()):
            n["widgets_values"] = wv
        page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
        ids = [n["id"] for n in saved_nodes]
        page.wait_for_function("(ids) => ids.every((id) => window.__xipa.state(id).status[0] "
                               "&& !window.__xipa.state(id).status[0].includes('checking'))", arg=ids)
        first, second = (state(page, i) for i in ids)
        assert first["hidden"] == {"mask_mode": True, "fused": True}
        check_status(first, ops_report, "sdpa:flash", "fall back")
        assert second["hidden"] == {"mask_mode": False, "fused": True}
        check_status(second, ops_report, "sdpa:flash", "error")
        assert any("attention bias" in line for line in second["status"])
        for i in ids:
            check_layout(page, i)
        check_exports(page, {i: dict(zip(INPUTS, wv)) for i, wv in zip(ids, loaded.values())})


def test_vue_node_renderer(playwright_api, comfy_server, ops_report):
    with editor(playwright_api, comfy_server, vue=True) as page:
        node = add_node(page, 120, 160)
        root = page.locator(f'[data-node-id="{node}"]')
        root.wait_for()
        status = root.locator(".xformers-ipadapter-op-status")
        mask_row = root.locator(".lg-node-widget").filter(has=page.locator('[aria-label="mask_mode"]'))
        fused_row = root.locator(".lg-node-widget").filter(has=page.locator('[aria-label="fused"]'))
        assert status.is_visible() and mask_row.is_visible() and fused_row.is_visible()
        assert status.inner_text().splitlines()[0] == "\u2713 auto runs here"

        # pick an op through the Vue drop-down (PrimeVue Select)
        def pick(name: str, value: str) -> None:
            root.locator(f'[aria-label="{name}"]').click()
            page.get_by_role("option", name=value, exact=True).click()
            page.wait_for_function("([id, n, v]) => window.__xipa.state(id).values[n] === v", arg=[node, name, value])

        pick("op", "sdpa:flash")
        st = state(page, node)
        check_status(st, ops_report, "sdpa:flash", "fall back")
        page.wait_for_function("(el) => el.offsetParent === null", arg=mask_row.element_handle())
        assert not mask_row.is_visible() and not fused_row.is_visible()
        assert status.inner_text().splitlines() == st["status"]
        pick("on_unsupported", "error")
        assert status.inner_text().splitlines()[-1] == "on_unsupported = error: stops with an error"
        pick("op", "xformers:cutlass")
        assert mask_row.is_visible() and fused_row.is_visible()
        pick("op", "sdpa")
        assert mask_row.is_visible() and not fused_row.is_visible()
        pick("mask_mode", "attention bias")
        check_exports(page, {node: {"op": "sdpa", "mask_mode": "attention bias", "fused": False,
                                    "on_unsupported": "error"}})
        page.locator(".p-select-overlay").wait_for(state="detached")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        root.screenshot(path=str(ARTIFACTS / "select_attention_op_vue.png"))

        # after loading a workflow the Vue rows follow the loaded values
        workflow = page.evaluate("() => app.graph.serialize()")
        saved = next(n for n in workflow["nodes"] if n["type"] == NODE_ID)
        saved["widgets_values"] = ["xformers:flash", "multiply output", False, "fall back"]
        page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
        root = page.locator(f'[data-node-id="{saved["id"]}"]')
        root.wait_for()
        mask_row = root.locator(".lg-node-widget").filter(has=page.locator('[aria-label="mask_mode"]'))
        fused_row = root.locator(".lg-node-widget").filter(has=page.locator('[aria-label="fused"]'))
        page.wait_for_function("(id) => window.__xipa.state(id).status[0]?.includes('xformers:flash')",
                               arg=saved["id"])
        page.wait_for_function("(el) => el.offsetParent === null", arg=mask_row.element_handle())
        assert not mask_row.is_visible() and fused_row.is_visible()
        check_exports(page, {saved["id"]: dict(zip(INPUTS, saved["widgets_values"]))})


def test_capabilities_come_from_the_route(playwright_api, comfy_server, ops_report):
    """The widget keeps no table of its own: flip sdpa:math's declared capabilities in the route's JSON and
    what it shows flips with them."""
    flipped = copy.deepcopy(ops_report)
    math = next(o for o in flipped["ops"] if o["name"] == "sdpa:math")
    assert (math["tensor_bias"], math["fused"]) == (True, False)  # what the engine declares
    math["tensor_bias"], math["fused"] = False, True
    with editor(playwright_api, comfy_server, vue=False, ops=flipped) as page:
        node = add_node(page, 120, 160, op="sdpa:math")
        assert state(page, node)["hidden"] == {"mask_mode": True, "fused": False}
        st = set_widget(page, node, "op", "sdpa")
        assert st["hidden"] == {"mask_mode": False, "fused": True}
