"""How much to prune, and when."""


def cubic_schedule(target, steps):
    """The fraction pruned after each of `steps` steps toward `target`, s_k = S (1 - (1 - k/K)^3)
    (Zhu and Gupta 2017): large steps while the network has much to spare, small ones at the end."""
    return [target * (1 - (1 - k / steps) ** 3) for k in range(1, steps + 1)]
