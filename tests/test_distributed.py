"""DDP: two gloo processes with the documented wrapper equal one process on the whole batch."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import nir_loss

C, D, WORLD = 5, 8, 2
FLOW = dict(num_blocks=2, hidden_features=16, num_layers=3, identity_init=False)


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


def worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, loss_fn = make_model_and_loss()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        wrapped = nir_loss.DistributedLossWrapper(loss_fn)  # the recipe in the docs
        x, y = data()
        part = slice(rank * 6, (rank + 1) * 6)
        wrapped(F.normalize(ddp(x[part]), dim=1), y[part]).backward()
        results[rank] = grads(model, loss_fn)
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
        per_rank = [dict(results[r]) for r in range(WORLD)]
    for rank_grads in per_rank:
        assert rank_grads.keys() == expected.keys()
        for name, g in expected.items():
            torch.testing.assert_close(rank_grads[name], g, atol=1e-10, rtol=1e-8, msg=name)


def test_efficient_mode_is_rejected_with_the_fix():
    try:
        nir_loss.DistributedLossWrapper(make_model_and_loss()[1], efficient=True)
    except ValueError as err:
        assert "efficient=False" in str(err)
    else:
        raise AssertionError("efficient=True must be rejected")
