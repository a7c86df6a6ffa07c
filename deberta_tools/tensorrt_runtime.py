"""Every TensorRT call of the project, for TensorRT 10 and 11, in one module so that the static check in
test/suite/test_tensorrt_api.py (names and types against NVIDIA's bindings of both versions) covers all of them.

TensorRT cannot be installed where CI runs; this code is written against the documented Python API and checked
statically there. GPU buffers and CUDA events come from torch (already a dependency); NVIDIA's own samples moved
from pycuda to cuda-python, and neither is needed here.

Version differences handled here:
- TensorRT 11 builds every network strongly typed and has no BuilderFlag.FP16: an fp16 engine needs an fp16 graph
  (deberta_onnx_modify.py --fp16). TensorRT 10 builds fp16 from fp32 graphs with BuilderFlag.FP16.
- Both: explicit batch is the default (no EXPLICIT_BATCH flag), the workspace is a memory-pool limit, inputs and
  outputs are bound by name (set_tensor_address) and run with execute_async_v3 on a stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import tensorrt as trt

from .errors import UserError

TRT_VERSION: str = trt.__version__
STRONGLY_TYPED: bool = int(TRT_VERSION.split(".")[0]) >= 11   # mypy: checked with --always-true/false per version


def _logger() -> trt.ILogger:
    logger = trt.Logger(trt.Logger.WARNING)
    # Registers DisentangledAttention_TRT and the other built-in plugins so the ONNX parser resolves them.
    # The bindings take the logger through an implicit conversion that newer signatures (a capsule) do not show.
    trt.init_libnvinfer_plugins(logger, "")  # type: ignore[arg-type]
    return logger


def build_engine(onnx_path: Path, precision: str, profile: dict, workspace_mib: int) -> bytes:
    """Parse `onnx_path` and build a serialized engine. `profile` maps input name -> (min, opt, max) shapes."""
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(trt.BuilderFlag.TF32)
    if precision == "fp16":
        if STRONGLY_TYPED:
            pass  # the graph's own fp16 types decide (checked by engine_files.precision_problem before)
        else:
            config.set_flag(trt.BuilderFlag.FP16)
    optimization = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        lo, opt, hi = profile[name]
        optimization.set_shape(name, trt.Dims(lo), trt.Dims(opt), trt.Dims(hi))
    config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    # IHostMemory implements the buffer protocol (NVIDIA's samples write it to files directly); the bindings'
    # signatures do not declare it.
    return bytes(memoryview(serialized))  # type: ignore[arg-type]


def _torch_dtype(dtype: trt.DataType):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
    if dtype not in table:
        raise UserError(f"unsupported engine tensor type {dtype}")
    return table[dtype]


class Engine:
    """A deserialized engine with one execution context and device buffers bound by name."""

    def __init__(self, data: bytes, name: str):
        self.logger = _logger()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise UserError(f"TensorRT {TRT_VERSION} could not load {name}: engines only load on the TensorRT "
                            "version and GPU they were built for; rebuild it with --force")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.buffers: dict = {}

    def bind(self, feeds: dict) -> dict:
        """Copy host inputs to the device once, allocate outputs for their shapes, and bind every address."""
        import torch

        for name in self.inputs:
            value = torch.from_numpy(feeds[name]).to("cuda", _torch_dtype(self.engine.get_tensor_dtype(name)))
            if not self.context.set_input_shape(name, tuple(value.shape)):
                raise UserError(f"input {name} shape {tuple(value.shape)} is outside the engine's profile; "
                                "rebuild with a wider --batch/--seq-len profile")
            self.buffers[name] = value
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            self.buffers[name] = torch.empty(shape, dtype=_torch_dtype(self.engine.get_tensor_dtype(name)),
                                             device="cuda")
        for name, tensor in self.buffers.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        return self.buffers

    def runner(self, stream) -> Callable[[], None]:
        """One asynchronous execution on `stream` (a torch.cuda.Stream), no host copies."""
        handle = stream.cuda_stream

        def run() -> None:
            if not self.context.execute_async_v3(handle):
                raise UserError("TensorRT execution failed (see its log above)")
        return run

    def outputs_on_host(self) -> dict:
        import torch

        torch.cuda.synchronize()
        return {name: self.buffers[name].float().cpu().numpy() for name in self.outputs}
