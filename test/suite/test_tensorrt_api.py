"""Static checks of the TensorRT code (TensorRT cannot run here): every name it uses exists in NVIDIA's bindings
of TensorRT 10 and 11, and the module type-checks against stubs generated from those bindings."""

import ast
import os
import subprocess
import sys

import pytest

import tensorrt_api
from conftest import ROOT

MODULE = ROOT / "deberta_tools" / "tensorrt_runtime.py"
FLAG = "STRONGLY_TYPED"   # True on TensorRT 11: the branch not taken for a version is not checked against it


def _strongly_typed(version):
    return int(version.split(".")[0]) >= 11


def _used_names(strongly_typed: bool, source: str | None = None) -> set[str]:
    """trt.A and trt.A.B chains in the module, skipping the branch of `if STRONGLY_TYPED:` not taken."""
    found = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node):
            if isinstance(node.test, ast.Name) and node.test.id == FLAG:
                self.visit(node.test)
                for stmt in (node.body if strongly_typed else node.orelse):
                    self.visit(stmt)
                return
            self.generic_visit(node)

        def visit_Attribute(self, node):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "trt":
                found.add(".".join(reversed(chain)))
                return
            self.generic_visit(node)

    Visitor().visit(ast.parse(source if source is not None else MODULE.read_text()))
    return found


def _missing(version, used):
    table = tensorrt_api.names(version)
    assert table["version"] == version
    missing = []
    for chain in used:
        parts = chain.split(".")
        if parts[0] not in table["module"]:
            missing.append(chain)
            continue
        for depth in range(1, len(parts)):
            owner = ".".join(parts[:depth])
            if owner in table["members"] and parts[depth] not in table["members"][owner]:
                missing.append(chain)
                break
    return missing


def _mypy(version, module, tmp_path):
    stubs = tensorrt_api.prepare(version) / "stubs"
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nfollow_imports = silent\nignore_missing_imports = True\n"
                      "check_untyped_defs = True\n[mypy-torch.*]\nfollow_imports = skip\n"
                      "[mypy-numpy.*]\nfollow_imports = skip\n"
                      # errors inside the generated stubs (pybind docstring types such as capsule) are not ours
                      "[mypy-tensorrt]\nignore_errors = True\n")
    flag = "--always-true" if _strongly_typed(version) else "--always-false"
    env = dict(os.environ, MYPYPATH=str(stubs))
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir",
                           str(tmp_path / "cache"), flag, FLAG, str(module)],
                          capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.parametrize("version", list(tensorrt_api.VERSIONS))
def test_every_tensorrt_name_exists(version):
    used = _used_names(_strongly_typed(version))
    assert {"Builder", "OnnxParser", "MemoryPoolType.WORKSPACE", "BuilderFlag.TF32"} <= used
    missing = _missing(version, used)
    assert not missing, f"TensorRT {version} has no {missing}"


def test_version_differences_are_real():
    """The branch on STRONGLY_TYPED guards names that really differ: FP16 exists in 10 and not in 11."""
    flags = {v: tensorrt_api.names(v)["members"]["BuilderFlag"] for v in tensorrt_api.VERSIONS}
    for version, members in flags.items():
        assert ("FP16" in members) == (not _strongly_typed(version)), version
    assert "BuilderFlag.FP16" in _used_names(False) and "BuilderFlag.FP16" not in _used_names(True)


@pytest.mark.parametrize("version", list(tensorrt_api.VERSIONS))
def test_module_type_checks_against_the_bindings(version, tmp_path):
    proc = _mypy(version, MODULE, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The upstream demo's TensorRT 8 idioms: both checks must reject them on every version we support.
TRT8 = """
import tensorrt as trt

def build(path: str) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    config = builder.create_builder_config()
    config.max_workspace_size = 4 << 30
    config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_engine(network, config)
    loaded = trt.Runtime(logger).deserialize_cuda_engine(b"")
    context = loaded.create_execution_context()
    context.execute_async_v2([0, 0], 0)
"""


@pytest.mark.parametrize("version", list(tensorrt_api.VERSIONS))
def test_checks_reject_tensorrt8_code(version, tmp_path):
    module = tmp_path / "trt8.py"
    module.write_text(TRT8)
    proc = _mypy(version, module, tmp_path)
    assert proc.returncode != 0
    assert "build_engine" in proc.stdout and "execute_async_v2" in proc.stdout and "max_workspace_size" in proc.stdout
    missing = _missing(version, _used_names(_strongly_typed(version), TRT8))
    if _strongly_typed(version):
        assert "BuilderFlag.FP16" in missing and "NetworkDefinitionCreationFlag.EXPLICIT_BATCH" in missing
