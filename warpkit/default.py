"""The old name of `warpkit.workloads.default`, kept so existing configs and imports work unchanged:
`reward_funcs: [warpkit.default:vader_reward]` resolves here. New code names `warpkit.workloads.default`."""

from warpkit.workloads.default import *  # noqa: F403
from warpkit.workloads.default import __all__  # noqa: F401
