"""Tiny random DebertaV2 models, exported for real, shared across the tests of one session."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Triton kernels run under its interpreter on machines without a GPU; the variable must be set before Triton loads.
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

# Tiny configs: hidden 64, 2 layers, a few heads. Spans are small so sequences of 64..256 reach the far,
# saturated log buckets (|i-j| > 2*span) that a wrong index rule would get wrong.
BASE = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=512, type_vocab_size=0, relative_attention=True, position_buckets=32,
            max_relative_positions=64, pos_att_type=["p2c", "c2p"], position_biased_input=False,
            share_att_key=True, norm_rel_ebd="layer_norm", layer_norm_eps=1e-7,
            # Weights large enough that attention is sharp and the position terms move the output: with the
            # default 0.02 a swapped c2p/p2c changed the final output by only 5e-5 relative.
            initializer_range=0.3)
CONFIGS = {
    "v3": {},
    "v3_separate_keys": dict(share_att_key=False, hidden_size=96, num_attention_heads=3, position_buckets=64,
                             max_relative_positions=128),
    "c2p_only": dict(pos_att_type=["c2p"]),
    "p2c_only": dict(pos_att_type=["p2c"]),
    "v3_span256": dict(position_buckets=256, max_relative_positions=512, num_attention_heads=4),
    "linear": dict(position_buckets=-1, max_relative_positions=64, position_biased_input=True,
                   max_position_embeddings=256, share_att_key=False, norm_rel_ebd="none"),
    "mrp_mismatch": dict(position_buckets=32, max_relative_positions=128),
    "no_relative": dict(relative_attention=False),
}


def make_config(name: str, **extra):
    from transformers import DebertaV2Config
    return DebertaV2Config(**{**BASE, **CONFIGS[name], **extra})


def make_model(name: str, head: str = "DebertaV2Model", seed: int = 0, **extra):
    import torch
    import transformers
    torch.manual_seed(seed)
    config = make_config(name, **extra)
    if head != "DebertaV2Model":
        config.num_labels = 3
    return getattr(transformers, head)(config).eval()


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """export_cache(config_name, exporter, head) -> (path to the exported .onnx, torch model)."""
    from deberta_tools import export, onnx_io
    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(name: str, exporter: str = "dynamo", head: str = "DebertaV2Model", seq_len: int = 256):
        key = (name, exporter, head, seq_len)
        if key not in cache:
            model = make_model(name, head)
            proto = export.export(model, exporter)
            export.annotate(proto, model.config, seq_len, exporter)
            path = onnx_io.save(proto, root / f"{name}_{exporter}_{head}_{seq_len}.onnx")
            cache[key] = (path, model)
        return cache[key]

    return get


def run_script(script: str, *args, cwd=None, timeout=600):
    """Run one of the top-level scripts the way a user does; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)
