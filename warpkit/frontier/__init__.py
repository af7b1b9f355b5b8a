"""The reward-KL frontier (work in progress: modules moved from the flat layout)."""
