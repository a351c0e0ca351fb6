"""The statistics and result shape of the fidelity benchmarks (benchmarks/sconv_fidelity.py,
benchmarks/dgc_fidelity.py): the paired difference and its t interval, the decision rule of a
claim, the claims computed from runs, and the matched-cost baselines' construction."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from benchmarks import bsn_fashion_mnist, dgc_fidelity, sconv_fidelity
from benchmarks.common import CLAIM_STATUSES, decide, paired_difference


def test_paired_difference_is_the_mean_of_per_seed_differences_with_a_t_interval():
    d = paired_difference({0: 90.0, 1: 91.0, 2: 92.5, 7: 50.0}, {0: 89.0, 1: 90.5, 2: 91.0})
    assert d["keys"] == [0, 1, 2] and d["diffs"] == [1.0, 0.5, 1.5] and d["n"] == 3
    assert d["mean"] == pytest.approx(1.0) and d["sd"] == pytest.approx(0.5)
    half = 4.302652729749464 * 0.5 / math.sqrt(3)                # t_{0.975, 2}
    assert d["ci"] == pytest.approx([1.0 - half, 1.0 + half])
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one["mean"] == 0.5 and one["ci"] is None


@pytest.mark.parametrize("ci,threshold,status", [
    ([0.1, 0.9], 0.0, "reproduced"), ([-0.9, -0.1], 0.0, "not reproduced"), ([-0.5, 0.5], 0.0, "undecided"),
    ([0.0, 0.0], 0.0, "undecided"), (None, 0.0, "undecided"),
    ([-0.8, -0.2], -1.0, "reproduced"), ([-1.8, -1.2], -1.0, "not reproduced"), ([-1.5, 0.2], -1.0, "undecided")])
def test_a_claim_is_decided_by_where_its_interval_lies(ci, threshold, status):
    assert decide(ci, threshold) == status and status in CLAIM_STATUSES


def _runs(arms, seeds, acc):
    return [{"arm": a, "seed": s, "test_acc": acc(a, s), "params": 1000, "macs": 2000} for a in arms for s in seeds]


def test_sconv_claims_follow_the_runs():
    better = {"scaled_gamma": 0.02, "paper_gamma": 0.0, "dealloc_only": 0.0, "shifts_frozen": 0.01,
              "static_matched": 0.03, "baseline": 0.0}
    noise = {0: 0.001, 1: -0.002, 2: 0.0015}
    runs = _runs(sconv_fidelity.ARMS, [0, 1, 2], lambda a, s: 0.9 + better[a] + (noise[s] if a != "static_matched" else 0))
    claims = {c["method"] + "−" + c["reference"]: c for c in sconv_fidelity.claims(runs)}
    assert len(claims) == len(sconv_fidelity.CLAIMS)
    assert all(set(c) >= {"claim", "status"} for c in claims.values())
    assert claims["paper_gamma−baseline"]["status"] == "undecided"          # identical runs: CI [0, 0]
    assert claims["scaled_gamma−baseline"]["status"] == "reproduced"
    assert claims["scaled_gamma−baseline"]["difference_points"] == pytest.approx(2.0)
    assert claims["scaled_gamma−shifts_frozen"]["status"] == "reproduced"
    assert claims["scaled_gamma−static_matched"]["status"] == "not reproduced"
    summary = {s["arm"]: s for s in sconv_fidelity.summarise(runs)}
    assert summary["scaled_gamma"]["acc_mean"] == pytest.approx(92.0 + 100 * sum(noise.values()) / 3)


def test_bsn_claim_pairs_each_budget_with_its_thinned_network_by_seed():
    runs = [{"name": "bsn macs 50%", "seed": 0, "accuracy": 0.850}, {"name": "bsn macs 50%", "seed": 1, "accuracy": 0.860},
            {"name": "thinned (widths 6/11/22)", "thinned_for": "bsn macs 50%", "seed": 1, "accuracy": 0.870},
            {"name": "thinned (widths 6/11/22)", "thinned_for": "bsn macs 50%", "seed": 0, "accuracy": 0.875},
            {"name": "thinned (widths 1/1/1)", "thinned_for": "bsn macs 25%", "seed": 0, "accuracy": 0.1}]
    name, per_seed, mean, ci, status = bsn_fashion_mnist.claim_row("bsn macs 50%", runs)
    assert per_seed == "-2.50 / -1.00" and mean == "-1.75"
    half = 12.706204736174707 * math.sqrt(1.125) / math.sqrt(2)          # t_{0.975, 1} · sd / √n
    assert ci == f"[{-1.75 - half:+.2f}, {-1.75 + half:+.2f}]" and status == "**undecided**"
    runs[1]["accuracy"] = 0.845                                                   # both seeds 2.5 points behind: sd 0
    assert bsn_fashion_mnist.claim_row("bsn macs 50%", runs)[-1] == "**not reproduced**"


def test_dgc_claims_use_the_one_point_margin_against_dense():
    drop = {"dense": 0.0, "dgc_xi0.3": -0.003, "dgc_xi0.5": -0.005, "dgc_xi0.75": -0.02, "width_matched": -0.02,
            "prune_finetune": -0.004, "static_group": -0.03, "random_gating": -0.04}
    noise = {0: 0.0005, 1: -0.001, 2: 0.0}
    runs = _runs(dgc_fidelity.ARMS, [0, 1, 2], lambda a, s: 0.9 + drop[a] + (noise[s] if a.startswith("dgc") else 0))
    status = {c["reference"]: c["status"] for c in dgc_fidelity.claims(runs)}
    assert status == {"dense": "reproduced", "width_matched": "reproduced", "prune_finetune": "undecided",
                      "static_group": "reproduced", "random_gating": "reproduced"}


def test_dgc_baselines_are_built_at_the_target_cost():
    torch.manual_seed(0)
    dense = dgc_fidelity.resnet_cifar(8, in_channels=1)
    same = dgc_fidelity.WidthResNet(1, (16, 32, 64))
    assert sum(p.numel() for p in same.parameters()) == sum(p.numel() for p in dense.parameters())
    assert dgc_fidelity.macs_of(same) == dgc_fidelity.macs_of(dense)
    widths, _, macs = dgc_fidelity.match_width(8, 0.5 * dgc_fidelity.macs_of(dense))
    assert widths[0] < 16 and abs(macs / dgc_fidelity.macs_of(dense) - 0.5) < 0.03
    grouped = dgc_fidelity.static_group(dgc_fidelity.resnet_cifar(8, in_channels=1), 2)
    convs = [m for n, m in grouped.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("features.")]
    assert convs and all(m.groups == 2 for m in convs)
    assert dgc_fidelity.macs_of(grouped) < 0.52 * dgc_fidelity.macs_of(dense)
    x = torch.randn(2, 1, 28, 28)
    assert grouped.eval()(x).shape == (2, 10)


def test_sconv_static_matched_copies_the_export_widths():
    base = sconv_fidelity.densenet_cifar(16, 8, in_channels=1)
    widths = sconv_fidelity.conv_widths(base)
    target = dict(widths, **{"features.0.0.brc1.conv": 27, "features.2.1.brc1.conv": 29})
    slim, ratios = sconv_fidelity.static_matched(base, target)
    assert set(ratios) == {"features.0.0.brc1.conv", "features.2.1.brc1.conv"}
    assert sconv_fidelity.conv_widths(slim) == target
