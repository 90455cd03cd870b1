"""DDP: two gloo processes with the documented wrapper equal one process on the whole batch."""

import copy
import io
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pytorch_metric_learning.utils import distributed as pml_distributed

import nir_loss

from .helpers import FLOW

C, D, WORLD = 5, 8, 2


def make_model_and_loss():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, D).double()
    loss_fn = nir_loss.ProxyAnchorNIRLoss(C, D, nir_weight=0.5, flow_options=FLOW, noise_std=0.0).double()
    return model, loss_fn


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 16, generator=g, dtype=torch.float64), torch.randint(0, C, (12,), generator=g)


def grads(model, loss_fn):
    named = {f"model.{k}": p for k, p in model.named_parameters()}
    named.update({f"loss.{k}": p for k, p in loss_fn.named_parameters()})
    return {k: p.grad.clone() for k, p in named.items()}


def _saved_and_loaded(wrapper):
    buffer = io.BytesIO()
    torch.save(wrapper, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# How the wrapper is obtained: the recipe in the docs, and what users do with it besides.
VARIANTS = {
    "recipe": lambda loss_fn: nir_loss.DistributedLossWrapper(loss_fn),
    "wrapped twice": lambda loss_fn: [nir_loss.DistributedLossWrapper(loss_fn) for _ in range(2)][1],
    "deep copy": lambda loss_fn: copy.deepcopy(nir_loss.DistributedLossWrapper(loss_fn)),
    "pickle": lambda loss_fn: pickle.loads(pickle.dumps(nir_loss.DistributedLossWrapper(loss_fn))),
    "torch.save/load": lambda loss_fn: _saved_and_loaded(nir_loss.DistributedLossWrapper(loss_fn)),
}


def worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, y = data()
        part = slice(rank * 6, (rank + 1) * 6)
        for name, make_wrapper in VARIANTS.items():
            model, loss_fn = make_model_and_loss()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            wrapped = make_wrapper(loss_fn)
            wrapped(F.normalize(ddp(x[part]), dim=1), y[part]).backward()
            results[(rank, name)] = grads(model, wrapped.loss)  # a copied wrapper holds a copied loss
        # Training noise on, and each rank's RNG in its own state (as data augmentation leaves it):
        # the loss on the gathered batch, hence the loss's parameters' gradient, is still the same.
        torch.manual_seed(0)
        loss_fn = nir_loss.ProxyAnchorNIRLoss(C, D, nir_weight=0.5, flow_options=FLOW).double()
        wrapped = nir_loss.DistributedLossWrapper(loss_fn)
        torch.manual_seed(100 + rank)
        for _ in range(2):
            wrapped(F.normalize(x[part, :D], dim=1), y[part]).backward()
        results[(rank, "noise")] = {k: p.grad.clone() for k, p in loss_fn.named_parameters()}
        results[(rank, "rng after")] = {"state": torch.random.get_rng_state()}
        torch.manual_seed(100 + rank)
        results[(rank, "rng expected")] = {"state": torch.random.get_rng_state()}
        # A miner's indices_tuple names positions in PML's gathered batch (local part first).
        _, loss_fn = make_model_and_loss()
        tup = (torch.tensor([0, 1, 4]), torch.tensor([2, 3, 5]))
        emb = F.normalize(x[part, :D], dim=1)
        ours, pml = nir_loss.DistributedLossWrapper(loss_fn), pml_distributed.DistributedLossWrapper(loss_fn)
        results[(rank, "miner")] = {"ours": ours(emb, y[part], tup).detach(), "pml": pml(emb, y[part], tup).detach()}
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process():
    model, loss_fn = make_model_and_loss()
    x, y = data()
    loss_fn(F.normalize(model(x), dim=1), y).backward()
    expected = grads(model, loss_fn)

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), results), nprocs=WORLD, join=True)
        per_rank = {key: dict(results[key]) for key in results.keys()}
    noisy = [per_rank.pop((r, "noise")) for r in range(WORLD)]
    for name, g in noisy[0].items():
        torch.testing.assert_close(noisy[1][name], g, atol=1e-12, rtol=1e-10, msg=f"noise: {name}")
    for r in range(WORLD):
        miner = per_rank.pop((r, "miner"))
        torch.testing.assert_close(miner["ours"], miner["pml"], atol=1e-12, rtol=1e-10)
    for r in range(WORLD):  # the wrapper leaves each rank's RNG where it was
        assert torch.equal(per_rank.pop((r, "rng after"))["state"], per_rank.pop((r, "rng expected"))["state"])
    assert sorted(per_rank) == sorted((r, v) for r in range(WORLD) for v in VARIANTS)
    for (rank, variant), rank_grads in per_rank.items():
        assert rank_grads.keys() == expected.keys()
        for name, g in expected.items():
            torch.testing.assert_close(
                rank_grads[name], g, atol=1e-10, rtol=1e-8, msg=f"{variant}, rank {rank}: {name}"
            )


def unequal_batches_worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, y = data()
        part = slice(0, 6) if rank == 0 else slice(6, 11)  # the last batch of an epoch: 6 and 5
        wrapped = nir_loss.DistributedLossWrapper(make_model_and_loss()[1])
        try:
            wrapped(F.normalize(x[part, :D], dim=1), y[part])
            results[rank] = "no error"
        except ValueError as e:
            results[rank] = str(e)
        full = wrapped(F.normalize(x[rank * 6 : rank * 6 + 6, :D], dim=1), y[rank * 6 : rank * 6 + 6])
        results[(rank, "next call")] = bool(torch.isfinite(full))  # the process group still works
    finally:
        dist.destroy_process_group()


def test_unequal_batch_sizes_raise_one_clear_error_on_every_rank():
    """gloo used to fail inside all_gather ("Received data size doesn't match") on one rank and
    with a reset connection on the other."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(unequal_batches_worker, args=(free_port(), results), nprocs=WORLD, join=True)
        results = dict(results)
    for rank in range(WORLD):
        assert "batch sizes [6, 5] (rank 0 first)" in results[rank] and "drop_last=True" in results[rank]
        assert results[(rank, "next call")]


def test_efficient_mode_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="use efficient=False"):
        nir_loss.DistributedLossWrapper(make_model_and_loss()[1], efficient=True)
