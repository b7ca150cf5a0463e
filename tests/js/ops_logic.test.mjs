// Unit tests of web/ops_logic.js under Node's built-in runner: `node --test tests/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  MASK_MODES, NODE_ID, ON_UNSUPPORTED, OP_CHOICES, ROUTE,
  acceptsTensorBias, annotateOps, availability, canFuse, describeStatus, indexReport, optionLabel,
  stripDecoration, unsupportedAction, visibility,
} from "../../web/ops_logic.js";

const fixture = JSON.parse(readFileSync(new URL("./fixtures/ops_cpu.json", import.meta.url), "utf8"));
const CPU_AVAILABLE = ["auto", "sdpa", "sdpa:math"];

test("the constants are the contract's (README, section Nodes)", () => {
  assert.equal(NODE_ID, "SelectXformersAttentionOp");
  assert.equal(ROUTE, "/xformers_ipadapter/ops");
  assert.deepEqual([...OP_CHOICES], [
    "auto", "xformers", "xformers:cutlass", "xformers:flash", "xformers:flash3", "xformers:ck",
    "xformers:triton_splitk", "sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math"]);
  assert.deepEqual([...MASK_MODES], ["multiply output", "attention bias"]);
  assert.deepEqual([...ON_UNSUPPORTED], ["fall back", "error"]);
});

test("indexReport keeps every op of the route, in order, and tolerates bad input", () => {
  const index = indexReport(fixture);
  assert.deepEqual([...index.keys()], [...OP_CHOICES]);
  assert.equal(index.get("sdpa:flash").available, false);
  assert.match(index.get("sdpa:flash").reason, /cuda/);
  for (const bad of [null, undefined, {}, { ops: "x" }, { ops: [null, { name: 3 }] }]) {
    assert.equal(indexReport(bad).size, 0);
  }
});

test("availability and labels follow the report; values are never decorated", () => {
  const index = indexReport(fixture);
  for (const op of OP_CHOICES) {
    const expected = CPU_AVAILABLE.includes(op) ? "available" : "unavailable";
    assert.equal(availability(index, op), expected, op);
    const label = optionLabel(index, op);
    assert.equal(label, expected === "available" ? op : `${op} (unavailable)`);
    assert.equal(stripDecoration(label), op);
  }
  // No report yet: plain labels; a report without the op: "(?)", still stripped back.
  assert.equal(optionLabel(new Map(), "xformers"), "xformers");
  const partial = indexReport({ ops: [{ name: "sdpa", available: true, reason: "" }] });
  assert.equal(availability(partial, "xformers"), "unknown");
  assert.equal(optionLabel(partial, "xformers"), "xformers (?)");
  assert.equal(stripDecoration("xformers (?)"), "xformers");
  assert.equal(stripDecoration("multiply output"), "multiply output");
  assert.equal(stripDecoration(true), true);
});

test("annotateOps lists every choice once with its reason", () => {
  const rows = annotateOps(indexReport(fixture));
  assert.deepEqual(rows.map((r) => r.name), [...OP_CHOICES]);
  for (const row of rows) {
    assert.equal(row.reason === "", row.state === "available", row.name);
    assert.equal(stripDecoration(row.label), row.name);
  }
});

test("on_unsupported in words", () => {
  assert.equal(unsupportedAction("fall back"), "falls back to sdpa");
  assert.equal(unsupportedAction("error"), "stops with an error");
});

// The capabilities come from the route (the fixture is the route's JSON on a CPU machine): an op is
// hidden where the report says it does not apply, never from a table of this file's own.
const NO_BIAS = ["xformers:flash", "xformers:flash3", "sdpa:flash", "sdpa:cudnn"];
const FUSABLE = ["auto", "xformers", "xformers:cutlass", "xformers:flash", "xformers:flash3", "xformers:ck"];

test("mask_mode is shown only for ops the report says take a tensor bias, unless its value is not the default", () => {
  const index = indexReport(fixture);
  for (const op of OP_CHOICES) {
    assert.equal(acceptsTensorBias(index, op), !NO_BIAS.includes(op), op);
    const shown = visibility({ op, mask_mode: "multiply output", fused: false, on_unsupported: "fall back" }, index);
    assert.equal(shown.mask_mode, !NO_BIAS.includes(op), op);
    // a loaded "attention bias" is never hidden, it is shown with a warning
    assert.equal(visibility({ op, mask_mode: "attention bias", fused: false }, index).mask_mode, true, op);
  }
});

test("fused is shown only for ops the report says fuse, unless it is on", () => {
  const index = indexReport(fixture);
  for (const op of OP_CHOICES) {
    assert.equal(canFuse(index, op), FUSABLE.includes(op), op);
    assert.equal(visibility({ op, mask_mode: "multiply output", fused: false }, index).fused, FUSABLE.includes(op), op);
    assert.equal(visibility({ op, mask_mode: "multiply output", fused: true }, index).fused, true, op);
  }
  assert.equal(visibility({ op: "sdpa (unavailable)", mask_mode: "multiply output", fused: false }, index).fused, false);
});

test("capabilities follow the report, not a table kept here", () => {
  // A report that (hypothetically) declares the opposite capabilities for sdpa:math flips what is shown.
  const flipped = structuredClone(fixture);
  const math = flipped.ops.find((o) => o.name === "sdpa:math");
  math.tensor_bias = false;
  math.fused = true;
  const index = indexReport(flipped);
  const shown = visibility({ op: "sdpa:math", mask_mode: "multiply output", fused: false }, index);
  assert.deepEqual(shown, { mask_mode: false, fused: true });
  const status = describeStatus(flipped, { op: "sdpa:math", mask_mode: "attention bias", fused: true, on_unsupported: "fall back" });
  assert.ok(status.lines.some((l) => /attention bias.*sdpa:math does not/.test(l)));
  assert.ok(!status.lines.some((l) => /^fused needs/.test(l)));
});

test("without a report (or without capabilities in it) nothing is hidden", () => {
  for (const index of [new Map(), indexReport({ ops: [{ name: "sdpa:flash", available: true, reason: "" }] })]) {
    assert.equal(acceptsTensorBias(index, "sdpa:flash"), null);
    assert.deepEqual(visibility({ op: "sdpa:flash", mask_mode: "multiply output", fused: false }, index),
      { mask_mode: true, fused: true });
  }
});

test("status: an available op", () => {
  const status = describeStatus(fixture, { op: "sdpa", mask_mode: "attention bias", fused: false, on_unsupported: "error" });
  assert.equal(status.level, "ok");
  assert.deepEqual(status.lines, ["\u2713 sdpa runs here"]);
  assert.match(status.title, /torch 2\./);
});

test("status: auto carries its notes", () => {
  const status = describeStatus(fixture, { op: "auto", mask_mode: "multiply output", fused: false, on_unsupported: "fall back" });
  assert.equal(status.level, "ok");
  assert.equal(status.lines[0], "\u2713 auto runs here");
  assert.match(status.lines[1], /^note: runs PyTorch SDPA where xformers cannot/);
  assert.ok(status.lines[1].length <= 170);
});

test("status: an unavailable op says why and what on_unsupported does", () => {
  const reason = indexReport(fixture).get("sdpa:efficient").reason;
  const fallBack = describeStatus(fixture, { op: "sdpa:efficient", mask_mode: "multiply output", fused: false, on_unsupported: "fall back" });
  assert.equal(fallBack.level, "warn");
  assert.deepEqual(fallBack.lines, ["\u2717 sdpa:efficient cannot run here", `why: ${reason}`,
    "on_unsupported = fall back: falls back to sdpa"]);
  assert.ok(fallBack.title.includes(reason));
  const error = describeStatus(fixture, { op: "sdpa:efficient", mask_mode: "multiply output", fused: false, on_unsupported: "error" });
  assert.equal(error.level, "error");
  assert.equal(error.lines[2], "on_unsupported = error: stops with an error");
});

test("status: long reasons are shortened on the line, complete in the title", () => {
  const reason = indexReport(fixture).get("xformers").reason;
  assert.ok(reason.length > 200);
  const status = describeStatus(fixture, { op: "xformers", mask_mode: "multiply output", fused: false, on_unsupported: "fall back" });
  assert.equal(status.lines[0], "\u2717 xformers cannot run here");
  assert.ok(status.lines[1].endsWith("\u2026"));
  assert.ok(status.lines[1].length < 200);
  assert.ok(status.title.includes(reason));
});

test("status: mask and fused settings that do not apply are warned about", () => {
  const status = describeStatus(fixture, { op: "sdpa:flash", mask_mode: "attention bias", fused: true, on_unsupported: "fall back" });
  assert.equal(status.level, "warn");
  assert.equal(status.lines.length, 5);
  assert.match(status.lines[3], /attention bias.*sdpa:flash does not/);
  assert.match(status.lines[4], /^fused needs an xformers op/);
});

test("status before the report arrives and after the route failed", () => {
  const values = { op: "xformers", mask_mode: "multiply output", fused: false, on_unsupported: "fall back" };
  const loading = describeStatus(null, values);
  assert.equal(loading.level, "unknown");
  assert.match(loading.lines[0], /checking operators/);
  const failed = describeStatus(null, values, "HTTP 500");
  assert.equal(failed.level, "unknown");
  assert.match(failed.lines[0], /operator report failed: HTTP 500/);
});
