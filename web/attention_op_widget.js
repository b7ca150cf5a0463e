// "Select Attention Op" in the graph editor: which attention operators can run on this machine and why the
// others cannot, what on_unsupported will do, and only the mask options that apply to the chosen op.
//
// - The op combo's labels (classic canvas: the value and the drop-down list) mark unavailable ops; the
//   values stay the contract's strings (the label is display-only, options.getOptionLabel).
// - A small DOM status widget "op_status" below the node's widgets says whether the op runs here, the
//   reason if not, and what on_unsupported does; its tooltip has the full text. DOM widgets render in the
//   classic canvas and in the Vue node renderer. It is UI-only: serialize = false (workflow) and
//   options.serialize = false (API prompt), and it is the node's last widget, so widgets_values keeps
//   exactly the four inputs in order.
// - mask_mode and fused are hidden where they do not apply (rule: ops_logic.js visibility()), re-applied
//   after every change and after a workflow is loaded. Hidden widgets still serialise their value.
// The pure logic lives in ops_logic.js (unit-tested under Node); this file only wires it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { NODE_ID, ROUTE, describeStatus, indexReport, optionLabel, stripDecoration, visibility } from "./ops_logic.js";

const EXTENSION_NAME = "xformers_ipadapter.attentionOp";
const STATUS_WIDGET = "op_status";
const CHOICE_WIDGETS = ["op", "mask_mode", "on_unsupported"];
const WATCHED_WIDGETS = ["op", "mask_mode", "fused", "on_unsupported"];
const LINE_HEIGHT = 15;
const MARGIN = 4;
const COLORS = { ok: "#7fcf8a", warn: "#e8b04a", error: "#ef6b6b", unknown: "#9aa4b2" };

// The operator report, fetched once per page (the server caches it too; ?refresh=1 recomputes it there).
const state = { report: null, error: "", index: new Map(), pending: null };
const trackedNodes = new Set();

function loadReport() {
  if (state.pending) return state.pending;
  state.pending = api
    .fetchApi(ROUTE, { cache: "no-store" })
    .then((response) => {
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      return response.json();
    })
    .then((report) => {
      state.report = report;
      state.error = "";
      state.index = indexReport(report);
    })
    .catch((err) => {
      state.report = null;
      state.error = String(err && err.message ? err.message : err);
      state.index = new Map();
      console.warn(`[${EXTENSION_NAME}] ${ROUTE} failed: ${state.error}`);
    })
    .then(() => {
      for (const node of trackedNodes) refreshNode(node);
    });
  return state.pending;
}

function isVueRenderer() {
  try {
    return Boolean(app.extensionManager?.setting?.get("Comfy.VueNodes.Enabled"));
  } catch {
    return false;
  }
}

function findWidget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function isLinked(node, name) {
  const input = node.inputs?.find((slot) => slot.widget?.name === name);
  return input != null && input.link != null;
}

function currentValues(node) {
  const values = {};
  for (const name of WATCHED_WIDGETS) values[name] = findWidget(node, name)?.value;
  return values;
}

// Frontend 1.32 skips hidden widgets when it draws and sizes a node, but still gives them a row when it
// lays the widgets out; a zero size (the row's 4 px gap included) closes that gap. Removed when shown.
const ZERO_SIZE = () => [0, -4];

/** Hide or show a widget on the classic canvas; returns true if that changed anything. */
function setHidden(widget, hidden) {
  if (!widget) return false;
  const changed = Boolean(widget.hidden) !== hidden;
  widget.hidden = hidden; // LGraphNode.isWidgetVisible: not drawn, not counted in the node's size
  if (hidden) widget.computeSize = ZERO_SIZE;
  else if (widget.computeSize === ZERO_SIZE) delete widget.computeSize;
  return changed;
}

// The Vue node renderer (Nodes 2.0) takes a copy of each widget's options when it mounts a node
// (frontend 1.32), so neither widget.hidden nor a later options.hidden reaches it, and options.hidden at
// mount time would drop the row for good. There the rows stay mounted and are shown or hidden by style.
function vueWidgetRow(node, name) {
  const root = document.querySelector(`[data-node-id="${CSS.escape(String(node.id))}"]`);
  if (!root) return null;
  return root.querySelector(`[data-widget-name="${CSS.escape(name)}"]`)
    ?? root.querySelector(`[aria-label="${CSS.escape(name)}"]`)?.closest(".lg-node-widget")
    ?? null;
}

// The latest visibility request per node: a retry waiting for the Vue node to mount never overrides a newer one.
const vueRequests = new WeakMap();

function applyVueVisibility(node, hiddenByName, framesLeft = 30) {
  if (!trackedNodes.has(node)) return;
  vueRequests.set(node, hiddenByName);
  for (const [name, hidden] of Object.entries(hiddenByName)) {
    const row = vueWidgetRow(node, name);
    if (!row) {
      if (framesLeft > 0) {
        requestAnimationFrame(() => {
          if (vueRequests.get(node) === hiddenByName) applyVueVisibility(node, hiddenByName, framesLeft - 1);
        });
      }
      return;
    }
    row.style.display = hidden ? "none" : "";
  }
}

function renderStatus(node, status) {
  const widget = findWidget(node, STATUS_WIDGET);
  if (!widget) return false;
  const el = widget.element;
  const lineCount = Math.max(1, status.lines.length);
  const changed = el.dataset.lines !== String(lineCount);
  el.replaceChildren(
    ...status.lines.map((text) => {
      const line = document.createElement("div");
      line.textContent = text;
      line.style.cssText = "overflow:hidden;text-overflow:ellipsis;white-space:nowrap;";
      return line;
    }),
  );
  el.dataset.level = status.level;
  el.dataset.lines = String(lineCount);
  el.title = status.title;
  el.style.color = COLORS[status.level] ?? COLORS.unknown;
  widget.statusLines = status.lines; // read by the browser test
  return changed;
}

/** Re-apply labels, visibility and status from the node's current values. */
function refreshNode(node) {
  if (!node.widgets) return;
  // A decorated value must never reach a prompt: turn any label back into the combo string.
  for (const name of CHOICE_WIDGETS) {
    const widget = findWidget(node, name);
    if (widget && typeof widget.value === "string") {
      const clean = stripDecoration(widget.value);
      if (clean !== widget.value) widget.value = clean;
    }
  }
  const values = currentValues(node);
  const visible = visibility(values, state.index);
  let layoutChanged = false;
  const hiddenByName = {};
  for (const name of ["mask_mode", "fused"]) {
    hiddenByName[name] = !visible[name] && !isLinked(node, name);
    layoutChanged = setHidden(findWidget(node, name), hiddenByName[name]) || layoutChanged;
  }
  if (isVueRenderer()) applyVueVisibility(node, hiddenByName);
  const status = describeStatus(state.report, values, state.error);
  layoutChanged = renderStatus(node, status) || layoutChanged;

  const opWidget = findWidget(node, "op");
  if (opWidget) {
    if (opWidget.baseTooltip === undefined) opWidget.baseTooltip = opWidget.tooltip ?? "";
    opWidget.tooltip = [opWidget.baseTooltip, status.title].filter(Boolean).join("\n\n");
  }
  if (layoutChanged) {
    const [minWidth, minHeight] = node.computeSize();
    node.setSize([Math.max(node.size[0], minWidth), minHeight]);
  }
  node.setDirtyCanvas?.(true, true);
}

function statusHeight(el) {
  return 2 * MARGIN + 6 + LINE_HEIGHT * Number(el.dataset.lines || 1);
}

function chainCallback(widget, after) {
  const original = widget.callback;
  widget.callback = function (...args) {
    const result = original?.apply(this, args);
    after();
    return result;
  };
}

function setupNode(node) {
  if (trackedNodes.has(node)) return;
  const opWidget = findWidget(node, "op");
  if (!opWidget) return;
  trackedNodes.add(node);

  // Display-only labels (classic canvas combo and, on newer frontends, the Vue drop-down).
  opWidget.options = opWidget.options ?? {};
  opWidget.options.getOptionLabel = (value) => (value == null ? "" : optionLabel(state.index, value));

  for (const name of WATCHED_WIDGETS) {
    const widget = findWidget(node, name);
    if (widget) chainCallback(widget, () => refreshNode(node));
  }

  const el = document.createElement("div");
  el.className = "xformers-ipadapter-op-status";
  // contain: inline-size keeps long lines from widening the node (they end in an ellipsis instead).
  el.style.cssText = `font: 11px/${LINE_HEIGHT}px sans-serif; padding: 2px 4px; box-sizing: border-box; ` +
    "width: 100%; contain: inline-size; overflow: hidden; pointer-events: auto; user-select: text;";
  const status = node.addDOMWidget(STATUS_WIDGET, "xformers_ipadapter_status", el, {
    serialize: false, // not in the API prompt
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    margin: MARGIN, // the canvas places the element MARGIN px inside its row on every side
    getMinHeight: () => statusHeight(el),
    getMaxHeight: () => statusHeight(el),
  });
  status.serialize = false; // not in the workflow's widgets_values

  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const result = onConfigure?.apply(this, args);
    refreshNode(this);
    return result;
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    trackedNodes.delete(this);
    return onRemoved?.apply(this, args);
  };
  refreshNode(node);
}

function isOurNode(node) {
  return (node?.comfyClass ?? node?.type) === NODE_ID;
}

app.registerExtension({
  name: EXTENSION_NAME,
  setup() {
    loadReport();
  },
  nodeCreated(node) {
    if (!isOurNode(node)) return;
    loadReport();
    setupNode(node);
  },
  loadedGraphNode(node) {
    if (!isOurNode(node)) return;
    setupNode(node);
    refreshNode(node);
  },
  afterConfigureGraph() {
    for (const node of trackedNodes) refreshNode(node);
  },
});
