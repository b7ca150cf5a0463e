// Pure logic of the "Select Attention Op" widget: no DOM, no ComfyUI imports, so it runs under Node's test
// runner (tests/js/). The wiring into the graph editor is attention_op_widget.js.
//
// Input: the JSON of GET /xformers_ipadapter/ops (docs/widget.md):
//   { versions: { torch, xformers }, device, xformers_problem,
//     ops: [{ name, available, reason, notes, tensor_bias, fused }] }
// tensor_bias and fused are each operator's declared capabilities, served by the engine's registry
// (processors/backends.py OPERATORS): this file keeps no copy of them.
// Output: what the node shows. Widget values are never decorated: labels are display-only, and
// stripDecoration() turns any label back into the contract's combo string.

export const NODE_ID = "SelectXformersAttentionOp";
export const ROUTE = "/xformers_ipadapter/ops";

// The contract's combo strings, in order (processors/backends.py: OP_CHOICES, MASK_MODES, ON_UNSUPPORTED).
export const OP_CHOICES = Object.freeze([
  "auto", "xformers", "xformers:cutlass", "xformers:flash", "xformers:flash3", "xformers:ck",
  "xformers:triton_splitk", "sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math",
]);
export const MASK_MODES = Object.freeze(["multiply output", "attention bias"]);
export const ON_UNSUPPORTED = Object.freeze(["fall back", "error"]);
export const DEFAULT_MASK_MODE = "multiply output";
export const FALLBACK_OP = "sdpa";

const UNAVAILABLE_SUFFIX = " (unavailable)";
const UNKNOWN_SUFFIX = " (?)";
const REASON_SHORT = 160;

/** The combo string behind a value that may carry a display label (" (unavailable)"). */
export function stripDecoration(value) {
  if (typeof value !== "string") return value;
  for (const suffix of [UNAVAILABLE_SUFFIX, UNKNOWN_SUFFIX]) {
    if (value.endsWith(suffix)) return value.slice(0, -suffix.length);
  }
  return value;
}

/**
 * The route's JSON as a Map name -> {name, available, reason, notes, tensorBias, fused}, in the route's order.
 * Tolerant: a missing or malformed report gives an empty Map (availability "unknown"); a capability the
 * report does not state is null (unknown).
 */
export function indexReport(report) {
  const index = new Map();
  const ops = report && Array.isArray(report.ops) ? report.ops : [];
  for (const op of ops) {
    if (!op || typeof op.name !== "string") continue;
    index.set(op.name, {
      name: op.name,
      available: op.available === true,
      reason: typeof op.reason === "string" ? op.reason : "",
      notes: typeof op.notes === "string" ? op.notes : "",
      tensorBias: typeof op.tensor_bias === "boolean" ? op.tensor_bias : null,
      fused: typeof op.fused === "boolean" ? op.fused : null,
    });
  }
  return index;
}

/** "available", "unavailable" or "unknown" (no report, or the op is not in it). */
export function availability(index, op) {
  const entry = index && index.get(stripDecoration(op));
  if (!entry) return "unknown";
  return entry.available ? "available" : "unavailable";
}

/** The label shown for a combo value (values themselves stay the contract strings). */
export function optionLabel(index, op) {
  const name = stripDecoration(op);
  if (!index || index.size === 0) return name;
  const state = availability(index, name);
  if (state === "unavailable") return name + UNAVAILABLE_SUFFIX;
  if (state === "unknown") return name + UNKNOWN_SUFFIX;
  return name;
}

/** Every op choice with its label, availability and reason, in the widget's order. */
export function annotateOps(index, choices = OP_CHOICES) {
  return choices.map((op) => {
    const entry = index && index.get(op);
    return {
      name: op,
      label: optionLabel(index, op),
      state: availability(index, op),
      reason: entry ? entry.reason : "",
      notes: entry ? entry.notes : "",
    };
  });
}

/** What on_unsupported does when the op cannot run the inputs, in words. */
export function unsupportedAction(onUnsupported) {
  return stripDecoration(onUnsupported) === "error" ? "stops with an error" : `falls back to ${FALLBACK_OP}`;
}

/** Whether the op takes an additive tensor bias (mask_mode "attention bias"): true, false, or null (unknown). */
export function acceptsTensorBias(index, op) {
  const entry = index && index.get(stripDecoration(op));
  return entry ? entry.tensorBias : null;
}

/** Whether the op can run fused (block-diagonal) calls: true, false, or null (unknown). */
export function canFuse(index, op) {
  const entry = index && index.get(stripDecoration(op));
  return entry ? entry.fused : null;
}

/**
 * Which optional widgets are shown. Rule: an option is hidden only where the report says it does not apply
 * to the selected op (unknown: shown), and a non-default value is never hidden (a loaded workflow that asks
 * for something the op cannot do shows it, with a warning in the status, instead of hiding a value that
 * still reaches the backend).
 *   mask_mode: shown unless the op takes no tensor attention bias, or when mask_mode is not "multiply output".
 *   fused:     shown unless the op cannot run block-diagonal fused calls, or when fused is true.
 */
export function visibility(values, index) {
  const op = stripDecoration(values.op);
  const maskMode = stripDecoration(values.mask_mode);
  return {
    mask_mode: acceptsTensorBias(index, op) !== false || (maskMode !== undefined && maskMode !== DEFAULT_MASK_MODE),
    fused: canFuse(index, op) !== false || values.fused === true,
  };
}

function shorten(text, limit = REASON_SHORT) {
  const flat = String(text).replace(/\s+/g, " ").trim();
  return flat.length <= limit ? flat : flat.slice(0, limit - 1).trimEnd() + "\u2026";
}

/**
 * The status shown under the widgets: { level, lines, title }.
 *   level: "ok" | "warn" | "error" | "unknown"; lines: short text lines; title: the full text (tooltip).
 * `report` is the route JSON, or null while it loads; `error` is a message when the route failed.
 */
export function describeStatus(report, values, error = "") {
  const op = stripDecoration(values.op);
  const onUnsupported = stripDecoration(values.on_unsupported);
  const maskMode = stripDecoration(values.mask_mode);
  const index = indexReport(report);
  const lines = [];
  const full = [];
  let level = "ok";

  const state = availability(index, op);
  if (state === "unknown") {
    level = "unknown";
    let why = "checking operators\u2026";
    if (error) why = `operator report failed: ${error}`;
    else if (report) why = `${op} is not in the operator report`;
    lines.push(`? ${op}: availability unknown (${shorten(why, 80)})`);
    full.push(`${op}: availability unknown (${why})`);
  } else if (state === "available") {
    const entry = index.get(op);
    lines.push(`\u2713 ${op} runs here`);
    full.push(`${op} runs on this machine (${report.device || "?"}).`);
    if (entry.notes) {
      lines.push(`note: ${shorten(entry.notes)}`);
      full.push(`Note: ${entry.notes}`);
    }
  } else {
    level = onUnsupported === "error" ? "error" : "warn";
    const entry = index.get(op);
    lines.push(`\u2717 ${op} cannot run here`);
    lines.push(`why: ${shorten(entry.reason)}`);
    lines.push(`on_unsupported = ${onUnsupported}: ${unsupportedAction(onUnsupported)}`);
    full.push(`${op} cannot run on this machine (${report.device || "?"}): ${entry.reason}`);
    full.push(`on_unsupported = ${onUnsupported}: the node ${unsupportedAction(onUnsupported)}.`);
  }

  if (maskMode === "attention bias" && acceptsTensorBias(index, op) === false) {
    if (level === "ok" || level === "unknown") level = "warn";
    const text = `mask_mode "attention bias" needs an op that takes a tensor bias; ${op} does not ` +
      `(with a mask connected it ${unsupportedAction(onUnsupported)})`;
    lines.push(text);
    full.push(text + ".");
  }
  if (values.fused === true && canFuse(index, op) === false) {
    if (level === "ok" || level === "unknown") level = "warn";
    const text = `fused needs an xformers op with block-diagonal masks; ${op} ` +
      (onUnsupported === "error" ? "cannot fuse (the node stops with an error)" : "runs separate calls");
    lines.push(text);
    full.push(text + ".");
  }
  const versions = report && report.versions ? report.versions : null;
  if (versions) {
    full.push(`torch ${versions.torch}, xformers ${versions.xformers ?? "not installed"}` +
      (report.xformers_problem ? ` (${report.xformers_problem})` : ""));
  }
  return { level, lines, title: full.join("\n") };
}
