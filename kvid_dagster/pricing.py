"""What a job costs, in kvid credits (1 credit = 0.01 USD): configuration, not constants.

The vendor's price pages have changed over time; this table is one published version, per 5-6 s
video. A 10 s v2 video is priced as two. Failed jobs are charged too, so every submission counts.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvid_dagster.client import KvidRequest

# (model, resolution) -> credits per 5-6 s video. 580p is not on the page: priced as 720p, the
# conservative choice for a budget.
DEFAULT_PRICES: Mapping[str, float] = {
    "v1/480p": 60,
    "v1/580p": 120,
    "v1/720p": 120,
    "v2/480p": 39,
    "v2/720p": 54,
    "v2/1080p": 89,
}


def estimate_cost_credits(request: KvidRequest, prices: Mapping[str, float] | None = None) -> float:
    """The credits one submission of ``request`` is expected to cost (0.0 when unpriced)."""
    table = DEFAULT_PRICES if prices is None else prices
    resolution = getattr(request, "resolution", "720p")
    price = float(table.get(f"{request.model}/{resolution}", 0.0))
    if getattr(request, "duration", "5") == "10":
        price *= 2
    return price
