// Build the static kiosk page into dist/ (or --outdir DIR): one minified script, one stylesheet,
// the HTML, and the licences of the bundled libraries. Deterministic: the same lock file gives the
// same bytes, and tests/test_kiosk.py checks that the committed dist/ is what this produces.
import { copyFile, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const here = dirname(fileURLToPath(import.meta.url));
const i = process.argv.indexOf('--outdir');
const outdir = resolve(i > 0 ? process.argv[i + 1] : join(here, 'dist'));

await rm(outdir, { recursive: true, force: true });
await mkdir(outdir, { recursive: true });
const result = await esbuild.build({
  absWorkingDir: here,
  entryPoints: { kiosk: 'src/main.js' },
  outdir,
  bundle: true,
  minify: true,
  format: 'iife',
  platform: 'browser',
  target: 'es2022',
  charset: 'utf8',
  legalComments: 'eof',
  metafile: true,
  define: { 'process.env.NODE_ENV': '"production"' },
  logLevel: 'warning',
});
await copyFile(join(here, 'src/index.html'), join(outdir, 'index.html'));

// The licence of every npm package that ended up in the bundle, in name order.
const packages = new Set();
for (const input of Object.keys(result.metafile.inputs)) {
  const m = input.match(/^node_modules\/((?:@[^/]+\/)?[^/]+)\//);
  if (m) packages.add(m[1]);
}
let notice = 'Third-party software bundled into kiosk.js and kiosk.css\n';
for (const name of [...packages].sort()) {
  const dir = join(here, 'node_modules', name);
  const { version, license } = JSON.parse(await readFile(join(dir, 'package.json'), 'utf8'));
  const file = (await readdir(dir)).sort().find((f) => /^licen[cs]e/i.test(f));
  notice += `\n${'='.repeat(78)}\n${name} ${version} (${license})\n${'='.repeat(78)}\n\n`;
  notice += file ? (await readFile(join(dir, file), 'utf8')).trim() + '\n' : '(no licence file in the package)\n';
}
await writeFile(join(outdir, 'THIRD-PARTY-LICENSES.txt'), notice);
