// Builds the chat page into ../bus/web/static (committed, so installing lamabus needs no Node).
// Run through ./build.sh, which installs the locked dependencies first.
import { createHash } from "node:crypto";
import { copyFile, mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "bus", "web", "static");

/** SHA-256 over the inputs of the build: tests/test_web_bundle.py recomputes it to catch a stale bundle. */
export async function sourceDigest() {
  const files = ["build.mjs", "package.json", "package-lock.json",
                 ...(await readdir(join(here, "src"))).sort().map((f) => `src/${f}`)];
  const h = createHash("sha256");
  for (const f of files) {
    h.update(`${f}\n`);
    h.update(await readFile(join(here, f)));
    h.update("\n");
  }
  return h.digest("hex");
}

await mkdir(out, { recursive: true });
await esbuild.build({
  entryPoints: [join(here, "src", "main.js")],
  outfile: join(out, "app.js"),
  bundle: true,
  format: "esm",
  target: ["es2022"],
  minify: true,
  legalComments: "eof",
  logLevel: "info",
});
await copyFile(join(here, "src", "index.html"), join(out, "index.html"));
await copyFile(join(here, "src", "style.css"), join(out, "style.css"));
const lock = JSON.parse(await readFile(join(here, "package-lock.json"), "utf8"));
const versions = Object.fromEntries(["@nats-io/nats-core", "@nats-io/jetstream", "esbuild"]
  .map((p) => [p, lock.packages[`node_modules/${p}`]?.version]));
await writeFile(join(out, "build.json"), JSON.stringify({ sources: await sourceDigest(), versions }, null, 2) + "\n");
