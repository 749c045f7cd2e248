"""NumPy ports of the four diffusers schedulers the serving pipeline offers.

The ``pipeline`` model runs in a Triton Python backend without PyTorch, so the denoising loop
cannot use diffusers itself. Each class here mirrors one diffusers 0.42 scheduler on the code
paths that a Stable Diffusion 1.x / 2.x scheduler config selects, operation for operation
and in the same precision. ``tests/test_schedulers.py`` runs every scheduler next to diffusers
on the same inputs and checks every step (see the precision notes below for how closely).

============  ==================================================================================
name          diffusers class
============  ==================================================================================
``ddim``      ``DDIMScheduler`` (``eta = 0``)
``euler``     ``EulerDiscreteScheduler``
``euler_a``   ``EulerAncestralDiscreteScheduler``
``dpmpp_2m``  ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, ``solver_order=2``)
============  ==================================================================================

``make_scheduler(name, config)`` reads a diffusers scheduler config as
``SchedulerClass.from_config(config)`` does: keys the class takes override its ``__init__``
defaults (except those listed in ``_use_default_values``), other keys are ignored, and
missing keys take that class's own defaults (which differ between classes). A config that
asks for something not ported here (Karras sigmas, thresholding, another solver...) raises
``ValueError`` naming the option instead of silently denoising differently.

A scheduler instance holds the state of one denoising run (step index, DPM-Solver's previous
prediction): use a fresh one per request. Samples are float32 ``[B, C, H, W]`` arrays whose
rows share the timestep.

Precision notes. diffusers keeps its schedule tables and per-step coefficients as float32
torch tensors, so the scalar arithmetic here is float32 too: scalars are held as shape-(1,)
float32 arrays (``_at``), because NumPy 1.x would promote a float32 *scalar* combined with a
Python float to float64. ``torch.cumprod`` accumulates in float64 and ``torch.linspace`` uses a
fused multiply-add; both are reproduced, so ``alphas_cumprod`` matches diffusers bit for bit.
The one thing not reproduced is torch's elementary functions: on x86 CPUs torch computes
float32 ``sqrt`` / ``** 0.5``, ``log`` and ``exp`` with MKL, which is not correctly rounded
(about 17% of its square roots are one ulp off), while ``_sqrt``, ``_log`` and ``_exp`` here
are. The tests swap torch's functions in for these three and then require every step to equal
diffusers' exactly; with NumPy's, steps differ from diffusers by a few float32 ulps (about
1e-5 at the ~50 magnitude where Euler samples start; more for ``euler_a``, whose
``sigma_down`` cancels badly).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

SCHEDULERS: tuple[str, ...] = ("ddim", "euler", "euler_a", "dpmpp_2m")

#: A timestep as passed to ``step``: an element of ``timesteps`` (or the same value as a number).
Timestep = float | np.floating | np.integer


def _at(values: np.ndarray, index: int) -> np.ndarray:
    """``values[index]`` as a shape-(1,) array, so arithmetic with it stays float32 like torch's."""
    return values[[index]]


# The elementary functions the port needs, float32 in and out and (practically) correctly
# rounded; the tests swap in torch's own to check that everything else is bit-exact.


def _sqrt(x: np.ndarray) -> np.ndarray:
    """float32 square root (diffusers' ``** 0.5`` and ``torch.sqrt``)."""
    return np.sqrt(x)


def _log(x: np.ndarray) -> np.ndarray:
    """float32 natural logarithm, evaluated in float64 and rounded once."""
    return np.log(x.astype(np.float64)).astype(np.float32)


def _exp(x: np.ndarray) -> np.ndarray:
    """float32 exponential, evaluated in float64 and rounded once."""
    return np.exp(x.astype(np.float64)).astype(np.float32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as its CPU kernel computes it.

    float32 ``step = (end - start) / (steps - 1)``; element ``i`` is ``start + step * i`` in the
    first half and ``end - step * (steps - 1 - i)`` in the second, each one fused multiply-add.
    The product is exact in float64, so evaluating in float64 and rounding once reproduces it.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    values = np.where(
        i < steps // 2, np.float64(start32) + step * i, np.float64(end32) - step * (steps - 1 - i)
    )
    return values.astype(np.float32)


def _alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """The float32 ``alphas_cumprod`` table every diffusers scheduler builds in ``__init__``."""
    if config["trained_betas"] is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif config["beta_schedule"] == "linear":
        betas = _torch_linspace_f32(config["beta_start"], config["beta_end"], config["num_train_timesteps"])
    elif config["beta_schedule"] == "scaled_linear":
        betas = (
            _torch_linspace_f32(
                config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"]
            )
            ** 2
        )
    else:
        raise ValueError(
            f"option beta_schedule={config['beta_schedule']!r} is not supported by the NumPy port "
            "(supported: 'linear', 'scaled_linear')"
        )
    # torch.cumprod on CPU accumulates float32 in float64 and rounds each partial product.
    return np.cumprod(1.0 - betas, dtype=np.float64).astype(np.float32)


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """``((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`` in float32, per training timestep."""
    return _sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int) -> np.ndarray:
    """Descending timesteps (float64) as DDIM and both Euler schedulers space ``n`` of them.

    ``linspace`` values are fractional; DDIM rounds them, the Euler schedulers keep them.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n)[::-1]
    if spacing == "leading":
        return (np.arange(0, n) * (num_train // n)).round()[::-1] + steps_offset
    return np.arange(num_train, 0, -num_train / n).round() - 1  # trailing


class Scheduler(ABC):
    """One denoising run of a diffusers scheduler, on NumPy.

    Subclasses declare the diffusers class they mirror, its ``__init__`` defaults and the
    values of each option they support; everything else in the config is validated here.
    """

    DIFFUSERS_CLASS: ClassVar[str]
    DIFFUSERS_DEFAULTS: ClassVar[dict[str, Any]]
    #: Option -> the values this port implements (checked after resolving the config).
    _SUPPORTED: ClassVar[dict[str, tuple[Any, ...]]]
    _COMMON_SUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "rescale_betas_zero_snr": (False,),
    }

    order: int = 1

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Resolve ``config`` as ``from_config`` would and build the schedule tables."""
        use_defaults = set(config.get("_use_default_values", ()))
        overrides = {
            k: v for k, v in config.items() if k in self.DIFFUSERS_DEFAULTS and k not in use_defaults
        }
        self.config: dict[str, Any] = {**self.DIFFUSERS_DEFAULTS, **overrides}
        for key, allowed in {**self._COMMON_SUPPORTED, **self._SUPPORTED}.items():
            if self.config[key] not in allowed:
                raise ValueError(
                    f"{self.DIFFUSERS_CLASS} option {key}={self.config[key]!r} is not supported by the "
                    f"NumPy port (supported: {', '.join(map(repr, allowed))})"
                )
        self.alphas_cumprod = _alphas_cumprod(self.config)
        self.num_inference_steps: int | None = None
        self.timesteps = np.empty(0, dtype=np.float32)
        #: The last step's prediction of the clean sample (diffusers' ``pred_original_sample``):
        #: what a preview decodes. Reading it changes nothing in the run.
        self.pred_original_sample: np.ndarray | None = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise (multiply the unit-variance latents by it)."""
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Lay out the schedule; ``timesteps`` then holds the float32 values to feed the UNet."""
        num_train = self.config["num_train_timesteps"]
        if not 1 <= num_inference_steps <= num_train:
            raise ValueError(f"num_inference_steps must be in [1, {num_train}], got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self._set_timesteps(num_inference_steps)

    @abstractmethod
    def _set_timesteps(self, num_inference_steps: int) -> None: ...

    @abstractmethod
    def set_begin_index(self, begin_index: int) -> None:
        """Start at ``timesteps[begin_index]`` (img2img: call after ``set_timesteps``)."""

    def scale_model_input(self, sample: np.ndarray, timestep: Timestep) -> np.ndarray:
        """The UNet input for ``sample`` at ``timestep`` (unscaled unless the scheduler says otherwise)."""
        return sample

    @abstractmethod
    def step(
        self,
        model_output: np.ndarray,
        timestep: Timestep,
        sample: np.ndarray,
        *,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """The float32 sample at the next (less noisy) timestep.

        ``noise`` is the standard-normal draw diffusers would take inside ``step`` with its
        generator; only the ancestral scheduler uses it.
        """

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """Noise ``original_samples`` to ``timesteps`` (one per row), as diffusers' ``add_noise``."""
        original_samples = np.asarray(original_samples, dtype=np.float32)
        signal_scale, noise_scale = self._noise_scales(np.asarray(timesteps).reshape(-1))
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return signal_scale.reshape(shape) * original_samples + noise_scale.reshape(shape) * np.asarray(
            noise, dtype=np.float32
        )

    @abstractmethod
    def _noise_scales(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row float32 factors of the clean sample and of the noise in ``add_noise``."""

    def _require_timesteps(self) -> int:
        """``num_inference_steps``; a ``ValueError`` before ``set_timesteps``."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps() before denoising")
        return self.num_inference_steps


class DDIM(Scheduler):
    """``diffusers.DDIMScheduler`` with ``eta = 0`` (deterministic DDIM)."""

    DIFFUSERS_CLASS = "DDIMScheduler"
    DIFFUSERS_DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    _SUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"thresholding": (False,)}

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        # alpha_prod for the step after the last timestep.
        self._final_alpha_cumprod = (
            np.ones(1, dtype=np.float32) if self.config["set_alpha_to_one"] else _at(self.alphas_cumprod, 0)
        )

    def set_begin_index(self, begin_index: int) -> None:
        """Nothing to do: DDIM keeps no step counter (diffusers' DDIMScheduler has no such method)."""

    def _set_timesteps(self, num_inference_steps: int) -> None:
        timesteps = _spaced_timesteps(
            self.config["timestep_spacing"],
            self.config["num_train_timesteps"],
            num_inference_steps,
            self.config["steps_offset"],
        )
        if self.config["timestep_spacing"] == "linspace":
            timesteps = timesteps.round()
        self.timesteps = timesteps.astype(np.float32)  # whole numbers (diffusers keeps them as int64)

    def step(
        self,
        model_output: np.ndarray,
        timestep: Timestep,
        sample: np.ndarray,
        *,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        num_inference_steps = self._require_timesteps()
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        t = int(timestep)
        # diffusers steps back by num_train // num_inference_steps whatever the spacing.
        prev_t = t - self.config["num_train_timesteps"] // num_inference_steps
        alpha_prod_t = _at(self.alphas_cumprod, t)
        alpha_prod_t_prev = _at(self.alphas_cumprod, prev_t) if prev_t >= 0 else self._final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        if self.config["prediction_type"] == "epsilon":
            pred_original_sample = (sample - _sqrt(beta_prod_t) * model_output) / _sqrt(alpha_prod_t)
            pred_epsilon = model_output
        else:  # v_prediction
            pred_original_sample = _sqrt(alpha_prod_t) * sample - _sqrt(beta_prod_t) * model_output
            pred_epsilon = _sqrt(alpha_prod_t) * model_output + _sqrt(beta_prod_t) * sample
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            pred_original_sample = np.clip(pred_original_sample, -limit, limit)

        self.pred_original_sample = pred_original_sample
        # eta = 0: no variance term, so the direction to x_t uses all of 1 - alpha_prod_t_prev.
        pred_sample_direction = _sqrt(1 - alpha_prod_t_prev) * pred_epsilon
        return _sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

    def _noise_scales(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        alpha_prod = self.alphas_cumprod[timesteps.astype(np.int64)]
        return _sqrt(alpha_prod), _sqrt(1 - alpha_prod)


class _SigmaScheduler(Scheduler):
    """Schedulers indexed by a step counter over a ``sigmas`` table (diffusers' ``step_index``)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.sigmas = np.empty(0, dtype=np.float32)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def set_begin_index(self, begin_index: int) -> None:
        self._begin_index = begin_index

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        self.timesteps = timesteps.astype(np.float32)
        self.sigmas = sigmas.astype(np.float32)
        self._step_index = None
        self._begin_index = None

    def _sigma_last(self) -> float | np.ndarray:
        """The sigma after the last timestep, from ``final_sigmas_type``."""
        if self.config["final_sigmas_type"] == "sigma_min":
            return _at(_train_sigmas(self.alphas_cumprod), 0)
        return 0.0

    def _index_for_timestep(self, timestep: Timestep) -> int:
        """Position of ``timestep`` in the schedule; the second match if it occurs twice."""
        indices = np.flatnonzero(self.timesteps == timestep)
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not in the schedule {self.timesteps.tolist()}")
        return int(indices[1] if len(indices) > 1 else indices[0])

    def _current_step_index(self, timestep: Timestep) -> int:
        """The step index, initialised on first use from ``begin_index`` or from ``timestep``."""
        self._require_timesteps()
        if self._step_index is None:
            self._step_index = (
                self._index_for_timestep(timestep) if self._begin_index is None else self._begin_index
            )
        return self._step_index

    def _add_noise_sigmas(self, timesteps: np.ndarray) -> np.ndarray:
        """One sigma per row for ``add_noise``, chosen as diffusers does."""
        self._require_timesteps()
        if self._begin_index is None:  # training-style: look each timestep up
            indices = [self._index_for_timestep(t) for t in timesteps]
        elif self._step_index is not None:  # after the first step (inpainting)
            indices = [self._step_index] * len(timesteps)
        else:  # before the first step (img2img)
            indices = [self._begin_index] * len(timesteps)
        return self.sigmas[indices]


class Euler(_SigmaScheduler):
    """``diffusers.EulerDiscreteScheduler`` (``s_churn = 0``, as the pipelines call it)."""

    DIFFUSERS_CLASS = "EulerDiscreteScheduler"
    DIFFUSERS_DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    _SUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "interpolation_type": ("linear",),
        "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "timestep_type": ("discrete",),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    @property
    def init_noise_sigma(self) -> float:
        self._require_timesteps()
        max_sigma = self.sigmas.max(keepdims=True)
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(max_sigma[0])
        return float(_sqrt(max_sigma**2 + 1)[0])

    def _set_timesteps(self, num_inference_steps: int) -> None:
        timesteps = _spaced_timesteps(
            self.config["timestep_spacing"],
            self.config["num_train_timesteps"],
            num_inference_steps,
            self.config["steps_offset"],
        ).astype(np.float32)
        train_sigmas = _train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self._set_schedule(timesteps, np.concatenate([sigmas, np.atleast_1d(self._sigma_last())]))

    def scale_model_input(self, sample: np.ndarray, timestep: Timestep) -> np.ndarray:
        """``sample / sqrt(sigma**2 + 1)``, the UNet's input scaling for the Euler methods."""
        sigma = _at(self.sigmas, self._current_step_index(timestep))
        return np.asarray(sample, dtype=np.float32) / _sqrt(sigma**2 + 1)

    def _pred_original_sample(
        self, model_output: np.ndarray, sample: np.ndarray, sigma: np.ndarray
    ) -> np.ndarray:
        if self.config["prediction_type"] == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / _sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)  # v_prediction

    def step(
        self,
        model_output: np.ndarray,
        timestep: Timestep,
        sample: np.ndarray,
        *,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        index = self._current_step_index(timestep)
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        sigma = _at(self.sigmas, index)  # == diffusers' sigma_hat, as gamma = 0 without s_churn
        self.pred_original_sample = self._pred_original_sample(model_output, sample, sigma)
        derivative = (sample - self.pred_original_sample) / sigma
        dt = _at(self.sigmas, index + 1) - sigma
        self._step_index = index + 1
        return sample + derivative * dt

    def _noise_scales(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sigma = self._add_noise_sigmas(timesteps)
        return np.ones_like(sigma), sigma


class EulerAncestral(Euler):
    """``diffusers.EulerAncestralDiscreteScheduler``: Euler steps plus fresh noise each step."""

    DIFFUSERS_CLASS = "EulerAncestralDiscreteScheduler"
    DIFFUSERS_DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    _SUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def _sigma_last(self) -> float:
        return 0.0

    def step(
        self,
        model_output: np.ndarray,
        timestep: Timestep,
        sample: np.ndarray,
        *,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        if noise is None:
            raise ValueError("euler_a: step() needs the step's standard-normal noise (noise=...)")
        index = self._current_step_index(timestep)
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        sigma_from = _at(self.sigmas, index)
        sigma_to = _at(self.sigmas, index + 1)
        sigma_up = _sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
        sigma_down = _sqrt(sigma_to**2 - sigma_up**2)

        self.pred_original_sample = self._pred_original_sample(model_output, sample, sigma_from)
        derivative = (sample - self.pred_original_sample) / sigma_from
        prev_sample = sample + derivative * (sigma_down - sigma_from)
        self._step_index = index + 1
        return prev_sample + np.asarray(noise, dtype=np.float32) * sigma_up


class DPMPlusPlus2M(_SigmaScheduler):
    """``diffusers.DPMSolverMultistepScheduler`` as DPM-Solver++(2M): ``dpmsolver++``, order 2, midpoint."""

    DIFFUSERS_CLASS = "DPMSolverMultistepScheduler"
    DIFFUSERS_DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    _SUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "solver_order": (2,),
        "algorithm_type": ("dpmsolver++",),
        # diffusers maps the UniPC / DEIS solver types onto midpoint.
        "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
        "thresholding": (False,),
        "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "variance_type": (None,),
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self._previous_x0: np.ndarray | None = None  # the last step's data prediction (the "2M" memory)

    def _set_timesteps(self, num_inference_steps: int) -> None:
        num_train = self.config["num_train_timesteps"]
        n = num_inference_steps
        # Leave out the timesteps whose log-SNR lambda is below lambda_min_clipped.
        lambdas = _log(_sqrt(self.alphas_cumprod)) - _log(_sqrt(1 - self.alphas_cumprod))
        last_timestep = num_train - int(np.searchsorted(lambdas[::-1], self.config["lambda_min_clipped"]))
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1] + self.config["steps_offset"]
        else:  # trailing
            timesteps = np.arange(last_timestep, 0, -num_train / n).round() - 1
        timesteps = timesteps.astype(np.int64)
        train_sigmas = _train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self._set_schedule(timesteps, np.concatenate([sigmas, np.atleast_1d(self._sigma_last())]))
        self._previous_x0 = None

    def _index_for_timestep(self, timestep: Timestep) -> int:
        # Unlike the Euler schedulers, DPM-Solver falls back to the last step for unknown timesteps.
        if not np.any(self.timesteps == timestep):
            return len(self.timesteps) - 1
        return super()._index_for_timestep(timestep)

    @staticmethod
    def _alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """VP ``(alpha_t, sigma_t)`` for the schedule's ``sigma``."""
        alpha_t = 1 / _sqrt(sigma**2 + 1)
        return alpha_t, sigma * alpha_t

    @staticmethod
    def _log_snr(alpha_t: np.ndarray, sigma_t: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):  # sigma_t = 0 after the last step: lambda = +inf, like torch
            return _log(alpha_t) - _log(sigma_t)

    def step(
        self,
        model_output: np.ndarray,
        timestep: Timestep,
        sample: np.ndarray,
        *,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        index = self._current_step_index(timestep)
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        num_steps = len(self.timesteps)
        lower_order_final = index == num_steps - 1 and (
            self.config["euler_at_final"]
            or (self.config["lower_order_final"] and num_steps < 15)
            or self.config["final_sigmas_type"] == "zero"
        )

        alpha_s0, sigma_s0 = self._alpha_sigma(_at(self.sigmas, index))
        if self.config["prediction_type"] == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        else:  # v_prediction
            x0 = alpha_s0 * sample - sigma_s0 * model_output

        alpha_t, sigma_t = self._alpha_sigma(_at(self.sigmas, index + 1))
        h = self._log_snr(alpha_t, sigma_t) - self._log_snr(alpha_s0, sigma_s0)
        if self._previous_x0 is None or lower_order_final:  # first order: DDIM in data prediction
            prev_sample = (sigma_t / sigma_s0) * sample - (alpha_t * (_exp(-h) - 1.0)) * x0
        else:  # second order, midpoint
            alpha_s1, sigma_s1 = self._alpha_sigma(_at(self.sigmas, index - 1))
            r0 = (self._log_snr(alpha_s0, sigma_s0) - self._log_snr(alpha_s1, sigma_s1)) / h
            d1 = (1.0 / r0) * (x0 - self._previous_x0)
            prev_sample = (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (_exp(-h) - 1.0)) * x0
                - 0.5 * (alpha_t * (_exp(-h) - 1.0)) * d1
            )
        self._previous_x0 = self.pred_original_sample = x0
        self._step_index = index + 1
        return prev_sample

    def _noise_scales(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._alpha_sigma(self._add_noise_sigmas(timesteps))


_CLASSES: dict[str, type[Scheduler]] = {
    "ddim": DDIM,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "dpmpp_2m": DPMPlusPlus2M,
}


def scheduler_for(diffusers_class: str) -> str | None:
    """Our name for a diffusers scheduler class (``"DDIMScheduler"`` -> ``"ddim"``), if we have it."""
    return next((name for name, cls in _CLASSES.items() if diffusers_class == cls.DIFFUSERS_CLASS), None)


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """A fresh scheduler ``name`` (one of ``SCHEDULERS``) for a diffusers scheduler ``config``."""
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None
    return cls(config)
