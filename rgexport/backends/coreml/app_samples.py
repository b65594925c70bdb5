"""App sample for Core ML artifacts: a Swift class (iOS) generated from the manifest's I/O contract."""

from __future__ import annotations

from typing import Any

from rgexport.appcode import header, io_tensor


# Swift: Core ML ----------------------------------------------------------------------------------------
def swift_coreml(folder: str, m: dict[str, Any]) -> str:
    io = m["io"]
    chunk = io["prefill_chunk"]
    vocab = m["model"]["config"]["vocab_size"]
    functions = io.get("functions", {"decode": "decode", "prefill": "prefill"})
    stateful = io["state"]["placement"] == "internal"
    package = m["artifact"]["file"]
    decode_in = [t["name"] for t in io["methods"]["decode"]["inputs"]]
    logits_name = io["methods"]["decode"]["outputs"][0]["name"]
    state_lines = ""
    if not stateful:
        state_lines = "\n".join(
            f'        state["{t["input"]}"] = try MLMultiArray(shape: {t["shape"]}, dataType: .float32)'
            for t in io["state"]["tensors"])
    head = header(m, folder)
    return f"""// {head}
import CoreML
import Foundation

/// RecurrentGemma on Core ML: `{package}`, functions `{functions['decode']}` (one token) and
/// `{functions['prefill']}` ({chunk} tokens). State: {io['state']['total_bytes']} bytes, {io['state']['placement']}.
@available(iOS 18.0, macOS 15.0, *)
final class RecurrentGemmaCoreML: StepModel {{
    static let vocabSize = {vocab}
    static let prefillChunk = {chunk}
    private let decodeModel: MLModel
    private let prefillModel: MLModel
    private var state: {"MLState" if stateful else "[String: MLMultiArray]"}

    init(modelURL: URL, computeUnits: MLComputeUnits = .cpuAndNeuralEngine) throws {{
        let decodeConfig = MLModelConfiguration()
        decodeConfig.computeUnits = computeUnits
        decodeConfig.functionName = "{functions['decode']}"
        decodeModel = try MLModel(contentsOf: modelURL, configuration: decodeConfig)
        let prefillConfig = MLModelConfiguration()
        prefillConfig.computeUnits = computeUnits
        prefillConfig.functionName = "{functions['prefill']}"
        prefillModel = try MLModel(contentsOf: modelURL, configuration: prefillConfig)
        {"state = decodeModel.makeState()" if stateful else "state = [:]"}
        try reset()
    }}

    /// Forget the sequence. Position 0 also starts a new one, whatever the state holds.
    func reset() throws {{
{"        state = decodeModel.makeState()" if stateful else state_lines}
    }}

    /// One token at `position`; returns {vocab} logits.
    func decode(token: Int32, position: Int32) throws -> MLMultiArray {{
        let tokenArray = try MLMultiArray(shape: {io_tensor(m, "decode", "inputs", decode_in[0])["shape"]}, dataType: .int32)
        tokenArray[0] = NSNumber(value: token)
        return try run(decodeModel, tokens: tokenArray, position: position)
    }}

    /// Exactly {chunk} tokens starting at `position`; returns [{chunk} x {vocab}] logits.
    func prefill(tokens: [Int32], position: Int32) throws -> MLMultiArray {{
        precondition(tokens.count == Self.prefillChunk)
        let tokenArray = try MLMultiArray(shape: [1, NSNumber(value: Self.prefillChunk)], dataType: .int32)
        for (i, t) in tokens.enumerated() {{ tokenArray[i] = NSNumber(value: t) }}
        return try run(prefillModel, tokens: tokenArray, position: position)
    }}

    private func run(_ model: MLModel, tokens: MLMultiArray, position: Int32) throws -> MLMultiArray {{
        let positionArray = try MLMultiArray(shape: [1], dataType: .int32)
        positionArray[0] = NSNumber(value: position)
        var features: [String: Any] = [
            "{decode_in[0]}": tokens,  // "{io['methods']['prefill']['inputs'][0]['name']}" in prefill
            "{decode_in[1]}": positionArray,
        ]
{"" if stateful else '''        for (name, value) in state { features[name] = value }
'''}        let input = try MLDictionaryFeatureProvider(dictionary: features)
{"        let output = try model.prediction(from: input, using: state)" if stateful else
 "        let output = try model.prediction(from: input)"}
{"" if stateful else _swift_state_readback(io)}        return output.featureValue(for: "{logits_name}")!.multiArrayValue!
    }}

    // StepModel (RecurrentGemmaGeneration.swift): the last row of logits, for the generation loop.
    var chunk: Int {{ Self.prefillChunk }}

    func prefillLast(tokens: [Int32], position: Int32) throws -> [Float] {{
        let logits = try prefill(tokens: tokens, position: position)  // [1, chunk, v], or [1, 1, v]: the last row
        return row(logits, logits.count / Self.vocabSize - 1)
    }}

    func decodeLogits(token: Int32, position: Int32) throws -> [Float] {{
        row(try decode(token: token, position: position), 0)
    }}

    private func row(_ logits: MLMultiArray, _ r: Int) -> [Float] {{
        (0..<Self.vocabSize).map {{ logits[r * Self.vocabSize + $0].floatValue }}
    }}
}}
"""


def _swift_state_readback(io: dict[str, Any]) -> str:
    return "".join(
        f'        state["{t["input"]}"] = output.featureValue(for: "{t["output"]}")!.multiArrayValue!\n'
        for t in io["state"]["tensors"])


# platform -> (file name, generator(folder, manifest))
SAMPLES = {"ios": ("RecurrentGemmaCoreML.swift", swift_coreml)}
