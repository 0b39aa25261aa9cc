import math

from un0_bench.reports.html import _ENV


def test_the_factor_filter_is_the_claims_wording_infinite_case_included():
    # A model that used no energy next to one that did is an infinite factor: "∞x", not an error or "infx".
    shown = _ENV.from_string("{{ a | factor }} {{ b | factor }} {{ c | factor }} {{ d | factor }}").render(
        a=math.inf, b=None, c=1234.4, d=3.14159)
    assert shown == "∞x — 1,234x 3.14x"
