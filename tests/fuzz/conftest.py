"""The fuzz suite's session fixture: one real bundle, built once; see fuzzing.py for the harness."""

from __future__ import annotations

import pytest
from fuzzing import PROFILE, Sandbox, link_tree, tree_digest


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> Sandbox:
    pytest.importorskip("onnxruntime")
    from rgexport.assets import shipped_model_dir
    from rgexport.build import BuildOptions
    from rgexport.bundle import build_bundle
    from rgexport.profiles import load_profile

    root = tmp_path_factory.mktemp("fuzz")
    fixtures = tmp_path_factory.mktemp("fuzz-fixtures")
    (fixtures / "edge.toml").write_text(PROFILE)
    # Built once, not validated here (a positive-control case validates it); every case corrupts a copy.
    built = build_bundle(load_profile(fixtures / "edge.toml"),
                         BuildOptions(backend="onnx", out=fixtures / "bundle-fuzz", validate=False))
    for name in ("cwd", "tmp", "cache", "cases", "outputs"):
        (root / name).mkdir()
    bundle = link_tree(built.out, root / "bundle-fuzz")
    prior = link_tree(bundle / "onnx-fp32", root / "outputs" / "prior")
    shipped = link_tree(shipped_model_dir(), root / "shipped")
    return Sandbox(root, bundle, bundle / "onnx-fp32", prior, tree_digest(prior), shipped)
