"""Data-parallel fits: two gloo processes on CPU give the gates of one process on the same global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chg_tlens import CHGConfig, fit_chg
from chg_tlens.core import distributed
from chg_tlens.core.distributed import local_slice
from chg_tlens.testbeds.planted import repeat_circuit

CONFIG = dict(n_seeds=2, steps=30, batch_size=16, progress=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        circuit = repeat_circuit()
        result = fit_chg(circuit.model, circuit.data(64, 0), CHGConfig(**CONFIG))
        if rank == 0:
            torch.save({"plus": result.theta_plus, "minus": result.theta_minus,
                        "nll": result.losses["zero"]["nll"]}, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process(tmp_path):
    out = str(tmp_path / "gates.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    parallel = torch.load(out)
    torch.set_num_threads(1)
    circuit = repeat_circuit()
    single = fit_chg(circuit.model, circuit.data(64, 0), CHGConfig(**CONFIG))
    assert torch.allclose(parallel["plus"], single.theta_plus, atol=1e-5, rtol=0)
    assert torch.allclose(parallel["minus"], single.theta_minus, atol=1e-5, rtol=0)
    assert torch.allclose(parallel["nll"], single.losses["zero"]["nll"], atol=1e-5)


def test_one_process_takes_the_whole_batch():
    index = torch.randperm(8, generator=torch.Generator().manual_seed(0))  # a batch, in its drawn order
    assert torch.equal(local_slice(index), index)


@pytest.mark.parametrize("size", [2, 4])
def test_each_process_takes_its_own_contiguous_share_and_together_the_whole_batch(monkeypatch, size):
    index = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shares = []
    for rank in range(size):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, size))
        shares.append(local_slice(index))
    assert all(len(share) == 8 // size for share in shares)
    assert torch.equal(torch.cat(shares), index)  # disjoint, in rank order, nothing lost or repeated
    uneven = []
    for rank in range(3):  # 8 examples on 3 processes: 3 + 3 + 2, still the whole batch once
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        uneven.append(local_slice(index))
    assert [len(share) for share in uneven] == [3, 3, 2] and torch.equal(torch.cat(uneven), index)
