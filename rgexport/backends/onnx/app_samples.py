"""App sample for ONNX artifacts on the web: an ES module for onnxruntime-web, generated from the manifest's
I/O contract."""

from __future__ import annotations

from typing import Any

from rgexport.appcode import header


# JavaScript: onnxruntime-web (the web target) ------------------------------------------------------------
def js_onnx_web(folder: str, m: dict[str, Any]) -> str:
    """recurrentgemma.mjs: an ES module that runs the ONNX artifact in a page with onnxruntime-web
    (WebAssembly; WebGPU where the caller asks for it), with rgexport's sampler and the generation loop.
    `rgexport validate BUNDLE --device browser` drives this very module in headless Chromium."""
    io = m["io"]
    chunk = io["prefill_chunk"]
    vocab = m["model"]["config"]["vocab_size"]
    tok = m["tokenizer"] or {"bos_id": 2, "eos_id": 1}
    files = m["backend_facts"].get("onnx_files", {"decode": "decode.onnx", "prefill": "prefill.onnx"})
    weights = m["backend_facts"].get("onnx_external_data")  # one file both graphs point into, or None
    dec, pre = io["methods"]["decode"], io["methods"]["prefill"]
    states = io["state"]["tensors"]
    bad = [t["name"] for t in states if t["dtype"] != "float32"]
    if bad:
        raise ValueError(f"the web sample carries float32 state; {bad} are not")
    state_js = ",\n".join(
        f'  {{ input: "{t["input"]}", output: "{t["output"]}", shape: {t["shape"]} }}' for t in states)
    head = header(m, folder)
    return f"""// {head}
// RecurrentGemma in the browser: `{folder}/{files['decode']}` (one token) and `{folder}/{files['prefill']}`
// ({chunk} tokens) on onnxruntime-web. The state ({io['state']['total_bytes']} bytes) passes out of each call
// and back into the next. Tokenisation: the bundle's tokenizer.model (SentencePiece) encodes the prompt.

export const VOCAB_SIZE = {vocab};
export const PREFILL_CHUNK = {chunk};
export const BOS_ID = {tok['bos_id']};
export const EOS_ID = {tok['eos_id']};
// The weights both graphs point into (ONNX external data), fetched once and handed to both sessions.
const WEIGHTS_FILE = {'"' + weights + '"' if weights else "null"};
const STATE = [
{state_js},
];

export class RecurrentGemmaWeb {{
  /** `ort` is the onnxruntime-web module; `baseUrl` the artifact folder's URL (ending in /). */
  static async create(ort, baseUrl, {{ executionProviders = ["wasm"] }} = {{}}) {{
    const options = {{ executionProviders, graphOptimizationLevel: "all" }};
    if (WEIGHTS_FILE) {{
      const response = await fetch(new URL(WEIGHTS_FILE, baseUrl).href);
      if (!response.ok) throw new Error(`${{WEIGHTS_FILE}}: HTTP ${{response.status}}`);
      options.externalData = [{{ path: WEIGHTS_FILE, data: new Uint8Array(await response.arrayBuffer()) }}];
    }}
    const [decode, prefill] = await Promise.all([
      ort.InferenceSession.create(new URL("{files['decode']}", baseUrl).href, options),
      ort.InferenceSession.create(new URL("{files['prefill']}", baseUrl).href, options),
    ]);
    return new RecurrentGemmaWeb(ort, decode, prefill);
  }}

  constructor(ort, decode, prefill) {{
    this.ort = ort;
    this.decodeSession = decode;
    this.prefillSession = prefill;
    this.reset();
  }}

  /** Zeros: a valid initial state. Position 0 also starts a new sequence whatever the state holds. */
  reset() {{
    this.state = {{}};
    for (const t of STATE) {{
      const size = t.shape.reduce((a, b) => a * b, 1);
      this.state[t.input] = new this.ort.Tensor("float32", new Float32Array(size), t.shape);
    }}
  }}

  async run(session, tokenName, tokens, shape, position) {{
    const feeds = {{
      ...this.state,
      [tokenName]: new this.ort.Tensor("int32", Int32Array.from(tokens), shape),
      "{dec['inputs'][1]['name']}": new this.ort.Tensor("int32", Int32Array.of(position), [1]),
    }};
    const out = await session.run(feeds);
    const next = {{}};
    for (const t of STATE) next[t.input] = out[t.output];
    this.state = next;
    return out["{dec['outputs'][0]['name']}"].data;  // Float32Array
  }}

  /** One token at `position` -> {vocab} logits. */
  decode(token, position) {{
    return this.run(this.decodeSession, "{dec['inputs'][0]['name']}", [token], {dec['inputs'][0]['shape']}, position);
  }}

  /** Exactly {chunk} tokens from `position` -> {chunk} x {vocab} logits. */
  prefill(tokens, position) {{
    if (tokens.length !== PREFILL_CHUNK) throw new Error(`prefill takes ${{PREFILL_CHUNK}} tokens`);
    return this.run(this.prefillSession, "{pre['inputs'][0]['name']}", tokens, {pre['inputs'][0]['shape']}, position);
  }}

  /** Any number of tokens from `position`: whole chunks through prefill, the rest through decode; the
   * last token's logits. */
  async feed(ids, position) {{
    let logits = null;
    let i = 0;
    while (ids.length - i >= PREFILL_CHUNK && PREFILL_CHUNK > 1) {{
      const rows = await this.prefill(ids.slice(i, i + PREFILL_CHUNK), position + i);
      logits = rows.subarray(rows.length - VOCAB_SIZE);
      i += PREFILL_CHUNK;
    }}
    for (; i < ids.length; i++) logits = await this.decode(ids[i], position + i);
    return logits;
  }}
}}

/** mulberry32: the same seed gives the same reply. */
function seeded(seed) {{
  let a = seed >>> 0;
  return () => {{
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }};
}}

/** rgexport's sampler: greedy at temperature 0; otherwise divide by the temperature, keep the top k,
 * keep the smallest set reaching probability topP, draw. */
export class Sampler {{
  constructor({{ temperature = 0, topK = 0, topP = 1, seed = 0 }} = {{}}) {{
    Object.assign(this, {{ temperature, topK, topP }});
    this.random = seeded(seed);
  }}

  sample(logits) {{
    if (this.temperature <= 0) {{
      let best = 0;
      for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
      return best;
    }}
    let order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
    if (this.topK > 0 && this.topK < order.length) order = order.slice(0, this.topK);
    const top = logits[order[0]] / this.temperature;
    let probs = order.map((i) => Math.exp(logits[i] / this.temperature - top));
    const total = probs.reduce((a, b) => a + b, 0);
    probs = probs.map((p) => p / total);
    if (this.topP < 1) {{
      let cumulative = 0;
      let keep = 0;
      while (keep < probs.length) {{
        cumulative += probs[keep++];
        if (cumulative >= this.topP) break;
      }}
      order = order.slice(0, keep);
      probs = probs.slice(0, keep);
    }}
    let r = this.random() * probs.reduce((a, b) => a + b, 0);
    for (let i = 0; i < probs.length; i++) {{
      r -= probs[i];
      if (r < 0) return order[i];
    }}
    return order[order.length - 1];
  }}
}}

/** The loop: prefill the prompt ids (BOS first), then sample and decode until EOS or `maxTokens`;
 * `onToken(id)` sees each new id as it comes (detokenize it with the bundle's tokenizer). */
export async function generate(model, promptIds, {{ maxTokens = 64, sampler = new Sampler(), onToken }} = {{}}) {{
  model.reset();
  let logits = await model.feed(promptIds, 0);
  const out = [];
  let position = promptIds.length;
  while (out.length < maxTokens) {{
    const next = sampler.sample(logits);
    if (next === EOS_ID) break;
    out.push(next);
    if (onToken) onToken(next);
    if (out.length === maxTokens) break;
    logits = await model.decode(next, position++);
  }}
  return out;
}}
"""


# platform -> (file name, generator(folder, manifest))
SAMPLES = {"web": ("recurrentgemma.mjs", js_onnx_web)}
