// Prints the minified and gzipped size of the library (closing notes, README).
import { buildSync } from "esbuild";
import { gzipSync } from "node:zlib";
const out = buildSync({ entryPoints: ["src/index.js"], bundle: true, minify: true, format: "esm", write: false });
const code = out.outputFiles[0].contents;
console.log(`minified ${code.length} bytes, gzipped ${gzipSync(code, { level: 9 }).length} bytes`);
