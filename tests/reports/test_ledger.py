import pytest
from un0_bench.reports.ledger import boundaries, derivation_energy_j, ledger

from tests.reports.fixtures import proxy, record


def test_proxy_boundaries_accumulate():
    r = proxy("un0", compute=1.0, gating=0.5, memory=2.0,
              derivation={"proxy": {"energy_j": 1e6}, "includes": {"teacher": {"proxy": {"energy_j": 3e6}}}})
    b = boundaries(r, pue=1.5, lifetime_images=1_000_000)
    assert b["compute"]["energy_j_per_image"] == 1.0
    assert b["gating"]["energy_j_per_image"] == 1.5
    assert b["memory"]["energy_j_per_image"] == 3.5
    assert b["idle"]["energy_j_per_image"] == 3.5  # the default profile gives no static power
    assert b["pue"]["energy_j_per_image"] == 3.5 * 1.5
    # training: (1e6 own + 3e6 teacher) J x PUE 1.5 / 1e6 images = 6 J per image on top
    assert b["training"]["energy_j_per_image"] == pytest.approx(3.5 * 1.5 + 6.0)


def test_factors_against_reference():
    ref = proxy("sd", compute=1000.0, memory=1000.0)
    mine = proxy("un0", compute=1.0, gating=1.0, memory=8.0)
    lg = ledger(mine, ref, pue=1.0)
    assert lg["compute"]["factor_vs_reference"] == 1000.0
    assert lg["gating"]["factor_vs_reference"] == 500.0
    assert lg["memory"]["factor_vs_reference"] == 200.0


def test_whole_device_meter_cannot_split():
    r = record("sd", "rapl", 10.0, energy_net_j_per_image=4.0)
    b = boundaries(r, pue=1.1)
    assert b["compute"]["energy_j_per_image"] is None and "cannot split" in b["compute"]["why"]
    assert b["memory"]["energy_j_per_image"] == 4.0
    assert b["idle"]["energy_j_per_image"] == 10.0
    assert b["pue"]["energy_j_per_image"] == pytest.approx(11.0)


def test_unavailable_meter_is_null_with_reason_not_zero():
    r = record("sd", "nvml", None, status="unavailable: no NVIDIA driver")
    b = boundaries(r)
    assert all(e["energy_j_per_image"] is None for e in b.values())
    assert b["pue"]["why"] == "unavailable: no NVIDIA driver"


def test_training_unmeasured_by_a_meter_is_null():
    r = record("sd", "codecarbon", 2.0, derivation={"codecarbon": {"status": "unavailable: x", "energy_j": None}})
    assert derivation_energy_j(r["derivation_energy"], "codecarbon")[0] is None
    assert boundaries(r)["training"]["energy_j_per_image"] is None


def test_training_never_recorded_is_unknown_and_nothing_trained_is_zero():
    # A pipeline's pretraining or a user's generator: no derivation recorded, so no figure (not + 0 J).
    unknown = boundaries(proxy("sd", compute=1.0, derivation=None))["training"]
    assert unknown["energy_j_per_image"] is None and unknown["why"] == "training energy not recorded for this model"
    assert derivation_energy_j(None, "proxy") == (None, "training energy not recorded for this model")
    # A reference (noise, real data) needed no training: boundary 6 is boundary 5 + 0 J.
    assert derivation_energy_j({}, "proxy") == (0.0, "nothing was trained for this model")
    nothing = boundaries(proxy("noise", compute=1.0), pue=1.5)
    assert nothing["training"]["energy_j_per_image"] == nothing["pue"]["energy_j_per_image"] == 1.5


def test_references_say_nothing_was_trained():
    from un0_bench.backbones.digits import DigitsBackbone
    from un0_bench.harness.core.generator import NOT_TRAINED
    from un0_bench.harness.core.stack import make_generator

    for name in ("noise", "real"):
        assert make_generator(name, DigitsBackbone()).derivation() is NOT_TRAINED


def test_pue_below_one_refused():
    with pytest.raises(ValueError, match="PUE"):
        boundaries(proxy("sd", 1.0), pue=0.9)


def test_run_settings_come_from_the_run_unless_overridden():
    from un0_bench.harness.running.config import DEFAULT_LIFETIME_IMAGES, DEFAULT_PUE
    from un0_bench.reports.ledger import run_settings

    run = {"reference": "un0", "pue": 1.2, "lifetime_images": 10}
    records = [record("sd", "proxy", 1.0, config={"run": run}), record("un0", "proxy", 0.1, config={"run": run})]
    assert run_settings(records) == run
    # An override replaces only what it gives; None means "the run's own".
    assert run_settings(records, {"reference": "sd", "pue": None, "lifetime_images": None}) == {**run,
                                                                                                "reference": "sd"}
    assert run_settings(records, {"pue": 2.0, "grid_gco2_per_kwh": 1.0}) == {**run, "pue": 2.0}
    # A resumed folder: the newest record's setting wins.
    later = record("x", "proxy", 1.0, config={"run": {**run, "pue": 1.4}})
    assert run_settings([*records, later])["pue"] == 1.4
    # Records without run settings (the fixtures' empty config.run): the defaults.
    assert run_settings([record("sd", "proxy", 1.0)]) == {"reference": "sd", "pue": DEFAULT_PUE,
                                                          "lifetime_images": DEFAULT_LIFETIME_IMAGES}
    assert run_settings([]) == run_settings([record("sd", "proxy", 1.0)])
