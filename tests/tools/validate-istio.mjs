// Validates Istio documents against Istio's CRD schemas (the OpenAPI schemas its API server checks, as
// @kubernetes-models/istio compiles them), offline. `cargo xtask deps` installs the packages into TOOLS.
//
//   node tests/tools/validate-istio.mjs TOOLS FILE...
//
// One line per document: `ok KIND NAME`, `invalid KIND NAME: why` or `no-schema APIVERSION KIND NAME` (a kind no
// Istio CRD defines: a ConfigMap, a Deployment). Exits 1 when a document is invalid.
import { existsSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [tools, ...files] = process.argv.slice(2);
const require = createRequire(join(tools, "package.json"));
const { parseAllDocuments } = require("yaml");
const models = join(tools, "node_modules/@kubernetes-models/istio");

let invalid = 0;
for (const file of files) {
  for (const parsed of parseAllDocuments(readFileSync(file, "utf8"))) {
    const doc = parsed.toJSON();
    if (!doc || typeof doc !== "object") continue;
    const name = `${doc.metadata?.namespace ?? ""}/${doc.metadata?.name ?? ""}`;
    const [group, version] = String(doc.apiVersion ?? "").split("/");
    const model = join(models, group ?? "", version ?? "", `${doc.kind}.js`);
    if (!group?.endsWith("istio.io") || !version || !existsSync(model)) {
      console.log(`no-schema ${doc.apiVersion} ${doc.kind} ${name}`);
      continue;
    }
    const Model = (await import(pathToFileURL(model)))[doc.kind];
    try {
      new Model(doc).validate();
      console.log(`ok ${doc.kind} ${name}`);
    } catch (error) {
      invalid++;
      console.log(`invalid ${doc.kind} ${name}: ${String(error.message).replaceAll("\n", "; ")}`);
    }
  }
}
process.exit(invalid ? 1 : 0);
