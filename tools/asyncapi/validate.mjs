// Validates an AsyncAPI document with the AsyncAPI project's own parser (@asyncapi/parser):
// the 3.0 JSON Schema of the spec, $ref resolution, the AMQP bindings' schemas and the parser's
// semantic rules. Usage: node validate.mjs FILE. Prints one JSON line per diagnostic and a last
// line {"errors": N, "warnings": N, "messages": [...]}; exits 1 when there is an error.
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const path = process.argv[2];
if (!path) {
  console.error("usage: node validate.mjs FILE");
  process.exit(2);
}
const parser = new Parser();
const { document, diagnostics } = await parser.parse(await readFile(path, "utf8"), {
  source: path,
});
const severity = ["error", "warning", "information", "hint"];
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: severity[d.severity], code: d.code, message: d.message, path: d.path.join("/") }));
}
const errors = diagnostics.filter((d) => d.severity === 0).length;
const warnings = diagnostics.filter((d) => d.severity === 1).length;
const messages = document ? document.allMessages().all().map((m) => m.name()).sort() : [];
console.log(JSON.stringify({ errors, warnings, version: document?.version() ?? null, messages }));
process.exit(errors || !document ? 1 : 0);
