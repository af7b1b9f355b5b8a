"""When the anchor's relatives act, and with which coefficients: plain Python, no torch (the RL config imports it).

- `BemaSchedule`: BEMA (Block et al. 2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes",
  arXiv 2508.00180), with TRL's `trl.trainer.callbacks.BEMACallback` parameter names and formulas (TRL 1.16,
  read from its source): at an update step t (the global optimizer step, counted from 0 at the start of
  training, not from the burn-in)

      beta_t  = max((rho + gamma * t) ** -kappa, min_ema_multiplier)     rho = lag, gamma = multiplier,
      alpha_t = (rho + gamma * t) ** -eta                                 kappa = ema_power, eta = bias_power

- `ElasticSchedule`: Elastic Reset (Noukhovitch et al. 2023, arXiv 2312.07551): an EMA of the policy (rate mu)
  every `update_every` steps, and every n = `reset_every` steps policy <- EMA, then EMA <- init.

`check_rate` and `check_steps` are the shared refusals (a rate outside (0, 1], a period below 1), each naming
the value and the fix; `prefix` names the setting as the caller's config spells it (`bema_` in the RL config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BemaAction",
    "BemaSchedule",
    "ElasticSchedule",
    "check_bema_settings",
    "check_rate",
    "check_steps",
]

BemaAction = Literal["wait", "snapshot", "update", "hold"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rate(name: str, value: Any, fix: str) -> None:
    """ValueError unless `value` is a number in (0, 1]."""
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}; {fix}")


def check_steps(name: str, value: Any, minimum: int = 1, unit: str = "optimizer steps") -> None:
    """ValueError unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({unit}), got {value!r}.")


def check_bema_settings(settings: dict[str, Any], prefix: str = "") -> None:
    """Refuse BEMA settings for which beta_t or alpha_t would leave (0, 1] at some update step t >= 1.

    `settings` holds `BemaSchedule`'s fields by name; refusals name them as `<prefix><field>`.
    """
    check_steps(f"{prefix}update_freq", settings["update_freq"])
    check_steps(f"{prefix}update_after", settings["update_after"], minimum=0)
    for name in ("ema_power", "bias_power", "lag", "multiplier"):
        value = settings[name]
        if not _is_number(value) or value < 0:
            raise ValueError(
                f"{prefix}{name} must be a finite number >= 0, got {value!r} (TRL's BEMACallback defaults: "
                "ema_power 0.5, bias_power 0.2, lag 10, multiplier 1)."
            )
    if settings["lag"] + settings["multiplier"] < 1:
        raise ValueError(
            f"{prefix}lag + {prefix}multiplier must be >= 1, got {settings['lag']!r} + "
            f"{settings['multiplier']!r}: the EMA rate beta_t = (lag + multiplier * t) ** -ema_power would exceed "
            "1 at step t = 1 (an extrapolation, not an average). Raise lag (TRL's default is 10)."
        )
    floor = settings["min_ema_multiplier"]
    if not _is_number(floor) or not 0.0 <= floor <= 1.0:
        raise ValueError(
            f"{prefix}min_ema_multiplier must be a number in [0, 1] (the floor of the EMA rate beta_t), got "
            f"{floor!r}; 0 means no floor."
        )


@dataclass(frozen=True)
class BemaSchedule:
    """BEMA's schedule, as TRL's `BEMACallback.on_step_end` runs it at global optimizer step t:

    - t < tau (`update_after`): nothing (the anchor stays what it was at the start, the init);
    - t == tau: snapshot theta_0 <- policy and EMA <- policy (the anchor is not rewritten at this step);
    - t > tau and (t - tau) % phi == 0 (phi = `update_freq`): EMA <- (1 - beta_t) EMA + beta_t policy, then
      anchor <- EMA + alpha_t (policy - theta_0).

    At the start of training (t = 0) theta_0 = EMA = anchor = policy; with tau = 0 that is the snapshot.

    Args:
        update_freq: phi >= 1, optimizer steps between updates. TRL's default is 400 (a model kept for
            evaluation); an RL anchor moves with the policy, so warpkit's default is 1 (every step, as WARP).
        ema_power: kappa >= 0 (TRL 0.5); 0 makes beta_t = 1, i.e. EMA = policy.
        bias_power: eta >= 0 (TRL 0.2); large values make alpha_t ~ 0 (plain EMA), 0 pins alpha_t = 1.
        lag: rho >= 0 (TRL 10), the virtual age of the average at t = 0.
        update_after: tau >= 0 (TRL 0), burn-in steps before theta_0 is taken.
        multiplier: gamma >= 0 (TRL 1); lag + multiplier >= 1 keeps beta_t, alpha_t in (0, 1].
        min_ema_multiplier: a floor in [0, 1] for beta_t (TRL 0).
    """

    update_freq: int = 1
    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10
    update_after: int = 0
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0

    def __post_init__(self) -> None:
        check_bema_settings(self.__dict__)

    def ema_beta(self, step: int) -> float:
        """beta_t = max((rho + gamma t) ** -kappa, min_ema_multiplier), TRL's `_ema_beta` verbatim."""
        beta = (self.lag + self.multiplier * step) ** (-self.ema_power)
        return max(beta, self.min_ema_multiplier)

    def bema_alpha(self, step: int) -> float:
        """alpha_t = (rho + gamma t) ** -eta, TRL's `_bema_alpha` verbatim."""
        return (self.lag + self.multiplier * step) ** (-self.bias_power)

    def action(self, step: int) -> BemaAction:
        """What happens after optimizer step `step` >= 1 (see the class docstring)."""
        if step < self.update_after:
            return "wait"
        if step == self.update_after:
            return "snapshot"
        if (step - self.update_after) % self.update_freq == 0:
            return "update"
        return "hold"


@dataclass(frozen=True)
class ElasticSchedule:
    """Elastic Reset's schedule at global optimizer step t >= 1: first the EMA update when t % `update_every`
    == 0, EMA <- (1 - mu) EMA + mu policy (mu = `ema_rate`; the paper's decay 0.995 is mu = 0.005), then the
    reset when t % n == 0 (n = `reset_every`): policy <- EMA, EMA <- init.
    """

    reset_every: int
    ema_rate: float = 0.005
    update_every: int = 1

    def __post_init__(self) -> None:
        check_steps("reset_every", self.reset_every)
        check_rate("ema_rate", self.ema_rate, "Elastic Reset uses 0.005 (an EMA decay of 0.995).")
        check_steps("update_every", self.update_every)

    def updates_at(self, step: int) -> bool:
        return step % self.update_every == 0

    def resets_at(self, step: int) -> bool:
        return step % self.reset_every == 0
