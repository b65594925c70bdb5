"""torch.export of the stateful program's methods and what lowering to XNNPACK left where (delegation, memory plan)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from rgexport.model import TensorSpec

ARTIFACT_FILE = "model.pte"
# The named data file beside it (int4's shared table and head): `DATA_TAG + ".ptd"`, as ExecuTorch names it.
DATA_TAG = "model"
# The tied head's weights in the exported programs (`_tie_head_as_linear_`): torchao's quantised weight is a
# parametrization there, "model.embedder.head.parametrizations.weight.original0".
HEAD_WEIGHTS = "embedder.head."

STATE_METHODS = ("reset", "read_state")

# Initial state data is stored per method that carries it, and copied in when that method loads. The
# compute methods carry it, so whichever of them a runtime loads first starts from zeros.
_INITIALISED_METHODS = ("decode", "prefill")

class _StateMethods(nn.Module):
    """Only the state buffers, under the same names as in `StatefulModel`, for `reset` and `read_state`.

    Exported from a weightless module so that these methods carry no copy of the weights; ExecuTorch
    matches shared buffers across methods by their fully qualified names.
    """

    def __init__(self, specs: list[TensorSpec]):
        super().__init__()
        self.specs = specs
        for s in specs:
            self.register_buffer(s.identifier, torch.zeros(s.shape, dtype=s.dtype))

    def reset(self) -> None:
        for s in self.specs:
            getattr(self, s.identifier).zero_()

    def read_state(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, s.identifier).clone() for s in self.specs)

@contextlib.contextmanager
def _forward_as(module: nn.Module, method: Any) -> Iterator[nn.Module]:
    """Temporarily makes `method` the module's forward, so torch.export captures it."""
    module.forward = method  # type: ignore[method-assign]
    try:
        yield module
    finally:
        del module.forward

@dataclasses.dataclass
class _Prepared:
    """What `quantize` hands to `export`: one module per compute method, and the state spec."""

    modules: dict[str, nn.Module]  # decode, prefill (the same StatefulModel unless PT2E split them)
    inputs: dict[str, tuple[torch.Tensor, ...]]
    specs: list[TensorSpec]

def cache_writes(program: Any, method: str = "decode") -> dict[str, int]:
    """The emitted `method`'s state writes: in-place row puts (`index_put_`) and whole-tensor copies (`copy_`)."""
    plan = next(p for p in program.executorch_program.execution_plan if p.name == method)
    names = collections.Counter(plan.operators[i.instr_args.op_index].name for i in plan.chains[0].instructions
                                if hasattr(i.instr_args, "op_index"))
    return {"index_put_": names.get("aten::index_put_", 0), "copy_": names.get("aten::copy_", 0)}


def _example_inputs(chunk: int) -> dict[str, tuple[torch.Tensor, ...]]:
    position = torch.zeros(1, dtype=torch.int32)
    return {
        "decode": (torch.zeros(1, 1, dtype=torch.int32), position),
        "prefill": (torch.zeros(1, chunk, dtype=torch.int32), position),
    }

def _zero_buffers_(module: nn.Module, specs: list[TensorSpec]) -> None:
    """Zeroes the state buffers: their values at export become the program's initial state."""
    names = {s.identifier for s in specs}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in names:
                buf.zero_()

def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.removesuffix(".default")

def _delegation(edge: Any, method: str) -> dict[str, Any]:
    """Counts the XNNPACK delegates (one call each per step), the operators inside them and those left to
    ExecuTorch's portable kernels."""
    import operator

    gm = edge.exported_program(method).graph_module
    delegated = partitions = 0
    outside: collections.Counter[str] = collections.Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if _op_name(node) == "executorch_call_delegate":
            partitions += 1
            lowered = getattr(gm, node.args[0].target)
            delegated += sum(1 for n in lowered.original_module.graph.nodes
                             if n.op == "call_function" and n.target is not operator.getitem)
        else:
            outside[_op_name(node)] += 1
    return {"partitions": partitions, "delegated_ops": delegated, "non_delegated_ops": sum(outside.values()),
            "non_delegated": dict(sorted(outside.items()))}

def planned_memory(program: Any) -> dict[str, dict[str, int]]:
    """Non-constant (memory-planned) bytes per method of a serialised-schema Program.

    mem_id 1 holds activations and I/O; with shared mutable buffers, mem_id 2 holds the state (the same
    arena for every method). mem_id 0 is reserved and always 0.
    """
    out = {}
    for plan in program.execution_plan:
        sizes = list(plan.non_const_buffer_sizes)
        out[plan.name] = {
            "activations": int(sizes[1]) if len(sizes) > 1 else 0,
            "state": int(sizes[2]) if len(sizes) > 2 else 0,
        }
    return out


@contextlib.contextmanager
def preprocess_shares_weights() -> Iterator[None]:
    """XNNPACK's preprocess works on a copy of each partition's program that shares its weight tensors.

    `BackendDetails.copy_exported_program_for_preprocess` (the hook for this, executorch 1.5.1) deep-copies
    every partition's program before `preprocess`, weights included, and the lowered module keeps that copy:
    one more copy of the weights per method (decode and prefill), 5 GB of int4-in-int8 data at
    RecurrentGemma-2B. XNNPACK's preprocess reads the constants and never writes them, so the copy here is of
    the graph only (deepcopy with the constants pre-seeded in its memo). The `.pte` is byte-identical
    (notes/perf.md; `tests/test_backend_executorch.py` compares builds with and without)."""
    import copy

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    def copy_sharing_weights(cls: Any, program: Any, compile_specs: Any) -> Any:
        memo = {id(t): t for t in [*program.state_dict.values(), *program.constants.values()]}
        return copy.deepcopy(program, memo)

    had = "copy_exported_program_for_preprocess" in vars(XnnpackBackend)
    before = vars(XnnpackBackend).get("copy_exported_program_for_preprocess")
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_sharing_weights)
    try:
        yield
    finally:
        if had:
            XnnpackBackend.copy_exported_program_for_preprocess = before
        else:
            del XnnpackBackend.copy_exported_program_for_preprocess


@contextlib.contextmanager
def serialized_weights_shared() -> Iterator[dict[str, int]]:
    """One `bytes` object per distinct serialized weight across every XNNPACK partition (executorch 1.5.1).

    XNNPACK's preprocess gives each partition a `NamedDataStore` of its own and adds every constant to it as
    a fresh `bytes` copy keyed by the copy's sha256. decode and prefill use the same weights, so each lowered
    module kept a full serialized copy (1.8 GB at RecurrentGemma-2B int4), and the program's store later
    drops the second as a duplicate. Here a blob whose key and bytes equal one already added is replaced by
    that first object before it is stored, so the second copy lives only while it is compared. Yields
    {"bytes": the bytes of the copies so replaced}. The `.pte` is byte-identical
    (tests/test_backend_executorch.py)."""
    from executorch.exir._serialize._named_data_store import NamedDataStore

    first: dict[str, bytes] = {}
    shared = {"bytes": 0}
    add_named_data = NamedDataStore.add_named_data

    def add_shared(self: Any, key: str, data: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, bytes):
            seen = first.get(key)
            if seen is not None and seen is not data and seen == data:
                shared["bytes"] += len(data)
                data = seen
            else:
                first.setdefault(key, data)
        return add_named_data(self, key, data, *args, **kwargs)

    NamedDataStore.add_named_data = add_shared
    try:
        yield shared
    finally:
        NamedDataStore.add_named_data = add_named_data
        first.clear()


def _names(node: torch.fx.Node) -> set[str]:
    """A node's target and the functions it was traced from, lower case."""
    return {str(node.target).lower(), *(str(fn).lower() for _, fn in node.meta.get("source_fn_stack", []))}


def _named(*words: str) -> Any:
    return lambda node, names: any(w in name for name in names for w in words)


# XNNPACK preprocess passes that rewrite only what Griffin's graphs do not have, each with what it could
# rewrite, a test of (node, its `_names`): ops named by these words (in a node's target or the function it was
# traced from), or a concatenation of more than the five inputs XNNPACK takes at once (executorch 1.5.1).
_PASS_NEEDS = {
    "ConvertToUpsampleBilinear2d": _named("upsample", "interpolate"),
    "ConvertToSDPAPass": _named("scaled_dot_product"),
    "FuseBatchNormPass": _named("batch_norm"),
    "DecomposeBatchNorm": _named("batch_norm"),
    "Conv1dUnsqueezePass": _named("convolution", "conv1d"),
    "PReLUReshapePass": _named("prelu"),
    "FuseActivationPass": _named("relu", "hardtanh"),
    "RemoveGetItemPass": _named("max_pool2d_with_indices", "max.dim"),
    "DecomposeConcatenate": lambda node, names: "aten.cat" in str(node.target) and len(node.args[0]) > 5,
}


@contextlib.contextmanager
def xnnpack_passes_that_apply() -> Iterator[dict[str, int]]:
    """XNNPACK's preprocess without the passes that find nothing to rewrite in the partition (executorch 1.5.1).

    Each partition goes through XNNPACK's 17 passes, every one a walk (most a re-trace) of the graph and
    a re-verification of the program: graph work that grows with the blocks, and most of lowering's time.
    Nine of them rewrite only upsampling, SDPA, batch norm, conv1d, PReLU, a ReLU or hardtanh after the op it
    fuses into, max with indices, or a concatenation of more than five inputs (`_PASS_NEEDS`); each is
    skipped where the partition has nothing it could rewrite. Yields {pass name: partitions it was skipped
    in}. The `.pte` is byte-identical (tests/test_backend_executorch.py)."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    skipped: dict[str, int] = {}
    init = XNNPACKPassManager.__init__

    def init_applicable(self: Any, exported_program: Any, passes: Any = None) -> None:
        init(self, exported_program, passes)
        if passes:
            return
        nodes = [(n, _names(n)) for n in exported_program.graph.nodes if n.op == "call_function"]
        kept = []
        for p in self.passes:
            needs = _PASS_NEEDS.get(p.__name__)
            if needs is not None and not any(needs(n, names) for n, names in nodes):
                skipped[p.__name__] = skipped.get(p.__name__, 0) + 1
                continue
            kept.append(p)
        self.passes = kept

    XNNPACKPassManager.__init__ = init_applicable
    try:
        yield skipped
    finally:
        XNNPACKPassManager.__init__ = init


@contextlib.contextmanager
def provenance_shared() -> Iterator[dict[str, int]]:
    """Node provenance recorded by reference while lowering (torch 2.13's `torch.fx.traceback.NodeSource`).

    Every pass that re-traces a graph (some forty of ExecuTorch's and XNNPACK's over decode and prefill)
    records where each node it makes came from, and `NodeSource(node)` deep-copies the node's whole
    `from_node` history for that: a history that grows by a level with every pass, copied once per node per
    pass. Here the new record gets the same history (a new list of the same `NodeSource` objects, which
    nothing changes once made: torch and ExecuTorch build new lists wherever they rewrite one). ExecuTorch
    derives the program's debug handles from these histories; the `.pte` is byte-identical
    (tests/test_backend_executorch.py). Yields {"nodes": the records so made}."""
    from torch.fx.traceback import NodeSource

    made = {"nodes": 0}
    init = NodeSource.__init__

    def init_sharing(self: Any, node: Any, *args: Any, **kwargs: Any) -> None:
        history = node.meta.get("from_node") if node is not None else None
        if history is None:
            init(self, node, *args, **kwargs)
            return
        node.meta["from_node"] = []  # what `init` deep-copies
        try:
            init(self, node, *args, **kwargs)
        finally:
            node.meta["from_node"] = history
        self.from_node = list(history)
        made["nodes"] += 1

    NodeSource.__init__ = init_sharing
    try:
        yield made
    finally:
        NodeSource.__init__ = init


def edge_checked_once() -> Any:
    """The `EdgeCompileConfig` for lowering: ExecuTorch's IR checks off during it, `check_edge_dialect` after.

    With `_check_ir_validity` on (the default), every program a pass returns is verified against the edge
    dialect (each op an edge op over a core ATen op, its tensors' dtypes allowed for it, tensors contiguous):
    a walk of the whole graph after each of some forty passes, a quarter of lowering's time at 9 blocks of
    2B width (149.6 -> 110.9 s, notes/perf.md). The same check once, on the lowered methods, is
    `check_edge_dialect`. Everything else in the config is ExecuTorch's default."""
    from executorch.exir import EdgeCompileConfig

    return EdgeCompileConfig(_check_ir_validity=False)


def check_edge_dialect(edge: Any, preserve_ops: Sequence[Any] = ()) -> None:
    """ExecuTorch's edge-dialect verifier (as `_check_ir_validity` runs it) over each lowered method's graph:
    what XNNPACK did not take must be edge ops over core ATen ops (or over `preserve_ops`, the ops the
    partitioner asked to keep whole, as ExecuTorch allows them) with the dtypes they allow. Raises
    ExecuTorch's `SpecViolationError` where not."""
    from executorch.exir import EdgeCompileConfig
    from executorch.exir.verification.verifier import EXIREdgeDialectVerifier

    verify = EXIREdgeDialectVerifier(edge_compile_config=EdgeCompileConfig(), class_only=True,
                                     preserve_ops=list(preserve_ops))()
    for method in edge.methods:
        verify(edge.exported_program(method).graph_module)


def forget_lowered_graphs() -> None:
    """Drops what ExecuTorch keeps of the graphs it lowered, once lowering is done (executorch 1.5.1).

    Two module-level holders kept every lowered graph, and through it the lowered modules with their
    serialized weights and the programs' quantised weights, for the life of the process: `is_same_node`
    (`exir/backend/utils.py`, an `lru_cache` without a bound over the fx Nodes that `to_backend` compares to
    check a partitioner left the graph alone) and the `why` of XNNPACK's partitioner configs (a
    `WhyNoPartition` that remembers the last node it refused). At 0.48 B parameters the first held 0.25 GiB;
    at RecurrentGemma-2B the first alone held 1.7 GiB through validation (notes/perf.md)."""
    import sys

    from executorch.exir.backend.utils import WhyNoPartition, is_same_node

    is_same_node.cache_clear()
    for name, module in list(sys.modules.items()):
        if name.startswith("executorch.backends.xnnpack.partition") and isinstance(getattr(module, "why", None),
                                                                                   WhyNoPartition):
            module.why.node = None


def release_delegated_weights(edge: Any, exported: dict[str, Any]) -> int:
    """Lets go of the weights XNNPACK has serialized, once lowering is done; returns the bytes let go.

    After `to_edge_transform_and_lower`, the weights of each delegated partition live twice: as XNNPACK's
    serialized data (which the program is written from) and as tensors, held by each lowered module's
    original program and by the torch.export programs the lowering started from (`exported`, emptied here:
    the edge programs hold what the rest of the build needs). After lowering, nothing reads the values of
    those tensors: `to_executorch` re-traces the delegate call with fake tensors (shapes and dtypes only)
    and the emitter reads the original program's graph (executorch 1.5.1). So each becomes a stride-0 view
    of one element, of its shape and dtype. They were 2.7 GB at RecurrentGemma-2B int4. The `.pte` is
    byte-identical (tests/test_backend_executorch.py)."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    kept = {id(t) for m in edge.methods for t in _program_tensors(edge.exported_program(m))}
    released = {}
    for method in edge.methods:
        for _, module in edge.exported_program(method).graph_module.named_children():
            if not isinstance(module, LoweredBackendModule):
                continue
            program = module.original_module
            for table in (program.state_dict, program.constants):
                for name, t in list(table.items()):
                    if type(t) not in (torch.Tensor, nn.Parameter) or id(t) in kept or t.numel() <= 1:
                        continue
                    released[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                    stand_in = torch.zeros((), dtype=t.dtype).expand(t.shape)
                    table[name] = nn.Parameter(stand_in, requires_grad=False) if isinstance(t, nn.Parameter) \
                        else stand_in
    exported.clear()
    return sum(released.values())


def _program_tensors(program: Any) -> list[Any]:
    return [t for t in (*program.state_dict.values(), *program.constants.values()) if isinstance(t, torch.Tensor)]


TRIM_EVERY = 64 << 20  # bytes of freed weights between heap trims while lowering


@contextlib.contextmanager
def quantised_weights_serialized_once(free: bool) -> Iterator[dict[str, int]]:
    """Each quantised weight serialized once for all XNNPACK partitions, and (`free`) its int8 values let go
    as soon as they are (executorch 1.5.1).

    torchao holds int4 weights one value a byte (`IntxUnpackedToInt8Tensor`), and lowering kept all of them
    while XNNPACK's serialized copy (4 bits a weight and bf16 scales) grew beside them: 8.0 and 4.5 GiB at
    RecurrentGemma-9B, the build's peak (notes/perf.md).
    - Once: prefill's partitions ask `NodeVisitor.get_serialized_buffer_index` for the weights that decode's
      have serialized already. The first call for an int8 weight (by its name in the program and the form
      asked for) is XNNPACK's own; a later one appends the same constant entry and hands the store the same
      bytes, without reading the tensor.
    - `free`: then nothing reads the int8 values again, so right after the first call every tensor on the
      weight's memory is pointed at a single zero. Lowering makes many (a Parameter per program: torch.export,
      edge and each partition, torchao's inner tensors of the model): they are found once, by the garbage
      collector's list, when serializing starts. Only for a build that holds the quantised model nowhere
      else (`BuildContext.disposable_weights`). A freed weight asked for in another form, or again by a later
      lowering, is refused (RuntimeError: its stand-in has no strides), never read as zeros. The freed
      weights came from glibc's heap and stay resident (not reused by the serialized bytes) until trimmed:
      the heap is trimmed every TRIM_EVERY bytes freed.
    Yields {"reused": calls served again, "freed_bytes": int8 bytes let go}. The `.pte` is byte-identical
    (tests/test_backend_executorch.py)."""
    import copy

    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from executorch.backends.xnnpack.utils.utils import get_param_tensor, get_tensor_name, is_param_node

    from rgexport.memory import trim_heap

    serialize = NodeVisitor.get_serialized_buffer_index
    done: dict[tuple[Any, ...], tuple[Any, tuple[Any, ...], dict[str, Any]]] = {}
    stats = {"reused": 0, "freed_bytes": 0}
    on_memory: dict[int, list[torch.Tensor]] | None = None  # storage address: the int8 tensors on it
    untrimmed = 0  # bytes freed since the heap was last trimmed

    def serialized_once(self: Any, tensor: torch.fx.Node, xnn_graph: Any, vals_to_ids: Any, convert_to_nhwc: bool,
                        swap_in_out_for_weights: bool, quant_params: Any, force_fp32: bool = False,
                        groups: int = 1) -> int:
        args = (tensor, xnn_graph, vals_to_ids, convert_to_nhwc, swap_in_out_for_weights, quant_params, force_fp32,
                groups)
        node = None if quant_params is None else quant_params.q_input
        if node is None or not is_param_node(self.exported_program, node):
            return serialize(self, *args)
        name = get_tensor_name(self.exported_program, node)
        source = get_param_tensor(self.exported_program, node)
        if not name or not isinstance(source, torch.Tensor) or source.dtype != torch.int8:
            return serialize(self, *args)
        custom = tensor.meta.get("custom") or {}
        key = (name, convert_to_nhwc, swap_in_out_for_weights, force_fp32, groups, quant_params.is_qc4w,
               custom.get("delegate_constant_tag"))
        if key in done:
            entry, add_args, add_kwargs = done[key]
            xnn_graph.constant_data.append(copy.copy(entry))
            self._named_data_store.add_named_data(*add_args, **add_kwargs)
            stats["reused"] += 1
            return len(xnn_graph.constant_data) - 1
        if source.numel() > 1 and not any(source.stride()):  # the stand-in of a freed weight
            raise RuntimeError(f"weight {name} was freed by an earlier lowering, or by this one in another form "
                               "(BuildContext.disposable_weights): its values are gone; export the model again")
        store, added = self._named_data_store, []

        def add(*a: Any, **k: Any) -> Any:
            added.append((a, k))
            return type(store).add_named_data(store, *a, **k)

        store.add_named_data = add
        try:
            index = serialize(self, *args)
        finally:
            del store.add_named_data
        (add_args, add_kwargs), = added
        done[key] = (copy.copy(xnn_graph.constant_data[index]), add_args, add_kwargs)
        if free and source.numel() > 1:
            nonlocal on_memory, untrimmed
            if on_memory is None:  # lowering's programs exist by now
                on_memory = _int8_tensors_by_memory()
            nbytes = source.untyped_storage().nbytes()
            stats["freed_bytes"] += nbytes
            untrimmed += nbytes
            with torch.no_grad():
                for t in on_memory.pop(source.untyped_storage().data_ptr(), [source]):
                    t.set_(torch.zeros((), dtype=t.dtype).expand(t.shape))
            if untrimmed >= TRIM_EVERY:
                trim_heap()  # freed weights from the heap stay resident, and are not reused, until trimmed
                untrimmed = 0
        return index

    NodeVisitor.get_serialized_buffer_index = serialized_once
    try:
        yield stats
    finally:
        NodeVisitor.get_serialized_buffer_index = serialize
        done.clear()
        on_memory = None


@contextlib.contextmanager
def head_data_external(enabled: bool) -> Iterator[dict[str, int]]:
    """(`enabled`) XNNPACK's serialized data for the tied head goes to the named data file DATA_TAG, where
    `to_executorch(external_constants=...)` puts the gather's table: equal bytes (`SharedTableEmbedder`), kept
    once by ExecuTorch's named data store (executorch 1.5.1). XNNPACK reads a weight node's
    `meta["custom"]["delegate_constant_tag"]` (for the weight and its scales) when it serializes it; the tag is
    set there on the head's weight node, found by its name in the program. Yields {"tensors": head weights
    tagged} (one per partition that runs the head)."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from executorch.backends.xnnpack.utils.utils import get_tensor_name, is_param_node

    stats = {"tensors": 0}
    if not enabled:
        yield stats
        return
    serialize = NodeVisitor.get_serialized_buffer_index

    def tagged(self: Any, tensor: torch.fx.Node, *args: Any, **kwargs: Any) -> int:
        quant_params = args[4] if len(args) > 4 else kwargs.get("quant_params")
        node = None if quant_params is None else quant_params.q_input
        if node is not None and is_param_node(self.exported_program, node) and \
                HEAD_WEIGHTS in (get_tensor_name(self.exported_program, node) or ""):
            tensor.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG
            stats["tensors"] += 1
        return serialize(self, tensor, *args, **kwargs)

    NodeVisitor.get_serialized_buffer_index = tagged
    try:
        yield stats
    finally:
        NodeVisitor.get_serialized_buffer_index = serialize


def _int8_tensors_by_memory() -> dict[int, list[torch.Tensor]]:
    """Every plain int8 tensor (Tensor or Parameter) with more than one element that Python's garbage collector
    tracks, by the address of its memory."""
    import gc

    found: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
    for o in gc.get_objects():
        if type(o) in (torch.Tensor, nn.Parameter) and o.dtype == torch.int8 and o.numel() > 1:
            found[o.untyped_storage().data_ptr()].append(o)
    return found
