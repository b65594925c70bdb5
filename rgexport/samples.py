"""Sample code for apps, generated from artifact manifests: names, shapes and dtypes are read from the
manifest's I/O contract, never typed by hand. Swift for Core ML and ExecuTorch on iOS; Kotlin for LiteRT
and ExecuTorch on Android; Python (ONNX Runtime) on Linux; JavaScript (onnxruntime-web) on the web.

Each class drives one artifact (prefill in whole chunks, decode token by token, the state carried the way
the contract says: inside the program, or out and back in). One shared file per language
(`RecurrentGemmaGeneration.swift` / `.kt`) holds the whole loop the CLI's `rgexport chat` runs: tokenize
(the app supplies a SentencePiece binding for the bundle's tokenizer.model), prefill each turn onto the
state, decode, sample (rgexport's sampler: greedy, temperature, top-k, top-p, seeded), detokenize; with the
checkpoint's chat template, reduced to the strings around each message, when the manifest records one.

The class for each backend lives in its package (`rgexport/backends/<name>/app_samples.py`, found through
`Backend.app_samples`); this module holds the loops they share, the writer and the integration guide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rgexport.appcode import header
from rgexport.profiles import TargetProfile


# Shared generation loop: tokenize, prefill, decode, sample, detokenize (Swift and Kotlin) ----------------
def _string_literal(text: str, language: str) -> str:
    """`text` as a Swift or Kotlin string literal."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "$" and language == "kotlin":
            out.append("\\$")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}" if language == "swift" else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def chat_format(manifest: dict[str, Any]) -> dict[str, Any]:
    """The strings a sample splices each turn into, from the manifest's chat template (rendered by
    `rgexport.templates`), or raw-text mode's when the model has none."""
    from rgexport.chat import RAW_SEPARATOR
    from rgexport.templates import ChatTemplate

    entry = (manifest.get("tokenizer") or {}).get("chat_template")
    if not entry:
        return {"templated": False, "first": "", "reply": "", "next": RAW_SEPARATOR, "next_after_stop": "",
                "stop": "", "source": "none: raw text"}
    template = ChatTemplate.from_dict(entry)
    fmt = template.turn_format()
    first = fmt["first"]
    if first.startswith(template.bos_token):  # the sample adds the BOS id itself
        first = first[len(template.bos_token):]
    stop = template.stop_strings[0] if template.stop_strings else ""
    after = fmt["next"][len(stop):] if stop and fmt["next"].startswith(stop) else fmt["next"]
    return {"templated": True, "first": first, "reply": fmt["reply"], "next": fmt["next"], "next_after_stop": after,
            "stop": stop, "source": entry.get("source", "the manifest")}


def swift_generation(m: dict[str, Any]) -> str:
    """RecurrentGemmaGeneration.swift: the tokenizer protocol, rgexport's sampler, the chat format and the
    generation loop that every Swift sample class (`StepModel`) plugs into."""
    tok = m["tokenizer"] or {"bos_id": 2, "eos_id": 1}
    f = chat_format(m)
    s = lambda text: _string_literal(text, "swift")  # noqa: E731
    head = header(m, "*")
    return f"""// {head}
import Foundation

/// The bundle's tokenizer.model is a SentencePiece model: the app supplies encode/decode through a
/// SentencePiece binding. `encode` adds no BOS.
protocol TextTokenizer {{
    func encode(_ text: String) -> [Int32]
    func decode(_ ids: [Int32]) -> String
}}

/// An artifact one step at a time (the RecurrentGemma* classes beside this file): the last row of logits.
protocol StepModel: AnyObject {{
    var chunk: Int {{ get }}
    func reset() throws
    func prefillLast(tokens: [Int32], position: Int32) throws -> [Float]
    func decodeLogits(token: Int32, position: Int32) throws -> [Float]
}}

/// SplitMix64: the same seed gives the same reply.
struct SeededGenerator: RandomNumberGenerator {{
    private var state: UInt64
    init(seed: UInt64) {{ state = seed }}
    mutating func next() -> UInt64 {{
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }}
}}

/// rgexport's sampler (`rgexport run`, `rgexport chat`): greedy at temperature 0; otherwise divide by the
/// temperature, keep the top k, keep the smallest set reaching probability topP, draw.
struct Sampler {{
    var temperature: Float = 0
    var topK: Int = 0
    var topP: Float = 1
    var rng = SeededGenerator(seed: 0)

    mutating func sample(_ logits: [Float]) -> Int32 {{
        if temperature <= 0 {{
            var best = 0
            for i in logits.indices where logits[i] > logits[best] {{ best = i }}
            return Int32(best)
        }}
        var order = logits.indices.sorted {{ logits[$0] > logits[$1] }}
        if topK > 0 && topK < order.count {{ order = Array(order[0..<topK]) }}
        let top = logits[order[0]] / temperature
        var probs = order.map {{ Double(exp(logits[$0] / temperature - top)) }}
        let total = probs.reduce(0, +)
        probs = probs.map {{ $0 / total }}
        if topP < 1 {{
            var cumulative = 0.0
            var keep = 0
            while keep < probs.count {{
                cumulative += probs[keep]
                keep += 1
                if cumulative >= Double(topP) {{ break }}
            }}
            order = Array(order[0..<keep])
            probs = Array(probs[0..<keep])
        }}
        var r = Double.random(in: 0..<probs.reduce(0, +), using: &rng)
        for (i, p) in probs.enumerated() {{
            r -= p
            if r < 0 {{ return Int32(order[i]) }}
        }}
        return Int32(order[order.count - 1])
    }}
}}

/// How a turn is written. Chat template: {f["source"]} (rendered by rgexport into the text around each
/// message). Without one the model runs raw text: turns continue the transcript on a new line.
enum ChatFormat {{
    static let templated = {"true" if f["templated"] else "false"}
    static let first = {s(f["first"])}  // after BOS, before the first message
    static let reply = {s(f["reply"])}  // after each message: the model's turn starts
    static let next = {s(f["next"])}  // before each later message
    static let nextAfterStop = {s(f["next_after_stop"])}  // the same, when the reply wrote the stop text
    static let stop = {s(f["stop"])}  // a reply ends here (besides EOS)
}}

/// The whole loop: tokenize, prefill the turn in chunks, then sample, decode and detokenize token by token.
/// The state carries the conversation, so each turn feeds only its own tokens.
final class Generator {{
    static let bosId: Int32 = {tok["bos_id"]}
    static let eosId: Int32 = {tok["eos_id"]}
    let model: StepModel
    let tokenizer: TextTokenizer
    var sampler: Sampler
    private(set) var position: Int32 = 0
    private var pending: [Int32] = []
    private var closedTurn = false

    init(model: StepModel, tokenizer: TextTokenizer, sampler: Sampler = Sampler()) {{
        self.model = model
        self.tokenizer = tokenizer
        self.sampler = sampler
    }}

    func reset() throws {{
        try model.reset()
        position = 0
        pending = []
        closedTurn = false
    }}

    /// Whole chunks through prefill, the rest through decode, from the current position.
    private func feed(_ ids: [Int32]) throws -> [Float] {{
        var logits: [Float] = []
        var i = 0
        while ids.count - i >= model.chunk && model.chunk > 1 {{
            logits = try model.prefillLast(tokens: Array(ids[i..<(i + model.chunk)]), position: position)
            position += Int32(model.chunk)
            i += model.chunk
        }}
        while i < ids.count {{
            logits = try model.decodeLogits(token: ids[i], position: position)
            position += 1
            i += 1
        }}
        return logits
    }}

    /// The ids one message adds to the conversation.
    func turnIds(_ message: String) -> [Int32] {{
        if position == 0 {{
            return [Self.bosId] + tokenizer.encode(ChatFormat.templated ? ChatFormat.first + message + ChatFormat.reply : message)
        }}
        if !ChatFormat.templated {{ return pending + tokenizer.encode(ChatFormat.next + message) }}
        let before = closedTurn ? ChatFormat.nextAfterStop : ChatFormat.next
        return pending + tokenizer.encode(before + message + ChatFormat.reply)
    }}

    /// One turn: streams the reply through `onText` until EOS, the stop text or `maxTokens`.
    func reply(to message: String, maxTokens: Int, onText: (String) -> Void) throws -> String {{
        var logits = try feed(turnIds(message))
        pending = []
        closedTurn = false
        var generated: [Int32] = []
        var shown = ""
        while generated.count < maxTokens {{
            let next = sampler.sample(logits)
            if next == Self.eosId {{ break }}
            generated.append(next)
            var text = tokenizer.decode(generated)
            if !ChatFormat.stop.isEmpty, let range = text.range(of: ChatFormat.stop) {{
                text = String(text[..<range.lowerBound])
                closedTurn = true
            }}
            if text.hasPrefix(shown) {{
                onText(String(text.dropFirst(shown.count)))
                shown = text
            }}
            if closedTurn || generated.count == maxTokens {{
                pending = [next]  // sampled, not yet fed: the next turn feeds it first
                break
            }}
            logits = try model.decodeLogits(token: next, position: position)
            position += 1
        }}
        return shown
    }}
}}
"""


def kotlin_generation(m: dict[str, Any]) -> str:
    """RecurrentGemmaGeneration.kt: the tokenizer interface, rgexport's sampler, the chat format and the
    generation loop that every Kotlin sample class (`StepModel`) plugs into."""
    tok = m["tokenizer"] or {"bos_id": 2, "eos_id": 1}
    f = chat_format(m)
    s = lambda text: _string_literal(text, "kotlin")  # noqa: E731
    head = header(m, "*")
    return f"""// {head}
package ai.rgexport.sample

import kotlin.math.exp
import kotlin.random.Random

/** The bundle's tokenizer.model is a SentencePiece model: the app supplies encode/decode through a
 * SentencePiece binding. `encode` adds no BOS. */
interface TextTokenizer {{
    fun encode(text: String): IntArray
    fun decode(ids: IntArray): String
}}

/** An artifact one step at a time (the RecurrentGemma* classes beside this file): the last row of logits. */
interface StepModel {{
    val chunk: Int
    fun reset()
    fun prefillLast(tokens: IntArray, position: Int): FloatArray
    fun decodeLogits(token: Int, position: Int): FloatArray
}}

/** rgexport's sampler (`rgexport run`, `rgexport chat`): greedy at temperature 0; otherwise divide by the
 * temperature, keep the top k, keep the smallest set reaching probability topP, draw (seeded). */
class Sampler(val temperature: Float = 0f, val topK: Int = 0, val topP: Float = 1f, seed: Long = 0) {{
    private val rng = Random(seed)

    fun sample(logits: FloatArray): Int {{
        if (temperature <= 0f) return logits.indices.maxByOrNull {{ logits[it] }}!!
        var order = logits.indices.sortedByDescending {{ logits[it] }}
        if (topK in 1 until order.size) order = order.take(topK)
        val top = logits[order[0]] / temperature
        var probs = order.map {{ exp((logits[it] / temperature - top).toDouble()) }}
        val total = probs.sum()
        probs = probs.map {{ it / total }}
        if (topP < 1f) {{
            var cumulative = 0.0
            var keep = 0
            while (keep < probs.size) {{
                cumulative += probs[keep]
                keep += 1
                if (cumulative >= topP) break
            }}
            order = order.take(keep)
            probs = probs.take(keep)
        }}
        var r = rng.nextDouble(probs.sum())
        for (i in probs.indices) {{
            r -= probs[i]
            if (r < 0) return order[i]
        }}
        return order.last()
    }}
}}

/** How a turn is written. Chat template: {f["source"]} (rendered by rgexport into the text around each
 * message). Without one the model runs raw text: turns continue the transcript on a new line. */
object ChatFormat {{
    const val TEMPLATED = {"true" if f["templated"] else "false"}
    const val FIRST = {s(f["first"])} // after BOS, before the first message
    const val REPLY = {s(f["reply"])} // after each message: the model's turn starts
    const val NEXT = {s(f["next"])} // before each later message
    const val NEXT_AFTER_STOP = {s(f["next_after_stop"])} // the same, when the reply wrote the stop text
    const val STOP = {s(f["stop"])} // a reply ends here (besides EOS)
}}

/** The whole loop: tokenize, prefill the turn in chunks, then sample, decode and detokenize token by token.
 * The state carries the conversation, so each turn feeds only its own tokens. */
class Generator(private val model: StepModel, private val tokenizer: TextTokenizer, var sampler: Sampler = Sampler()) {{
    companion object {{
        const val BOS_ID = {tok["bos_id"]}
        const val EOS_ID = {tok["eos_id"]}
    }}

    var position = 0
        private set
    private var pending = IntArray(0)
    private var closedTurn = false

    fun reset() {{
        model.reset()
        position = 0
        pending = IntArray(0)
        closedTurn = false
    }}

    /** Whole chunks through prefill, the rest through decode, from the current position. */
    private fun feed(ids: IntArray): FloatArray {{
        var logits = FloatArray(0)
        var i = 0
        while (ids.size - i >= model.chunk && model.chunk > 1) {{
            logits = model.prefillLast(ids.copyOfRange(i, i + model.chunk), position)
            position += model.chunk
            i += model.chunk
        }}
        while (i < ids.size) {{
            logits = model.decodeLogits(ids[i], position)
            position += 1
            i += 1
        }}
        return logits
    }}

    /** The ids one message adds to the conversation. */
    fun turnIds(message: String): IntArray {{
        if (position == 0) {{
            val text = if (ChatFormat.TEMPLATED) ChatFormat.FIRST + message + ChatFormat.REPLY else message
            return intArrayOf(BOS_ID) + tokenizer.encode(text)
        }}
        if (!ChatFormat.TEMPLATED) return pending + tokenizer.encode(ChatFormat.NEXT + message)
        val before = if (closedTurn) ChatFormat.NEXT_AFTER_STOP else ChatFormat.NEXT
        return pending + tokenizer.encode(before + message + ChatFormat.REPLY)
    }}

    /** One turn: streams the reply through `onText` until EOS, the stop text or `maxTokens`. */
    fun reply(message: String, maxTokens: Int, onText: (String) -> Unit): String {{
        var logits = feed(turnIds(message))
        pending = IntArray(0)
        closedTurn = false
        val generated = ArrayList<Int>()
        var shown = ""
        while (generated.size < maxTokens) {{
            val next = sampler.sample(logits)
            if (next == EOS_ID) break
            generated.add(next)
            var text = tokenizer.decode(generated.toIntArray())
            val stopAt = if (ChatFormat.STOP.isEmpty()) -1 else text.indexOf(ChatFormat.STOP)
            if (stopAt >= 0) {{
                text = text.substring(0, stopAt)
                closedTurn = true
            }}
            if (text.startsWith(shown)) {{
                onText(text.substring(shown.length))
                shown = text
            }}
            if (closedTurn || generated.size == maxTokens) {{
                pending = intArrayOf(next) // sampled, not yet fed: the next turn feeds it first
                break
            }}
            logits = model.decodeLogits(next, position)
            position += 1
        }}
        return shown
    }}
}}
"""


# The generation loop each language's classes share (tokenize, prefill, decode, sample, detokenize).
SHARED = {"swift": ("RecurrentGemmaGeneration.swift", swift_generation),
          "kt": ("RecurrentGemmaGeneration.kt", kotlin_generation)}


def write_samples(bundle: Path, profile: TargetProfile, artifacts: list[tuple[Path, dict[str, Any]]]) -> list[Path]:
    """Writes each artifact's sample for the profile's platform (`Backend.app_samples`), the shared loop of
    each language used, and the guide."""
    from rgexport.backends import get_backend

    out_dir = bundle / "samples"
    written = []
    for folder, manifest in artifacts:
        generators = get_backend(manifest["backend"]).app_samples()
        if (profile.platform or "") not in generators:
            continue
        name, fn = generators[profile.platform or ""]
        out_dir.mkdir(exist_ok=True)
        path = out_dir / name
        path.write_text(fn(folder.name, manifest))
        written.append(path)
        shared = SHARED.get(name.rsplit(".", 1)[1])
        if shared and not (out_dir / shared[0]).exists():  # one per language: every class plugs into it
            (out_dir / shared[0]).write_text(shared[1](manifest))
            written.append(out_dir / shared[0])
    guide = bundle / "INTEGRATION.md"
    guide.write_text(integration_guide(profile, artifacts, written, bundle))
    return [*written, guide]


def shipped_files(manifest: dict[str, Any]) -> list[str]:
    """The files an app ships for an artifact: its main file (or package folder) and every file beside it
    (ExecuTorch's `model.ptd`, ONNX's `prefill.onnx` and `weights.bin`); not a package's inner files, nor the
    tokenizer, which the bundle holds once."""
    main = manifest["artifact"]["file"]
    tokenizer = (manifest.get("tokenizer") or {}).get("file")
    rest = [f["path"] for f in manifest["artifact"]["files"]
            if f["path"] not in (main, tokenizer) and not f["path"].startswith(main + "/")]
    return [main, *rest]


def integration_guide(profile: TargetProfile, artifacts, samples: list[Path], bundle: Path) -> str:
    lines = [
        f"# {profile.name}: integration guide",
        "",
        f"{profile.description}. Minimum: {profile.min_runtime or '-'}. "
        f"Memory budget checked by `rgexport validate`: {profile.memory_budget_mb or '-'} MB peak.",
        "",
        "## Artifacts",
        "",
        "| folder | backend / recipe | file | bytes | state | validation |",
        "|---|---|---|---|---|---|",
    ]
    for folder, m in artifacts:
        st = m["io"]["state"]
        files = " + ".join(f"`{f}`" for f in shipped_files(m))
        lines.append(f"| `{folder.name}/` | {m['backend']} / {m['recipe']['name']} | {files} | "
                     f"{m['artifact']['total_bytes']:,} | {st['total_bytes']:,} bytes, {st['placement']} | "
                     f"{m['validation']['status']} |")
    lines += ["", "## Driving an artifact", ""]
    for folder, m in artifacts:
        lines += [f"### {m['backend']} / {m['recipe']['name']}", "", m["io"]["new_sequence"], ""]
        for method, spec in m["io"]["methods"].items():
            ins = ", ".join(f"`{t.get('identifier', t.get('litert_name', t['name']))}` {t['dtype']}{t['shape']}" for t in spec["inputs"][:2])
            more = len(spec["inputs"]) - 2
            outs = spec["outputs"]
            result = (f"`{outs[0]['name']}` {outs[0]['dtype']}{outs[0]['shape']}" if outs else "nothing")
            if len(outs) > 1:
                result += f" and {len(outs) - 1} more"
            lines.append(f"- `{method}`: {ins or 'no inputs'}" + (f" and {more} state inputs" if more > 0 else "")
                         + f" → {result}")
        lines.append("")
    if samples:
        lines += ["## Sample code", "",
                  "Generated from the manifests above (names and shapes are never typed by hand):", ""]
        lines += [f"- `{p.relative_to(bundle).as_posix()}`" for p in samples]
        lines.append("")
    lines += [
        "## Tokenizer",
        "",
        "`tokenizer.model` is a SentencePiece model: encode the prompt with it (add the BOS id first), feed "
        "the ids, decode generated ids with it. On iOS and Android use a SentencePiece binding; ids and "
        "special tokens are listed in each artifact's manifest.",
        "",
    ]
    return "\n".join(lines)
