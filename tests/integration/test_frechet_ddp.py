"""FrechetDistance under DDP: 2 CPU processes (gloo) feeding disjoint halves equal one process on everything."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drifting_lightning.metrics.frechet import FrechetDistance

WORLD = 2


def features() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(600, 16, generator=g), torch.randn(500, 16, generator=g) * 1.2 + 0.3


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    real, fake = features()
    fd, ref_fd = FrechetDistance(num_features=16), FrechetDistance(num_features=16)
    # Disjoint, unequal shares in several batches per rank.
    for x, is_real in ((real, True), (fake, False)):
        share = x[: len(x) // 3] if rank == 0 else x[len(x) // 3 :]
        for batch in share.split(70):
            fd.update(batch, is_real)
            if not is_real:
                ref_fd.update(batch, False)
    ref_fd.set_reference(real.double().mean(0), torch.cov(real.double().T))
    results = {"fd": fd.compute(), "ref_fd": ref_fd.compute()}
    results["fake_n"] = fd.fake_n.clone()  # local state again after compute (unsynced)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_reduction_equals_single_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    real, fake = features()
    single = FrechetDistance(num_features=16)
    single.update(real, True)
    single.update(fake, False)
    expected = single.compute().item()

    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(out["fd"].item() - expected) < 1e-8
        assert abs(out["ref_fd"].item() - expected) < 1e-8
        assert out["fake_n"].item() == (len(fake) // 3 if rank == 0 else len(fake) - len(fake) // 3)
