"""What `rgexport bench` counts as weights read per decode token, on every backend: the decode program's
weights, without a table it only gathers from (the embedding: one row per token). Artifacts of the shipped
model, built once per session (validated where tests/test_parity.py reads them too) or per module."""

from __future__ import annotations

import pytest

from rgexport.backends import get_backend
from rgexport.bench import weights_read_per_token
from rgexport.build import BuildOptions, build
from rgexport.manifest import read_manifest


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, shipped_build):
    """artifact(backend, recipe, **options) -> (folder, manifest), each built once: without options, the session's
    validated build (`shipped_build`, which tests/test_parity.py reads too)."""
    built = {}

    def get(backend: str, recipe: str, **options):
        key = (backend, recipe, tuple(sorted(options.items())))
        if key not in built:
            pytest.importorskip({"executorch": "executorch", "tflite": "ai_edge_litert", "coreml": "coremltools",
                                 "onnx": "onnxruntime"}[backend])
            if options:
                out = tmp_path_factory.mktemp(f"{backend}-{recipe}") / "artifact"
                result = build(BuildOptions(backend=backend, recipe=recipe, out=out, validate=False, options=options))
            else:
                result = shipped_build(backend, recipe)
            built[key] = read_manifest(result.out)
        return built[key]

    return get


def traffic(backend: str, folder, manifest) -> dict:
    """The backend helper's breakdown, checked against the hook bench calls."""
    import importlib

    weights = importlib.import_module(f"rgexport.backends.{backend}.weights")
    info = weights.decode_weight_traffic(folder / manifest["artifact"]["file"])
    data = manifest.get("backend_facts", {}).get("data_file")  # ExecuTorch's .ptd: the shared head, read whole
    if data:
        info["read_bytes"] += weights.named_data_bytes(folder / data)
    assert get_backend(backend).weights_read_per_token(folder, manifest) == info["read_bytes"]
    assert weights_read_per_token(folder, manifest) == info["read_bytes"]
    return info


def sizes(manifest) -> tuple[int, int, int]:
    """(vocabulary, width, parameters) of the artifact's model."""
    from rgexport.config import GriffinConfig

    config = GriffinConfig.from_dict(manifest["model"]["config"])
    return config.vocab_size, config.width, config.num_parameters()


def test_executorch_fp32_leaves_out_the_gather_table(artifact):
    """The .pte holds the tied table twice: packed for XNNPACK's head (read whole) and as the constant that
    `aten::embedding` gathers from (a row per token). Only the first is read per token."""
    folder, manifest = artifact("executorch", "fp32")
    v, w, params = sizes(manifest)
    info = traffic("executorch", folder, manifest)
    assert info["gathered_bytes"] == v * w * 4
    assert info["read_bytes"] <= info["file_bytes"] - v * w * 4
    # What is left is the float32 model, read once (the head reads the table whole), plus the decode
    # delegate's own graph: within 1 %. Counting the gather table too would be 22 % over.
    assert 4 * params <= info["read_bytes"] <= 1.01 * 4 * params, (info, 4 * params)


@pytest.mark.slow
@pytest.mark.parametrize("head_bits", [8, 4])
def test_executorch_quantized_gather_leaves_out_the_table_and_scales(artifact, head_bits):
    """int4 with the quantized gather: `embedding_byte` reads one int8 row and its scale per token,
    `embedding_4bit` (head_bits=4) one packed int4 row and its float32 scale per group of 32. With the 4-bit head
    the table is the head's own bytes in `model.ptd` (share_table): the head reads them whole, so they count
    once, and only the gather's scales are left out of the program."""
    folder, manifest = artifact("executorch", "int4", quantized_gather=True, head_bits=head_bits)
    v, w, _ = sizes(manifest)
    info = traffic("executorch", folder, manifest)
    row = v * w if head_bits == 8 else v * w // 2
    shared = head_bits == 4
    assert manifest["backend_facts"].get("data_file") == ("model.ptd" if shared else None)
    assert info["gathered_bytes"] == (0 if shared else row) + (v * 4 if head_bits == 8 else v * (w // 32) * 4)
    files = sum(f["bytes"] for f in manifest["artifact"]["files"] if f["path"] in ("model.pte", "model.ptd"))
    assert info["read_bytes"] <= files - info["gathered_bytes"]
    assert info["read_bytes"] >= row  # the head's own copy of the table is read whole


# fp32: GATHER over an inline float32 table. int8: EMBEDDING_LOOKUP over an int8 table that
# ai-edge-quantizer stores past the flatbuffer (Buffer.offset/size, as for models above 2 GB); the int8
# linears carry a float32 scale per output channel, 1.7 % on the shipped model.
@pytest.mark.parametrize(("recipe", "itemsize", "over"), [
    pytest.param("fp32", 4, 1.01, marks=pytest.mark.slow), ("int8", 1, 1.03)])
def test_tflite_leaves_out_the_gather_table(artifact, recipe, itemsize, over):
    """The decode signature's constant buffers, without the table the gather reads a row of."""
    folder, manifest = artifact("tflite", recipe)
    v, w, params = sizes(manifest)
    info = traffic("tflite", folder, manifest)
    assert info["gathered_bytes"] == v * w * itemsize
    assert info["read_bytes"] <= info["file_bytes"] - v * w * itemsize
    assert itemsize * params <= info["read_bytes"] <= over * itemsize * params, (info, itemsize * params)


def test_coreml_counts_the_shared_table_once(artifact):
    """rgexport's Core ML package keeps the tied table as one blob that `gather` and the head both take:
    the head reads it whole, so it is counted, once (twice would be 22 % over)."""
    folder, manifest = artifact("coreml", "fp16")
    _, _, params = sizes(manifest)
    info = traffic("coreml", folder, manifest)
    assert info["gathered_bytes"] == 0
    assert 2 * params <= info["read_bytes"] <= 1.01 * 2 * params, (info, 2 * params)


@pytest.mark.parametrize("int4", [False, True])
def test_coreml_leaves_out_a_table_only_gathered(tmp_path, int4):
    """An untied embedding in an ML program coremltools converts (and, int4, compresses: the gather then
    reads the table through constexpr_blockwise_shift_scale): the table is left out, the head counted."""
    ct = pytest.importorskip("coremltools")
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from rgexport.backends.coreml.weights import decode_weight_traffic

    rng = np.random.default_rng(0)
    vocab, width, out = 1000, 64, 500
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    head = rng.standard_normal((out, width)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,), dtype=types.int32)], opset_version=ct.target.iOS18)
    def program(token):
        return mb.linear(x=mb.gather(x=table, indices=token, axis=0), weight=head)

    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32)
    bias = out * 4  # linear's zero bias, a float32 blob
    if int4:
        import coremltools.optimize.coreml as cto

        model = cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32, weight_threshold=0)))
        table_bytes, head_bytes = vocab * width // 2 + vocab * 2 * 4, out * width // 2 + out * 2 * 4  # + scales
    else:
        table_bytes, head_bytes = vocab * width * 4, out * width * 4
    model.save(str(tmp_path / "m.mlpackage"))
    info = decode_weight_traffic(tmp_path / "m.mlpackage", function="main")
    assert info["gathered_bytes"] == table_bytes
    assert info["read_bytes"] == head_bytes + bias
