"""Two CPU processes (gloo) training the same network as sd-scripts does under accelerate: DDP around the network,
gradients all-reduced by hand, with and without gradient checkpointing and with module/rank dropout. Both ranks
must end with identical adapter weights."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Block(nn.Module):
    pass


Block.__name__ = "Transformer2DModel"


def _model() -> nn.Module:
    torch.manual_seed(0)
    block = Block()
    block.proj_in = nn.Linear(8, 16)
    block.conv = nn.Conv2d(16, 16, 3, padding=1)
    block.proj_out = nn.Linear(16, 8)
    root = nn.Module()
    root.block = block
    return root.requires_grad_(False)


def _forward(model: nn.Module, x: torch.Tensor, checkpoint: bool) -> torch.Tensor:
    def body(inp: torch.Tensor) -> torch.Tensor:
        h = model.block.proj_in(inp)  # (B, T, 16)
        h = model.block.conv(h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 4)).mean(-1).transpose(1, 2)
        return model.block.proj_out(torch.relu(h))

    if checkpoint:
        from torch.utils.checkpoint import checkpoint as ckpt

        return ckpt(body, x, use_reentrant=True)  # sd-scripts' SDXL UNet uses reentrant checkpointing
    return body(x)


def _worker(rank: int, port: int, kwargs: dict, checkpoint: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from dora_network import create_network

    model = _model()
    network = create_network(1.0, 4, 2, None, None, model, conv_dim="4", **kwargs)
    network.apply_to(None, model)
    optimizer = torch.optim.AdamW(network.prepare_optimizer_params(None, 1e-2, 1e-2))
    network.prepare_grad_etc(None, model)
    wrapped = nn.parallel.DistributedDataParallel(network)  # what accelerator.prepare does with several processes
    network.on_epoch_start(None, model)
    torch.manual_seed(100 + rank)  # different data and dropout draws per rank
    for _ in range(4):
        x = torch.randn(2, 5, 8).requires_grad_(True)
        loss = _forward(model, x, checkpoint).square().mean()
        loss.backward()
        for param in wrapped.parameters():  # sd-scripts' manual all-reduce over the wrapped network
            if param.grad is not None:
                dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                param.grad /= 2
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    digest = hashlib.sha256(b"".join(v.detach().numpy().tobytes() for _, v in sorted(network.state_dict().items())))
    with open(f"{out}.{rank}", "w") as handle:
        handle.write(digest.hexdigest())
    # both ranks done, then the DDP reducer (it holds gloo work) goes before its process group: tearing the group
    # down under a live reducer can abort the process at exit ("terminate called without an active exception")
    dist.barrier()
    del wrapped
    dist.destroy_process_group()
    # Everything under test is done and written. Interpreter finalisation still aborts about one run in four here
    # (torch 2.13 CPU, gloo: a C++ thread destroyed while joinable, no Python frame on the stack, our package starts
    # no threads), so the worker leaves without running finalisers; a real failure above still raises first.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint, kwargs", [
    (False, {}),
    (True, {"module_dropout": "0.5", "rank_dropout": "0.3"}),
    (True, {"wd_on_out": "True", "dropout": "0.1"}),
])
def test_two_ranks_end_with_identical_weights(tmp_path, checkpoint, kwargs):
    out = str(tmp_path / "digest")
    mp.start_processes(_worker, args=(_free_port(), kwargs, checkpoint, out), nprocs=2, join=True,
                       start_method="spawn")
    digests = [open(f"{out}.{rank}").read() for rank in range(2)]
    assert digests[0] == digests[1]


def test_module_dropout_keeps_every_parameter_in_the_graph():
    from dora_network import create_network

    model = _model()
    network = create_network(1.0, 4, 2, None, None, model, conv_dim="4", module_dropout="0.999")
    network.apply_to(None, model)
    network.train()
    _forward(model, torch.randn(2, 5, 8).requires_grad_(True), False).sum().backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)  # dropped, but present
