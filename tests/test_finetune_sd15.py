"""One LoRA step, its fuse and its export on a Stable Diffusion 1.5-sized UNet (860 M parameters,
random weights, as ``test_export_sd15.py``): the fine-tune code fits real models.

The same adapter configuration as :mod:`sfumato.training.finetune` (peft LoRA on the attention
projections), one AdamW step on 8x8 latents, the diffusers LoRA file written, the adapters fused
into the weights and removed, then the ONNX export with external data and its parity check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_export_sd15 import SD15_UNET


@pytest.mark.slow
@pytest.mark.usefixtures("big_memory")
def test_one_lora_step_fuse_and_export_at_sd15_size(tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sfumato.export.networks import check_parity, export_onnx
    from sfumato.export.source import SourceInfo, SourceModules
    from sfumato.training.finetune import LORA_FILE, UNET_LORA_TARGETS

    torch.manual_seed(0)
    torch.set_num_threads(2)
    unet = UNet2DConditionModel.from_config(SD15_UNET)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(UNET_LORA_TARGETS))
    )
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 5_000_000  # LoRA only: a few million of 860 M
    probe = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    before = probe.base_layer.weight.detach().clone()

    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    latents = torch.randn(1, 4, 8, 8)
    noise = torch.randn_like(latents)
    context = torch.randn(1, 77, 768)
    loss = torch.nn.functional.mse_loss(unet(latents, torch.tensor([500]), context).sample, noise)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)

    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"), unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    assert (tmp_path / "lora" / LORA_FILE).stat().st_size > 1_000_000

    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    to_k = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    assert isinstance(to_k, torch.nn.Linear) and not any("lora" in n for n, _ in unet.named_parameters())
    assert not torch.equal(to_k.weight, before)  # the step's change is in the weights now
    unet.eval()

    info = SourceInfo(
        path=tmp_path,
        pipeline_class="StableDiffusionPipeline",
        unet_config=SD15_UNET,
        vae_config={"block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215},
        text_encoder_config={"max_position_embeddings": 77, "hidden_size": 768, "vocab_size": 49408},
        scheduler_config={},
    )
    modules = SourceModules(text_encoder=None, unet=unet, vae=None)
    paths = export_onnx(modules, info, out_dir=tmp_path / "onnx", networks=("unet",))
    cases = check_parity(modules, info, onnx_paths=paths, sizes=[(64, 64)], batches=(1,))
    assert max(c.relative_error for c in cases) <= 1e-4, cases
