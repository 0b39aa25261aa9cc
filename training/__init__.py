"""Every ``un0-bench train`` target: how each shipped weights file is made, and the loop they share.

The floor above ``un0_impl/``: a trainer may import the instrument, the backbones, the techniques
and the Un-0 networks it trains, and none of them imports a trainer. One module per target family
(``teacher``, ``judge``, ``int8_calibration``, ``pruned``, ``distilled``, ``un0``, ``oscillator``),
the teacher's (noise, image) pairs the students learn from (``pairs``), and the shared loop (``loop``).
"""
