"""ExecuTorch: one `.pte` program with decode, prefill, reset and read_state over shared state buffers.

Stages (each a method below, called in this order by the build pipeline):
1. quantize: wrap the model in a `StatefulModel`, give each attention block `graphs.RowPutRingBuffer`, and
   apply the recipe in place (torchao `quantize_` for int4; the XNNPACK PT2E quantizer for int8 and w8a8,
   which works on captured graphs, one per method). The calibrated recipe w8a8 first captures real (tokens,
   position, state) samples along the fp32 model's trajectory over `ctx.calibration_tokens`, one set per
   method (`executorch_calibration`). With the row-put ring buffer, decode puts the new key and value into
   one slot (`index_put`), which `to_executorch`'s reinplace pass makes an in-place write of the cache
   buffer, where the shared model's blend rewrites every slot and ExecuTorch then copies each cache back whole.
2. export: `torch.export(strict=False)` of decode (tokens [1, 1]) and prefill (tokens [1, chunk]), plus
   two small state methods, `reset` (zeroes the state) and `read_state` (returns it).
3. lower: `to_edge_transform_and_lower` with the XNNPACK partitioner for decode and prefill, after the
   edge rewrites of `executorch_rewrites` (option `xnnpack_rewrites`, default all) that let XNNPACK take
   the ops it would refuse (RMSNorm's mean, the RG-LRU's selections, weight-only arithmetic), then
   `to_executorch` with `share_mutable_buffers=True`, which places every state buffer once, in its own
   memory arena (mem_id 2) that all four methods address at the same offsets.
4. write: `model.pte`, and `model.ptd` beside it where int4's 4-bit head and its gather table are the same
   bytes (option share_table): ExecuTorch's named data, stored once for both, that the runtime loads with the
   program (`Runtime.load_program(pte, data_path=ptd)`).

ExecuTorch facts this relies on (measured with executorch 1.5.1, see notes/executorch.md):
- Without `share_mutable_buffers`, each method plans its own copy of the state among its activations:
  decode after a prefill then ignores the chunk (logits off by 4 on the test model).
- Buffers marked by `InitializedMutableBufferPass` are (re)initialised from the program *when their
  method is loaded*, shared or not. The runner therefore loads every method before the first call; a
  method loaded later would silently zero the state of a sequence in progress.
- `Program.load_method` caches methods, so loading again does not reset: `reset` does that explicitly.
"""

from __future__ import annotations

import collections
import types
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rgexport.backends.base import Backend, BuildContext, Runner, standard_io_contract, tensor_io
from rgexport.backends.executorch.calibration import W8A8_NOTE, calibration_samples
from rgexport.backends.executorch.export import (
    _INITIALISED_METHODS,
    ARTIFACT_FILE,
    DATA_TAG,
    STATE_METHODS,
    _delegation,
    _example_inputs,
    _forward_as,
    _Prepared,
    _StateMethods,
    _zero_buffers_,
    cache_writes,
    check_edge_dialect,
    edge_checked_once,
    forget_lowered_graphs,
    head_data_external,
    planned_memory,
    preprocess_shares_weights,
    provenance_shared,
    quantised_weights_serialized_once,
    release_delegated_weights,
    serialized_weights_shared,
    xnnpack_passes_that_apply,
)
from rgexport.backends.executorch.recipes import (
    GROUP_SIZE,
    RECIPES,
    Int4GatherEmbedder,
    Int8GatherEmbedder,
    _tie_head_as_linear_,
    eager_in_slices_,
    pack_int4_rows,
    quantize_rows_,
    share_table_with_head_,
)
from rgexport.backends.executorch.runner import ExecuTorchRunner
from rgexport.errors import RgexportError
from rgexport.graphs import StatefulModel, put_decode_rows
from rgexport.model import Griffin, TensorSpec


def _head_bits(options: dict[str, Any], default: int = 4) -> int:
    """Option head_bits (int4's tied head), checked: 8 or 4; `default` where it is unset."""
    bits = options.get("head_bits", default)
    if bits not in (4, 8) or isinstance(bits, bool):
        raise RgexportError(f"option head_bits is {bits!r}; expected 4 or 8")
    return bits


def _shares_table(options: dict[str, Any]) -> bool:
    """Whether int4 stores its 4-bit head and the gather table once (`SharedTableEmbedder`, `model.ptd`): option
    share_table (default true) where the head is 4-bit and the gather reads its rows. Unset options count as
    the streamed defaults (quantized_gather and a 4-bit head), as `table_copies_bits` counts them."""
    share = options.get("share_table", True)
    if not isinstance(share, bool):
        raise RgexportError(f"option share_table is {share!r}; expected true or false")
    return share and options.get("quantized_gather", True) is not False and _head_bits(options) == 4


class ExecuTorchBackend(Backend):
    """ExecuTorch with the XNNPACK delegate; state lives in the program as shared mutable buffers."""

    name = "executorch"
    extra = "executorch"
    artifact_suffix = ".pte"
    packages = ("executorch", "torch", "torchao")
    build_base_bytes = int(1.5 * (1 << 30))  # a larger toolchain than ONNX's and LiteRT's
    # ExecuTorch's Python runtime takes torch tensors, so it needs torch; PyPI's aarch64 torch 2.13.0 is
    # a CUDA 13 build whose libraries need libcudart, cuBLAS, cuDNN, NCCL... at load time (several GB
    # of NVIDIA wheels, one of them not published for aarch64 in the pinned version). The CPU path never
    # calls them, so the emulated device links small aarch64 stand-ins that define each symbol torch
    # imports from them (every function returns 100, cudaErrorNoDevice). Installed without
    # dependencies: executorch's own list is its compiler's (pandas, torchao, hydra, ...); `extras` is
    # what `import torch` and `executorch.runtime` import.
    device_runtime: ClassVar[dict[str, Any]] = {
        "dists": {"executorch": "1.5.1", "torch": "2.13.0"},
        "extras": {"ruamel.yaml": "0.18.10", "pyyaml": "6.0.2", "packaging": "25.0", "tabulate": "0.9.0",
                   "flatbuffers": "25.2.10", "typing-extensions": "4.12.2", "sympy": "1.14.0", "mpmath": "1.3.0",
                   "filelock": "3.18.0", "networkx": "3.4.2", "jinja2": "3.1.6", "markupsafe": "3.0.2",
                   "fsspec": "2025.3.0"},
        "no_deps": True,
        "cuda_stubs": {
            "lib_dirs": ["torch/lib", "executorch/lib", "executorch/extension/pybindings"],
            "extensions": ["torch/_C.*.so", "torch/lib/libtorch_global_deps.so",
                           "executorch/extension/pybindings/_C.*.so"],
        },
        "module": "executorch.runtime",
    }
    device_module = "device.py"
    options = {
        "delegate": '"xnnpack" (the only one supported)',
        "quantized_gather": "int4: the embedding gather reads the head's quantised rows (embedding_byte or "
        "embedding_4bit) instead of a float32 table (default: true when the weights are streamed, else false)",
        "head_bits": "int4: the tied head's weights in 8 bits per channel or 4 bits per group of 32, and the "
        "quantized gather's with them (default: 4 when the weights are streamed, else 8)",
        "share_table": "int4 with head_bits 4 and the quantized gather: the head's packed 4-bit weights and the "
        "gather table are the same bytes, stored once in model.ptd beside model.pte (default: true; false: one "
        "self-contained .pte that holds them twice)",
        "stream_weights": '"auto" (default: above 2 GiB of float32 weights), true or false: int4 reads the '
        "checkpoint one block at a time and quantises each block as it arrives, so the float32 model is never "
        "whole in memory",
        "activation_observer": 'w8a8: "histogram" (default) or "minmax"',
        "xnnpack_rewrites": "edge rewrites that let XNNPACK take more of the graph (default: all of "
        "executorch_rewrites.REWRITES)",
    }
    default_recipe = "fp32"
    recipes = RECIPES
    recipe_aliases = {"8da4w": "int4", "a8w8": "w8a8"}  # names before the one recipe vocabulary

    # 1. Quantise -----------------------------------------------------------------------------------
    def quantize(self, model: Griffin, ctx: BuildContext) -> _Prepared:
        """A StatefulModel over `model`, quantised in place (the pipeline passes a copy where it must)."""
        self.check_recipe(ctx.recipe)
        if self.recipes[ctx.recipe].calibrated:
            ctx.calibration_sequences()  # before any work: a calibrated recipe without text cannot be built
        delegate = ctx.options.get("delegate", "xnnpack")
        if delegate != "xnnpack":
            raise RgexportError(f"ExecuTorch delegate {delegate!r} is not supported; expected one of ['xnnpack']")
        self.require("executorch")
        if ctx.stream is not None and ctx.recipe != "int4":
            raise RgexportError(f"ExecuTorch streams the weights for int4 only, not {ctx.recipe}; leave "
                                "stream_weights out or set it false")
        stateful = StatefulModel(model, prefill_last_only=ctx.prefill_last_only).eval()
        stateful.requires_grad_(False)
        # Decode writes one row of each K/V cache (`index_put`, made in place by `lower`'s reinplace pass),
        # before any recipe captures a graph: the PT2E recipes' captured graphs get it too.
        put_decode_rows(stateful)
        inputs = _example_inputs(ctx.prefill_chunk)
        modules: dict[str, nn.Module] = {"decode": stateful, "prefill": stateful}
        if ctx.recipe == "int4" and ctx.stream is not None:
            self._quantize_int4_from_stream(stateful, ctx)
        elif ctx.recipe == "int4":
            self._quantize_int4(stateful, ctx)
        elif ctx.recipe == "int8":
            modules = {m: self._quantize_int8_pt2e(stateful, inputs[m]) for m in inputs}
        elif ctx.recipe == "w8a8":
            modules = self._quantize_w8a8_pt2e(stateful, inputs, ctx)
        return _Prepared(modules, inputs, stateful.specs)

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        if "head_bits" in options:
            _head_bits(options)  # 4 or 8, said before anything loads
        _shares_table(options)  # true or false, likewise

    def streams_weights(self, recipe: str, options: dict[str, Any]) -> bool | None:
        """int4 only: its quantisation works layer by layer (torchao `quantize_`), so each block is quantised as
        it is read; the PT2E recipes capture the whole float graph first."""
        want = options.get("stream_weights", "auto")
        if want not in ("auto", True, False):
            raise RgexportError(f'option stream_weights is {want!r}; expected "auto", true or false')
        if self.resolve_recipe(recipe) != "int4" or want is False:
            return False
        return True if want is True else None

    def _quantize_int4(self, stateful: StatefulModel, ctx: BuildContext) -> None:
        model = stateful.model
        head = _tie_head_as_linear_(model)
        skipped = self._int4_linears(model, skip=head)
        self._int4_head(model, head, ctx, share=True)
        self._int4_note(skipped, ctx)

    def _quantize_int4_from_stream(self, stateful: StatefulModel, ctx: BuildContext) -> None:
        """int4 over a model without weights (`streaming.fake_griffin`): the embedding, then each block, then
        the final norm are read from `ctx.stream` and put in place, each block's linears quantised before the
        next block is read. The float32 model is never whole: at most the float table (with
        quantized_gather, freed once the head's int8 copy exists) or one float block at a time. The result
        is the in-memory recipe's, tensor for tensor (`_int4_linears` and `_int4_head` are the same calls)."""
        from rgexport.memory import release_freed
        from rgexport.streaming import assert_real

        model, stream = stateful.model, ctx.stream
        ctx.options.setdefault("quantized_gather", True)
        ctx.options.setdefault("head_bits", 4)
        model.embedder = stream.embedder()
        self._int4_head(model, _tie_head_as_linear_(model), ctx, share=True)
        skipped = []
        for i in range(len(model.blocks)):
            block = stream.block(i)
            skipped += [f"blocks.{i}.{n}" for n in self._int4_linears(block)]
            model.blocks[i] = block
            del block
        model.final_norm = stream.final_norm()
        assert_real(model)
        release_freed()  # the float parts' heap, before export and lowering
        self._int4_note(skipped, ctx)

    def table_copies_bits(self, recipe: str, options: dict[str, Any]) -> tuple[float, ...]:
        """int4 keeps the tied head (`_int4_head`: 8 bits, or 4 with a bf16 scale per group of 32 as XNNPACK
        stores them) and a gather table beside it: the head's rows again (quantized_gather, the default for
        streamed builds; 4-bit rows keep torchao's float32 scales) or the float32 table. Unset options count as
        the streamed defaults, the smaller. Shared (option share_table, the default there), the gather keeps only
        its scales: its rows are the head's bytes."""
        if recipe == "int4":
            four = _head_bits(options) == 4
            head, gather = (4 + 16 / GROUP_SIZE, 4 + 32 / GROUP_SIZE) if four else (8, 8)
            if _shares_table(options):
                gather = 32 / GROUP_SIZE
            return (head, 32 if options.get("quantized_gather") is False else gather)
        return super().table_copies_bits(recipe, options)

    def weight_bits(self, recipe: str, options: dict[str, Any]) -> float:
        """int4's linears: XNNPACK stores a bf16 scale per group of GROUP_SIZE beside the 4-bit weights (the
        2B program's XNNPACK data is 4.5 bits per weight it holds)."""
        if recipe == "int4":
            return 4 + 16 / GROUP_SIZE
        return super().weight_bits(recipe, options)

    def packed_at_load_bits(self, recipe: str, options: dict[str, Any]) -> tuple[float, float]:
        """int4: ExecuTorch's loader holds the whole `.pte` while XNNPACK packs every weight it runs (the
        linears and the head) into its own layout, so the load peak holds both. Measured at RecurrentGemma-2B:
        a 2.07 GB file peaked at 4.00 GB while loading and settled at 2.51 (notes/perf.md); shared (1.74 GB in
        `model.pte` and `model.ptd`), 4.33 and 2.84, the `.ptd`'s table counted twice by RSS (mapped twice; PSS
        2.465 GB for both). Counted here at the weights' own bits, scales left out."""
        if recipe == "int4":
            return (4, _head_bits(options))
        return super().packed_at_load_bits(recipe, options)

    def quantise_part(self, part: nn.Module, kind: str, ctx: BuildContext) -> nn.Module | None:
        """int4's own quantised model, a part at a time (the same calls as the build): the reference that the
        artifact must compute closely whatever the weights (`rgexport.validate`, own-model check)."""
        if ctx.recipe != "int4":
            return None
        if kind == "embedder":
            holder = types.SimpleNamespace(embedder=part, config=ctx.config)
            self._int4_head(holder, _tie_head_as_linear_(holder), ctx)
            eager_in_slices_(part)  # the own model runs eagerly: no whole-table temporaries
        elif kind == "block":
            self._int4_linears(part)
        return part

    def _int4_linears(self, module: nn.Module, skip: nn.Module | None = None) -> list[str]:
        """int4 weights in groups of GROUP_SIZE on `module`'s nn.Linear layers (not `skip`, the head); returns
        the names of those left float32 because their in-features are not a multiple of the group."""
        self.require("torchao")
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and m is not skip}
        skipped = sorted(n for n, m in linears.items() if m.in_features % GROUP_SIZE)
        # Only the nn.Linear layers: the RG-LRU's block-diagonal gates (bmm), the recurrence and the
        # embedding gather stay float32.
        quantize_(
            module,
            Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE)),
            filter_fn=lambda m, fqn: m is not skip and isinstance(m, nn.Linear) and m.in_features % GROUP_SIZE == 0,
        )
        return skipped

    def _int4_head(self, model: Griffin, head: nn.Linear, ctx: BuildContext, share: bool = False) -> None:
        """The tied output head (`_tie_head_as_linear_`) in int8 per channel or (option head_bits=4) int4 per
        group, and (option quantized_gather) the gather over its rows with the float32 table dropped; with
        `share` and option share_table, the head's columns swapped in pairs so that its packed bytes are the
        gather table's (`share_table_with_head_`). The own model of validation (`quantise_part`) does not swap:
        the same values, unswapped."""
        self.require("torchao")
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        bits = _head_bits(ctx.options, default=8)
        # The tied output head: as large as all other linears together in small models, a quarter of
        # RecurrentGemma-2B. int8 (the in-memory default) costs SMALL no top-1 agreement where int4 cost one
        # token in 40 (notes/executorch.md); int4 (the streamed default) halves the head's bytes, in the file
        # and read per token. A slice of rows at a time: torchao's temporaries for the whole 2.6 GB table of
        # RecurrentGemma-2B came to 6 GB.
        granularity = PerAxis(0) if bits == 8 else PerGroup(GROUP_SIZE)
        quantize_rows_(head, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8 if bits == 8 else torch.int4,
                                                                   weight_granularity=granularity))
        if ctx.options.get("quantized_gather", False):
            # The embedding gather reads the head's quantised rows through ExecuTorch's quantized
            # `embedding_byte` / `embedding_4bit` (as its llama export does) instead of keeping the float32
            # table, the largest tensor in the program (2.6 GB of about 4.3 GB at RecurrentGemma-2B,
            # notes/perf.md). Same values and scales as the head, so the gather adds no error the head does not
            # have. The ops' kernels live in executorch.kernels.quantized: the manifest lists the op under
            # backend_facts.quantized_ops and `load` imports them. Default for streamed (large) builds.
            import executorch.exir.passes._quant_patterns_and_replacements  # registers the ops
            import executorch.kernels.quantized  # noqa: F401 - its kernels, for validation in this process

            weight = head.weight
            if bool((weight.zero_point != 0).any()):
                raise RgexportError(f"int4: the int{bits} head has non-zero zero points; the quantized gather "
                                    "expects symmetric rows")
            embedder = model.embedder
            # The float32 table first (the head holds its own quantised weight now): the copies below are then
            # made beside the quantised head alone, not beside the table as well (0.66 GB less peak at 2B).
            del embedder.input_embedding
            # Own copies: a buffer aliasing the head parameter's inner tensor is not something torch.export keeps.
            if bits == 8:
                embedder.register_buffer("embedding_int8", weight.qdata.detach().clone())
                embedder.register_buffer("embedding_scales", weight.scale.detach().reshape(-1).clone())
                embedder.__class__, op = Int8GatherEmbedder, "embedding_byte"
            else:
                embedder.register_buffer("embedding_int4", pack_int4_rows(weight.qdata.detach()))
                embedder.register_buffer("embedding_scales", weight.scale.detach().clone())
                embedder.__class__, op = Int4GatherEmbedder, "embedding_4bit"
            ctx.facts["quantized_ops"] = [f"quantized_decomposed::{op}.dtype"]
            if share and bits == 4 and _shares_table(ctx.options):
                share_table_with_head_(embedder)
                ctx.facts["data_file"] = DATA_TAG + ".ptd"  # lowering stores the table there, once
            ctx.notes.append(f"int4: the embedding gather reads the head's int{bits} table ({op}); a runtime "
                             "must link ExecuTorch's quantized kernels (Python: import executorch.kernels.quantized).")

    @staticmethod
    def _int4_note(skipped: list[str], ctx: BuildContext) -> None:
        if skipped:
            ctx.notes.append(
                f"int4 left {len(skipped)} linear layers in float32 because their in-features are not a "
                f"multiple of the group size {GROUP_SIZE}: {sorted(skipped)}."
            )

    def _quantize_int8_pt2e(self, stateful: StatefulModel, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
        """PT2E works on a captured graph, so each method gets its own quantised copy."""
        self.require("torchao")
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer()
        quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
        graph = torch.export.export(stateful, inputs, strict=False).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            prepared(*inputs)  # dynamic activations: one pass sets the weight observers
        converted = convert_pt2e(prepared)
        _zero_buffers_(converted, stateful.specs)  # the calibration pass wrote to the state
        return converted

    def _quantize_w8a8_pt2e(self, stateful: StatefulModel, inputs: dict[str, tuple[torch.Tensor, ...]],
                            ctx: BuildContext) -> dict[str, nn.Module]:
        """Static int8 on the linear ops of each method's graph, calibrated on that method's own samples
        (decode: one token; prefill: one chunk) captured from the fp32 model before anything is quantised."""
        self.require("torchao")
        from rgexport.backends.executorch import calibration as ec

        samples = calibration_samples(stateful.model, ctx.calibration_sequences(), ctx.prefill_chunk)
        observer = ctx.options.get("activation_observer", ec.W8A8_OBSERVER)
        modules, facts = {}, {}
        for method in ("decode", "prefill"):
            modules[method], facts[method] = ec.quantize_static_pt2e(
                stateful, inputs[method], stateful.specs, samples[method], ec.W8A8_KINDS, observer=observer,
                dynamic_kinds=ec.W8A8_DYNAMIC_KINDS)
            facts[method]["positions_past_window"] = sum(
                int(s.position.reshape(-1)[0]) >= ctx.config.attention_window_size for s in samples[method])
        _zero_buffers_(stateful, stateful.specs)
        ctx.facts["w8a8"] = {
            "calibration_tokens": sum(len(t) for t in ctx.calibration_sequences()),
            "static_kinds": list(ec.W8A8_KINDS),
            "dynamic_kinds": list(ec.W8A8_DYNAMIC_KINDS),
            "float_kinds": dict(ec.W8A8_FLOAT_KINDS),
            "sensitivity": {k: list(v) for k, v in ec.SENSITIVITY.items()},
            **facts,
        }
        ctx.notes.append(W8A8_NOTE.format(
            decode=facts["decode"]["calibration_samples"], prefill=facts["prefill"]["calibration_samples"],
            last=max(f["positions"][1] for f in facts.values()), observer=observer))
        return modules

    # 2. Export -------------------------------------------------------------------------------------
    def export(self, prepared: _Prepared, ctx: BuildContext) -> dict[str, Any]:
        """ExportedPrograms by method name: decode, prefill, reset, read_state."""
        programs = {}
        with torch.no_grad():
            for method, module in prepared.modules.items():
                programs[method] = torch.export.export(module, prepared.inputs[method], strict=False)
            state = _StateMethods(prepared.specs)
            for method in STATE_METHODS:
                with _forward_as(state, getattr(state, method)) as m:
                    programs[method] = torch.export.export(m, (), strict=False)
        return programs

    # 3. Lower --------------------------------------------------------------------------------------
    def lower(self, exported: dict[str, Any], ctx: BuildContext) -> Any:
        """XNNPACK-lowers decode and prefill; plans the state once for all methods."""
        self.require("executorch")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

        from rgexport.backends.executorch import rewrites as executorch_rewrites
        from rgexport.memory import release_freed

        names = [s.identifier for s in self.state_specs(ctx)]
        rewrites = list(ctx.options.get("xnnpack_rewrites", executorch_rewrites.REWRITES))
        executorch_rewrites.edge_passes(rewrites)  # refuses an unknown name before the slow work
        # One set of pass objects per compute method, as for InitializedMutableBufferPass.
        shares_table = "data_file" in ctx.facts  # quantize made the head's bytes the table's
        # head_data_external last: its tag is set before the serialize-once patch keys a weight by it.
        # The ops XNNPACK keeps whole (linear, ...): the edge check allows them, as ExecuTorch's own does.
        kept_whole = XnnpackPartitioner().ops_to_not_decompose(exported["decode"])[0]
        with preprocess_shares_weights(), serialized_weights_shared() as shared, \
                quantised_weights_serialized_once(ctx.disposable_weights) as once, \
                xnnpack_passes_that_apply() as skipped, head_data_external(shares_table) as tagged, \
                provenance_shared() as provenance:
            edge = to_edge_transform_and_lower(
                exported,
                partitioner={m: [XnnpackPartitioner()] for m in ("decode", "prefill")},
                transform_passes={m: [*executorch_rewrites.edge_passes(rewrites), InitializedMutableBufferPass(names)]
                                  for m in _INITIALISED_METHODS},
                compile_config=edge_checked_once(),
            )
        check_edge_dialect(edge, kept_whole)
        forget_lowered_graphs()  # ExecuTorch's memos would keep both graphs and their weights alive
        ctx.facts["serialized_duplicates_shared_bytes"] = shared["bytes"]
        ctx.facts["quantised_weights_serialized_again"] = once["reused"]
        ctx.facts["quantised_weights_freed_once_serialized_bytes"] = once["freed_bytes"]
        ctx.facts["xnnpack_passes_skipped"] = dict(sorted(skipped.items()))
        ctx.facts["provenance_records_shared"] = provenance["nodes"]
        # XNNPACK holds the delegated weights serialized now; their tensors go before the program is emitted.
        ctx.facts["weights_released_after_lowering_bytes"] = release_delegated_weights(edge, exported)
        release_freed()
        delegation = {m: _delegation(edge, m) for m in ("decode", "prefill")}
        ctx.facts["xnnpack_rewrites"] = rewrites
        program = edge.to_executorch(ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            run_reinplace_pass=True,  # decode's index_put on a cache -> index_put_ into its buffer, no copy_ back
            emit_mutable_buffer_names=True,
            # The gather table beside the head's XNNPACK data: the named data store keeps equal bytes once.
            external_constants=_table_tag if shares_table else False,
        ))
        if shares_table:
            self._check_table_shared(program, tagged, ctx)
        self._record_facts(program, delegation, ctx)
        return program

    @staticmethod
    def _check_table_shared(program: Any, tagged: dict[str, int], ctx: BuildContext) -> None:
        """That the `.ptd` data holds the gather table and the head's packed weights as one copy: less than the
        table twice. Raises where they were not shared (the head's data untagged, or
        bytes that differ: a packing this ExecuTorch does not do as 1.5.1 did), naming the option that
        writes the self-contained `.pte` instead."""
        files = program._tensor_data or {}  # name -> Cord; executorch 1.5.1's manager has no public sizes
        table = ctx.config.vocab_size * ctx.config.width // 2
        if list(files) != [DATA_TAG] or not tagged["tensors"] or len(files[DATA_TAG]) >= 2 * table:
            sizes = {k: len(v) for k, v in files.items()}
            raise RgexportError(
                f"ExecuTorch did not store the int4 head and its gather table once (data files {sizes}, table "
                f"{table} bytes, {tagged['tensors']} head tensors tagged); build with --option share_table=false")
        ctx.facts["shared_table_bytes"] = table

    def _record_facts(self, program: Any, delegation: dict[str, Any], ctx: BuildContext) -> None:
        writes = ctx.facts["decode_state_writes"] = cache_writes(program)
        ctx.facts["kv_cache_decode_write"] = "in place (index_put_)" if writes["index_put_"] else \
            "one-hot blend, copied back"
        planned = planned_memory(program.executorch_program)
        ctx.facts["planned_memory_bytes"] = planned
        ctx.facts["delegation"] = delegation
        outside = collections.Counter()
        for d in delegation.values():
            outside.update(d["non_delegated"])
        ctx.notes.append(
            "XNNPACK runs {} of {} decode ops in {} delegate calls and {} of {} prefill ops in {}; left to "
            "portable kernels (both methods): {}.".format(
                delegation["decode"]["delegated_ops"],
                delegation["decode"]["delegated_ops"] + delegation["decode"]["non_delegated_ops"],
                delegation["decode"]["partitions"],
                delegation["prefill"]["delegated_ops"],
                delegation["prefill"]["delegated_ops"] + delegation["prefill"]["non_delegated_ops"],
                delegation["prefill"]["partitions"],
                ", ".join(f"{op} x{n}" for op, n in sorted(outside.items())),
            )
        )
        ctx.notes.append(
            f"State ({planned['decode']['state']} bytes) is planned once and shared by all methods; "
            "the runtime loads every method up front because loading a method re-initialises the state."
        )

    # 4. Write --------------------------------------------------------------------------------------
    def write(self, lowered: Any, ctx: BuildContext) -> list[Path]:
        path = Path(ctx.work_dir) / ARTIFACT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            lowered.write_to_file(f)
        data = ctx.facts.get("data_file")
        if data is None:
            return [path]
        lowered.write_tensor_data_to_file(str(path.parent))  # DATA_TAG + ".ptd"
        return [path, path.parent / data]

    # Contract and runtime ----------------------------------------------------------------------------
    @staticmethod
    def state_specs(ctx: BuildContext) -> list[TensorSpec]:
        from rgexport.model import state_spec

        return state_spec(ctx.config, 1)

    def io_contract(self, ctx: BuildContext) -> dict[str, Any]:
        specs = self.state_specs(ctx)
        contract = standard_io_contract(ctx.config, ctx.prefill_chunk, specs, placement="internal",
                                        prefill_logits=ctx.prefill_logits)
        methods = contract["methods"]
        # decode is the prefill graph with a chunk of one: tokens [1, 1] in, logits [1, 1, v] out.
        methods["decode"]["inputs"][0] = tensor_io("tokens", [1, 1], "int32")
        methods["decode"]["outputs"][0] = tensor_io("logits", [1, 1, ctx.config.vocab_size], "float32")
        methods["reset"] = {"inputs": [], "outputs": []}
        methods["read_state"] = {"inputs": [], "outputs": [tensor_io(s.name, s.shape, "float32") for s in specs]}
        contract["new_sequence"] += (
            " `reset` zeroes the state; `read_state` returns it in `state.tensors` order. Load every method "
            "before running any: loading a method re-initialises the shared state."
        )
        return contract

    def check_artifact(self, artifact_dir: Path, manifest: dict[str, Any]) -> Path:
        """The flatbuffer's file identifier, then a load of the program and its methods in a child process:
        ExecuTorch's Python bindings abort the process on some corrupt files (a log line that is not UTF-8)."""
        from rgexport.safety import check_magic, probe_in_child

        path = super().check_artifact(artifact_dir, manifest)
        check_magic(path, b"ET12", 4, "an ExecuTorch program (.pte)")
        data = _data_path(artifact_dir, manifest)
        if data is not None:
            if not data.is_file():
                raise RgexportError(f"{data} does not exist: the program's weights it shares; rebuild the artifact")
            check_magic(data, b"FT01", 4, "ExecuTorch named data (.ptd)")
        quantized = "1" if manifest.get("backend_facts", {}).get("quantized_ops") else "0"
        probe_in_child(["-c", _PROBE, str(path), quantized, str(data or "")], path, "ExecuTorch's runtime")
        return path

    def program_files(self, manifest: dict[str, Any]) -> list[str]:
        """`model.pte` and, where the table is shared, the `model.ptd` it loads with."""
        data = manifest.get("backend_facts", {}).get("data_file")
        return [manifest["artifact"]["file"], *([data] if data else [])]

    def load(self, artifact_dir: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        """A runner on ExecuTorch's Python runtime.

        `threads` resizes XNNPACK's thread pool, which belongs to the process (all loaded programs) and
        defaults to the number of cores; `torch.set_num_threads` does not reach it.
        """
        self.require("executorch")
        if threads is not None:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(int(threads))  # experimental API in 1.5.1
        if manifest.get("backend_facts", {}).get("quantized_ops"):
            # Registers quantized_decomposed kernels (int4's quantized gather) with the Python runtime.
            self.require("executorch.kernels.quantized")
        path = Path(artifact_dir) / manifest["artifact"]["file"]
        names = [t["name"] for t in manifest["io"]["state"]["tensors"]]
        return ExecuTorchRunner(path, int(manifest["io"]["prefill_chunk"]), names,
                                data_path=_data_path(artifact_dir, manifest))


def _data_path(artifact_dir: Path, manifest: dict[str, Any]) -> Path | None:
    """The `.ptd` the program loads with (backend fact data_file), or None where it is self-contained."""
    from rgexport.safety import contained

    data = manifest.get("backend_facts", {}).get("data_file")
    return contained(Path(artifact_dir), data, "the manifest's backend_facts.data_file") if data else None


def _table_tag(node: torch.fx.Node) -> str | None:
    """`to_executorch`'s external_constants: the gather's int4 table goes to the named data file."""
    return DATA_TAG if node.name.endswith("embedding_int4") else None


# Loads a .pte and every method (what ExecuTorchRunner does) in a child process:
# python -c _PROBE PATH QUANTIZED DATA_PATH (empty: none).
_PROBE = """import sys
if sys.argv[2] == "1":
    import executorch.kernels.quantized
from executorch.runtime import Runtime
from rgexport.backends.executorch.runner import share_packed_weights
share_packed_weights()
program = Runtime.get().load_program(sys.argv[1], data_path=sys.argv[3] or None)
for name in sorted(program.method_names):
    program.load_method(name)
"""

