"""The rewards of an RL run, checked: a non-finite reward stops the run at the first step, by name.

TRL turns a reward of None into NaN and sums the rewards of a sample with `nansum`, so a reward that returns
NaN (or None, or inf) for every completion trains to exit code 0 with a zero advantage: grad_norm 0, no
learning, and a merge of such runs has cosine 0. warpkit refuses such a reward at the first step instead:

- a reward function (`'module:function'`) is wrapped in `FiniteReward`, which calls it and raises a
  ValueError naming the reward and its first offending completion;
- a reward-model folder is loaded and called by TRL itself (`trainer.reward_funcs[i]` is the model), so
  `check_reward_models` puts a forward hook on that model which checks its scores (`logits[:, 0]`) and
  names the folder and the first offending text (prompt + completion, decoded from the model's input).

TRL's convention that a reward may return None for a sample it does not apply to (with several rewards) is
not supported: return a number (e.g. 0.0) for such samples, or split the dataset.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["FiniteReward", "check_reward_models", "finite_reward", "first_non_finite", "non_finite_message"]


def first_non_finite(values: Sequence[Any]) -> int | None:
    """The index of the first value that is None, not a number, NaN or ±inf; None when all are finite."""
    for i, v in enumerate(values):
        try:
            if v is None or not math.isfinite(float(v)):
                return i
        except (TypeError, ValueError):
            return i
    return None


FIX_FUNCTION = "Fix the reward (return e.g. 0.0 where it cannot score)."
FIX_MODEL = "Check the reward model's weights (a merge or a training run that diverged?) or use another one."


def non_finite_message(
    name: str, values: Sequence[Any], index: int, completion: Any, fix: str = FIX_FUNCTION
) -> str:
    """'reward NAME returned VALUE for completion I of N (K non-finite in all): TEXT. <why> <fix>'."""
    bad = sum(first_non_finite([v]) is not None for v in values)
    return (
        f"reward {name} returned {values[index]!r} for completion {index} of {len(values)} ({bad} non-finite "
        f"in all): {_text(completion)!r}. A reward must be a finite number for every completion: TRL "
        "drops NaN and None from the reward sum, so the run would train on a zero advantage and learn "
        f"nothing. {fix}"
    )


def _text(completion: Any, limit: int = 200) -> str:
    """A completion as text (chat messages: their contents), cut to ``limit`` characters."""
    if isinstance(completion, list):
        completion = "".join(str(m.get("content", m)) if isinstance(m, dict) else str(m) for m in completion)
    text = str(completion)
    return text if len(text) <= limit else text[:limit] + "..."


class FiniteReward:
    """A reward function with TRL's signature whose every value is checked to be finite.

    Calls pass through unchanged; the values it returns are returned as they are. ``name`` (the
    ``module:function`` spec) names the reward in errors; ``__name__`` stays the function's, so TRL's
    metric keys (``rewards/<function>/mean``) do not change. Picklable when the function is.
    """

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn = fn
        self.name = name
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def check(self, values: Any, completions: Sequence[Any]) -> Any:
        listed = values.tolist() if hasattr(values, "tolist") else list(values)
        index = first_non_finite(listed)
        if index is not None:
            completion = completions[index] if index < len(completions) else None
            raise ValueError(non_finite_message(self.name, listed, index, completion))
        return values

    def __call__(self, *args: Any, completions: Sequence[Any] = (), **kwargs: Any) -> Any:
        return self.check(self.fn(*args, completions=completions, **kwargs), completions)

    def __repr__(self) -> str:
        return f"FiniteReward({self.name})"


class _AsyncFiniteReward(FiniteReward):
    """`FiniteReward` of an ``async`` reward function: TRL awaits it (its `is_async_callable` sees this)."""

    async def __call__(self, *args: Any, completions: Sequence[Any] = (), **kwargs: Any) -> Any:
        return self.check(await self.fn(*args, completions=completions, **kwargs), completions)


def finite_reward(fn: Callable[..., Any], name: str) -> FiniteReward:
    """``fn`` wrapped in `FiniteReward` (its async form when calling ``fn`` returns a coroutine)."""
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable class carries `async` on its __call__
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
    return (_AsyncFiniteReward if is_async else FiniteReward)(fn, name)


def check_reward_models(trainer: Any, names: Sequence[str]) -> None:
    """Hook every reward model TRL loaded for ``trainer`` so that a non-finite score raises a ValueError
    naming it (``names``: one per reward, in `trainer.reward_funcs` order) and the first offending text."""
    from torch import nn

    for i, (model, name) in enumerate(zip(trainer.reward_funcs, names, strict=True)):
        if isinstance(model, nn.Module):
            tokenizer = trainer.reward_processing_classes[i]
            model.register_forward_hook(_score_check(f"model {name}", tokenizer), with_kwargs=True)


def _score_check(name: str, tokenizer: Any) -> Callable[..., None]:
    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        scores = output.logits[:, 0].detach().float()
        if bool(scores.isfinite().all()):
            return
        values = scores.cpu().tolist()
        index = first_non_finite(values)
        assert index is not None
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        text = (
            ""
            if ids is None
            else tokenizer.decode(
                ids[index][mask[index].bool()] if mask is not None else ids[index], skip_special_tokens=True
            )
        )
        raise ValueError(non_finite_message(name, values, index, text, FIX_MODEL))

    return hook
