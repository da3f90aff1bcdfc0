"""The quantize stage says so before GPTQModel's first-time C++ build, which is otherwise a silent minute."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stage_module():
    spec = importlib.util.spec_from_file_location("quantize_stage_script", ROOT / "stages" / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notice_until_the_packing_kernel_is_built(tmp_path, monkeypatch):
    stage = stage_module()
    monkeypatch.setenv("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(tmp_path))
    cache = stage.pack_kernel_cache()
    assert cache == tmp_path / "pack_block_cpu"
    assert "compiles its C++ packing kernel" in stage.pack_kernel_notice(cache)
    (cache / "aa3e410a044f011c").mkdir(parents=True)
    (cache / "aa3e410a044f011c" / "gptqmodel_pack_block_cpu.so").write_bytes(b"")
    assert stage.pack_kernel_notice(cache) is None
