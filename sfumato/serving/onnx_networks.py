"""The four networks as in-process ONNX Runtime sessions, read from an exported repository.

The same ``model.onnx`` files Triton serves; used by the in-process benchmark anchor and by
tests that check the pipeline logic without a server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class OnnxNetworks:
    def __init__(self, repository: Path, *, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self._sessions = {
            name: ort.InferenceSession(
                str(Path(repository) / name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder")
        }

    def _run(self, name: str, output: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self._sessions[name].run([output], feed)[0]

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("text_encoder", "last_hidden_state", {"input_ids": input_ids})

    def unet(self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
        feed = {
            "sample": sample,
            "timestep": timestep.reshape(-1),
            "encoder_hidden_states": encoder_hidden_states,
        }
        return self._run("unet", "out_sample", feed)

    def vae_encoder(self, image: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", "latent_parameters", {"image": image})

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", "image", {"latent": latent})
