"""Export at Stable Diffusion 1.5's real size: a 860 M-parameter UNet (3.4 GB in fp32).

Random weights from SD 1.5's UNet configuration; the ONNX graph needs external data (over the
2 GB protobuf limit), and parity is checked on small latents so the test stays in minutes.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import pytest

from sfumato.export.networks import check_parity, export_onnx
from sfumato.export.source import SourceInfo, SourceModules

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


@pytest.mark.slow
@pytest.mark.usefixtures("big_memory")
def test_sd15_sized_unet_exports_with_external_data_and_parity(tmp_path: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD15_UNET).eval()
    params = sum(p.numel() for p in unet.parameters())
    assert params > 850_000_000
    info = SourceInfo(
        path=tmp_path,
        pipeline_class="StableDiffusionPipeline",
        unet_config=SD15_UNET,
        vae_config={"block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215},
        text_encoder_config={"max_position_embeddings": 77, "hidden_size": 768, "vocab_size": 49408},
        scheduler_config={},
    )
    modules = SourceModules(text_encoder=None, unet=unet, vae=None)
    started = time.perf_counter()
    paths = export_onnx(modules, info, out_dir=tmp_path / "onnx", networks=("unet",))
    export_s = time.perf_counter() - started
    folder = paths["unet"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (folder / "model.onnx").stat().st_size < 2**31 < (folder / "model.onnx.data").stat().st_size
    onnx.checker.check_model(str(folder / "model.onnx"))  # by path: external data resolved
    # 8x8 and 8x16 latents (64x64 and 64x128 pixels), batch 1 and 2
    cases = check_parity(modules, info, onnx_paths=paths, sizes=[(64, 64), (64, 128)], batches=(1, 2))
    worst = max(c.relative_error for c in cases)
    print(f"\nSD-1.5 UNet: {params / 1e6:.0f} M params, export {export_s:.0f} s, worst error {worst:.2e}")
    assert len(cases) == 4
    assert worst <= 1e-4
