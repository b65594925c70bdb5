"""Shared fixtures: a small random Griffin (every term exercised) and the shipped model.

Artifacts are expensive to build (XNNPACK lowering alone takes about a minute here), so each backend's
test module builds its artifacts once per session in module- or session-scoped fixtures.
"""

from __future__ import annotations

import pytest
import torch

from rgexport.config import GriffinConfig
from rgexport.model import Griffin

# Small enough to export in seconds, shaped so every path is exercised: two attention blocks, a window
# that wraps several times within a short test, lru_width == width (the HF reference needs that).
SMALL = GriffinConfig(
    vocab_size=512, width=64, mlp_expanded_width=128, num_heads=2, lru_width=64,
    block_types=("recurrent", "recurrent", "attention", "recurrent", "recurrent", "attention"),
    attention_window_size=16, logits_soft_cap=30.0,
)


def perturbed_random_model(config: GriffinConfig, seed: int = 0) -> Griffin:
    """Paper initialisation, then biases and norm scales (zero at init) perturbed so every term counts."""
    g = torch.Generator().manual_seed(seed)
    model = Griffin(config).reset_parameters_(g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".b", ".bias", ".scale")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            elif p.dim() >= 2:
                p.mul_(1.5)  # larger activations than at init, so errors are not hidden by tiny logits
    return model.eval()


@pytest.fixture(scope="session")
def small_config() -> GriffinConfig:
    return SMALL


@pytest.fixture(scope="session")
def small_model() -> Griffin:
    return perturbed_random_model(SMALL)


@pytest.fixture(scope="session")
def random_model():
    """random_model(config) -> Griffin: `perturbed_random_model`, for a test that needs another shape than SMALL
    (test modules cannot import this file by name: tests/fuzz has a conftest too)."""
    return perturbed_random_model


@pytest.fixture(scope="session")
def small_tokens() -> torch.Tensor:
    """Five windows' worth of tokens (batch 1), so the ring buffer wraps four times."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, SMALL.vocab_size, (1, 5 * SMALL.attention_window_size), generator=g)


@pytest.fixture(scope="session")
def shipped():
    """The shipped tiny model, loaded through the same loader as a user's checkpoint."""
    from rgexport.checkpoint import load_checkpoint

    return load_checkpoint()


# What the shipped model's artifacts are validated over (past its 128-token window: the ring buffer wraps).
SHIPPED_TOKENS = 256


@pytest.fixture(scope="session")
def shipped_build(tmp_path_factory):
    """shipped_build(backend, recipe) -> BuildResult: the shipped model's artifact, built and validated over
    SHIPPED_TOKENS (not required to pass: the parity tests judge the report), once per session for every module
    that reads it (tests/test_parity.py, tests/test_weights_read.py)."""
    from rgexport.build import BuildOptions, build

    built = {}

    def get(backend: str, recipe: str):
        if (backend, recipe) not in built:
            out = tmp_path_factory.mktemp("shipped") / f"{backend}-{recipe}"
            built[backend, recipe] = build(BuildOptions(backend=backend, recipe=recipe, out=out,
                                                        validation_tokens=SHIPPED_TOKENS, require_pass=False))
        return built[backend, recipe]

    get.tokens = SHIPPED_TOKENS
    return get
