"""What every backend provides: recipes, the export stages, and a runner in its own runtime.

A backend is a small class with four stage methods the build pipeline calls in order
(quantize -> export -> lower -> write), an `io_contract` for the manifest, and `load`, which returns a
`Runner` that executes the artifact in the backend's runtime. Backend libraries are imported inside
these methods, never at module import, and a missing one raises `MissingDependencyError`.

Recipe names form one vocabulary (`RECIPE_NAMES`): a name means the same weights and activations on every
backend that has it. A backend may keep earlier names of its recipes as `recipe_aliases`; they still build,
with a one-line notice naming the current one.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from rgexport.config import GriffinConfig, prefill_last_only
from rgexport.errors import MissingDependencyError, RgexportError
from rgexport.graphs import input_name, output_name
from rgexport.model import Griffin, TensorSpec

# The one recipe vocabulary: name -> what it means on every backend that offers it.
RECIPE_NAMES = {
    "fp32": "float32 weights and compute",
    "fp16": "float16 weights (and compute where the runtime has fp16 kernels); precision-critical parts in float32",
    "int8": "int8 weights, int8 activations quantised on the fly (dynamic) inside each matmul",
    "int4": "4-bit weights in blocks of 32 input channels, int8 dynamic activations inside each matmul",
    "w8a8": "int8 weights and static int8 activations, their ranges calibrated on real text",
    "w8": "weight-only int8: int8 weights, float compute",
    "w4": "weight-only int4: 4-bit weights in blocks of 32 input channels, float compute",
    "palette4": "weight-only 4-bit palettes (k-means lookup tables), float compute",
}
# The fewest bits a recipe stores any weight in (scales, tables and float islands come on top): parameters x
# bits / 8 is a lower bound of an artifact's weights, whatever the backend.
RECIPE_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "w8a8": 8, "w8": 8, "w4": 4, "palette4": 4}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named way of building an artifact. `quantized` recipes are judged on agreement, not logits."""

    name: str
    description: str
    quantized: bool = False
    calibrated: bool = False


@dataclasses.dataclass
class BuildContext:
    """Everything a backend's stages may need, and where they leave facts for the manifest."""

    config: GriffinConfig
    recipe: str
    work_dir: Path  # the backend writes its artifact files here
    prefill_chunk: int
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # from the target profile
    prefill_logits: str = "all"  # prefill returns "all" tokens' logits or the "last" one's (config.PREFILL_LOGITS)
    calibration_tokens: list[list[int]] | None = None  # tokenised calibration text (calibrated recipes)
    notes: list[str] = dataclasses.field(default_factory=list)  # sentences for the manifest and report
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)  # backend-specific manifest fields
    # A StreamedCheckpoint when the model handed to `export` has no weights (`Backend.streams_weights`): the
    # backend reads them from here part by part.
    stream: Any = None
    # True where the build holds the quantised model nowhere but in what it hands `export` (a copy, a streamed
    # model, or a large model it let go): lowering may then free each weight once it is serialized.
    disposable_weights: bool = False

    def calibration_sequences(self) -> list[list[int]]:
        """The calibration token sequences of a calibrated recipe; an error naming where they come from if
        there are none (or an empty one)."""
        from rgexport.errors import RgexportError

        tokens = self.calibration_tokens
        if not tokens or not all(len(t) for t in tokens):
            raise RgexportError(
                f"recipe {self.recipe} is calibrated: it needs calibration token sequences (ctx.calibration_tokens; "
                "`rgexport build` tokenises calibration/corpus/calibration.txt or --calibration FILE)")
        return tokens

    @property
    def prefill_last_only(self) -> bool:
        """Whether the prefill graph returns the chunk's last logits alone (`graphs.PrefillIO(last_only=)`)."""
        return prefill_last_only(self.prefill_logits)


class Runner(abc.ABC):
    """Runs one artifact in its runtime. Numpy in, numpy out; one sequence at a time (batch 1)."""

    prefill_chunk: int
    # Rows a prefill call returns: the chunk's, or 1 where the artifact's prefill returns its last token's
    # logits alone (manifest io.prefill_logits "last"; `rgexport.runtime.load_runner` sets it).
    prefill_rows: int | None = None
    # Set where the runner is not the artifact's own runtime (Core ML on Linux): reports say so beside speed.
    stand_in: ClassVar[str] = ""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the current sequence (zero the state). Position 0 also starts a new sequence."""

    @abc.abstractmethod
    def decode(self, token: int, position: int) -> np.ndarray:
        """One token at `position` -> logits [vocab] float32."""

    @abc.abstractmethod
    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        """Exactly `prefill_chunk` tokens starting at `position` -> logits [chunk, vocab] float32, or [1, vocab]
        (the last token's) where the artifact's prefill returns the last logits alone."""

    def state(self) -> dict[str, np.ndarray] | None:
        """The current state by name (float32), where the runtime exposes it; else None."""
        return None

    def memory(self) -> dict[str, int]:
        """The runtime's own allocation figures in bytes, where it reports them."""
        return {}


def manifest_prefill_rows(io: dict[str, Any]) -> int:
    """Rows of logits a prefill call returns, from a manifest's `io`: 1 where `prefill_logits` is "last", else the
    chunk (a manifest from before the field means every row)."""
    return 1 if prefill_last_only(io.get("prefill_logits", "all")) else int(io["prefill_chunk"])


def prefill_every_row(runner: Runner) -> bool:
    """Whether `runner.prefill` returns a row of logits for every token of its chunk."""
    return runner.prefill_rows in (None, runner.prefill_chunk)


def feed(runner: Runner, tokens: Sequence[int], position: int = 0, every_token: bool = True) -> np.ndarray:
    """Runs a prompt of any length: whole chunks through `prefill`, the rest through `decode`.

    Returns the logits for every token [n, vocab]. Where the artifact's prefill returns its last token's
    logits alone, every token goes through `decode` instead; `every_token=False` keeps prefill and returns
    the rows it has, the last token's last (what generation needs: `last_logits`).
    """
    out = []
    i = 0
    chunk = runner.prefill_chunk if not every_token or prefill_every_row(runner) else 1
    while len(tokens) - i >= chunk > 1:
        out.append(runner.prefill(tokens[i : i + chunk], position + i))
        i += chunk
    for j in range(i, len(tokens)):
        out.append(runner.decode(tokens[j], position + j)[None])
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)


def last_logits(runner: Runner, tokens: Sequence[int], position: int = 0) -> np.ndarray:
    """Feeds `tokens` from `position` (whole chunks through prefill) -> the last token's logits [vocab]."""
    if not tokens:
        raise RgexportError("no tokens to feed")
    return feed(runner, tokens, position, every_token=False)[-1]


class Backend(abc.ABC):
    """One runtime. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    extra: ClassVar[str]  # pip extra that installs the runtime
    artifact_suffix: ClassVar[str]  # e.g. ".pte"
    recipes: ClassVar[dict[str, Recipe]]
    default_recipe: ClassVar[str]
    recipe_aliases: ClassVar[dict[str, str]] = {}  # an earlier recipe name -> its name in RECIPE_NAMES
    packages: ClassVar[tuple[str, ...]] = ()  # distributions whose versions go into the manifest
    options: ClassVar[dict[str, str]] = {}  # backend option -> what it does (profiles, `build --option`)
    # Where the recipe's quantisation happens: "quantise" (the torch model, in `quantize`) or "lower" (the
    # converted program: ONNX graphs, the LiteRT flatbuffer, the Core ML program). The build names its stages
    # after it: "quantise" where `quantize` quantises, "prepare" where it only checks inputs.
    quantizes_in: ClassVar[str] = "quantise"
    # Peak resident memory of one build beyond its weights (the runtime and toolchain), for the executors'
    # resource estimate (`rgexport.executors.cell_resources`).
    build_base_bytes: ClassVar[int] = 1 << 30
    # A build that loads the whole float32 model (no streaming) peaked at this multiple of the model's bytes
    # where it was measured at scale; None where not measured. A large model whose estimate exceeds this
    # machine's memory is refused before anything is loaded (`rgexport.build`), not killed by the OOM killer.
    whole_model_build_factor: ClassVar[float | None] = None
    # The runtime on the emulated aarch64 device (`rgexport.emulate`); empty where there is none:
    #   dists       distribution -> version to install (this machine's installed version wins)
    #   module      what the smoke test imports
    #   extras      further distributions (with no_deps: the ones the runtime imports)
    #   no_deps     install without dependencies
    #   cuda_stubs  {"lib_dirs": [...], "extensions": [...]}: link stand-ins for the CUDA libraries that
    #               these extensions (globs under the site folder) need, searched for in lib_dirs
    device_runtime: ClassVar[dict[str, Any]] = {}
    # The device-side runner class: a module in this backend's package, standalone (the standard library,
    # numpy and the runtime; no torch, nothing from rgexport), that `rgexport/emulate/device_runner.py`
    # loads by path. It defines `METHODS`, the class that loads an artifact and calls its methods.
    device_module: ClassVar[str | None] = None

    def device_module_path(self) -> Path | None:
        """The file of `device_module`, or None where this backend has no device-side runner."""
        if self.device_module is None:
            return None
        import inspect

        return Path(inspect.getfile(type(self))).with_name(self.device_module)

    def stand_in_here(self) -> str:
        """What runs this backend's artifacts on this machine where it is not their own runtime (the
        `Runner.stand_in` that `load` would return); empty where it is."""
        return ""

    def table_copies_bits(self, recipe: str, options: dict[str, Any]) -> tuple[float, ...]:
        """Bits per parameter of each copy of the tied embedding table that `recipe` stores, at the least
        (`rgexport.budget`'s lower bound): one copy at the recipe's bits, unless the backend keeps more."""
        return (RECIPE_BITS[recipe],)

    def weight_bits(self, recipe: str, options: dict[str, Any]) -> float:
        """Bits per parameter that `recipe` stores at the least, scales included where the backend knows its
        layout (`rgexport.budget`'s lower bound): the recipe's bits unless the backend says more."""
        return RECIPE_BITS[recipe]

    def packed_at_load_bits(self, recipe: str, options: dict[str, Any]) -> tuple[float, float]:
        """Bits per parameter (outside the tied table, of the table) of a second copy of the weights that the
        runtime makes while the artifact's own copy is still held, at the least: a load peak the budget must
        hold (`rgexport.budget.memory_lower_bound`). Nothing by default."""
        return (0, 0)

    def describe_file(self, path: Path) -> dict[str, Any] | None:
        """A summary of one of this backend's files (`rgexport info FILE`), where the backend can read one
        alone; None where it cannot."""
        return None

    # Availability ------------------------------------------------------------------------------
    def require(self, module: str) -> Any:
        """Imports `module` or raises an error naming this backend's extra."""
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise MissingDependencyError(module.split(".")[0], self.extra, e) from None

    def runtime_versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for p in self.packages:
            try:
                out[p] = version(p)
            except PackageNotFoundError:
                out[p] = "not installed"
        return out

    def check_options(self, options: dict[str, Any]) -> None:
        from rgexport.errors import RgexportError

        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = "; ".join(f"{k}: {v}" for k, v in self.options.items()) or "none"
            raise RgexportError(f"backend {self.name} has no option {', '.join(unknown)}. Its options: {known}")

    def streams_weights(self, recipe: str, options: dict[str, Any]) -> bool | None:
        """Whether `export` can take a model without weights and read them from `BuildContext.stream` part by
        part, so the float32 model is never whole: False (the default) where it cannot, True where
        `options` ask for it, None where the build decides by size (`config.is_small`)."""
        return False

    def check_size(self, config: Any, recipe: str, options: dict[str, Any], streams: bool) -> None:
        """Refuses (RgexportError, one line that says why and what to build instead), before anything is loaded,
        a build that this backend's toolchain cannot make correctly at `config`'s size; `streams`: whether the
        build reads the weights from a stream (`streams_weights`, as the build decided it). Default: none."""
        return None

    def quantise_part(self, part: Any, kind: str, ctx: BuildContext) -> Any:
        """The recipe's own quantised model, a part at a time: `part` (an Embedder, a ResidualBlock or the
        final RMSNorm; `kind` "embedder", "block" or "final_norm", float32, the caller's to change) as the
        artifact holds it, run in PyTorch. Validation compares the artifact with it at a tight bound (a
        miscompile shows whatever the weights, random ones included); None where this backend cannot give
        it for `ctx.recipe` (then only the comparison with float32 judges the artifact)."""
        return None

    # Build stages --------------------------------------------------------------------------------
    def quantize(self, model: Griffin, ctx: BuildContext) -> Any:
        """Applies the recipe's torch-level quantisation (`quantizes_in == "quantise"`), or checks what the
        recipe will need before the slow stages; returns what `export` takes."""
        return model

    @abc.abstractmethod
    def export(self, prepared: Any, ctx: BuildContext) -> Any:
        """Captures the graphs (decode and prefill)."""

    def lower(self, exported: Any, ctx: BuildContext) -> Any:
        """Lowers/converts to the runtime's format (and quantises there, where `quantizes_in == "lower"`);
        returns what `write` takes. `exported` is the backend's to consume: a backend may empty it to let
        weights go once they live in the lowered form."""
        return exported

    @abc.abstractmethod
    def write(self, lowered: Any, ctx: BuildContext) -> list[Path]:
        """Writes the artifact file(s) into `ctx.work_dir`; returns their paths."""

    @abc.abstractmethod
    def io_contract(self, ctx: BuildContext) -> dict[str, Any]:
        """Inputs, outputs and state of each method, for the manifest (see `functional_io_contract`)."""

    # Runtime -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, artifact_dir: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        """Loads the artifact described by `manifest` from `artifact_dir` into a runner; `threads` sizes the
        runtime's CPU thread pool where it has one (None: the runtime's default)."""

    def program_files(self, manifest: dict[str, Any]) -> list[str]:
        """The files (manifest paths) of the decode program an app loads: the main file (or folder) and the
        data files it refers to. The accuracy matrix sizes an artifact by them."""
        main = manifest["artifact"]["file"]
        return [f["path"] for f in manifest["artifact"]["files"]
                if f["path"] == main or f["path"].startswith(main + "/")]

    def weights_read_per_token(self, artifact_dir: Path, manifest: dict[str, Any]) -> int:
        """Bytes of weights one decode step reads, for the bandwidth limit of `rgexport bench`: what the
        backend package's `weights.weights_read_per_token` counts (its decode program's weights, without
        tables it only gathers from: an embedding table is read one row per token). A backend without that
        module counts the main artifact file whole, which overstates the figure by any gathered table."""
        weights = self._own_module("weights")
        if weights is not None:
            return weights.weights_read_per_token(artifact_dir, manifest)
        files = set(self.program_files(manifest))
        return sum(f["bytes"] for f in manifest["artifact"]["files"] if f["path"] in files)

    def _own_module(self, name: str) -> Any:
        """Module `name` of this backend's package, or None when the package has none."""
        package = type(self).__module__.rpartition(".")[0]
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
            return None

    def check_artifact(self, artifact_dir: Path, manifest: dict[str, Any]) -> Path:
        """Checks, without loading it into the runtime, that the artifact's main file is what this backend
        reads (magic bytes, a structural parse; anything that could abort the process runs in a child
        process); raises RgexportError naming the file. Called after the checksums matched, before `load`.
        The default checks that the main file exists; returns its path."""
        from rgexport.errors import RgexportError
        from rgexport.safety import contained

        path = contained(Path(artifact_dir), manifest["artifact"]["file"], "the manifest's artifact.file")
        if not path.exists():
            raise RgexportError(f"{path} does not exist; rebuild the artifact")
        return path

    def variants(self, artifact_dir: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Other ways to load the same artifact that validation checks too: name -> `load` keyword
        arguments (ONNX's .ort files for ONNX Runtime Mobile, say)."""
        return {}

    def app_samples(self) -> dict[str, tuple[str, Any]]:
        """Sample code for apps: platform -> (file name, generator(folder name, manifest) -> source), from the
        `SAMPLES` table of the backend package's `app_samples` module; {} when it has none."""
        module = self._own_module("app_samples")
        return dict(module.SAMPLES) if module is not None else {}

    def check_recipe(self, recipe: str) -> None:
        from rgexport.errors import RgexportError

        if recipe not in self.recipes:
            raise RgexportError(
                f"Backend {self.name} has no recipe {recipe!r}; expected one of {sorted(self.recipes)}"
            )

    def resolve_recipe(self, recipe: str, notify: bool = True) -> str:
        """The current name of `recipe`: itself, or the recipe an earlier name (`recipe_aliases`) stands
        for, with a one-line notice on stderr unless `notify` is false (reading an old manifest). Raises
        RgexportError listing the valid names for anything else."""
        if recipe in self.recipe_aliases:
            current = self.recipe_aliases[recipe]
            if notify:
                from rgexport.notices import notice

                notice(f"{self.name} recipe {recipe!r} is now called {current!r} "
                       f"({RECIPE_NAMES[current]}); building {current!r}")
            return current
        self.check_recipe(recipe)
        return recipe


def tensor_io(name: str, shape: Sequence[int], dtype: str) -> dict[str, Any]:
    return {"name": name, "shape": list(shape), "dtype": dtype}


def state_tensors(specs: list[TensorSpec], placement: str, dtype: str = "float32") -> list[dict[str, Any]]:
    """Manifest entries for the state. placement: "internal" (kept by the runtime under its `identifier`,
    as ExecuTorch buffers and Core ML states are) or "io"."""
    out = []
    for s in specs:
        d = s.to_dict()
        d["dtype"] = dtype
        itemsize = np.dtype(dtype).itemsize
        d["bytes"] = s.numel * itemsize
        d["placement"] = placement
        if placement == "io":
            d["input"] = input_name(s)
            d["output"] = output_name(s)
        else:
            d["identifier"] = s.identifier
        out.append(d)
    return out


def standard_io_contract(
    config: GriffinConfig, chunk: int, specs: list[TensorSpec], placement: str,
    state_dtype: str = "float32", token_dtype: str = "int32", prefill_logits: str = "all",
) -> dict[str, Any]:
    """The I/O contract of a decode/prefill pair built from `rgexport.graphs`."""
    rows = 1 if prefill_last_only(prefill_logits) else chunk
    v = config.vocab_size
    state_in = [tensor_io(input_name(s), s.shape, state_dtype) for s in specs] if placement == "io" else []
    state_out = [tensor_io(output_name(s), s.shape, state_dtype) for s in specs] if placement == "io" else []
    tensors = state_tensors(specs, placement, state_dtype)
    return {
        "methods": {
            "decode": {
                "inputs": [tensor_io("token", [1], token_dtype), tensor_io("position", [1], token_dtype),
                           *state_in],
                "outputs": [tensor_io("logits", [1, v], "float32"), *state_out],
            },
            "prefill": {
                "inputs": [tensor_io("tokens", [1, chunk], token_dtype),
                           tensor_io("position", [1], token_dtype), *state_in],
                "outputs": [tensor_io("logits", [1, rows, v], "float32"), *state_out],
            },
        },
        "state": {
            "placement": placement,
            "tensors": tensors,
            "total_bytes": sum(t["bytes"] for t in tensors),
        },
        "new_sequence": (
            "Start every sequence at position 0: the graph clears the recurrence and the Conv1D window "
            "and masks every cached key there, whatever the state holds. Positions must then increase by "
            "one per token; prefill takes exactly `chunk` tokens starting at `position`."
            + (" Feed each call's new_state.* outputs back as the next call's state.* inputs; zeros are a "
               "valid initial state." if placement == "io" else
               " The state lives inside the program and persists between calls of either method.")
        ),
        "prefill_chunk": chunk,
        # "last": prefill returns the chunk's last token's logits alone ([1, 1, v]); "all": every token's.
        "prefill_logits": prefill_logits,
    }
