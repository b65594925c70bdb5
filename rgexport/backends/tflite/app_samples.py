"""App sample for LiteRT artifacts: a Kotlin class (Android) generated from the manifest's I/O contract."""

from __future__ import annotations

from typing import Any

from rgexport.appcode import header


# Kotlin: LiteRT ----------------------------------------------------------------------------------------
def kotlin_litert(folder: str, m: dict[str, Any]) -> str:
    io = m["io"]
    chunk = io["prefill_chunk"]
    vocab = m["model"]["config"]["vocab_size"]
    head = header(m, folder)
    dec, pre = io["methods"]["decode"], io["methods"]["prefill"]
    name = lambda t: t.get("identifier", t.get("litert_name", t["name"]))  # noqa: E731
    states = io["state"]["tensors"]
    alloc = "\n".join(
        f'        "{t.get("litert_input", t["input"])}" to direct({t["bytes"]}),  // {t["name"]} {t["shape"]}'
        for t in states)
    pairs = "\n".join(
        f'        "{t.get("litert_output", t["output"])}" to "{t.get("litert_input", t["input"])}",' for t in states)
    return f"""// {head}
package ai.rgexport.sample

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import org.tensorflow.lite.Interpreter

/**
 * RecurrentGemma on LiteRT: `{m['artifact']['file']}`, signatures `{dec.get('signature', 'decode')}` (one token)
 * and `{pre.get('signature', 'prefill')}` ({chunk} tokens). The state ({io['state']['total_bytes']} bytes) passes
 * out of each call and back into the next.
 */
class RecurrentGemmaLiteRT(modelFile: File, threads: Int = 4) : StepModel {{
    companion object {{
        const val VOCAB_SIZE = {vocab}
        const val PREFILL_CHUNK = {chunk}
        private fun direct(bytes: Int): ByteBuffer = ByteBuffer.allocateDirect(bytes).order(ByteOrder.nativeOrder())
    }}

    private val interpreter = Interpreter(modelFile, Interpreter.Options().setNumThreads(threads))

    /** State inputs by signature name. */
    private var state: Map<String, ByteBuffer> = freshState()

    /** Which output feeds which input on the next call. */
    private val feedsBack = mapOf(
{pairs}
    )

    private fun freshState(): Map<String, ByteBuffer> = mapOf(
{alloc}
    )

    /** Forget the sequence (zeros). Position 0 also starts a new sequence whatever the state holds. */
    override fun reset() {{ state = freshState() }}

    fun decode(token: Int, position: Int): FloatArray =
        run("{dec.get('signature', 'decode')}", "{name(dec['inputs'][0])}", intArrayOf(token), position, 1)

    fun prefill(tokens: IntArray, position: Int): FloatArray {{
        require(tokens.size == PREFILL_CHUNK)
        return run("{pre.get('signature', 'prefill')}", "{name(pre['inputs'][0])}", arrayOf(tokens), position, PREFILL_CHUNK)
    }}

    private fun run(signature: String, tokenInput: String, tokens: Any, position: Int, rows: Int): FloatArray {{
        val inputs = HashMap<String, Any>()
        inputs[tokenInput] = tokens
        inputs["{name(dec['inputs'][1])}"] = intArrayOf(position)
        inputs.putAll(state)
        val logits = direct(rows * VOCAB_SIZE * 4)
        val outputs = HashMap<String, Any>()
        outputs["{name(dec['outputs'][0])}"] = logits
        val next = feedsBack.mapValues {{ (_, input) -> direct(state.getValue(input).capacity()) }}
        for ((output, input) in feedsBack) outputs[output] = next.getValue(output)
        interpreter.runSignature(inputs, outputs, signature)
        // New buffers each call: outputs never alias the inputs they replace.
        state = feedsBack.entries.associate {{ (output, input) -> input to next.getValue(output).also {{ it.rewind() }} }}
        logits.rewind()
        return FloatArray(rows * VOCAB_SIZE).also {{ logits.asFloatBuffer().get(it) }}
    }}

    // StepModel (RecurrentGemmaGeneration.kt): the last row of logits, for the generation loop.
    override val chunk: Int = PREFILL_CHUNK

    override fun prefillLast(tokens: IntArray, position: Int): FloatArray {{
        val logits = prefill(tokens, position)
        return logits.copyOfRange(logits.size - VOCAB_SIZE, logits.size)
    }}

    override fun decodeLogits(token: Int, position: Int): FloatArray = decode(token, position)
}}
"""


# platform -> (file name, generator(folder, manifest))
SAMPLES = {"android": ("RecurrentGemmaLiteRT.kt", kotlin_litert)}
