"""torch.distributed on CPU (gloo, 2 spawned processes): distributed curvature equals the
single-process result on the same data, and the DDP/rank-0 helpers behave."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eigendamage import distributed as ed_dist
from eigendamage.curvature import collect_kfac, eigendecompose
from eigendamage.curvature.distributed import assign_by_cost, distributed_eigh
from eigendamage.errors import CurvatureError, OutputExistsError

WORLD = 2
BATCHES = 5  # odd: the ranks get unequal shares (3 and 2 batches)


def model_and_data() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5),
    )
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g))]
    data += [
        (torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g))
        for _ in range(BATCHES - 1)
    ]
    return model, data


def curvature_outputs(distributed: bool | None) -> dict:
    """Everything compared between the two-process run and one process."""
    model, data = model_and_data()
    common = dict(fisher="true", samples=2, seed=3, distributed=distributed)
    computed: list[int] = []
    out = {
        "patch": collect_kfac(model, data, diag=True, progress=computed.append, **common),
        "channel": collect_kfac(model, data, conv_mode="channel", **common),
        "diagonal_a": collect_kfac(model, data, max_dense=20, **common),
        "one_batch": collect_kfac(model, data, batches=1, **common),  # rank 1 gets none
    }
    out["kfe"] = eigendecompose(out["channel"], drop_bias=True, distributed=distributed)
    out["computed"] = sorted(set(computed))  # batch indices this process ran
    return out


def as_tensors(out: dict) -> dict[str, torch.Tensor]:
    flat = {"computed": torch.tensor(out.get("computed", []))}
    for key, per_layer in out.items():
        if key == "computed":
            continue
        for name, v in per_layer.items():
            if key == "kfe":
                flat[f"{key}.{name}.lamA"] = v.A.lam
                flat[f"{key}.{name}.lamS"] = v.S.lam
                # eigenvectors up to sign: compare the projector-weighted reconstruction
                flat[f"{key}.{name}.A"] = (v.A.Q * v.A.lam.unsqueeze(-2)) @ v.A.Q.transpose(-1, -2)
                flat[f"{key}.{name}.S"] = (v.S.Q * v.S.lam.unsqueeze(-2)) @ v.S.Q.transpose(-1, -2)
            else:
                flat[f"{key}.{name}.A"] = v.A
                flat[f"{key}.{name}.S"] = v.S
                flat[f"{key}.{name}.bounds"] = torch.tensor([v.a_rank_bound, v.s_rank_bound])
                if "diag" in v.extra:
                    flat[f"{key}.{name}.diag"] = v.extra["diag"]
    return flat


def ddp_steps(model: nn.Module, loader, steps: int) -> nn.Module:
    """Plain SGD steps on mean cross-entropy, through the DDP helpers."""
    net = ed_dist.wrap_ddp(model)
    loader = ed_dist.shard_loader(loader)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model


def ddp_problem() -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    return model, loader


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    info = ed_dist.init_from_env()
    assert (info.rank, info.world_size, info.backend) == (rank, WORLD, "gloo")
    results = as_tensors(curvature_outputs(None))
    # rank 0's exception reaches every rank (no rank left waiting in a collective)
    try:
        ed_dist.on_main(_refuse)
        results["on_main_raised"] = torch.tensor(0)
    except OutputExistsError:
        results["on_main_raised"] = torch.tensor(1)
    results["on_main_value"] = torch.tensor(ed_dist.on_main(lambda: 40 + 2 + rank))
    # an eigendecomposition failing on one rank raises on every rank (no hang)
    try:
        distributed_eigh([torch.eye(3), torch.eye(4)], _fail_on_rank_1, rank, WORLD)
        results["eigh_failure_raised"] = torch.tensor(0)
    except CurvatureError:
        results["eigh_failure_raised"] = torch.tensor(1)
    # per-rank factors merged afterwards == factors of all the data
    model, data = model_and_data()
    mine = collect_kfac(model, data[rank::WORLD], fisher="empirical", distributed=False)
    merged = ed_dist.all_reduce_factors(mine)
    for name, f in merged.items():
        results[f"merged.{name}.A"], results[f"merged.{name}.S"] = f.A, f.S
        results[f"merged.{name}.bounds"] = torch.tensor([f.a_rank_bound, f.s_rank_bound])
    # DDP: two half batches per step == one process on the whole batch
    model, loader = ddp_problem()
    for p in model.parameters():  # different starting points: broadcast must fix them
        p.data += rank
    ed_dist.broadcast_module(model)
    for k, p in enumerate(ddp_steps(model, loader, 3).parameters()):
        results[f"ddp.{k}"] = p.detach()
    torch.save(results, Path(tmp) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _fail_on_rank_1(part: list[torch.Tensor]) -> list:
    if dist.get_rank() == 1:
        raise CurvatureError("eigh did not converge; raise the damping")
    return [torch.linalg.eigh(m) for m in part]


def _refuse() -> None:
    raise OutputExistsError("output directory exists")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_distributed_factors_and_eigenbases_equal_single_process(two_ranks):
    single = as_tensors(curvature_outputs(False))
    assert single.pop("computed").tolist() == list(range(BATCHES))
    for r, results in enumerate(two_ranks):
        assert results.pop("computed").tolist() == list(range(r, BATCHES, WORLD))
        for key, ref in single.items():
            torch.testing.assert_close(
                results[key],
                ref,
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, k=key, r=r: f"rank {r} {k}: {m}",
            )


def test_diagonal_fallback_is_the_diagonal_of_the_dense_factor(two_ranks):
    dense = as_tensors({"patch": curvature_outputs(False)["patch"]})
    for name in ("0", "2", "4"):
        a = two_ranks[0][f"diagonal_a.{name}.A"]
        full = dense[f"patch.{name}.A"]
        if a.dim() == full.dim():  # this layer stayed dense (side <= max_dense)
            torch.testing.assert_close(a, full)
        else:
            torch.testing.assert_close(a, torch.diagonal(full, dim1=-2, dim2=-1))


def test_merging_per_rank_factors_equals_factors_of_all_data(two_ranks):
    model, data = model_and_data()
    ref = collect_kfac(model, data, fisher="empirical", distributed=False)
    for results in two_ranks:
        for name, f in ref.items():
            torch.testing.assert_close(results[f"merged.{name}.A"], f.A)
            torch.testing.assert_close(results[f"merged.{name}.S"], f.S)
            assert results[f"merged.{name}.bounds"].tolist() == [f.a_rank_bound, f.s_rank_bound]


def test_errors_and_rank_zero_results_reach_every_rank(two_ranks):
    assert all(int(r["on_main_raised"]) == 1 for r in two_ranks)
    assert all(int(r["on_main_value"]) == 42 for r in two_ranks)  # rank 0's value
    assert all(int(r["eigh_failure_raised"]) == 1 for r in two_ranks)


def test_ddp_steps_equal_single_process_full_batch_steps(two_ranks):
    model, loader = ddp_problem()
    ref = list(ddp_steps(model, loader, 3).parameters())
    for results in two_ranks:
        for k, p in enumerate(ref):
            torch.testing.assert_close(results[f"ddp.{k}"], p.detach(), rtol=1e-5, atol=1e-6)


def test_helpers_are_identity_in_one_process():
    model, loader = ddp_problem()
    assert ed_dist.init_from_env().world_size == 1 or ed_dist.is_distributed()
    assert ed_dist.is_main() and ed_dist.world_size() == 1
    assert ed_dist.wrap_ddp(model) is model and ed_dist.shard_loader(loader) is loader
    assert ed_dist.on_main(lambda: 7) == 7


def test_sharded_sampler_partitions_one_permutation():
    shares = [list(ed_dist.ShardedSampler(10, r, 3, shuffle=True, seed=4)) for r in range(3)]
    assert all(len(s) == 4 for s in shares)  # padded to 12 = 3 x 4
    assert set().union(*map(set, shares)) == set(range(10))
    again = list(ed_dist.ShardedSampler(10, 1, 3, shuffle=True, seed=4))
    assert again == shares[1]


def test_work_assignment_balances_cubic_costs():
    owners = assign_by_cost([8.0, 1.0, 1.0, 4.0, 4.0], 2)
    loads = [sum(c for c, o in zip([8, 1, 1, 4, 4], owners, strict=True) if o == r) for r in (0, 1)]
    assert sorted(loads) == [9, 9]


def _prune_cli(out: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    args = ["prune", "--model", "tiny-mlp", "--data", "digits", "--method", "eigendamage"]
    args += ["--ratio", "0.5", "--rounds", "2", "--fisher-batches", "3", "--finetune-epochs"]
    args += ["1", "--device", "cpu", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*launcher, "-m", "eigendamage.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_prune_cli_under_torchrun_writes_once_and_matches_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-port", str(_free_port())]
    ddp = _prune_cli(tmp_path / "ddp", torchrun)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _prune_cli(tmp_path / "single", [sys.executable])
    assert single.returncode == 0, single.stderr[-3000:]
    # Rank 0 alone printed the summary and wrote the run; the files are complete.
    assert ddp.stdout.count("pruned") == single.stdout.count("pruned") == 1
    files = sorted(p.relative_to(tmp_path / "ddp") for p in (tmp_path / "ddp").rglob("*"))
    assert files == sorted(
        p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*")
    )
    m_ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    m_one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    # Round 1 prunes the same model (factors are all-reduced: equal up to summation order);
    # fine-tuning under DDP sees the same global batches in another split, so later rounds
    # may differ slightly but must stay in the same budget.
    assert m_ddp["rounds"][0]["params"] == m_one["rounds"][0]["params"]
    assert (
        abs(m_ddp["after"]["params"] - m_one["after"]["params"]) <= 0.05 * m_one["after"]["params"]
    )
    # Starting again into the same directory stops both ranks with rank 0's verdict.
    again = _prune_cli(tmp_path / "ddp", torchrun)
    assert again.returncode != 0 and "exists" in again.stderr
