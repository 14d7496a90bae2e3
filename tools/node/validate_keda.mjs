// Validates KEDA objects against KEDA's schema, as published in @kubernetes-models/keda (generated from KEDA's
// Go API types; pinned in package.json). Reads a JSON list of objects on stdin, prints one JSON line
// [{kind, name, errors}] and exits 1 when any object fails, 2 when one is not a KEDA kind this knows.
// Used by tests/unit/test_kubernetes.py on the rendered deploy/kubernetes overlays.
import { readFileSync } from "node:fs";
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";

const objects = JSON.parse(readFileSync(0, "utf8"));
const report = [];
let status = 0;
for (const obj of objects) {
  const name = obj?.metadata?.name;
  const Model = obj?.apiVersion === "keda.sh/v1alpha1" ? keda[obj.kind] : undefined;
  if (typeof Model !== "function") {
    report.push({ kind: obj?.kind, name, errors: [`not a keda.sh/v1alpha1 kind: ${obj?.apiVersion} ${obj?.kind}`] });
    status = 2;
    continue;
  }
  try {
    new Model(obj).validate();
    report.push({ kind: obj.kind, name, errors: [] });
  } catch (err) {
    report.push({ kind: obj.kind, name, errors: [String(err.message ?? err)] });
    status = Math.max(status, 1);
  }
}
console.log(JSON.stringify(report));
process.exit(status);
