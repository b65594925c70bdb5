"""The web target in a real browser: `rgexport validate BUNDLE --device browser`.

The bundle is served on 127.0.0.1 only (a port the OS picks), with onnxruntime-web from the project's npm
install (`web/package.json`, `npm ci` in `web/`). Headless Chromium (Debian's `chromium`, driven by
Playwright for Python with the system browser's executable) opens a page that imports the bundle's own
generated sample, `samples/recurrentgemma.mjs`, so the code an app would ship is what runs. The page is a
`Runner` to `rgexport.validate`: held-out tokens go in one call at a time, logits come back, and the usual
report (logit error, KL, top-1, perplexity, greedy divergence) compares them with the fp32 step model.
Speed is timed inside the page (no round trips): prefill tok/s and decode tok/s.

Nothing is fetched from outside: the page's only origin is the local server.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.backends.base import Runner, manifest_prefill_rows
from rgexport.errors import RgexportError

ORT_WEB_ENV = "RGEXPORT_ORT_WEB"  # a folder holding onnxruntime-web's dist files (default: web/node_modules)
CHROMIUM_ENV = "RGEXPORT_CHROMIUM"  # the browser's executable (default: chromium on PATH)
SAMPLE = "samples/recurrentgemma.mjs"
# fp32 in a browser must match the step model this closely (the bar; validation's own is 1e-3).
BROWSER_FP32_MAX_LOGIT_ERROR = 1e-4

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>rgexport: browser validation</title></head>
<body><pre id="log">loading</pre>
<script type="module">
import * as ort from "/ort/ort.wasm.min.mjs";
ort.env.wasm.wasmPaths = "/ort/";  // an absolute URL path: relative ones resolve against the module
ort.env.wasm.numThreads = Math.min(navigator.hardwareConcurrency || 1, crossOriginIsolated ? 4 : 1);
const log = (s) => { document.getElementById("log").textContent = s; };
window.rg = {
  async load(artifactUrl, sampleUrl, executionProviders) {
    const sample = await import(sampleUrl);
    this.sample = sample;
    this.model = await sample.RecurrentGemmaWeb.create(ort, new URL(artifactUrl, location.href).href,
                                                        { executionProviders });
    log("loaded " + artifactUrl);
    return { ort: ort.env.versions ? ort.env.versions.web : null, threads: ort.env.wasm.numThreads,
             userAgent: navigator.userAgent, crossOriginIsolated };
  },
  reset() { this.model.reset(); },
  async decode(token, position) { return Array.from(await this.model.decode(token, position)); },
  async prefill(tokens, position) { return Array.from(await this.model.prefill(tokens, position)); },
  async speed(prompt, steps) {
    this.model.reset();
    let t = performance.now();
    await this.model.prefill(prompt, 0);
    const prefillMs = performance.now() - t;
    const sampler = new this.sample.Sampler();
    let logits = await this.model.decode(prompt[0], prompt.length);
    t = performance.now();
    for (let i = 0; i < steps; i++) logits = await this.model.decode(sampler.sample(logits), prompt.length + 1 + i);
    const decodeMs = performance.now() - t;
    return { prefill_ms: prefillMs, prefill_tokens: prompt.length, decode_ms: decodeMs, decode_steps: steps };
  },
};
window.rgReady = true;
log("ready");
</script></body></html>
"""


def ort_web_dist() -> Path:
    """onnxruntime-web's dist folder: $RGEXPORT_ORT_WEB, or web/node_modules of the project (`npm ci`)."""
    candidates = [os.environ.get(ORT_WEB_ENV)] if os.environ.get(ORT_WEB_ENV) else []
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidates.append(str(root / "web" / "node_modules" / "onnxruntime-web" / "dist"))
    for c in candidates:
        if c and (Path(c) / "ort.wasm.min.mjs").is_file():
            return Path(c)
    raise RgexportError("onnxruntime-web is not installed: run `npm ci` in the project's web/ folder "
                        f"(or set {ORT_WEB_ENV} to its dist/ folder)")


def chromium_path() -> Path:
    """The system Chromium: $RGEXPORT_CHROMIUM, or chromium / chromium-browser on PATH."""
    found = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not Path(found).is_file():
        raise RgexportError("Chromium is not installed: `apt-get install chromium` (Debian), or set "
                            f"{CHROMIUM_ENV} to a Chromium executable")
    return Path(found)


def missing() -> str | None:
    """Why browser validation cannot run here (for a test's skip reason), or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return 'Playwright for Python is not installed: pip install "rgexport[browser]"'
    try:
        chromium_path()
        ort_web_dist()
    except RgexportError as e:
        return str(e)
    return None


class _Handler(http.server.SimpleHTTPRequestHandler):
    """/ -> the page, /ort/ -> onnxruntime-web, /bundle/ -> the bundle. Cross-origin isolated, so the
    WebAssembly build may use threads."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def __init__(self, *args: Any, roots: dict[str, Path], **kwargs: Any):
        self.roots = roots
        super().__init__(*args, directory=str(roots["/bundle/"]), **kwargs)

    def translate_path(self, path: str) -> str:
        clean = path.split("?", 1)[0].split("#", 1)[0]
        for prefix, root in self.roots.items():
            if clean.startswith(prefix):
                rel = Path(*[p for p in clean[len(prefix):].split("/") if p and p not in (".", "..")])
                return str(root / rel)
        return str(self.roots["/bundle/"] / "__missing__")

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@contextlib.contextmanager
def serve(bundle: Path) -> Iterator[str]:
    """Serves the page, onnxruntime-web and `bundle` on 127.0.0.1; yields the base URL."""
    roots = {"/ort/": ort_web_dist(), "/bundle/": bundle}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, roots=roots))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class BrowserRunner(Runner):
    """An artifact running in a page, driven one call at a time (a `Runner` for rgexport.validate)."""

    def __init__(self, page: Any, prefill_chunk: int, vocab_size: int):
        self.page = page
        self.prefill_chunk = prefill_chunk
        self.vocab = vocab_size

    def reset(self) -> None:
        self.page.evaluate("() => rg.reset()")

    def decode(self, token: int, position: int) -> np.ndarray:
        return np.asarray(self.page.evaluate("([t, p]) => rg.decode(t, p)", [int(token), int(position)]), np.float32)

    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        out = self.page.evaluate("([t, p]) => rg.prefill(t, p)", [[int(t) for t in tokens], int(position)])
        return np.asarray(out, np.float32).reshape(-1, self.vocab)  # [chunk, v], or [1, v]: prefill_logits "last"


@contextlib.contextmanager
def browser_page(base_url: str) -> Iterator[Any]:
    """A headless Chromium page on the local server's page, ready (`window.rgReady`)."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise RgexportError('Playwright for Python is not installed: pip install "rgexport[browser]"') from None
    executable = chromium_path()
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=str(executable), headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
        except PlaywrightError as e:
            raise RgexportError(f"Chromium ({executable}) did not start: {str(e).splitlines()[0]}") from None
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base_url + "/", wait_until="load")
            try:
                page.wait_for_function("window.rgReady === true", timeout=60_000)
            except PlaywrightError:
                raise RgexportError("the page did not start: " + ("; ".join(errors) or "no error reported")) from None
            yield page
        finally:
            browser.close()


def validate_browser(path: str | Path, *, checkpoint: str | None = None, tokens: int | None = None,
                     speed_steps: int = 128, stages: Any = None) -> dict[str, Any]:
    """Runs every ONNX artifact of a bundle (folder or .zip) in headless Chromium through the bundle's
    own `samples/recurrentgemma.mjs`, and compares it with the fp32 step model. Returns
    {"bundle", "browser", "artifacts": [{"backend", "recipe", "report", "speed"}], "passed"}."""
    from rgexport.archive import BUNDLE_MANIFEST, safe_extract
    from rgexport.bundle import verify_bundle_files
    from rgexport.manifest import read_manifest
    from rgexport.profiles import platform_backends
    from rgexport.progress import Stages
    from rgexport.tokenizer import Tokenizer
    from rgexport.validate import artifact_checkpoint, heldout_tokens, reference_run, run_validation

    stages = stages or Stages(quiet=True)
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = safe_extract(path, Path(tmp)) if path.is_file() else path
        mf = folder / BUNDLE_MANIFEST
        if not mf.is_file():
            raise RgexportError(f"{path} is not a bundle (no {BUNDLE_MANIFEST}); --device browser takes a web bundle")
        bundle = json.loads(mf.read_text())
        problems = verify_bundle_files(folder, bundle)
        if problems:
            raise RgexportError(f"{path}: bundle files do not match bundle.json: " + "; ".join(problems))
        runs = platform_backends("web")  # what the web profile ships is what a browser runs
        arts = [a for a in bundle["artifacts"] if a["backend"] in runs]
        if not arts:
            raise RgexportError(f"{path} has no {' or '.join(runs)} artifact: the browser runs what the web profile "
                                "ships (build --target web)")
        if not (folder / SAMPLE).is_file():
            raise RgexportError(f"{path} has no {SAMPLE}: build it with a web profile (platform = \"web\")")
        results = []
        with serve(folder) as url, browser_page(url) as page:
            for art in arts:
                art_folder, manifest = read_manifest(folder / art["folder"])
                recipe = manifest["recipe"]
                with stages.stage("load", f"{art['folder']} in Chromium"):
                    ckpt = artifact_checkpoint(manifest, checkpoint)
                    tokenizer = Tokenizer(art_folder / manifest["tokenizer"]["file"])
                    n = tokens or 4 * ckpt.config.attention_window_size
                    ids = heldout_tokens(tokenizer, n, None)
                    chunk = int(manifest["io"]["prefill_chunk"])
                    reference = reference_run(ckpt.model, chunk, ids)
                    ckpt = None
                    env = page.evaluate("([a, s]) => rg.load(a, s, ['wasm'])",
                                        [f"/bundle/{art['folder']}/", f"/bundle/{SAMPLE}"])
                with stages.stage("validate", f"{n} tokens in the page"), stages.bar("validating", n) as advance:
                    runner = BrowserRunner(page, chunk, manifest["model"]["config"]["vocab_size"])
                    runner.prefill_rows = manifest_prefill_rows(manifest["io"])
                    report = run_validation(runner, reference, ids, backend=art["backend"], variant="browser",
                                            recipe=recipe["name"], quantized=recipe["quantized"],
                                            progress=advance)
                err = report.metrics.get("max_abs_logit_error")
                if recipe["name"] == "fp32" and err is not None and err > BROWSER_FP32_MAX_LOGIT_ERROR:
                    report.failures.append(f"max_abs_logit_error {err:.2e} > {BROWSER_FP32_MAX_LOGIT_ERROR:g} "
                                           "(fp32 in the browser)")
                with stages.stage("speed", f"{speed_steps} decode steps timed in the page"):
                    s = page.evaluate("([p, n]) => rg.speed(p, n)", [list(ids[:chunk]), speed_steps])
                speed = {**s, "prefill_tokens_per_second": 1e3 * s["prefill_tokens"] / s["prefill_ms"],
                         "decode_tokens_per_second": 1e3 * s["decode_steps"] / s["decode_ms"], **env}
                results.append({"backend": art["backend"], "recipe": recipe["name"], "folder": art["folder"],
                                "report": report, "speed": speed})
        browser = results[0]["speed"]["userAgent"] if results else ""
        return {"bundle": str(path), "browser": browser, "artifacts": results,
                "passed": all(r["report"].passed for r in results)}


def format_browser(result: dict[str, Any]) -> str:
    """The report lines: each artifact's validation, and its speed in the page."""
    from rgexport.validate import format_report

    lines = [f"browser: {result['browser']}"]
    for r in result["artifacts"]:
        s = r["speed"]
        lines.append(format_report(r["report"]))
        lines.append(f"  in the page  prefill {s['prefill_tokens_per_second']:,.0f} tok/s, decode "
                     f"{s['decode_tokens_per_second']:,.0f} tok/s (onnxruntime-web {s.get('ort') or '?'}, wasm, "
                     f"{s['threads']} thread(s))")
    lines.append(f"browser validation: {'PASSED' if result['passed'] else 'FAILED'}")
    return "\n".join(lines)
