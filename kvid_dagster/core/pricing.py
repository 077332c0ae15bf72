"""What a job costs, in kvid credits (1 credit = 0.01 USD): configuration, not constants.

The vendor's price pages have changed over time; this table is one published version, per 5-6 s
video, keyed ``<model>/<resolution>``. A longer video is priced per started 6 s (a 10 s v2 video
as two). Failed jobs are charged too, so every submission counts. Where the service reports what
a job cost (the generation dialect's ``used_credit``), the ledger keeps that figure as the cost
and this estimate beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from kvid_dagster.client import KvidRequest

# 580p is not on the page: priced as 720p, the conservative choice for a budget. The generation
# dialect's ``wan`` and ``seedance`` are the v1 and v2 families; a model not in the table (v3,
# veo3.1, a model path, the server's default) is unpriced until configured.
_V1 = {"480p": 60, "580p": 120, "720p": 120}
_V2 = {"480p": 39, "720p": 54, "1080p": 89}
DEFAULT_PRICES: Mapping[str, float] = {
    **{f"{model}/{res}": price for model in ("v1", "wan") for res, price in _V1.items()},
    **{f"{model}/{res}": price for model in ("v2", "seedance") for res, price in _V2.items()},
}
SECONDS_PER_PRICE = 6  # a price is per 5-6 s video
_LONGEST_AUTO_S = 15  # reference-to-video's "auto" duration: priced at its longest


def estimate_cost_credits(request: KvidRequest, prices: Mapping[str, float] | None = None) -> float:
    """The credits one submission of ``request`` is expected to cost (0.0 when unpriced)."""
    table = DEFAULT_PRICES if prices is None else prices
    resolution = getattr(request, "resolution", "720p")
    price = float(table.get(f"{request.model}/{resolution}", 0.0))
    duration = getattr(request, "duration", None)
    seconds = _LONGEST_AUTO_S if duration == "auto" else int(duration or SECONDS_PER_PRICE)
    return price * max(1, math.ceil(seconds / SECONDS_PER_PRICE))
