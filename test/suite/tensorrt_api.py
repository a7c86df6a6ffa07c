"""NVIDIA's TensorRT Python bindings, made inspectable on a machine without TensorRT.

The bindings wheels on PyPI (tensorrt-cuXX-bindings) are real; the libraries they link against
(libnvinfer, libnvinfer_plugin, libnvonnxparser) are not installable here. The bindings need only a handful of C
entry points from those libraries to load, so we compile no-op stand-ins for them, import the real bindings
module, and record its names (module attributes, class members, enum values) and type stubs generated from it by
mypy's stubgen. Nothing is ever executed through the stand-ins. Results are cached in .cache/tensorrt-api/.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "tensorrt-api"
# Oldest and newest of each major version we support, from NVIDIA's PyPI packages.
VERSIONS = {"10.0.1": "tensorrt-cu12-bindings", "10.16.1.11": "tensorrt-cu13-bindings",
            "11.0.0.114": "tensorrt-cu13-bindings", "11.4.0.106": "tensorrt-cu13-bindings"}
_ENTRY_POINTS = """
void *createInferBuilder_INTERNAL(void *a, int b) { return 0; }
void *createInferRefitter_INTERNAL(void *a, void *b, int c) { return 0; }
void *createInferRuntime_INTERNAL(void *a, int b) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *a, void *b, int c) { return 0; }
void *createNvOnnxParser_INTERNAL(void *a, void *b, int c) { return 0; }
void *getBuilderPluginRegistry(int a) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return 0; }
int initLibNvInferPlugins(void *a, const char *b) { return 1; }
int getInferLibVersion(void) { return 0; }
"""
_DUMP = """
import inspect, json, sys
import tensorrt_bindings as trt
members = {}
for name in dir(trt):
    obj = getattr(trt, name)
    if inspect.isclass(obj):
        members[name] = sorted(dir(obj))
        for sub in dir(obj):
            inner = getattr(obj, sub, None)
            if inspect.isclass(inner) and not sub.startswith("_"):
                members[name + "." + sub] = sorted(dir(inner))
json.dump({"version": trt.__version__, "module": sorted(dir(trt)), "members": members}, open(sys.argv[1], "w"))
"""


def _repair(stub: str) -> str:
    """Make stubgen's output valid Python: pybind11 allows a required parameter after defaulted ones
    (add_scale_nd's channel_axis), so such parameters get a default too; and module-level aliases named like
    builtins are dropped. No signature we call is affected."""
    out = []
    for line in stub.splitlines():
        if re.match(r"^(bool|int|float|str|bytes|object|type)\s*:", line):
            continue  # module-level DataType aliases (trt.bool) would shadow the builtins inside the stub
        head, sep, rest = line.partition("(")
        if not sep or not head.strip().startswith("def ") or ") ->" not in rest:
            out.append(line)
            continue
        params_text, tail = rest.rsplit(") ->", 1)
        params, depth, current = [], 0, ""
        for ch in params_text:
            depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
            if ch == "," and depth == 0:
                params.append(current)
                current = ""
            else:
                current += ch
        params.append(current)
        seen_default = False
        for i, param in enumerate(params):
            name = param.strip()
            if "=" in name:
                seen_default = True
            elif seen_default and name and not name.startswith("*"):
                params[i] = param + " = ..."
        out.append(f"{head}({','.join(params)}) ->{tail}")
    return "\n".join(out) + "\n"


def _run(cmd, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def prepare(version: str) -> Path:
    """Folder with names.json and stubs/tensorrt/__init__.pyi for one bindings version."""
    done = CACHE / version
    if (done / "names.json").is_file():
        return done
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
              "--dest", str(tmp / "wheel"), f"{VERSIONS[version]}=={version}"])
        with zipfile.ZipFile(next((tmp / "wheel").glob("*.whl"))) as wheel:
            wheel.extractall(tmp / "site")
        major = version.split(".")[0]
        (tmp / "lib").mkdir()
        (tmp / "entry.c").write_text(_ENTRY_POINTS)
        for lib in ("nvinfer", "nvinfer_plugin", "nvonnxparser"):
            _run(["cc", "-shared", "-fPIC", "-o", str(tmp / "lib" / f"lib{lib}.so.{major}"), str(tmp / "entry.c")])
        env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(tmp / "lib"), "PYTHONPATH": str(tmp / "site")}
        out = tmp / "out"
        out.mkdir()
        _run([sys.executable, "-c", _DUMP, str(out / "names.json")], env=env)
        _run([sys.executable, "-c", "import sys; from mypy.stubgen import main; main(sys.argv[1:])",
              "-m", "tensorrt_bindings.tensorrt", "-o", str(tmp / "gen")], env=env)
        stub = _repair((tmp / "gen" / "tensorrt_bindings" / "tensorrt.pyi").read_text())
        (out / "stubs" / "tensorrt").mkdir(parents=True)
        (out / "stubs" / "tensorrt" / "__init__.pyi").write_text(stub + "\n__version__: str\n")
        shutil.move(str(out), str(done))
    return done


def names(version: str) -> dict:
    return json.loads((prepare(version) / "names.json").read_text())
