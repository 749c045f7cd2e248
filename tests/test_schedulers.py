"""The NumPy schedulers against diffusers, step for step, on the same inputs.

Each trajectory starts both implementations from the same latents and feeds both the same
deterministic fake UNet (a nonlinear function of the scaled sample and the timestep, so any
error propagates). It runs twice:

* ``torch-math``: the port's three elementary functions (sqrt, log, exp) are swapped for
  torch's. Everything else is the port's own arithmetic, and every step must then equal
  diffusers' *exactly*: the port mirrors diffusers operation for operation.
* ``numpy-math``: the port as it runs in Triton. torch's CPU sqrt/log/exp (MKL) are not
  correctly rounded, NumPy's are, so steps differ by a few float32 ulps: within 1e-5 (max
  abs) for all but ``euler_a``, whose ``sigma_down = sqrt(sigma_to**2 - sigma_up**2)``
  cancels and magnifies a one-ulp difference in ``sigma_up`` about tenfold.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from sfumato.serving import schedulers
from sfumato.serving.schedulers import SCHEDULERS, make_scheduler

SHAPE = (2, 4, 32, 32)
ATOL = {"ddim": 1e-5, "euler": 1e-5, "euler_a": 3e-5, "dpmpp_2m": 1e-5}  # numpy-math
SIGMA_RTOL = 2.5e-7  # init_noise_sigma with numpy-math: within two float32 ulps

# What the demo model ships (a Stable Diffusion 1.x DDIM config), as diffusers saved it.
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "sfumato-shapes" / "scheduler"
SD1: dict[str, Any] = json.loads((SHIPPED / "scheduler_config.json").read_text())
CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": SD1,
    "sd2-trailing": {**SD1, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "sd2-linspace": {**SD1, "prediction_type": "v_prediction", "timestep_spacing": "linspace"},
    # Only the betas given: every class falls back to its own defaults (DDIM clips and its
    # final alpha is one, the others space timesteps by linspace...).
    "class-defaults": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    # The other options the port implements.
    "options": {
        **SD1,
        "trained_betas": (np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2).tolist(),
        "clip_sample": True,
        "clip_sample_range": 1.5,
        "set_alpha_to_one": True,
        "final_sigmas_type": "sigma_min",
        "lower_order_final": False,
        "lambda_min_clipped": -2.5,
        "solver_type": "bh2",
    },
}
DIFFUSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ddim": diffusers.DDIMScheduler.from_config,
    "euler": diffusers.EulerDiscreteScheduler.from_config,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler.from_config,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler.from_config,
}
WORST: dict[str, float] = {}  # largest numpy-math error per scheduler, printed with -s


def _torch_math(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: fn(torch.from_numpy(np.array(x, dtype=np.float32))).numpy()


@pytest.fixture(params=["numpy-math", "torch-math"])
def exact(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether this run swaps in torch's sqrt/log/exp and so must match diffusers exactly."""
    if request.param == "torch-math":
        monkeypatch.setattr(schedulers, "_sqrt", _torch_math(torch.sqrt))
        monkeypatch.setattr(schedulers, "_log", _torch_math(torch.log))
        monkeypatch.setattr(schedulers, "_exp", _torch_math(torch.exp))
    return request.param == "torch-math"


@pytest.fixture(scope="module", autouse=True)
def report_worst() -> Iterator[None]:
    yield
    print("\nmax abs error per scheduler (numpy-math):", {k: f"{v:.3g}" for k, v in WORST.items()})


def fake_unet(
    model_input: np.ndarray, timestep: float, alphas_cumprod: np.ndarray, prediction_type: str
) -> np.ndarray:
    """A deterministic stand-in for the UNet, computed identically (in float64) for both sides.

    It behaves like a trained model so that latents keep Stable Diffusion's magnitudes: from
    the (variance-preserving) input it guesses the clean latents, a bounded nonlinear function
    of the input and the timestep, and returns the matching epsilon or v.
    """
    x = model_input.astype(np.float64)
    alpha_prod = np.interp(timestep, np.arange(len(alphas_cumprod)), alphas_cumprod)
    denoised = 2.0 * np.tanh(0.6 * x + 0.3 * np.sin(timestep / 97.0))
    eps = (x - np.sqrt(alpha_prod) * denoised) / np.sqrt(1 - alpha_prod)
    if prediction_type == "v_prediction":
        return (np.sqrt(alpha_prod) * eps - np.sqrt(1 - alpha_prod) * denoised).astype(np.float32)
    return eps.astype(np.float32)


class Pair:
    """The same scheduler in diffusers and in NumPy, stepped together and compared."""

    def __init__(self, name: str, config: dict[str, Any], steps: int, *, exact: bool, seed: int = 0) -> None:
        self.name, self.exact = name, exact
        self.ref = DIFFUSERS[name](config)
        self.ours = make_scheduler(name, config)
        self.ref.set_timesteps(steps)
        self.ours.set_timesteps(steps)
        # The ancestral step's noise: diffusers draws it from `ref_gen`, ours gets it from an
        # identically seeded twin, with the call diffusers' randn_tensor makes.
        self.ref_gen = torch.Generator().manual_seed(seed + 1)
        self.our_gen = torch.Generator().manual_seed(seed + 1)
        self.unet = functools.partial(
            fake_unet,
            alphas_cumprod=self.ref.alphas_cumprod.double().numpy(),
            prediction_type=self.ref.config.prediction_type,
        )
        assert self.ours.timesteps.dtype == np.float32
        np.testing.assert_array_equal(self.ours.timesteps, self.ref.timesteps.numpy().astype(np.float32))
        assert self.ours.order == self.ref.order
        if exact and name != "ddim":
            np.testing.assert_array_equal(self.ours.sigmas, self.ref.sigmas.numpy())

    def check(self, ours: np.ndarray, ref: torch.Tensor, what: str) -> None:
        assert ours.dtype == np.float32 and ours.shape == tuple(ref.shape), what
        err = float(np.max(np.abs(ours.astype(np.float64) - ref.numpy())))
        if self.exact:
            assert err == 0, f"{self.name} {what}: differs from diffusers by {err:.3g} with torch's math"
        else:
            WORST[self.name] = max(WORST.get(self.name, 0.0), err)
            assert err <= ATOL[self.name], f"{self.name} {what}: max abs error {err:.3g}"

    def check_init_noise_sigma(self) -> None:
        ref = float(self.ref.init_noise_sigma)
        assert self.ours.init_noise_sigma == (ref if self.exact else pytest.approx(ref, rel=SIGMA_RTOL))

    def step(
        self, t_ref: torch.Tensor, t_ours: np.float32, ref: torch.Tensor, ours: np.ndarray, what: str
    ) -> tuple[torch.Tensor, np.ndarray]:
        """One denoising step, as StableDiffusionPipeline runs it; returns both new samples."""
        ref_in = self.ref.scale_model_input(ref, t_ref)
        ours_in = self.ours.scale_model_input(ours, t_ours)
        self.check(ours_in, ref_in, f"{what} model input")
        ref_out = torch.from_numpy(self.unet(ref_in.numpy(), float(t_ref)))
        ours_out = self.unet(ours_in, float(t_ours))
        noise = torch.randn(ours.shape, generator=self.our_gen).numpy() if self.name == "euler_a" else None
        ref = self.ref.step(ref_out, t_ref, ref, generator=self.ref_gen).prev_sample
        ours = self.ours.step(ours_out, t_ours, ours, noise=noise)
        self.check(ours, ref, what)
        return ref, ours

    def check_noise_draws(self) -> None:
        """diffusers took exactly the draws that were handed to ours."""
        assert torch.equal(self.ref_gen.get_state(), self.our_gen.get_state())


@pytest.mark.parametrize("steps", [1, 10, 25, 50])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_text_to_image_trajectory(name: str, config: str, steps: int, exact: bool) -> None:
    pair = Pair(name, CONFIGS[config], steps, exact=exact)
    pair.check_init_noise_sigma()
    ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps)) * pair.ref.init_noise_sigma
    ours = ref.numpy().copy()
    for i, (t_ref, t_ours) in enumerate(zip(pair.ref.timesteps, pair.ours.timesteps, strict=True)):
        ref, ours = pair.step(t_ref, t_ours, ref, ours, f"step {i} (t={float(t_ref)})")
    pair.check_noise_draws()


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("config", ["sd1", "sd2-trailing", "options"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_img2img_and_inpainting_trajectory(name: str, config: str, steps: int, exact: bool) -> None:
    """StableDiffusionImg2ImgPipeline's truncated schedule (strength 0.6), plus the legacy
    inpainting pipeline's re-noising of the known latents after every step."""
    pair = Pair(name, CONFIGS[config], steps, exact=exact, seed=7)
    init_timestep = min(int(steps * 0.6), steps)
    t_start = max(steps - init_timestep, 0)
    begin = t_start * pair.ref.order
    ref_ts, our_ts = pair.ref.timesteps[begin:], pair.ours.timesteps[begin:]
    if hasattr(pair.ref, "set_begin_index"):  # as the pipeline does: DDIMScheduler has none
        pair.ref.set_begin_index(begin)
    pair.ours.set_begin_index(begin)
    if len(ref_ts) == 0:  # steps * strength < 1: nothing to denoise
        return

    gen = torch.Generator().manual_seed(3)
    known, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    ref = pair.ref.add_noise(known, noise, ref_ts[:1].repeat(SHAPE[0]))
    ours = pair.ours.add_noise(known.numpy(), noise.numpy(), np.repeat(our_ts[:1], SHAPE[0]))
    pair.check(ours, ref, "add_noise at the first timestep")
    for i, (t_ref, t_ours) in enumerate(zip(ref_ts, our_ts, strict=True)):
        ref, ours = pair.step(t_ref, t_ours, ref, ours, f"step {i} (t={float(t_ref)})")
        if i + 1 < len(ref_ts):
            ref_known = pair.ref.add_noise(known, noise, ref_ts[i + 1 : i + 2])
            ours_known = pair.ours.add_noise(known.numpy(), noise.numpy(), our_ts[i + 1 : i + 2])
            pair.check(ours_known, ref_known, f"add_noise after step {i}")
    pair.check_noise_draws()


@pytest.mark.parametrize("config", ["sd1", "sd2-linspace", "class-defaults"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_per_row_timesteps(name: str, config: str, exact: bool) -> None:
    """Training-style add_noise (no begin index): each row looked up at its own timestep."""
    pair = Pair(name, CONFIGS[config], 25, exact=exact)
    timesteps = pair.ref.timesteps[[0, 3, 11, 24, 11]]
    if name == "ddim":
        timesteps = torch.tensor([999, 0, 500, 1, 731])  # DDIM indexes its training table directly
    if name == "dpmpp_2m":
        timesteps[4] = 1234  # not in the schedule: DPM-Solver falls back to the last step
    gen = torch.Generator().manual_seed(5)
    original, noise = torch.randn((5, 4, 8, 8), generator=gen), torch.randn((5, 4, 8, 8), generator=gen)
    ref = pair.ref.add_noise(original, noise, timesteps)
    ours = pair.ours.add_noise(original.numpy(), noise.numpy(), timesteps.numpy())
    pair.check(ours, ref, "add_noise")


@pytest.mark.parametrize("name", SCHEDULERS)
def test_defaults_are_the_diffusers_class_defaults(name: str) -> None:
    ours = type(make_scheduler(name, {}))
    ref = getattr(diffusers, ours.DIFFUSERS_CLASS)
    assert DIFFUSERS[name].__self__ is ref  # type: ignore[attr-defined]
    parameters = inspect.signature(ref.__init__).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.name != "self"}
    assert defaults == ours.DIFFUSERS_DEFAULTS


@pytest.mark.parametrize("name", SCHEDULERS)
def test_alphas_cumprod_is_bit_exact(name: str) -> None:
    for config in [*CONFIGS.values(), {}, {"beta_start": 0.00085, "beta_end": 0.012}]:
        ref, ours = DIFFUSERS[name](config), make_scheduler(name, config)
        np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("name", SCHEDULERS)
def test_config_is_resolved_like_from_config(name: str, exact: bool) -> None:
    """Keys listed in _use_default_values, and keys the class does not take, leave its defaults."""
    config = {**SD1, "_use_default_values": ["timestep_spacing"], "use_karras_sigmas": False, "foo": 1}
    pair = Pair(name, config, 20, exact=exact)
    assert pair.ours.config["timestep_spacing"] == pair.ref.config.timestep_spacing
    pair.check_init_noise_sigma()


def test_options_of_other_classes_are_ignored() -> None:
    """As with from_config: DDIMScheduler takes no use_karras_sigmas, so it cannot ask for them."""
    assert make_scheduler("ddim", {**SD1, "use_karras_sigmas": True}).config["timestep_spacing"] == "leading"


def test_unknown_scheduler_is_refused() -> None:
    with pytest.raises(ValueError, match="bogus") as error:
        make_scheduler("bogus", SD1)
    assert all(name in str(error.value) for name in SCHEDULERS)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("ddim", "thresholding", True),
        ("ddim", "prediction_type", "sample"),
        ("ddim", "rescale_betas_zero_snr", True),
        ("ddim", "beta_schedule", "squaredcos_cap_v2"),
        ("euler", "use_karras_sigmas", True),
        ("euler", "interpolation_type", "log_linear"),
        ("euler", "timestep_type", "continuous"),
        ("euler_a", "timestep_spacing", "bogus_spacing"),
        ("dpmpp_2m", "algorithm_type", "sde-dpmsolver++"),
        ("dpmpp_2m", "solver_order", 3),
        ("dpmpp_2m", "solver_type", "heun"),
        ("dpmpp_2m", "use_lu_lambdas", True),
        ("dpmpp_2m", "variance_type", "learned_range"),
    ],
)
def test_unsupported_option_is_refused(name: str, option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        make_scheduler(name, {**SD1, option: value})


@pytest.mark.parametrize("name", SCHEDULERS)
def test_misuse_is_refused(name: str) -> None:
    scheduler = make_scheduler(name, SD1)
    sample = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 981, sample, noise=sample)
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(steps)
    scheduler.set_timesteps(10)
    if name == "euler_a":
        with pytest.raises(ValueError, match="noise"):
            scheduler.step(sample, scheduler.timesteps[0], sample)
    if name in ("euler", "euler_a"):
        with pytest.raises(ValueError, match="not in the schedule"):
            scheduler.scale_model_input(sample, 12345.0)
