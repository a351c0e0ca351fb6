"""graphsel on torch.distributed, with real processes (``tests/distributed_workers.py``: spawn, gloo on
loopback, a FileStore, 30 s collective timeouts and a deadline on every launch, so nothing hangs).

For each method, two ranks with different data run the training helpers through rewiring steps,
inside DistributedDataParallel with its default settings where there is training; afterwards the
ranks hold bit-identical parameters, buffers and rewiring state, and where the method is
deterministic the two ranks equal one process on the concatenated data. A rank that dies or a
collective that times out ends with a DistributedError naming the collective and the rank.

The parent process never initialises torch.distributed: its single-process references run the
ordinary, unchanged code path.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from graphsel import distributed as gd
from graphsel.errors import DistributedError, GraphselError
from graphsel.passes import selective_conv as sc
import distributed_workers as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    """Every method's scenario on two ranks, launched once for the session (W.METHODS)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                          # shared by this session's workers
    return W.launch_once("methods", root)


def ranks(runs: list[dict], scenario: str) -> list[dict]:
    """Each rank's result of ``scenario``; fails with the ranks' tracebacks when it raised."""
    results = [r[scenario] for r in runs]
    errors = [f"--- rank {i}:\n{r['error']}" for i, r in enumerate(results) if "error" in r]
    if errors:
        pytest.fail(f"scenario {scenario!r} failed:\n" + "\n".join(errors), pytrace=False)
    return results


def same_state(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (bit for bit) between two ``W.state`` results."""
    assert a.keys() == b.keys()
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


# -- one process ---------------------------------------------------------------------------------

def test_without_an_initialised_group_every_collective_is_the_identity():
    assert not gd.initialized() and gd.resolve_group() is None
    assert gd.rank(None) == 0 and gd.world_size(None) == 1
    t = torch.arange(5.0)
    assert gd.all_reduce_sum(t, None, what="x") is t and gd.all_gather_rows(t, None, what="x") is t
    assert gd.broadcast_object({"a": 1}, None, what="x") == {"a": 1} and gd.all_gather_object(3, None, what="x") == [3]
    assert gd.sum_over([1, 2.5], None, what="x") == [1.0, 2.5]
    gd.assert_replicas_equal(torch.nn.Linear(2, 2))           # nothing to compare with
    with pytest.raises(DistributedError, match="not initialised"):
        gd.resolve_group(object())


def test_order_statistics_are_the_sorted_values():
    v = torch.rand(1000).abs()
    v[::7] = 0.0
    v[3] = float("nan")
    ranks = [0, 1, 499, 998, 999]
    expected = torch.sort(v).values[ranks].tolist()
    got = gd.order_statistics(v, ranks, None, what="x")
    assert got[:4] == expected[:4] and got[4] != got[4]         # NaN sorts last, as in torch.sort
    with pytest.raises(ValueError, match="non-negative"):
        gd.order_statistics(-v[1:3], [0], None, what="x")


def test_a_failed_collective_names_what_and_why():
    err = gd._error("dealloc of 'layer1'", "all_reduce", None, RuntimeError(
        "[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:8878: Connection reset by peer."))
    assert isinstance(err, GraphselError) and isinstance(err, RuntimeError)
    assert (err.collective, err.rank, err.world_size) == ("all_reduce", 0, 1)
    assert "dealloc of 'layer1': all_reduce failed on rank 0 of 1: a peer closed its connection" in str(err)
    late = gd._error("x", "broadcast", None, RuntimeError("Timed out waiting 3000ms for recv operation to complete"))
    assert "did not answer within the process group's timeout" in str(late) and "init_process_group(timeout" in str(late)


def test_sconv_single_process_forward_leaves_unused_shifts_without_gradient():
    """The DDP anchor is for torch.distributed only: one process keeps shift.grad None while no slot
    is a copy (optimizers with per-parameter step counts see no change)."""
    gm = W.sconv_model().train()
    torch.nn.functional.cross_entropy(gm(torch.randn(4, 3, 6, 6)), torch.tensor([0, 1, 2, 3])).backward()
    shifts = [m.shift for _, m in sc.selective_modules(gm)]
    assert shifts and all(s.grad is None for s in shifts)


# -- SConv ---------------------------------------------------------------------------------------

def test_sconv_ranks_rewire_identically_under_ddp_defaults(runs):
    """DDP with find_unused_parameters=False trains through epochs without copies (every shift
    takes part) and through the schedule's dealloc/realloc with seed=None and module-level
    realloc(gm) with the global generator, each rank seeded differently: rank 0 decides."""
    a, b = ranks(runs, "sconv")
    assert a["losses"] != b["losses"]                               # the ranks saw different data
    assert same_state(a["state"], b["state"]) == []                 # parameters, buffers, slots, shifts
    assert a["records"] == b["records"] and a["closed"] == b["closed"] and a["copies"] == b["copies"]
    assert a["allocation"] == b["allocation"]
    assert all(torch.equal(a["slots"][p], b["slots"][p]) for p in a["slots"])   # before DDP's buffer broadcast
    assert sum(layer[2] for rec in a["records"] if rec for layer in rec) > 0     # the schedule re-allocated
    assert any(a["copies"].values())
    assert a["alone_shifts"] != b["alone_shifts"]                   # the control: each rank's own draws differ


def test_rewiring_inside_ddp_then_rewrap_and_the_replica_check(runs):
    """The README's order: SelectiveSchedule(compensate=True) refuses the DDP wrapper; built on the
    module it adds conv biases, which assert_replicas_equal reports as unknown to the stale wrapper;
    rewrap builds a new one (the optimizer already had them) and, once nothing is new, keeps it and
    re-broadcasts the buffers. A parameter changed on one rank is named by the check on every rank."""
    a, b = ranks(runs, "ddp_rewiring")
    for r in (a, b):
        assert "compensate=True gives 2 convolution(s) a new bias" in r["refused"] and "rewrap" in r["refused"]
        assert "stale: 2 parameter(s) it was not built with (3.conv.bias, 6.conv.bias)" in r["stale"]
        assert r["first"]["rebuilt"] and r["first"]["added"] == ["3.conv.bias", "6.conv.bias"]
        assert all("already in parameter group" in note for note in r["first"]["optimizer"])
        assert r["later"] == [False, False, False] and r["biases"] == [True, True]     # compensation ran
        assert r["mismatch"]["name"] == "6.conv.weight" and r["mismatch"]["ranks"] == [1]
        assert "parameter '6.conv.weight'" in r["mismatch"]["message"] and "max |difference| 0.001" in \
            r["mismatch"]["message"]
    assert same_state(a["state"], b["state"]) == []


def test_fsdp2_trains_a_rewired_model_and_refuses_to_rewire_a_sharded_one(runs):
    """fully_shard (FSDP2) on CPU with gloo: an SConv model rewired before sharding trains exactly as
    under DDP; dealloc on the sharded model is a clear error; DGC's calibration through the sharded
    model gives the union threshold; buffers are each rank's own until sync_buffers."""
    a, b = ranks(runs, "fsdp")
    union = W.dgc_calibration(W.dgc_model(), W.dgc_data(0) + W.dgc_data(1))
    for r in (a, b):
        assert r["copies"] > 0 and r["gap"] == 0.0
        assert "sharded (FSDP2 fully_shard)" in r["refused"] and "before sharding" in r["refused"]
        assert r["t_data"] == union["t_data"]
    assert same_state(a["full"], b["full"]) == []
    assert same_state(a["buffers"], b["buffers"]) != [] and same_state(a["synced"], b["synced"]) == []


# -- DGC -----------------------------------------------------------------------------------------

def test_dgc_global_threshold_is_the_union_threshold_on_every_rank(runs):
    """Calibrated from data or from a library on two ranks with different data (and batch sizes):
    the same T on both, bit for bit the single-process T of the union; then DGCTraining's
    calibrations inside DDP keep the replicas identical."""
    a, b = ranks(runs, "dgc_")
    union = W.dgc_calibration(W.dgc_model(), W.dgc_data(0) + W.dgc_data(1))
    alone = W.dgc_calibration(W.dgc_model(), W.dgc_data(0))
    for key in ("t_data", "t_lib", "rates"):
        assert a[key] == b[key] == union[key], key
    assert a["t_data"] != alone["t_data"] and a["t_lib"] != alone["t_lib"]   # rank 0's own data gives another T
    assert all(torch.equal(a["keep"][p], union["keep"][p]) and torch.equal(b["keep"][p], union["keep"][p])
               for p in union["keep"])
    assert len(a["history"]) == 2 and a["history"] == b["history"]
    assert same_state(a["state"], b["state"]) == []


# -- DCP -----------------------------------------------------------------------------------------

def test_dcp_selection_on_two_ranks_is_one_process_on_the_concatenated_batches(runs):
    """The dcp pass (head fitting, greedy selection, masked SGD) with each rank's own batches:
    the same channels, weights and heads on both ranks, equal to one process whose batch i is the
    ranks' batches i concatenated; phase 1 fine-tuning (both modes) keeps the replicas identical."""
    a, b = ranks(runs, "dcp_")
    union = W.dcp_selection(W.concatenated([W.dcp_data(0), W.dcp_data(1)]))
    assert a["order"] == b["order"] == union["order"]
    assert all(len(kept) for kept in a["order"].values())
    assert same_state(a["selected"], b["selected"]) == [] and a["head_fit"] == b["head_fit"]
    for k, v in union["selected"].items():
        assert torch.allclose(a["selected"][k].double(), v.double(), rtol=1e-4, atol=1e-6), k
    for p, losses in union["losses"].items():
        assert a["losses"][p] == pytest.approx(losses, rel=1e-4)
    assert a["head_fit"] == pytest.approx(union["head_fit"], rel=1e-4)
    assert same_state(a["finetuned"], b["finetuned"]) == []
    assert a["finetune_losses"] == b["finetune_losses"]


# -- BSN -----------------------------------------------------------------------------------------

def test_bsn_baseline_is_the_global_batch_mean_and_ddp_defaults_train(runs):
    """BudgetedTrainer around DDP (default settings) through a warm-up epoch, where no logit is in
    the loss, and a sampling epoch with each rank's own draws: identical replicas and epoch
    records. With the same architecture per sample (fixed draws), the baseline, the gate
    statistics and the gradients of two ranks equal one process's on the concatenated batch."""
    from graphsel.passes import bsn
    a, b = ranks(runs, "bsn_")
    assert same_state(a["state"], b["state"]) == []
    assert a["history"] == b["history"] and [h["sampling"] for h in a["history"]] == [False, True]
    x, y = W.concatenated([W.bsn_data(0), W.bsn_data(1)])[0]
    one = W.bsn_step(bsn.BudgetedTrainer(W.bsn_model(), fraction=0.6), x, y, offset=0)
    for rank in (a, b):
        step = rank["step"]
        assert step["baseline"] == pytest.approx(one["baseline"], rel=1e-6)
        assert step["gate_on"] == one["gate_on"] and 0 < min(one["gate_on"]) and max(one["gate_on"]) < 1
        assert step["grads"].keys() == one["grads"].keys()
        for k, g in one["grads"].items():
            assert torch.allclose(step["grads"][k], g, rtol=1e-5, atol=1e-7), k


# -- failures ------------------------------------------------------------------------------------

def test_a_silent_or_dead_rank_is_a_clear_error_within_the_timeout(tmp_path):
    """Rank 1 says nothing for 6 s, then exits. Rank 0's dealloc on a group with a 2 s timeout and
    then its schedule step on the default group end with DistributedError naming the call, the
    collective and the rank: no hang."""
    a, _ = W.launch("failures", tmp_path, dying=(1,), deadline_s=120)
    timeout, died = a["timeout"], a["died"]
    for case in (timeout, died):
        assert case["raised"] == "DistributedError"
        assert (case["rank"], case["world_size"]) == (0, 2) and case["collective"] == "broadcast_object_list from rank 0"
        assert "dealloc of '3': broadcast_object_list from rank 0 failed on rank 0 of 2" in case["message"]
        assert case["seconds"] < 60
    assert "did not answer within the process group's timeout" in timeout["message"] and timeout["seconds"] >= 1.9
    assert "a peer closed its connection (it exited or crashed)" in died["message"]
