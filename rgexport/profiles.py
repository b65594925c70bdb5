"""Target profiles (targets/*.toml): which artifacts a device target ships, and its memory budget.

`resolve_target(name)` accepts a profile name, a path to a user's profile file, or a single backend name
(which becomes a one-artifact profile with the backend's default recipe).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from rgexport.config import PREFILL_LOGITS
from rgexport.errors import RgexportError

PLATFORMS = ("ios", "android", "linux", "web")


@dataclasses.dataclass(frozen=True)
class ArtifactSpec:
    backend: str
    recipe: str | None
    options: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    platform: str | None
    min_runtime: str | None
    memory_budget_mb: float | None
    artifacts: tuple[ArtifactSpec, ...]
    source: str  # file path, or "backend"
    # What its artifacts' prefill returns ("all", "last": config.PREFILL_LOGITS); None: the build's default.
    prefill_logits: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["artifacts"] = [dataclasses.asdict(a) for a in self.artifacts]
        return d


def _parse(data: dict[str, Any], source: str) -> TargetProfile:
    from rgexport.registry import BACKENDS

    def need(key: str, kind: type) -> Any:
        if key not in data:
            raise RgexportError(f"target profile {source} lacks '{key}'")
        if not isinstance(data[key], kind):
            raise RgexportError(f"target profile {source}: '{key}' must be a {kind.__name__}")
        return data[key]

    name = need("name", str)
    arts = need("artifacts", list)
    if not arts:
        raise RgexportError(f"target profile {source} lists no [[artifacts]]")
    specs = []
    for i, a in enumerate(arts):
        backend = a.get("backend")
        if backend not in BACKENDS:
            raise RgexportError(
                f"target profile {source}: artifacts[{i}].backend is {backend!r}, expected one of {sorted(BACKENDS)}"
            )
        specs.append(ArtifactSpec(backend, a.get("recipe"), dict(a.get("options", {}))))
    platform = data.get("platform")
    if platform is not None and platform not in PLATFORMS:
        raise RgexportError(f"target profile {source}: platform {platform!r}, expected one of {list(PLATFORMS)}")
    budget = data.get("memory_budget_mb")
    if budget is not None and (not isinstance(budget, int | float) or budget <= 0):
        raise RgexportError(f"target profile {source}: memory_budget_mb must be a positive number")
    prefill_logits = data.get("prefill_logits")
    if prefill_logits is not None and prefill_logits not in PREFILL_LOGITS:
        raise RgexportError(f"target profile {source}: prefill_logits {prefill_logits!r}, expected one of "
                            f"{list(PREFILL_LOGITS)}")
    return TargetProfile(name, str(data.get("description", "")), platform, data.get("min_runtime"), budget,
                         tuple(specs), source, prefill_logits)


def load_profile(path: str | Path) -> TargetProfile:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise RgexportError(f"Cannot read target profile {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise RgexportError(f"Target profile {p} is not valid TOML: {e}") from None
    return _parse(data, str(p))


def list_profiles() -> list[TargetProfile]:
    from rgexport.assets import targets_dir

    return [load_profile(p) for p in sorted(targets_dir().glob("*.toml"))]


def profile_names() -> list[str]:
    """The shipped profiles' names (targets/*.toml), sorted."""
    return sorted(p.name for p in list_profiles())


def platform_backends(platform: str) -> list[str]:
    """The backends the shipped profiles for `platform` ship ("web": what a browser runs), in order."""
    out: list[str] = []
    for p in list_profiles():
        if p.platform == platform:
            out += [a.backend for a in p.artifacts if a.backend not in out]
    return out


def target_backends(names: list[str]) -> list[str]:
    """Backend and profile names -> the backends they name, in order without repeats (a profile stands for
    its artifacts' backends)."""
    out: list[str] = []
    for name in names:
        out += [a.backend for a in resolve_target(name).artifacts if a.backend not in out]
    return out


def targets_document(profiles: list[TargetProfile] | None = None) -> dict[str, Any]:
    """`rgexport targets --json`: {"profiles": [profile...], "backends": [{"name", "default_recipe",
    "recipes" (default first), "extra"} or {"name", "error"}]}."""
    from rgexport.backends import get_backend
    from rgexport.registry import backend_names

    backends: list[dict[str, Any]] = []
    for name in backend_names():
        try:
            b = get_backend(name)
        except RgexportError as e:
            backends.append({"name": name, "error": str(e)})
            continue
        backends.append({"name": name, "default_recipe": b.default_recipe,
                         "recipes": [b.default_recipe, *[r for r in b.recipes if r != b.default_recipe]],
                         "extra": b.extra})
    return {"profiles": [p.to_dict() for p in (list_profiles() if profiles is None else profiles)],
            "backends": backends}


def resolve_target(name: str) -> TargetProfile:
    """A profile by name, a profile file, or a backend name as a one-artifact profile."""
    from rgexport.registry import BACKENDS

    if name in BACKENDS:
        return TargetProfile(name, f"the {name} backend alone", None, None, None,
                             (ArtifactSpec(name, None, {}),), "backend")
    if name.endswith(".toml") or "/" in name:
        return load_profile(name)
    profiles = {p.name: p for p in list_profiles()}
    if name in profiles:
        return profiles[name]
    raise RgexportError(
        f"Unknown target {name!r}; expected a profile ({', '.join(sorted(profiles))}), "
        f"a backend ({', '.join(sorted(BACKENDS))}) or a path to a profile .toml"
    )
