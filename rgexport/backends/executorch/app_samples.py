"""App samples for ExecuTorch artifacts: a Swift class (iOS) and a Kotlin class (Android), generated from the
manifest's I/O contract."""

from __future__ import annotations

from typing import Any

from rgexport.appcode import header
from rgexport.errors import RgexportError


# Swift: ExecuTorch -------------------------------------------------------------------------------------
def swift_executorch(folder: str, m: dict[str, Any]) -> str:
    io = m["io"]
    chunk = io["prefill_chunk"]
    vocab = m["model"]["config"]["vocab_size"]
    head = header(m, folder)
    reset = "        _ = try module.execute(\"reset\", [Value]())\n" if "reset" in io["methods"] else ""
    loads = "".join(f'        try module.load("{name}")\n' for name in io["methods"])
    data = m.get("backend_facts", {}).get("data_file")  # the .ptd that int4's shared table lives in
    if data:
        files = f"`{m['artifact']['file']}` with `{data}`"
        init = ("    /// `dataPath`: the named data file beside the program (ExecuTorch 1.0 or later).\n"
                "    init(path: String, dataPath: String) throws {\n"
                "        module = Module(filePath: path, dataFilePaths: [dataPath])\n")
    else:
        files = f"`{m['artifact']['file']}`"
        init = "    init(path: String) throws {\n        module = Module(filePath: path)\n"
    return f"""// {head}
import ExecuTorch

/// RecurrentGemma on ExecuTorch: {files}, methods `decode` (one token) and `prefill`
/// ({chunk} tokens) sharing the state inside the program ({io['state']['total_bytes']} bytes).
final class RecurrentGemmaExecuTorch: StepModel {{
    static let vocabSize = {vocab}
    static let prefillChunk = {chunk}
    private let module: Module

{init}        // Load every method before running any: loading a method re-initialises the shared state.
{loads}    }}

    /// Position 0 starts a new sequence whatever the state holds.
    func reset() throws {{
{reset}    }}

    func decode(token: Int32, position: Int32) throws -> [Float] {{
        let outputs = try module.execute("decode", [
            Tensor<Int32>([token], shape: [1, 1]),
            Tensor<Int32>([position], shape: [1]),
        ])
        let logits: Tensor<Float> = outputs[0].tensor()!
        return logits.scalars()
    }}

    func prefill(tokens: [Int32], position: Int32) throws -> [Float] {{
        precondition(tokens.count == Self.prefillChunk)
        let outputs = try module.execute("prefill", [
            Tensor<Int32>(tokens, shape: [1, {chunk}]),
            Tensor<Int32>([position], shape: [1]),
        ])
        let logits: Tensor<Float> = outputs[0].tensor()!
        return logits.scalars()
    }}

    // StepModel (RecurrentGemmaGeneration.swift): the last row of logits, for the generation loop.
    var chunk: Int {{ Self.prefillChunk }}

    func prefillLast(tokens: [Int32], position: Int32) throws -> [Float] {{
        let logits = try prefill(tokens: tokens, position: position)
        return Array(logits[(logits.count - Self.vocabSize)...])
    }}

    func decodeLogits(token: Int32, position: Int32) throws -> [Float] {{
        try decode(token: token, position: position)
    }}
}}
"""



# Kotlin: ExecuTorch ------------------------------------------------------------------------------------
def kotlin_executorch(folder: str, m: dict[str, Any]) -> str:
    io = m["io"]
    chunk = io["prefill_chunk"]
    vocab = m["model"]["config"]["vocab_size"]
    head = header(m, folder)
    reset = '        module.execute("reset")\n' if "reset" in io["methods"] else ""
    methods = ", ".join(f'"{name}"' for name in io["methods"])
    data = m.get("backend_facts", {}).get("data_file")
    if data:
        raise RgexportError(
            f"this ExecuTorch artifact keeps weights in {data} beside {m['artifact']['file']}, and ExecuTorch's "
            "Android Module (org.pytorch.executorch.Module, through 1.4.1) loads a program alone; build it with "
            "--option share_table=false for Android (the android profile does)")
    return f"""// {head}
package ai.rgexport.sample

import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/**
 * RecurrentGemma on ExecuTorch: `{m['artifact']['file']}`, methods `decode` (one token) and `prefill`
 * ({chunk} tokens) sharing the state inside the program ({io['state']['total_bytes']} bytes).
 */
class RecurrentGemmaExecuTorch(path: String) : StepModel {{
    companion object {{
        const val VOCAB_SIZE = {vocab}
        const val PREFILL_CHUNK = {chunk}
    }}

    private val module: Module = Module.load(path)

    init {{
        // Load every method before running any: loading a method re-initialises the shared state.
        for (method in listOf({methods})) module.loadMethod(method)
    }}

    /** Position 0 starts a new sequence whatever the state holds. */
    override fun reset() {{
{reset}    }}

    fun decode(token: Int, position: Int): FloatArray {{
        val outputs = module.execute(
            "decode",
            EValue.from(Tensor.fromBlob(intArrayOf(token), longArrayOf(1, 1))),
            EValue.from(Tensor.fromBlob(intArrayOf(position), longArrayOf(1))),
        )
        return outputs[0].toTensor().dataAsFloatArray
    }}

    fun prefill(tokens: IntArray, position: Int): FloatArray {{
        require(tokens.size == PREFILL_CHUNK)
        val outputs = module.execute(
            "prefill",
            EValue.from(Tensor.fromBlob(tokens, longArrayOf(1, PREFILL_CHUNK.toLong()))),
            EValue.from(Tensor.fromBlob(intArrayOf(position), longArrayOf(1))),
        )
        return outputs[0].toTensor().dataAsFloatArray
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
SAMPLES = {"ios": ("RecurrentGemmaExecuTorch.swift", swift_executorch),
           "android": ("RecurrentGemmaExecuTorch.kt", kotlin_executorch)}
